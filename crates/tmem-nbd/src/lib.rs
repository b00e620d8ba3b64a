//! tmem-nbd (placeholder; being written).
