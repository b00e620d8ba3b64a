//! tmem-api (placeholder; being written).
