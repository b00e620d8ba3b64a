//! tmem-guest (placeholder; being written).
fn main() {}
