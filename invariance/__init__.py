"""invariance: what finetuning does to a vision model's invariances.

The library layer: models and layer features, eval data, inversion, CKA, STIR shards,
metric formulas, storage and config. It never imports Ray; `jobs/` orchestrates it.
"""

__version__ = "0.1.0"
