//! tmem-vm (placeholder; being written).
