//! tmem-exports (placeholder; being written).
