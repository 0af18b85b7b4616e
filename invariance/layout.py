"""Where everything lives under the output prefix (hive-style, one writer per key).

    stir/settings=<hash>/epoch=<e>/<ref_model>_layer<j>_seed<s>.parquet   STIR shards
    cka/settings=<hash>/epoch=<e>/cka.parquet                             CKA shards
    _manifests/settings=<hash>/...                                        completion records
    _manifests/inversions/<hash>/layer<j>_seed<s>.json                    cached pt inversions
    _cache/inversions/<hash>/layer<j>_seed<s>.safetensors                 X' of pt[j], seed s
    reduced/curves.parquet, reduced/flow.parquet, reduced/status.json
    plots/*.png, plots/flow/epoch=<e>.png

Completion records live outside the scanned data folders, so
``pl.scan_parquet(".../stir/**/*.parquet", hive_partitioning=True)`` reads only data.
"""

from __future__ import annotations

from dataclasses import dataclass

MANIFESTS = "_manifests"
REDUCED_CURVES = "reduced/curves.parquet"
REDUCED_FLOW = "reduced/flow.parquet"
REDUCED_STATUS = "reduced/status.json"
PLOTS = "plots"


@dataclass(frozen=True, order=True)
class StirUnit:
    """One STIR shard: (checkpoint, reference model, reference layer, seed)."""

    epoch: int
    ref_model: str
    ref_layer: int
    seed: int
    checkpoint: str
    checkpoint_url: str

    def data_key(self, settings: str) -> str:
        return f"stir/settings={settings}/epoch={self.epoch}/{self.ref_model}_layer{self.ref_layer}_seed{self.seed}.parquet"

    def record_key(self, settings: str) -> str:
        return f"{MANIFESTS}/settings={settings}/stir/epoch={self.epoch}/{self.ref_model}_layer{self.ref_layer}_seed{self.seed}.json"


@dataclass(frozen=True, order=True)
class CkaUnit:
    """One CKA shard: every layer pair of pt and ft on X, for one checkpoint."""

    epoch: int
    checkpoint: str
    checkpoint_url: str

    def data_key(self, settings: str) -> str:
        return f"cka/settings={settings}/epoch={self.epoch}/cka.parquet"

    def record_key(self, settings: str) -> str:
        return f"{MANIFESTS}/settings={settings}/cka/epoch={self.epoch}.json"


@dataclass(frozen=True, order=True)
class InversionUnit:
    """One pretrained-model inversion X' of pt[layer] for a seed; reused by every checkpoint."""

    ref_layer: int
    seed: int

    def data_key(self, inversion_settings: str) -> str:
        return f"_cache/inversions/{inversion_settings}/layer{self.ref_layer}_seed{self.seed}.safetensors"

    def record_key(self, inversion_settings: str) -> str:
        return f"{MANIFESTS}/inversions/{inversion_settings}/layer{self.ref_layer}_seed{self.seed}.json"


def flow_plot_key(epoch: int) -> str:
    return f"{PLOTS}/flow/epoch={epoch}.png"
