//! tmem-lab (placeholder; being written).
fn main() {}
