"""Where everything lives: every key under an output prefix is built here and nowhere else.

Under a run's ``output`` (hive-style, one writer per key):

    stir/settings=<hash>/epoch=<e>/<ref_model>_layer<j>_seed<s>_<ckpt>.parquet   STIR shards
    cka/settings=<hash>/epoch=<e>/cka_<ckpt>.parquet                             CKA shards
    (<ckpt>: the checkpoint file's fingerprint; a file replaced under its epoch writes new shards)
    _manifests/settings=<hash>/...                                        completion records
    _manifests/inversions/<hash>/layer<j>_seed<s>.json                    cached pt inversions
    _manifests/leases/settings=<hash>.json                                the run lease
    _cache/inversions/<hash>/layer<j>_seed<s>.safetensors                 X' of pt[j], seed s
    reduced/curves.parquet, flow.parquet, robustness*.parquet, status.json
    plots/*.png, plots/flow/epoch=<e>.png

Under a finetuning run's ``output`` (``invariance finetune``):

    initial.safetensors, epoch=NN.safetensors, metrics/epoch=NN.parquet, _state/last.pt

Completion records live outside the scanned data folders, so
``pl.scan_parquet(".../stir/**/*.parquet", hive_partitioning=True)`` reads only data.
"""

from __future__ import annotations

from dataclasses import dataclass

MANIFESTS = "_manifests"
REDUCED_CURVES = "reduced/curves.parquet"
REDUCED_FLOW = "reduced/flow.parquet"
REDUCED_STATUS = "reduced/status.json"
REDUCED_ROBUSTNESS = "reduced/robustness.parquet"
REDUCED_ROBUSTNESS_CORRELATION = "reduced/robustness_correlation.parquet"
REDUCED_ROBUSTNESS_SEARCH = "reduced/robustness_search.parquet"
REDUCED_ROBUSTNESS_EARLY = "reduced/robustness_early.parquet"
REPORT = "reports/index.html"
PLOTS = "plots"
LAYER_CURVES_PLOT = f"{PLOTS}/layer_curves.png"
DYNAMICS_PLOT = f"{PLOTS}/dynamics.png"
ROBUSTNESS_PLOT = f"{PLOTS}/robustness.png"

# a finetuning run's outputs
FINETUNE_INITIAL = "initial.safetensors"
FINETUNE_METRICS = "metrics"
FINETUNE_STATE = "_state/last.pt"
# the run-config sections (model, finetuned_model) that read the run's checkpoints
FINETUNE_ANALYSIS = "analysis.json"


def _fingerprint_suffix(fingerprint: str) -> str:
    """``_<fingerprint>`` in a shard's file name: the hive folders (settings, epoch) stay as they are."""
    return f"_{fingerprint}" if fingerprint else ""


@dataclass(frozen=True, order=True)
class StirUnit:
    """One STIR shard: (checkpoint, reference model, reference layer, seed)."""

    epoch: int
    ref_model: str
    ref_layer: int
    seed: int
    checkpoint: str
    checkpoint_url: str
    checkpoint_fingerprint: str = ""  # the file's identity: a file replaced under the same epoch is another unit

    def __str__(self) -> str:
        return f"stir {self.checkpoint} {self.ref_model}[{self.ref_layer}] seed {self.seed}"

    def _stem(self) -> str:
        return f"{self.ref_model}_layer{self.ref_layer}_seed{self.seed}{_fingerprint_suffix(self.checkpoint_fingerprint)}"

    def data_key(self, settings_hash: str) -> str:
        return f"stir/settings={settings_hash}/epoch={self.epoch}/{self._stem()}.parquet"

    def record_key(self, settings_hash: str) -> str:
        return f"{MANIFESTS}/settings={settings_hash}/stir/epoch={self.epoch}/{self._stem()}.json"


@dataclass(frozen=True, order=True)
class CkaUnit:
    """One CKA shard: every layer pair of pt and ft on X, for one checkpoint."""

    epoch: int
    checkpoint: str
    checkpoint_url: str
    checkpoint_fingerprint: str = ""

    def __str__(self) -> str:
        return f"cka {self.checkpoint}"

    def data_key(self, settings_hash: str) -> str:
        return f"cka/settings={settings_hash}/epoch={self.epoch}/cka{_fingerprint_suffix(self.checkpoint_fingerprint)}.parquet"

    def record_key(self, settings_hash: str) -> str:
        return f"{MANIFESTS}/settings={settings_hash}/cka/epoch={self.epoch}{_fingerprint_suffix(self.checkpoint_fingerprint)}.json"


@dataclass(frozen=True, order=True)
class InversionUnit:
    """One pretrained-model inversion X' of pt[layer] for a seed; reused by every checkpoint."""

    ref_layer: int
    seed: int

    def __str__(self) -> str:
        return f"pt inversion layer {self.ref_layer} seed {self.seed}"

    def data_key(self, inversion_hash: str) -> str:
        return f"_cache/inversions/{inversion_hash}/layer{self.ref_layer}_seed{self.seed}.safetensors"

    def record_key(self, inversion_hash: str) -> str:
        return f"{MANIFESTS}/inversions/{inversion_hash}/layer{self.ref_layer}_seed{self.seed}.json"


Unit = StirUnit | CkaUnit | InversionUnit


def flow_plot_key(epoch: int) -> str:
    return f"{PLOTS}/flow/epoch={epoch}.png"


def lease_key(settings_hash: str) -> str:
    return f"{MANIFESTS}/leases/settings={settings_hash}.json"


def write_probe_key(token: str) -> str:
    """A throwaway object that proves the prefix is writable."""
    return f"{MANIFESTS}/write-probe-{token}"


def finetune_checkpoint_key(epoch: int) -> str:
    return f"epoch={epoch:02d}.safetensors"


def finetune_metrics_key(epoch: int) -> str:
    return f"{FINETUNE_METRICS}/epoch={epoch:02d}.parquet"
