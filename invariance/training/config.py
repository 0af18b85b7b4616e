"""The finetune config: YAML, validated up front; errors name the key and the problem.

Every key, its default and its meaning is in invariance/training/README.md; keep the two in step.
A ``sweep`` section expands into one trial config per grid point, each writing below
``<output>/<trial name>/``, the name spelling out the grid values (``lr-0.001_augment-true``).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from invariance.config import Int, ModelConfig, did_you_mean, read_yaml, validate_config
from invariance.io.paths import NOT_PATHS, ResolvedPaths, _join, config_folder, is_relative_path
from invariance.training.adapters import AdapterKind
from invariance.training.corruptions import CORRUPTIONS, SEVERITIES
from invariance.errors import ConfigError
from invariance.training.tasks import TaskName
from invariance.training.loop import OptimizerName, TrainSettings

MethodName = Literal["full", "linear_probe", "lp_ft"]
_NEW_KEY_DEFAULTS = {"method": "full", "lp_epochs": None, "lp_lr": None, "adapter": None, "clip": None,
                     "warmup_steps": 0}  # fmt: skip

# Keys a sweep may not vary: where results go and how trials are placed are not grid values.
_NOT_SWEEPABLE = ("output", "storage_options", "sweep", "resources")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FinetuneDataConfig(_Strict):
    """Train and test splits of one image dataset, read by the eval loaders (with labels)."""

    format: Literal["cifar", "imagefolder", "parquet"]
    path: str
    train_split: str = "train"
    test_split: str = "test"
    n_train: Int | None = Field(None, gt=0)
    n_test: Int = Field(500, gt=0)
    selection: Literal["first", "random"] = "random"
    selection_seed: Int = 0
    image_size: Int | None = Field(None, gt=0)
    image_column: str = "image"
    label_column: str = "label"


class CorruptionsConfig(_Strict):
    """Corrupted copies of the first ``n_samples`` test images, scored every epoch."""

    names: list[str] = Field(default_factory=lambda: list(CORRUPTIONS))
    severities: list[Int] = Field(default_factory=lambda: list(SEVERITIES))
    n_samples: Int | None = Field(None, gt=0)
    seed: Int = 0

    @field_validator("names")
    @classmethod
    def _known_names(cls, value: list[str]) -> list[str]:
        unknown = [name for name in value if name not in CORRUPTIONS]
        if unknown:
            raise ValueError(f"unknown corruptions {unknown}; known: {sorted(CORRUPTIONS)}")
        if len(set(value)) != len(value):
            raise ValueError("corruption names must be unique")
        return value

    @field_validator("severities")
    @classmethod
    def _valid_severities(cls, value: list[int]) -> list[int]:
        if any(v not in SEVERITIES for v in value):
            raise ValueError(f"severities are 1..5, got {value}")
        if len(set(value)) != len(value):
            raise ValueError("severities must be unique")
        return sorted(value)


class AdapterConfig(_Strict):
    """A parameter-efficient adapter on the frozen encoder (training/adapters.py)."""

    kind: AdapterKind
    rank: Int = Field(8, ge=1)
    alpha: float = Field(8.0, gt=0)  # peft's default (r 8, alpha 8), as the LoRA reference
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | None = None
    reduction_factor: Int = Field(16, ge=1)
    merge: bool = False

    @model_validator(mode="after")
    def _merge_is_lora(self) -> "AdapterConfig":
        if self.merge and self.kind != "lora":
            raise ValueError("adapter.merge: only LoRA updates merge into the base weights; use merge: false")
        return self

    def factory_kwargs(self) -> dict[str, Any]:
        """The settings ``adapters.add_adapter`` takes (what a run's ``finetuned_model`` passes on)."""
        keys = ("kind", "rank", "alpha", "dropout", "target_modules") if self.kind == "lora" else ("kind", "reduction_factor")
        return {key: getattr(self, key) for key in keys}


class KnnConfig(_Strict):
    """Per-epoch weighted kNN (core/knn.py) of the pre-logits: train-split bank, test-split queries."""

    k: Int = Field(20, ge=1)
    temperature: float = Field(0.07, gt=0)
    n_train: Int | None = Field(None, gt=0)


class ClipConfig(_Strict):
    """FLYP (task: contrastive): an open_clip CLIP model and the prompts of the class names."""

    model_name: str | None = None
    model_config_dict: dict[str, Any] | None = Field(None, alias="model_config")
    pretrained: str | None = None
    class_names: list[str] | None = None
    templates: list[str] | None = None

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, protected_namespaces=())

    @model_validator(mode="after")
    def _one_model(self) -> "ClipConfig":
        if (self.model_name is None) == (self.model_config_dict is None):
            raise ValueError("give exactly one of clip.model_name (an open_clip name) or clip.model_config (a dict)")
        for template in self.templates or []:
            if "{}" not in template:
                raise ValueError(f"clip.templates: {template!r} has no '{{}}' for the class name")
        return self


class FinetuneResources(_Strict):
    """What each run (each sweep trial) asks Ray for, and how often Tune restarts a failed trial."""

    num_gpus: float = Field(0.0, ge=0)
    num_cpus: float = Field(1.0, gt=0)
    max_failures: Int = Field(2, ge=0)


# what task: contrastive (FLYP) starts from where the config does not say (the FLYP paper's settings)
FLYP_DEFAULTS: dict[str, Any] = {"optimizer": "adamw", "lr": 1e-5, "weight_decay": 0.1, "warmup_steps": 500}


class FinetuneConfig(_Strict):
    """One finetuning run (or a grid of them): model, data, task, optimizer, schedule, outputs."""

    # {path key: the value as written} for the relative paths resolve_finetune_paths resolved, and
    # the folder they were resolved against (a sweep's trials resolve their own values there too)
    _paths_as_written: dict[str, str] = PrivateAttr(default_factory=dict)
    _paths_base: str | None = PrivateAttr(default=None)

    output: str
    storage_options: dict[str, Any] = Field(default_factory=dict, repr=False)  # may hold credentials
    model: ModelConfig | None = None
    pretrained: str | None = None
    data: FinetuneDataConfig
    task: TaskName = "classification"
    method: MethodName = "full"
    lp_epochs: Int | None = Field(None, ge=1)
    lp_lr: float | None = Field(None, gt=0)
    adapter: AdapterConfig | None = None
    clip: ClipConfig | None = None
    knn: KnnConfig | None = None
    num_classes: Int | None = Field(None, gt=0)
    optimizer: OptimizerName = "sgd"
    lr: float = Field(1e-3, gt=0)
    momentum: float = Field(0.9, ge=0)
    weight_decay: float = Field(1e-4, ge=0)
    epochs: Int = Field(100, ge=1)
    warmup_steps: Int = Field(0, ge=0)
    batch_size: Int = Field(64, ge=1)
    augment: bool = False
    seed: Int = 0
    checkpoint_every: Int = Field(1, ge=1)
    corruptions: CorruptionsConfig = Field(default_factory=CorruptionsConfig)
    resources: FinetuneResources = Field(default_factory=FinetuneResources)
    sweep: dict[str, list[Any]] | None = None

    @field_validator("sweep")
    @classmethod
    def _sweep_shape(cls, value: dict[str, list[Any]] | None) -> dict[str, list[Any]] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("give at least one key with a list of values, e.g. {lr: [0.001, 0.01]}")
        for key, values in value.items():
            if key.split(".")[0] in _NOT_SWEEPABLE:
                raise ValueError(f"{key!r} cannot be swept (not sweepable: {', '.join(_NOT_SWEEPABLE)})")
            if key.split(".")[0] not in cls.model_fields:
                close = did_you_mean(key.split(".")[0], [k for k in cls.model_fields if k not in _NOT_SWEEPABLE])
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise ValueError(f"{key!r} is not a finetune config key{hint}")
            if not values:
                raise ValueError(f"{key}: give a non-empty list of values")
            if len({json.dumps(v, sort_keys=True, default=str) for v in values}) != len(values):
                raise ValueError(f"{key}: values must be unique")
        return value

    @model_validator(mode="before")
    @classmethod
    def _flyp_defaults(cls, data: Any) -> Any:
        """``task: contrastive`` (FLYP) trains as Goyal et al. 2022 unless told otherwise: AdamW,
        lr 1e-5, weight decay 0.1, 500 warmup steps, then the cosine decay."""
        if isinstance(data, dict) and data.get("task") == "contrastive":
            return {**FLYP_DEFAULTS, **data}
        return data

    @model_validator(mode="after")
    def _method_fits(self) -> "FinetuneConfig":
        if self.task == "contrastive":
            if self.clip is None:
                raise ValueError("task: contrastive needs a clip section (clip.model_name or clip.model_config)")
            if self.model is not None:
                raise ValueError("model: a contrastive run builds its model from clip; leave model out")
            if self.method != "full" or self.adapter is not None:
                raise ValueError("task: contrastive trains the whole CLIP (method: full, no adapter)")
        else:
            if self.model is None:
                raise ValueError("model: required (a timm arch + kwargs, or a factory)")
            if self.clip is not None:
                raise ValueError("clip: only task: contrastive reads the clip section")
        if self.method == "lp_ft":
            if self.lp_epochs is None or self.lp_epochs >= self.epochs:
                raise ValueError(f"lp_epochs: method lp_ft needs 1 <= lp_epochs < epochs ({self.epochs}), got {self.lp_epochs}")
        if self.method == "linear_probe" and self.adapter is not None:
            raise ValueError("adapter: method linear_probe trains the head only; drop the adapter or use method full")
        return self

    @model_validator(mode="after")
    def _trials_valid(self) -> "FinetuneConfig":
        # every grid point must be a valid config: fail at parse time, not in the 7th trial
        if self.sweep is not None:
            for params in grid_points(self.sweep):
                try:
                    self.for_trial(params)
                except ConfigError as exc:
                    detail = str(exc).split("\n", 1)[-1].strip()
                    raise ValueError(f"sweep: the trial {trial_name(params)} is not a valid config: {detail}") from None
        return self

    def train_settings(self, stage: str = "ft") -> TrainSettings:
        """The optimizer and schedule of one stage: ``lp`` (lp_ft's first lp_epochs, at lp_lr or lr)
        or ``ft`` (the rest; every epoch of method full and linear_probe)."""
        epochs, lr = self.epochs, self.lr
        if self.method == "lp_ft":
            epochs = self.lp_epochs if stage == "lp" else self.epochs - self.lp_epochs
            lr = (self.lp_lr or self.lr) if stage == "lp" else self.lr
        return TrainSettings(
            epochs=epochs, batch_size=self.batch_size, lr=lr, optimizer=self.optimizer,
            momentum=self.momentum, weight_decay=self.weight_decay, augment=self.augment, seed=self.seed,
            warmup_steps=self.warmup_steps,
        )  # fmt: skip

    def stage(self, epoch: int) -> str:
        """``lp`` when only the head trains in ``epoch`` (linear_probe; lp_ft's first lp_epochs), else ``ft``."""
        if self.method == "linear_probe" or (self.method == "lp_ft" and epoch <= self.lp_epochs):
            return "lp"
        return "ft"

    def settings_as_written(self, exclude: set[str]) -> dict[str, Any]:
        """The settings except ``exclude``, as JSON, with every path as written in the config: the
        folder a config runs from (a Ray job's unpacked working dir) never changes them."""
        settings = self.model_dump(mode="json", exclude=exclude, by_alias=True)
        for key, value in self._paths_as_written.items():
            *parents, leaf = key.split(".")
            section = settings
            for part in parents:
                section = section.get(part) or {}
            if leaf in section:
                section[leaf] = value
        return settings

    def fingerprint(self) -> str:
        """Hash of every setting that changes the trained weights: a run resumes only under the
        same fingerprint. Not in it: output, storage, resources, sweep, corruptions, checkpoint_every, knn."""
        settings = self.settings_as_written({"output", "storage_options", "resources", "sweep", "corruptions",
                                             "checkpoint_every", "knn"})  # fmt: skip
        for key, default in _NEW_KEY_DEFAULTS.items():  # runs from before these keys keep their fingerprint
            if settings.get(key) == default:
                settings.pop(key, None)
        canonical = json.dumps(settings, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def for_trial(self, params: dict[str, Any]) -> "FinetuneConfig":
        """The config of one grid point: ``params`` applied (dotted keys reach nested sections),
        output ``<output>/<trial name>``, no sweep."""
        raw = self.model_dump(mode="python", by_alias=True, exclude_none=True)
        for key, value in params.items():
            section = raw
            *parents, leaf = key.split(".")
            for part in parents:
                if not isinstance(section.get(part), dict):
                    section[part] = {}
                section = section[part]
            section[leaf] = value
        raw["output"] = f"{self.output.rstrip('/')}/{trial_name(params)}"
        raw["sweep"] = None
        trial = parse_finetune_config(raw)
        if self._paths_base is None:
            return trial
        # a trial's own path values (a sweep over pretrained or data.path) resolve as the config's do
        trial, _ = resolve_finetune_paths(trial, self._paths_base)
        overridden = {key for key in self._paths_as_written for param in params if key == param or key.startswith(param + ".")}
        trial._paths_as_written = {**{key: value for key, value in self._paths_as_written.items() if key not in overridden},
                                   **trial._paths_as_written}  # fmt: skip
        trial._paths_as_written.pop("output", None)  # <output>/<trial name>: output is in no hash
        return trial

    def trials(self) -> list[tuple[str, FinetuneConfig]]:
        """(trial name, config) per grid point; without a sweep, one run named ``run`` at ``output``."""
        if self.sweep is None:
            return [("run", self)]
        return [(trial_name(params), self.for_trial(params)) for params in grid_points(self.sweep)]


def grid_points(sweep: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """The cartesian product of the sweep's value lists, in the order of the keys."""
    keys = list(sweep)
    return [dict(zip(keys, values)) for values in itertools.product(*(sweep[key] for key in keys))]


def _value_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    return str(value)


def trial_name(params: dict[str, Any]) -> str:
    """Filesystem-safe name of a grid point: ``{optimizer: sgd, lr: 0.001}`` -> ``optimizer-sgd_lr-0.001``."""
    parts = [f"{key}-{_value_text(value)}" for key, value in params.items()]
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", "_".join(parts))


def parse_finetune_config(raw: dict[str, Any]) -> FinetuneConfig:
    """A dict (as read from YAML) -> validated FinetuneConfig, or ConfigError naming every bad key."""
    return validate_config(FinetuneConfig, raw, kind="finetune", reference="invariance/training/README.md")


def load_finetune_config(path: str | Path) -> FinetuneConfig:
    """Read and validate a YAML finetune config from a local path or any fsspec URL, its relative
    paths resolved against the file's folder (as a run config's are)."""
    return resolve_finetune_paths(parse_finetune_config(read_yaml(path)), config_folder(str(path)))[0]


def clip_pretrained_is_file(config: FinetuneConfig) -> bool:
    """Whether ``clip.pretrained`` names a file (else an open_clip tag such as ``openai``, which
    downloads): as ``contrastive.build_clip`` reads it."""
    clip = config.clip
    if clip is None or clip.pretrained is None:
        return False
    value = clip.pretrained
    return clip.model_config_dict is not None or "/" in value or value.endswith((".pt", ".bin", ".safetensors"))


def resolve_finetune_paths(config: FinetuneConfig, base: str | None = None) -> tuple[FinetuneConfig, ResolvedPaths]:
    """``config`` with its relative paths (``output``, ``pretrained``, ``data.path``, a checkpoint
    file in ``clip.pretrained``) made absolute against ``base`` (the config file's folder; the
    working directory when None), ``~`` expanded, as io/paths.py does for a run config. The
    fingerprint keeps the paths as written; a sweep's trials resolve their own values against ``base``."""
    cwd = os.getcwd()
    base = base if base is not None else cwd
    relative: dict[str, str] = {}

    def resolved(key: str, value: str | None) -> str | None:
        if value is None or value in NOT_PATHS.get(key, ()):
            return value
        if is_relative_path(value):
            relative[key] = value
            return _join(base, value)
        return os.path.expanduser(value) if value.startswith("~") else value

    update: dict[str, Any] = {"output": resolved("output", config.output), "pretrained": resolved("pretrained", config.pretrained),
                              "data": config.data.model_copy(update={"path": resolved("data.path", config.data.path)})}  # fmt: skip
    if clip_pretrained_is_file(config):
        update["clip"] = config.clip.model_copy(update={"pretrained": resolved("clip.pretrained", config.clip.pretrained)})
    result = config.model_copy(update=update)
    result._paths_as_written = {**config._paths_as_written, **relative}
    result._paths_base = base
    return result, ResolvedPaths(base, cwd, relative)


def portable(config: FinetuneConfig) -> dict[str, Any]:
    """What a trial's config travels to its Tune worker as (JSON): the settings and the paths as
    written (the fingerprint takes those); ``from_portable`` reads it back."""
    return {"config": config.model_dump(mode="json", by_alias=True), "paths_as_written": dict(config._paths_as_written)}


def from_portable(value: dict[str, Any]) -> FinetuneConfig:
    """The config ``portable`` wrote, its paths already absolute."""
    config = parse_finetune_config(value["config"])
    config._paths_as_written = dict(value.get("paths_as_written") or {})
    return config
