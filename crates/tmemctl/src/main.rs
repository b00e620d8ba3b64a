//! tmemctl (placeholder; being written).
fn main() {}
