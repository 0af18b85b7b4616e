"""Where everything lives: every key under an output prefix is built here and nowhere else.

Under a run's ``output`` (hive-style, one writer per key):

    stir/settings=<hash>/epoch=<e>/<ref_model>_layer<j>_seed<s>_<ckpt>.parquet   STIR shards
    cka/settings=<hash>/epoch=<e>/cka_<ckpt>.parquet                             CKA shards
    <measure>/settings=<hash>/epoch=<e>/<measure>_<ckpt>.parquet   subspace, procrustes, a user's measure
    (<ckpt>: the checkpoint file's fingerprint; a file replaced under its epoch writes new shards)
    (a point of the weight path: ``_alpha<a>`` after <ckpt>, ``_alpha<a>_scale`` under extra: scale;
    alpha 1 is the checkpoint itself and keeps the plain key)
    (a study, ``{run}`` in ``checkpoints``: a ``run=<name>/`` folder after ``settings=<hash>/`` in the
    STIR, CKA and checkpoint kNN keys and their records; without ``{run}`` the keys are as above)
    knn/settings=<knn hash>/epoch=<e>/knn_<ckpt>.parquet                     kNN shards of a checkpoint
    knn/settings=<knn hash>/pretrained.parquet                              kNN shard of pt (one per run)
    <data folder>/compacted-<members hash>.parquet    the shards of a complete folder, compacted (a row group each)
    _raw/<shard key>                                  raw shards kept after compaction (``compaction.keep_raw``)
    _manifests/compacted/<compacted key>.json         a compacted file's completion record (its shards' records)
    _manifests/settings=<hash>/...                                        completion records
    _manifests/inversions/<hash>/layer<j>_seed<s>.json                    cached pt inversions
    _manifests/leases/settings=<hash>.json                                the run lease
    _cache/inversions/<hash>/layer<j>_seed<s>.safetensors                 X' of pt[j], seed s
    reduced/curves.parquet, flow.parquet, knn.parquet, robustness*.parquet, status.json
    reduced/<measure>.parquet (cka, procrustes, a user's), plots/<measure>/epoch=<e>.png
    plots/*.png, plots/flow/epoch=<e>.png, plots/interpolation/epoch=<e>.png
    plots/runs/<run>/{layer_curves,dynamics}.png, plots/runs/<run>/flow/epoch=<e>.png,
    plots/runs_compared.png                                               a study's plots

Under a finetuning run's ``output`` (``invariance finetune``):

    initial.safetensors, epoch=NN.safetensors, metrics/epoch=NN.parquet, _state/last.pt

Completion records live outside the scanned data folders, so
``pl.scan_parquet(".../stir/**/*.parquet", hive_partitioning=True)`` reads only data.
"""

from __future__ import annotations

import hashlib
import posixpath
from dataclasses import dataclass
from typing import ClassVar
from urllib.parse import quote

MANIFESTS = "_manifests"
REDUCED_CURVES = "reduced/curves.parquet"
REDUCED_FLOW = "reduced/flow.parquet"
REDUCED_KNN = "reduced/knn.parquet"
REDUCED_STATUS = "reduced/status.json"
# what the last reduce read (a hash per checkpoint of its shards) and wrote (a hash per table and figure)
REDUCED_INDEX = "reduced/index.json"
REDUCED_ROBUSTNESS = "reduced/robustness.parquet"
REDUCED_ROBUSTNESS_CORRELATION = "reduced/robustness_correlation.parquet"
REDUCED_ROBUSTNESS_SEARCH = "reduced/robustness_search.parquet"
REDUCED_ROBUSTNESS_EARLY = "reduced/robustness_early.parquet"
REPORT = "reports/index.html"
PLOTS = "plots"
ROBUSTNESS_PLOT = f"{PLOTS}/robustness.png"
KNN_LAYERS_PLOT = f"{PLOTS}/knn_layers.png"
KNN_ALPHA_PLOT = f"{PLOTS}/knn_alpha.png"
RUNS_COMPARED_PLOT = f"{PLOTS}/runs_compared.png"

# a finetuning run's outputs
FINETUNE_INITIAL = "initial.safetensors"
FINETUNE_METRICS = "metrics"
FINETUNE_STATE = "_state/last.pt"
# the run-config sections (model, finetuned_model) that read the run's checkpoints
FINETUNE_ANALYSIS = "analysis.json"


def _fingerprint_suffix(fingerprint: str) -> str:
    """``_<fingerprint>`` in a shard's file name: the hive folders (settings, epoch) stay as they are."""
    return f"_{fingerprint}" if fingerprint else ""


PLAIN_ALPHA = 1.0  # the checkpoint itself


def run_folder(run: str) -> str:
    """``run=<name>/``, the hive folder of a study's run in its keys; empty without ``{run}`` (the keys
    of a single run stay as they were). Characters other than letters, digits and ``-_.~`` are
    percent-encoded as Hive does (``lr=0.01,optimizer=sgd`` -> ``run=lr%3D0.01%2Coptimizer%3Dsgd``):
    a '=' in a folder value would break hive parsing; Polars decodes them when it scans."""
    return f"run={quote(run, safe='-_.~')}/" if run else ""


def _run_label(run: str) -> str:
    return f"{run} " if run else ""


def alpha_suffix(alpha: float, extra: str = "keep") -> str:
    """``_alpha0.25`` (``_alpha0.25_scale`` under ``interpolation.extra: scale``) in the name of a
    point of the weight path; empty for alpha 1, the checkpoint itself, whose keys stay as they were."""
    if alpha == PLAIN_ALPHA:
        return ""
    return f"_alpha{alpha:g}" + ("_scale" if extra == "scale" else "")


@dataclass(frozen=True, order=True)
class StirUnit:
    """One STIR shard: (checkpoint, reference model, reference layer, seed)."""

    measure: ClassVar[str] = "stir"

    epoch: int
    ref_model: str
    ref_layer: int
    seed: int
    checkpoint: str
    checkpoint_url: str
    checkpoint_fingerprint: str = ""  # the file's identity: a file replaced under the same epoch is another unit
    alpha: float = PLAIN_ALPHA  # the point of the weight path (1: the checkpoint)
    extra: str = "keep"  # interpolation.extra (only in the keys of alpha < 1)
    run: str = ""  # the study's run ("" without ``{run}``)

    def __str__(self) -> str:
        at = f" alpha {self.alpha:g}" if self.alpha != PLAIN_ALPHA else ""
        return f"stir {_run_label(self.run)}{self.checkpoint}{at} {self.ref_model}[{self.ref_layer}] seed {self.seed}"

    def _stem(self) -> str:
        return (f"{self.ref_model}_layer{self.ref_layer}_seed{self.seed}{_fingerprint_suffix(self.checkpoint_fingerprint)}"
                f"{alpha_suffix(self.alpha, self.extra)}")  # fmt: skip

    def data_key(self, settings_hash: str) -> str:
        return f"stir/settings={settings_hash}/{run_folder(self.run)}epoch={self.epoch}/{self._stem()}.parquet"

    def record_key(self, settings_hash: str) -> str:
        return f"{MANIFESTS}/settings={settings_hash}/stir/{run_folder(self.run)}epoch={self.epoch}/{self._stem()}.json"


@dataclass(frozen=True, order=True)
class PointUnit:
    """One shard of a measure at one point: a checkpoint, or a point of its weight path (alpha).
    The keys of every measure with one shard per point (CKA, subspace similarity, Procrustes, a
    user's function), named by the measure:

        <measure>/settings=<hash>/[run=<name>/]epoch=<e>/<measure>[_<ckpt>][_alpha<a>].parquet
        _manifests/settings=<hash>/<measure>/[run=<name>/]epoch=<e>[_<ckpt>][_alpha<a>].json
    """

    measure: str
    epoch: int
    checkpoint: str
    checkpoint_url: str
    checkpoint_fingerprint: str = ""
    alpha: float = PLAIN_ALPHA
    extra: str = "keep"
    run: str = ""

    def __str__(self) -> str:
        at = f" alpha {self.alpha:g}" if self.alpha != PLAIN_ALPHA else ""
        return f"{self.measure} {_run_label(self.run)}{self.checkpoint}{at}"

    def _suffix(self) -> str:
        return _fingerprint_suffix(self.checkpoint_fingerprint) + alpha_suffix(self.alpha, self.extra)

    def data_key(self, settings_hash: str) -> str:
        return (f"{self.measure}/settings={settings_hash}/{run_folder(self.run)}epoch={self.epoch}/"
                f"{self.measure}{self._suffix()}.parquet")  # fmt: skip

    def record_key(self, settings_hash: str) -> str:
        return f"{MANIFESTS}/settings={settings_hash}/{self.measure}/{run_folder(self.run)}epoch={self.epoch}{self._suffix()}.json"


@dataclass(frozen=True, order=True)
class KnnUnit:
    """One kNN shard: every run layer of one model, ``pt`` (once per run: empty checkpoint, epoch
    -1) or ``ft`` (a checkpoint at one alpha). Keyed by the kNN settings hash."""

    measure: ClassVar[str] = "knn"

    epoch: int
    model: str  # pt | ft
    checkpoint: str = ""
    checkpoint_url: str = ""
    checkpoint_fingerprint: str = ""
    alpha: float = PLAIN_ALPHA
    extra: str = "keep"
    run: str = ""  # the study's run of an ft shard (pt's shard is shared by every run)

    def __str__(self) -> str:
        if self.model == "pt":
            return "knn pretrained"
        return f"knn {_run_label(self.run)}{self.checkpoint}" + (f" alpha {self.alpha:g}" if self.alpha != PLAIN_ALPHA else "")

    def _stem(self) -> str:
        if self.model == "pt":
            return "pretrained"
        return f"{run_folder(self.run)}epoch={self.epoch}/knn{_fingerprint_suffix(self.checkpoint_fingerprint)}{alpha_suffix(self.alpha, self.extra)}"

    def data_key(self, knn_hash: str) -> str:
        return f"knn/settings={knn_hash}/{self._stem()}.parquet"

    def record_key(self, knn_hash: str) -> str:
        return f"{MANIFESTS}/knn/{knn_hash}/{self._stem()}.json"


@dataclass(frozen=True, order=True)
class InversionUnit:
    """One pretrained-model inversion X' of pt[layer] for a seed; reused by every checkpoint (a
    unit of the STIR measure)."""

    measure: ClassVar[str] = "stir"

    ref_layer: int
    seed: int

    def __str__(self) -> str:
        return f"pt inversion layer {self.ref_layer} seed {self.seed}"

    @property
    def checkpoint_url(self) -> str:
        """No checkpoint: the pretrained model's (every unit has the attribute)."""
        return ""

    def data_key(self, inversion_hash: str) -> str:
        return f"_cache/inversions/{inversion_hash}/layer{self.ref_layer}_seed{self.seed}.safetensors"

    def record_key(self, inversion_hash: str) -> str:
        return f"{MANIFESTS}/inversions/{inversion_hash}/layer{self.ref_layer}_seed{self.seed}.json"


# every unit names its measure (``unit.measure``): the engine finds the measure that computes it
Unit = StirUnit | PointUnit | InversionUnit | KnnUnit


COMPACTED_PREFIX = "compacted-"
COMPACTED_RECORDS = f"{MANIFESTS}/compacted/"
RAW_ARCHIVE = "_raw"
# the Parquet key-value metadata of a compacted file: JSON [[shard file name, rows], ...] in row order
COMPACTED_MEMBERS = "invariance.members"


def compacted_key(folder: str, member_names: list[str]) -> str:
    """``<folder>/compacted-<hash>.parquet``: the one file the shards ``member_names`` (file names in
    ``folder``) are compacted into; the name is a hash of the sorted names, so the plan knows without
    a read whether a folder's file holds exactly the shards it plans there."""
    digest = hashlib.sha256("\n".join(sorted(member_names)).encode()).hexdigest()[:16]
    return f"{folder}/{COMPACTED_PREFIX}{digest}.parquet"


def compaction_record_key(compacted: str) -> str:
    """The completion record of the compacted file ``compacted``: ``_manifests/compacted/<its key>.json``.
    It holds the records of the shards the file holds, which are then removed: a listing of
    ``_manifests/`` grows by one key per compacted folder, not one per shard."""
    return f"{MANIFESTS}/compacted/{compacted.removesuffix('.parquet')}.json"


def is_compacted(key: str) -> bool:
    """Whether ``key`` is a compacted file (not a raw shard)."""
    return posixpath.basename(key).startswith(COMPACTED_PREFIX) and key.endswith(".parquet")


def raw_archive_key(key: str) -> str:
    """Where a raw shard is kept after compaction with ``compaction.keep_raw``: outside the data
    folders that ``scan_parquet`` reads, so no row is read twice."""
    return f"{RAW_ARCHIVE}/{key}"


def flow_plot_key(epoch: int, run: str = "") -> str:
    """``plots/flow/epoch=<e>.png``; a study's run: ``plots/runs/<run>/flow/epoch=<e>.png``."""
    return f"{run_plots(run)}/flow/epoch={epoch}.png"


def run_plots(run: str) -> str:
    """The plots folder of a study's run, ``plots/runs/<run>`` (``plots`` without ``{run}``); the
    name as the run's folder holds it (a study's run names are folder names already)."""
    return f"{PLOTS}/runs/{run}" if run else PLOTS


def interpolation_plot_key(epoch: int, run: str = "") -> str:
    """Forgetting, learning and CKA divergence against alpha, one line per layer, for one checkpoint."""
    return f"{run_plots(run)}/interpolation/epoch={epoch}.png"


def layer_curves_plot_key(run: str = "") -> str:
    """``plots/layer_curves.png``; a study's run: ``plots/runs/<run>/layer_curves.png``."""
    return f"{run_plots(run)}/layer_curves.png"


def dynamics_plot_key(run: str = "") -> str:
    """``plots/dynamics.png``; a study's run: ``plots/runs/<run>/dynamics.png``."""
    return f"{run_plots(run)}/dynamics.png"


def knn_layers_plot_key(run: str = "") -> str:
    """``plots/knn_layers.png``; a study's run: ``plots/runs/<run>/knn_layers.png``."""
    return f"{run_plots(run)}/knn_layers.png"


def knn_alpha_plot_key(run: str = "") -> str:
    """``plots/knn_alpha.png``; a study's run: ``plots/runs/<run>/knn_alpha.png``."""
    return f"{run_plots(run)}/knn_alpha.png"


def reduced_table_key(measure: str) -> str:
    """``reduced/<measure>.parquet``: the reduced table of a measure of its own (CKA's pairs,
    Procrustes, a user's measure)."""
    return f"reduced/{measure}.parquet"


def measure_plot_key(measure: str, epoch: int, run: str = "") -> str:
    """``plots/<measure>/epoch=<e>.png`` (a layer x layer heatmap); a study's run:
    ``plots/runs/<run>/<measure>/epoch=<e>.png``."""
    return f"{run_plots(run)}/{measure}/epoch={epoch}.png"


def lease_key(settings_hash: str) -> str:
    return f"{MANIFESTS}/leases/settings={settings_hash}.json"


def write_probe_key(token: str) -> str:
    """A throwaway object that proves the prefix is writable."""
    return f"{MANIFESTS}/write-probe-{token}"


def finetune_checkpoint_key(epoch: int) -> str:
    return f"epoch={epoch:02d}.safetensors"


def finetune_metrics_key(epoch: int) -> str:
    return f"{FINETUNE_METRICS}/epoch={epoch:02d}.parquet"
