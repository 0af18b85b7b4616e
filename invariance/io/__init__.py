"""Storage (fsspec, write-once), the output layout (every key), checkpoints, data readers, synthetic data."""
