//! tmem-core (placeholder; being written).
