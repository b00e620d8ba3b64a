//! tmemd (placeholder; being written).
fn main() {}
