//! tmem-work (placeholder; being written).
fn main() {}
