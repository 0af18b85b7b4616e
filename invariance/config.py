"""The run config: YAML, validated up front; errors name the key and the problem.

Every key, its default and its meaning is in README.md ("Config reference"); keep the two
in step. ``settings_hash`` keys the results: every setting that changes the numbers goes
into it, nothing else (never credentials).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Iterable, Literal, TypeVar

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from invariance.errors import ConfigError

# Bump when a code change alters the numbers computed for unchanged settings.
# 2: early stop (inversion.tolerance) decided per sample; 3: `mean` leaves prefix tokens out;
# 4: CKA shards carry subspace similarity (a new column: old shards must not mix with new ones)
ALGORITHM_VERSION = 4

TokenPolicy = Literal["flatten", "cls", "mean"]


def _reject_bool(value: Any) -> Any:
    # YAML reads yes/no/on/off/true/false as booleans, which pydantic would take as 1/0:
    # `iterations: yes` must be an error, not a one-step inversion.
    if isinstance(value, bool):
        raise ValueError("expected an integer, got a boolean")
    return value


Int = Annotated[int, BeforeValidator(_reject_bool)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    """Which network: a timm architecture name + kwargs, or a user factory."""

    arch: str | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)
    factory: str | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    strict: bool = True
    # named-module layers (layers: {modules: [...]}) of a model that is not timm's: how many
    # leading tokens are prefix tokens (class, registers); None: the network's num_prefix_tokens, else 0
    prefix_tokens: Int | None = Field(None, ge=0)

    def numbers_settings(self, key: str = "model") -> dict[str, Any]:
        """What of the model changes the numbers: not ``strict`` (it changes whether a checkpoint
        loads); ``prefix_tokens`` only when set (older configs keep their hash); with a ``factory``,
        the fingerprint of its code (``factory_fingerprint``: editing the factory computes anew;
        configs without a factory keep their hash). ``key`` names the section in errors."""
        exclude = {"strict"} | ({"prefix_tokens"} if self.prefix_tokens is None else set())
        settings = self.model_dump(mode="json", exclude=exclude)
        if self.factory is not None:
            settings["factory_source"] = factory_fingerprint(self.factory, f"{key}.factory")
        return settings

    @field_validator("mean", "std")
    @classmethod
    def _sane_normalization(cls, value: tuple[float, float, float] | None, info: Any) -> Any:
        # images enter in [0, 1]: a std of 0 divides by 0 (every metric NaN), a 0-255 scale
        # (mean 123.7, std 58.4) or a negative std silently changes every feature
        if value is None:
            return value
        if not all(math.isfinite(v) for v in value):
            raise ValueError(f"{info.field_name} must be finite numbers")
        if info.field_name == "std" and not all(0.001 <= v <= 10 for v in value):
            raise ValueError("every std must be in [0.001, 10] (images enter in [0, 1]; a std of 0 divides by 0, "
                             "a 0-255 scale would be ~58)")  # fmt: skip
        if info.field_name == "mean" and not all(0 <= v <= 1 for v in value):
            raise ValueError("every mean must be in [0, 1] (images enter in [0, 1]; a 0-255 scale would be ~120)")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> "ModelConfig":
        if (self.arch is None) == (self.factory is None):
            raise ValueError("give exactly one of model.arch (a timm name) or model.factory ('package.module:function')")
        if self.factory is not None and ":" not in self.factory:
            raise ValueError(f"model.factory must look like 'package.module:function', got {self.factory!r}")
        return self


def factory_fingerprint(spec: str, key: str = "model.factory") -> str:
    """Identity of a user factory's code (``"package.module:function"``): a hash of the source
    files of the module named and of the module that defines the function (when it is defined
    elsewhere and imported), as they are on disk. The plan's settings hash and every later
    computation of it (the reducer's status) call this one function, so they agree.

    What it misses (editing these reuses results computed with the old code): code in other
    modules the factory imports or calls (helpers, a base class in another file), the versions of
    installed packages it builds on (timm, transformers), and a module edited on disk after this
    process imported it (the hash follows the file, the process runs the code it imported)."""
    import importlib
    import inspect
    import sys

    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - the user's module: named, never a raw traceback
        raise ConfigError(f"{key}: cannot import module {module_name!r} ({type(exc).__name__}: {exc})") from None
    if not hasattr(module, attr):
        raise ConfigError(f"{key}: module {module_name!r} has no attribute {attr!r}")
    defining = sys.modules.get(getattr(getattr(module, attr), "__module__", None) or module_name)
    digest = hashlib.sha256()
    for source_module in dict.fromkeys(m for m in (module, defining) if m is not None):
        try:
            path = inspect.getsourcefile(source_module) or getattr(source_module, "__file__", None)
            data = Path(path).read_bytes() if path else b""
        except (TypeError, OSError):  # a built-in or generated module: its name stands for it
            data = b""
        digest.update(f"{source_module.__name__}\n{len(data)}\n".encode())
        digest.update(data)
    return digest.hexdigest()[:16]


class LayerModules(_Strict):
    """``layers: {modules: [name, ...]}``: layer k is the output of the k-th named submodule."""

    modules: list[str] = Field(min_length=1)

    @field_validator("modules")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("module names must be unique")
        return value


# the largest image side (pixels) a model may be fed: 500 images of 4096 px are 100 GB of floats
MAX_IMAGE_SIZE = 4096


class DataConfig(_Strict):
    """The eval images X: n samples chosen deterministically from a dataset."""

    format: Literal["cifar", "imagefolder", "parquet"]
    path: str
    split: str = "test"
    n_samples: Int = Field(500, gt=0)
    selection: Literal["first", "random"] = "first"
    # numpy's generator takes no negative seed (a ValueError deep in the data reader)
    selection_seed: Int = Field(0, ge=0)
    image_size: Int | None = None
    image_column: str = "image"

    @field_validator("image_size")
    @classmethod
    def _image_size_in_range(cls, value: int | None) -> int | None:
        # 100000 px passed and ended in a raw traceback (an allocation of terabytes) deep in a worker
        if value is not None and not 1 <= value <= MAX_IMAGE_SIZE:
            raise ValueError(f"must be in 1..{MAX_IMAGE_SIZE} pixels (the side of the square images the model "
                             "is fed; leave it out for the model's input size)")  # fmt: skip
        return value


InversionOptimizer = Literal["reference", "adam"]
# the step size each optimizer gets when `step_size` is not given (bench/bench_optimizers.py)
DEFAULT_STEP_SIZE: dict[str, float] = {"reference": 0.5, "adam": 0.1}


class InversionConfig(_Strict):
    """The inversion: the reference normalized gradient descent on relative L2, or Adam.

    ``step_size`` defaults per ``optimizer`` (DEFAULT_STEP_SIZE): the reference's L2 step 0.5,
    constant; Adam's learning rate, decayed to 0 over ``iterations`` on a cosine while its momentum
    rises from 0.5 to 0.9 (core/inversion.py, adam_schedule).
    """

    # Bump when a change to the Adam inversion alters its numbers for unchanged settings: it is
    # hashed into adam configs only, so reference results (and their hashes) are untouched.
    # 1: cosine learning rate, beta1 0.9; 2: beta1 rising from 0.5 to 0.9 as the rate falls
    ADAM_SCHEDULE_VERSION: typing.ClassVar[int] = 2

    optimizer: InversionOptimizer = "reference"
    iterations: Int = Field(500, ge=1)
    step_size: float = Field(0.5, gt=0, allow_inf_nan=False)
    tolerance: float | None = Field(None, gt=0, allow_inf_nan=False)
    micro_batch: Annotated[Int, Field(ge=1)] | Literal["auto"] = "auto"
    bf16: bool = True
    compile: bool = False

    @model_validator(mode="before")
    @classmethod
    def _default_step_size(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("step_size") is None:
            optimizer = data.get("optimizer", "reference")
            if optimizer in DEFAULT_STEP_SIZE:
                data = {**data, "step_size": DEFAULT_STEP_SIZE[optimizer]}
        return data

    def numbers_settings(self) -> dict[str, Any]:
        """The settings that change X' (not micro_batch, compile). ``optimizer: reference``, the
        default, is left out: its hash is the one from before the key existed, so results
        cached by earlier versions stay valid. Adam's carry ``adam_schedule`` (ADAM_SCHEDULE_VERSION),
        left out of version 1 so that hashes of then stay as they were."""
        exclude = {"micro_batch", "compile"} | ({"optimizer"} if self.optimizer == "reference" else set())
        settings = self.model_dump(mode="json", exclude=exclude)
        if self.optimizer == "adam" and self.ADAM_SCHEDULE_VERSION > 1:
            settings["adam_schedule"] = self.ADAM_SCHEDULE_VERSION
        return settings


class InterpolationConfig(_Strict):
    """The weight path ``theta(alpha) = (1 - alpha) * pretrained + alpha * finetuned`` (WiSE-FT):
    which alphas, which checkpoints get a path, and what becomes of tensors only the checkpoint has."""

    alphas: list[float] = Field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0], min_length=1)
    # last: the newest checkpoint; all: every one; a list: those epochs
    epochs: Literal["last", "all"] | list[Int] = "last"
    # tensors the pretrained model lacks or has in another shape: keep (the checkpoint's) | scale (times alpha)
    extra: Literal["keep", "scale"] = "keep"

    @field_validator("alphas")
    @classmethod
    def _alphas_on_the_path(cls, value: list[float]) -> list[float]:
        outside = [a for a in value if not (math.isfinite(a) and 0.0 <= a <= 1.0)]
        if outside:
            raise ValueError(f"every alpha must be in [0, 1] (0: the pretrained weights, 1: the checkpoint), got {outside}")
        if len(set(value)) != len(value):
            raise ValueError("alphas must be unique")
        keys: dict[str, float] = {}
        for alpha in value:  # shard keys name an alpha by its 6 significant digits
            if f"{alpha:g}" in keys:
                raise ValueError(f"alphas {keys[f'{alpha:g}']} and {alpha} agree to 6 significant digits and would "
                                 "share their shards' keys; use alphas that differ within 6 digits")  # fmt: skip
            keys[f"{alpha:g}"] = alpha
        return sorted(float(a) for a in value)

    @field_validator("epochs")
    @classmethod
    def _epochs_listed(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("give last, all or a non-empty list of epochs")
        return sorted(set(value)) if isinstance(value, list) else value


class KnnProbeConfig(_Strict):
    """DINO's weighted kNN on frozen features at every run layer: a labelled bank (``train``,
    the keys of ``data``), the run's eval images with their labels as the queries."""

    train: DataConfig
    label_column: str = "label"  # Parquet banks and eval images: the integer class column
    k: list[Int] = Field(default_factory=lambda: [20], min_length=1)
    temperature: float = Field(0.07, gt=0, allow_inf_nan=False)
    # None: cls where the model has a class token, else mean
    token_policy: TokenPolicy | None = None

    @field_validator("k")
    @classmethod
    def _k_positive(cls, value: list[int]) -> list[int]:
        if any(k < 1 for k in value):
            raise ValueError(f"every k must be at least 1, got {value}")
        if len(set(value)) != len(value):
            raise ValueError("k values must be unique")
        return sorted(value)

    @model_validator(mode="after")
    def _k_within_the_bank(self) -> "KnnProbeConfig":
        if max(self.k) > self.train.n_samples:
            raise ValueError(f"knn.k: {max(self.k)} neighbours asked of a bank of knn.train.n_samples = "
                             f"{self.train.n_samples} images; lower k or enlarge the bank")  # fmt: skip
        return self

    def numbers_settings(self) -> dict[str, Any]:
        """What changes the kNN numbers (beyond the run's own settings)."""
        return self.model_dump(mode="json")


# exp(x) is finite in float32 up to x = 88.72
FLOAT32_EXP_LIMIT = 88.72


def knn_settings_hash(run_settings_hash: str, config: "RunConfig", bank_fingerprint: str) -> str:
    """The hash keying kNN shards: the run's settings hash (model, weights, eval images), the kNN
    settings (the bank's path as written) and ``bank_fingerprint``, the listings of the bank's and
    the eval data's files (a bank or labels replaced in place compute anew); the STIR/CKA hash
    stays as it is when a ``knn`` section is added."""
    assert config.knn is not None
    knn = config.knn.numbers_settings()
    knn["train"]["path"] = config.path_as_written("knn.train.path", config.knn.train.path)
    if config.knn.temperature < 1 / FLOAT32_EXP_LIMIT:
        # exp(1 / T) overflowed float32 before the vote was taken in float64 (issue 25): such
        # shards are computed anew; every other temperature keeps its hash
        knn["vote"] = "float64"
    return settings_hash({"run": run_settings_hash, "knn": knn, "bank": bank_fingerprint})


class ResourcesConfig(_Strict):
    """What each Ray task asks for, and how much work is in flight."""

    num_gpus: float = Field(0.0, ge=0, allow_inf_nan=False)
    num_cpus: float = Field(1.0, gt=0, allow_inf_nan=False)
    max_in_flight: Int | None = Field(None, ge=1)
    max_retries: Int = Field(3, ge=0)
    # host memory each worker keeps pretrained X' in (GiB): holding every (layer, seed) X' reads each once
    inversion_cache_gb: float = Field(2.0, ge=0, allow_inf_nan=False)


class CompactionConfig(_Strict):
    """What a run does with the shards of a folder (a measure's run and epoch) once all are complete."""

    # one Parquet file per folder, a row group per shard: a reduce, a recipe and a listing open one
    # file per epoch instead of one per shard
    enabled: bool = True
    # keep the raw shards under _raw/ (outside the folders Polars scans) instead of removing them
    keep_raw: bool = False


class RunConfig(_Strict):
    """One run: a pretrained model, its finetuning checkpoints, and what to measure."""

    # {path key: the value as written} for the relative paths io/paths.py resolved
    _paths_as_written: dict[str, str] = PrivateAttr(default_factory=dict)

    output: str
    # may hold credentials: never in a repr, an error message or the settings hash
    storage_options: dict[str, Any] = Field(default_factory=dict, repr=False)
    model: ModelConfig
    # the finetuned checkpoints' module when it differs from `model` (adapters, another head)
    finetuned_model: ModelConfig | None = None
    pretrained: str
    checkpoints: str
    data: DataConfig
    layers: Literal["all"] | list[Int] | LayerModules = "all"
    token_policy: TokenPolicy = "flatten"
    seeds: list[Int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    inversion: InversionConfig = Field(default_factory=InversionConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    # not in the settings hash: where rows are stored, never what they are
    compaction: CompactionConfig = Field(default_factory=CompactionConfig)
    # not in the settings hash: each alpha is a unit of its own, kNN shards have their own hash
    interpolation: InterpolationConfig | None = None
    knn: KnnProbeConfig | None = None
    # measures beyond those on in every run (STIR, CKA, subspace similarity) and the knn section:
    # a built-in's name (``procrustes``) or a user's ``{function: "module:fn", name: ..., per: layer | pair}``,
    # checked by invariance.measures when the run is planned. Not in the settings hash: each measure's
    # shards have their own hash
    measures: list[str | dict[str, Any]] = Field(default_factory=list)
    # a study's runs compared (the paper's Fig. 6) over each run's first N checkpoint epochs (the complete
    # ones among them); None: all.
    # Not in the settings hash: it only chooses what the comparison shows
    compare_epochs: Int | None = Field(None, ge=1)

    @field_validator("checkpoints")
    @classmethod
    def _has_epoch(cls, value: str) -> str:
        spec = re.search(r"\{epoch[:!][^}]*\}", value)
        if spec:
            raise ValueError(f"{spec.group(0)} has a format spec; write plain {{epoch}}: it matches the digits "
                             "with or without leading zeros (epoch=7 and epoch=07 alike)")  # fmt: skip
        if value.count("{epoch}") != 1:
            raise ValueError("must contain {epoch} exactly once, e.g. 's3://lab/run/epoch={epoch}.safetensors'")
        run_spec = re.search(r"\{run[:!][^}]*\}", value)
        if run_spec:
            raise ValueError(f"{run_spec.group(0)} has a format spec; write plain {{run}}: it matches a run's name "
                             "(any text without '/')")  # fmt: skip
        if value.count("{run}") > 1 or ("{run}" in value and value.index("{run}") > value.index("{epoch}")):
            raise ValueError("{run} may stand once, before {epoch}: a study of runs, e.g. "
                             "'s3://lab/runs/{run}/epoch={epoch}.safetensors'")  # fmt: skip
        return value

    @field_validator("data")
    @classmethod
    def _enough_samples(cls, value: DataConfig) -> DataConfig:
        # every STIR/CKA row carries debiased CKA, defined from 4 samples: fail here, not after the inversions
        if value.n_samples < 4:
            raise ValueError(f"n_samples must be at least 4 (debiased CKA needs 4 samples), got {value.n_samples}")
        return value

    @field_validator("layers")
    @classmethod
    def _layers_valid(cls, value: Any) -> Any:
        if isinstance(value, list):
            if not value:
                raise ValueError("give 'all' or a non-empty list of layer indices")
            if any(v < 0 for v in value):
                raise ValueError("layer indices start at 0 (block 0); the pre-logits layer is `depth`")
            if len(set(value)) != len(value):
                raise ValueError("layer indices must be unique")
            return sorted(value)
        return value

    @field_validator("seeds")
    @classmethod
    def _seeds_unique(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value):
            raise ValueError("seeds must be unique")
        return value

    @property
    def layer_modules(self) -> list[str] | None:
        """The named submodules of ``layers: {modules: [...]}``; None for timm's layers."""
        return list(self.layers.modules) if isinstance(self.layers, LayerModules) else None

    def resolve_layers(self, depth: int) -> list[int]:
        """Layer indices 0..depth (depth = pre-logits); errors name ``layers`` when out of range."""
        if self.layers == "all" or isinstance(self.layers, LayerModules):
            return list(range(depth + 1))
        too_deep = [k for k in self.layers if k > depth]
        if too_deep:
            raise ConfigError(
                f"layers: {too_deep} out of range; this model has layers 0..{depth} "
                f"(blocks 0..{depth - 1}, pre-logits {depth})"
            )
        return list(self.layers)

    def path_as_written(self, key: str, value: str) -> str:
        """``value`` of the path key ``key`` as the config wrote it, before relative paths were
        resolved (io/paths.py): hashes take this, so the folder a config is run from (a Ray job's
        unpacked working dir, a colleague's checkout) never changes them. Content is keyed by the
        fingerprints of the weights and images, not by where they are."""
        return self._paths_as_written.get(key, value)

    def numbers_settings(self) -> dict[str, Any]:
        """Every setting that changes the STIR/CKA numbers (not output, storage or resources)."""
        return {
            "algorithm": ALGORITHM_VERSION,
            # strict changes whether a checkpoint loads, never the numbers of one that does
            "model": self.model.numbers_settings(),
            "pretrained": self.path_as_written("pretrained", self.pretrained),
            # which finetuning run: another run's epoch=3 in the same output prefix is not done
            "checkpoints": self.path_as_written("checkpoints", self.checkpoints),
            "data": {**self.data.model_dump(mode="json"), "path": self.path_as_written("data.path", self.data.path)},
            "layers": self.layers.model_dump(mode="json") if isinstance(self.layers, LayerModules) else self.layers,
            "token_policy": self.token_policy,
            "inversion": self.inversion.numbers_settings(),
            # left out when unset: the hash of a config without it is the one from before the key existed
            **({"finetuned_model": self.finetuned_model.numbers_settings("finetuned_model")} if self.finetuned_model else {}),
        }

    def inversion_settings(self) -> dict[str, Any]:
        """What a pretrained-model inversion depends on: not the checkpoints, not the layer set."""
        settings = self.numbers_settings()
        if self.layer_modules is None:  # named modules: the index says which module, so they stay
            settings.pop("layers")
        settings.pop("checkpoints")
        settings.pop("finetuned_model", None)
        return settings


def settings_hash(settings: dict[str, Any]) -> str:
    """Short stable hash of a JSON-able settings dict (key order does not matter)."""
    canonical = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def did_you_mean(word: str, choices: Iterable[str], limit: int = 3) -> list[str]:
    """The choices closest to ``word`` (a misspelt key or name), closest first."""
    return difflib.get_close_matches(word, list(choices), n=limit, cutoff=0.6)


def _known_keys(model: type[BaseModel], path: list[str]) -> list[str]:
    """The keys a config section accepts: the fields of ``model`` at ``path`` (``["data"]``)."""
    for part in path:
        field = model.model_fields.get(part)
        inner = getattr(field, "annotation", None)
        candidates = [inner, *typing.get_args(inner)]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return []
    return list(model.model_fields)


def _format_validation_error(error: ValidationError, kind: str, reference: str, model: type[BaseModel]) -> str:
    lines = []
    for item in error.errors():
        # drop pydantic's union-branch tags ("literal['all']", "list[...]") from the key path
        parts = [str(part) for part in item["loc"] if not (isinstance(part, str) and "[" in part)]
        key = ".".join(parts) or "(top level)"
        if item["type"] == "extra_forbidden":
            close = did_you_mean(str(parts[-1]), _known_keys(model, parts[:-1])) if parts else []
            hint = f"did you mean {' or '.join(repr(c) for c in close)}?" if close else "misspelt?"
            lines.append(f"  {key}: unknown key ({hint} see the config reference in {reference})")
        elif item["type"] == "missing":
            lines.append(f"  {key}: required key is missing")
        elif parts and parts[0] == "storage_options":
            lines.append(f"  {key}: {item['msg']} (value not shown: it may hold credentials)")
        else:
            lines.append(f"  {key}: {item['msg']} (got {item.get('input')!r})")
    return f"invalid {kind} config:\n" + "\n".join(lines)


ConfigModel = TypeVar("ConfigModel", bound=BaseModel)


def validate_config(model: type[ConfigModel], raw: Any, kind: str = "run", reference: str = "README.md") -> ConfigModel:
    """A dict (as read from YAML) -> validated ``model``, or ConfigError naming every bad key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"the {kind} config must be a YAML mapping of keys, got {type(raw).__name__}")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, kind, reference, model)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a mapping holding the same key twice (PyYAML keeps the last
    silently: `seeds` written twice would run with the second and say nothing)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise ConfigError(f"duplicate key {key!r} at line {line} (first at line {seen[key]}): each key may appear once")
            if isinstance(key, (str, int, float, bool)):
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _shown(path: str | Path) -> str:
    # URLs may carry credentials (s3://KEY:SECRET@bucket/...); config.py is below io/, so inline
    import re

    return re.sub(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/@\s'\"]+@", r"\1***@", str(path))


def read_yaml(path: str | Path) -> Any:
    """The YAML document at a local path or any fsspec URL; ConfigError when missing, a folder,
    not UTF-8 text, not valid YAML, or holding a key twice."""
    import fsspec

    try:
        fs, inner = fsspec.core.url_to_fs(str(path))
        if fs.isdir(inner):
            raise ConfigError(f"{_shown(path)} is a folder; give the path of the YAML run config file in it")
        with fsspec.open(str(path), "rb") as handle:
            data = handle.read()
        text = data.decode("utf-8-sig")
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {_shown(path)}") from None
    except IsADirectoryError:
        raise ConfigError(f"{_shown(path)} is a folder; give the path of the YAML run config file in it") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{_shown(path)}: not UTF-8 text (byte {exc.start}): save the config as UTF-8 YAML") from None
    except ConfigError as exc:
        raise ConfigError(f"{_shown(path)}: {exc}" if str(exc).startswith("duplicate key") else str(exc)) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{_shown(path)}: not valid YAML: {exc}") from None
    except (OSError, ValueError, ImportError) as exc:
        raise ConfigError(f"cannot read the config {_shown(path)}: {type(exc).__name__}: {_shown(str(exc))}") from None


def parse_config(raw: dict[str, Any]) -> RunConfig:
    """A dict (as read from YAML) -> validated RunConfig, or ConfigError naming every bad key."""
    return validate_config(RunConfig, raw)


def load_config(path: str | Path) -> RunConfig:
    """Read and validate a YAML run config from a local path or any fsspec URL."""
    return parse_config(read_yaml(path))
