//! tmem-balloon (placeholder; being written).
