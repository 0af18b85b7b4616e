"""What a worker holds for the steps it runs: the run's spec (config, store, hashes, layers) and a
``Workspace`` that caches what is costly to load (models by weights URL, eval images, shard
contexts, pretrained X' read from the store) for the life of one worker process.

Measures (``invariance.measures``) compute their units with these; executors build one Workspace
per worker and pass it along, knowing nothing of the science.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from invariance.config import DataConfig, ResourcesConfig, RunConfig
from invariance.core.interpolation import interpolated_model
from invariance.core.inversion import InversionResult
from invariance.core.knn_probe import knn_label_error
from invariance.core.models import FeatureModel, load_model
from invariance.core.shards import ShardContext
from invariance.errors import CheckpointError, ConfigError, DataError
from invariance.io.checkpoints import weights_fingerprint
from invariance.io.data import EvalImages, load_eval_images, load_labelled_images
from invariance.io.layout import PLAIN_ALPHA
from invariance.io.storage import Store, redact


@dataclass(frozen=True)
class RunSpec:
    """What every step of one run needs: the config, the store, the settings hashes that key
    its outputs, and the layers."""

    config: RunConfig
    store: Store
    settings_hash: str
    layers: tuple[int, ...]
    # {name: hash} of every hash keying the plan's units (a measure's own, the inversions'...)
    hashes: dict[str, str] = field(default_factory=dict)
    # the plan's fingerprint of the eval images: a worker that loads other images refuses to compute
    eval_fingerprint: str = ""
    # the plan's fingerprint of the pretrained weights: a worker that finds other weights refuses
    pretrained_fingerprint: str = ""

    @classmethod
    def from_plan(cls, config: RunConfig, store: Store, plan: Any) -> "RunSpec":
        """The spec of every step of ``plan`` (an ``engine.plan.Plan``): its hashes, layers and
        input fingerprints."""
        return cls(config, store, plan.settings_hash, tuple(plan.layers), dict(plan.hashes),
                   eval_fingerprint=plan.fingerprints.get("eval_images", ""),
                   pretrained_fingerprint=plan.fingerprints.get("pretrained", ""))  # fmt: skip

    def hash_of(self, name: str) -> str:
        """The hash ``name`` (a measure's, ``inversion``) of the plan; ConfigError when the spec lacks it."""
        if name not in self.hashes:
            raise ConfigError(f"the run spec carries no {name!r} hash; build it with RunSpec.from_plan(config, store, plan)")
        return self.hashes[name]


# host memory a worker may hold in pretrained X' it has read (6 ViT-B/32 inversions of 500 images)
INVERSION_CACHE_BYTES = int(ResourcesConfig.model_fields["inversion_cache_gb"].default * 1024**3)


class InversionCache:
    """Pretrained X' read from the store, by data key, least recently used first out, bounded in
    bytes (X' and its losses, on the host). An X' larger than the bound is not kept."""

    def __init__(self, max_bytes: int = INVERSION_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, InversionResult] = OrderedDict()
        self.bytes = 0

    @staticmethod
    def size(result: InversionResult) -> int:
        return sum(t.numel() * t.element_size() for t in (result.images, result.final_loss))

    def get(self, key: str, load: Callable[[], InversionResult]) -> InversionResult:
        """The X' at ``key``: from the cache, else ``load()`` (then kept if it fits the bound)."""
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        result = load()
        size = self.size(result)
        if size <= self.max_bytes:
            while self.bytes + size > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self.bytes -= self.size(evicted)
            self._entries[key] = result
            self.bytes += size
        return result

    def __len__(self) -> int:
        return len(self._entries)


class Workspace:
    """Per-process cache of models (by weights URL, LRU), eval images, shard contexts (which keep
    the Grams of the features on X, not the features) and the pretrained X' read from the store
    (``inversion_cache_bytes``, LRU): a worker reads each X' once while it fits.

    ``gpu_memory_share``: the part of the GPU's memory this process may use (below 1 where
    processes share a GPU); the caching allocator enforces it and auto micro-batches fit in it.
    """

    def __init__(self, device: str | torch.device | None = None, max_models: int = 3, gpu_memory_share: float = 1.0,
                 inversion_cache_bytes: int = INVERSION_CACHE_BYTES) -> None:  # fmt: skip
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if not 0 < gpu_memory_share <= 1:
            raise ValueError(f"gpu_memory_share must be in (0, 1], got {gpu_memory_share}")
        if self.device.type == "cuda" and gpu_memory_share < 1:
            # process-wide, for the life of the process (a Ray worker builds one Workspace)
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            torch.cuda.set_per_process_memory_fraction(gpu_memory_share, index)
        self.max_models = max_models
        self._models: OrderedDict[tuple[str, str | None], FeatureModel] = OrderedDict()
        self._images: dict[str, EvalImages] = {}
        self._contexts: OrderedDict[tuple[str, str | None], ShardContext] = OrderedDict()
        self.inversions = InversionCache(inversion_cache_bytes)

    def pretrained_inversion(self, store: Store, data_key: str) -> InversionResult:
        """The pretrained X' at ``data_key``, read from ``store`` only when not cached."""
        return self.inversions.get(data_key, lambda: load_inversion(store, data_key))

    def model(self, config: RunConfig, weights: str | None, role: str = "pt", layers: tuple[int, ...] | None = None,
              fingerprint: str = "") -> FeatureModel:  # fmt: skip
        """The model of ``role`` ("pt": ``model``; "ft": ``finetuned_model``, else ``model``) with
        ``weights``; ``layers``: the analysed ones (``model.strict: false`` must load all they read).

        ``fingerprint``: the identity the plan saw for the weights file. The cache is keyed by it
        (a file replaced in place is another model), and a file that is no longer the planned
        one is refused (CheckpointError), not computed and filed under the old identity."""
        model_config = config.finetuned_model if role == "ft" and config.finetuned_model else config.model
        key = (model_config.model_dump_json(), str(config.layers), weights, fingerprint)

        def load() -> FeatureModel:
            if fingerprint and weights is not None:
                found = weights_fingerprint(weights, config.storage_options, "pretrained" if role == "pt" else "checkpoints")
                if found != fingerprint:
                    raise CheckpointError(f"{redact(weights)}: the file was replaced since the run was planned "
                                          f"(fingerprint {found}, planned {fingerprint}); rerun to plan it anew")  # fmt: skip
            return load_model(model_config, weights, config.storage_options, modules=config.layer_modules,
                              layers=layers).to(self.device)  # fmt: skip

        return _cached(self._models, key, self.max_models, load)

    def pretrained_model(self, spec: RunSpec) -> FeatureModel:
        """The pretrained model of ``spec``, checked against the plan's fingerprint of its weights."""
        return self.model(spec.config, spec.config.pretrained, "pt", spec.layers, spec.pretrained_fingerprint)

    def path_model(self, spec: RunSpec, checkpoint_url: str, alpha: float = PLAIN_ALPHA, extra: str = "keep",
                   fingerprint: str = "") -> FeatureModel:  # fmt: skip
        """The finetuned model of ``checkpoint_url`` (planned with ``fingerprint``) at ``alpha`` on the
        weight path from the pretrained weights (built here from the two loaded models, no file
        written); alpha 1: the checkpoint."""
        finetuned = self.model(spec.config, checkpoint_url, "ft", spec.layers, fingerprint)
        if alpha == PLAIN_ALPHA:
            return finetuned
        key = ("interpolated", f"{alpha!r}:{extra}", checkpoint_url, fingerprint, spec.pretrained_fingerprint)
        pretrained = self.pretrained_model(spec)
        return _cached(self._models, key, self.max_models,
                       lambda: interpolated_model(pretrained, finetuned, alpha, extra))  # type: ignore[arg-type]

    def labelled_images(self, data: DataConfig, image_size: int, label_column: str, storage_options: dict,
                        key_name: str, identity: str = "") -> EvalImages:  # fmt: skip
        """Images of ``data`` with their labels, loaded once per ``identity`` (the kNN hash, which
        holds the files' fingerprints: files replaced in place are loaded anew); a DataError names
        ``key_name`` (``knn.train``, ``data``) when they have none."""
        key = f"labelled:{data.model_dump_json()}@{image_size}:{label_column}:{identity}"
        if key not in self._images:
            try:
                loaded = load_labelled_images(data, image_size, storage_options, label_column)
            except DataError as exc:
                raise knn_label_error(key_name, label_column, exc) from None
            if loaded.labels is None or len(loaded.labels) == 0:
                raise DataError(f"{key_name}: {redact(data.path)} gave no class labels; the kNN probe needs them")
            if int(loaded.labels.min()) < 0:
                raise DataError(f"{key_name}: negative class labels in {redact(data.path)} (knn.label_column {label_column!r})")
            self._images[key] = EvalImages(loaded.images.to(self.device), loaded.indices, loaded.labels.to(self.device),
                                           fingerprint=loaded.fingerprint, classes=loaded.classes)  # fmt: skip
        return self._images[key]

    def eval_images(self, config: RunConfig, image_size: int, expected_fingerprint: str = "") -> EvalImages:
        """The eval images, loaded once; DataError when they are not the ones the run was planned
        with (``expected_fingerprint``, unless empty): the dataset changed since."""
        key = config.data.model_dump_json() + f"@{image_size}"
        if key not in self._images or (expected_fingerprint and self._images[key].fingerprint != expected_fingerprint):
            # first use, or the images this worker holds are not the planned ones (replaced since): load them
            loaded = load_eval_images(config.data, image_size, config.storage_options)
            self._images[key] = EvalImages(loaded.images.to(self.device), loaded.indices, fingerprint=loaded.fingerprint)
        images = self._images[key]
        if expected_fingerprint and images.fingerprint != expected_fingerprint:
            raise DataError(
                f"data.path {redact(config.data.path)}: the eval images changed since the run was planned "
                f"(fingerprint {images.fingerprint}, planned {expected_fingerprint}); rerun to plan them anew"
            )
        return images

    def context(self, spec: RunSpec, checkpoint_url: str | None, alpha: float = PLAIN_ALPHA, extra: str = "keep",
                fingerprint: str = "") -> ShardContext:  # fmt: skip
        """Shard context for pt and (unless None) the checkpoint at ``checkpoint_url`` (planned with
        ``fingerprint``), at ``alpha`` on the weight path (1: the checkpoint itself)."""
        key = (spec.settings_hash, checkpoint_url, fingerprint, alpha, extra)

        def build() -> ShardContext:
            models = {"pt": self.pretrained_model(spec)}
            if checkpoint_url is not None:
                models["ft"] = self.path_model(spec, checkpoint_url, alpha, extra, fingerprint)
            images = self.eval_images(spec.config, models["pt"].input_size, spec.eval_fingerprint)
            return ShardContext(models, images, spec.layers, spec.config.token_policy, spec.config.inversion)

        return _cached(self._contexts, key, self.max_models, build)


def _cached(cache: OrderedDict, key: Any, limit: int, build: Callable[[], Any]) -> Any:
    """``cache[key]``, built on first use; the least recently used entries beyond ``limit`` go."""
    if key not in cache:
        cache[key] = build()
        while len(cache) > limit:
            cache.popitem(last=False)
    cache.move_to_end(key)
    return cache[key]


def save_inversion(store: Store, key: str, result: InversionResult) -> None:
    """X' ``[n, 3, S, S]`` float32, its per-sample losses and step count, as one safetensors put."""
    from safetensors.torch import save

    tensors = {
        "images": result.images.float().cpu().contiguous(),
        "final_loss": result.final_loss.float().cpu(),
        "iterations_run": torch.tensor([result.iterations_run], dtype=torch.int64),
    }
    store.put(key, save(tensors))


def load_inversion(store: Store, key: str) -> InversionResult:
    from safetensors.torch import load

    tensors = load(store.get(key))
    return InversionResult(tensors["images"], tensors["final_loss"], int(tensors["iterations_run"][0]))
