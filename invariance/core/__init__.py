"""The science, no storage: models and layer features, inversion, CKA, the STIR/CKA shard computation, FLOPs."""
