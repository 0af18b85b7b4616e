"""One finetuning run: a timm ViT from a pretrained checkpoint (or from scratch) trained on
an image dataset, writing a checkpoint series that `invariance run` discovers.

Layout below the run's output prefix (any fsspec URL; written through ``Store.put``):

    initial.safetensors          the weights training starts from (pretrained + new head)
    epoch=NN.safetensors         the ViT's state_dict after epoch NN (every checkpoint_every)
    metrics/epoch=NN.parquet     one row: losses, clean and corrupted test accuracy
    _state/last.pt               optimizer, schedule and task state of the last checkpoint

A run that finds ``_state/last.pt`` resumes after that checkpoint's epoch with the same
optimizer state and cosine schedule: on CPU it ends with the same weights as a run that
was never interrupted. ``_state/last.pt`` holds plain tensors and containers only
(read back with ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import polars as pl
import torch
from safetensors.torch import save as safetensors_bytes

from invariance.config import DataConfig
from invariance.core.knn import knn_accuracy
from invariance.core.models import load_model, load_weights
from invariance.errors import ConfigError, DataError
from invariance.io.checkpoints import load_state_dict
from invariance.io.data import EvalImages, class_names, load_labelled_images, to_model_input
from invariance.io.layout import (
    FINETUNE_ANALYSIS,
    FINETUNE_INITIAL,
    FINETUNE_STATE,
    finetune_checkpoint_key,
    finetune_metrics_key,
)
from invariance.io.storage import Store, redact
from invariance.training.adapters import add_adapter, adapter_parameters, merged_state
from invariance.training.config import FinetuneConfig
from invariance.training.corruptions import corrupt
from invariance.training.loop import Trainer
from invariance.training.tasks import Task, build_task

log = logging.getLogger(__name__)
# Keep the corrupted test sets in memory between epochs up to this size; regenerate above it.
_CORRUPTED_CACHE_BYTES = 512 * 2**20

METRICS_SCHEMA = {
    "epoch": pl.Int64,
    "task": pl.String,
    "method": pl.String,
    "stage": pl.String,
    "train_loss": pl.Float64,
    "lr": pl.Float64,
    "test_loss": pl.Float64,
    "clean_accuracy": pl.Float64,
    "corrupted_loss": pl.Float64,
    "corrupted_accuracy": pl.Float64,
    "knn_k": pl.Int64,
    "knn_top1": pl.Float64,
    "knn_top5": pl.Float64,
    "n_train": pl.Int64,
    "n_test": pl.Int64,
    "n_corrupted": pl.Int64,
    "checkpoint": pl.Boolean,
    "seconds": pl.Float64,
    "corrupted": pl.List(
        pl.Struct({"corruption": pl.String, "severity": pl.Int64, "loss": pl.Float64, "accuracy": pl.Float64})
    ),
}


@dataclass(frozen=True)
class FinetuneData:
    """``train``/``test``: images ``[n, 3, S, S]`` in [0, 1] with ``labels: [n]``; S is
    ``data.image_size`` or the model's input size (batches are resized to the model's)."""

    train: EvalImages
    test: EvalImages
    num_classes: int


@dataclass
class FinetuneResult:
    """What one call did: the epochs it trained (after ``resumed_from``) and their metric rows."""

    output: str
    resumed_from: int
    epochs_run: int
    metrics: pl.DataFrame


def _split_config(config: FinetuneConfig, split: str, n_samples: int | None) -> DataConfig:
    """The eval loaders' config for one split (n_samples None: the whole split is asked for instead)."""
    data = config.data
    return DataConfig(
        format=data.format, path=data.path, split=split, n_samples=n_samples or 1, selection=data.selection,
        selection_seed=data.selection_seed, image_size=data.image_size, image_column=data.image_column,
    )  # fmt: skip


def load_finetune_data(config: FinetuneConfig, input_size: int) -> FinetuneData:
    """The train split (``n_train`` images, or all) and ``n_test`` test images, with labels."""
    options, label = config.storage_options, config.data.label_column
    train = load_labelled_images(_split_config(config, config.data.train_split, config.data.n_train), input_size,
                                 options, label, whole_split=config.data.n_train is None)  # fmt: skip
    test = load_labelled_images(_split_config(config, config.data.test_split, config.data.n_test), input_size, options, label)
    largest = int(max(train.labels.max(), test.labels.max()))
    if int(min(train.labels.min(), test.labels.min())) < 0:
        raise DataError(f"data.label_column {label!r}: negative class labels in {config.data.path}")
    num_classes = config.num_classes or largest + 1
    if config.task == "classification" and largest >= num_classes:
        raise ConfigError(f"num_classes: {num_classes}, but {config.data.path} has labels up to {largest}")
    return FinetuneData(train, test, num_classes)


@torch.no_grad()
def score(task: Task, images: torch.Tensor, labels: torch.Tensor, input_size: int, batch_size: int,
          clean: torch.Tensor | None = None) -> tuple[float, float | None]:  # fmt: skip
    """(mean loss, accuracy or None) of ``task`` on ``images: [n, 3, H, W]`` in [0, 1];
    ``clean`` (default: the images) is what a reconstruction should give back."""
    device = task.mean.device
    task.eval()
    loss_sum, correct, has_accuracy = 0.0, 0, True
    for begin in range(0, len(images), batch_size):
        part = slice(begin, begin + batch_size)
        inputs = to_model_input(images[part].to(device), input_size)
        targets = inputs if clean is None else to_model_input(clean[part].to(device), input_size)
        batch_loss, batch_correct = task.score(inputs, labels[part].to(device), targets)
        loss_sum += batch_loss
        has_accuracy = batch_correct is not None
        correct += batch_correct or 0
    n = max(1, len(images))
    return loss_sum / n, (correct / n if has_accuracy else None)


class CorruptedTestSets:
    """The corrupted copies of a test subset, one per (name, severity); kept in memory when small."""

    def __init__(self, images: torch.Tensor, names: list[str], severities: list[int], seed: int) -> None:
        self.images, self.seed = images, seed
        self.pairs = [(name, severity) for name in names for severity in severities]
        size = images.numel() * images.element_size() * len(self.pairs)
        self._cache: dict[tuple[str, int], torch.Tensor] | None = {} if size <= _CORRUPTED_CACHE_BYTES else None

    def __iter__(self) -> Iterator[tuple[str, int, torch.Tensor]]:
        for name, severity in self.pairs:
            if self._cache is not None and (name, severity) in self._cache:
                yield name, severity, self._cache[(name, severity)]
                continue
            corrupted = corrupt(self.images, name, severity, self.seed)
            if self._cache is not None:
                self._cache[(name, severity)] = corrupted
            yield name, severity, corrupted


def evaluate_epoch(task: Task, data: FinetuneData, corrupted: CorruptedTestSets, input_size: int,
                   batch_size: int) -> dict[str, Any]:  # fmt: skip
    """Clean and corrupted test scores; corrupted means are over every (name, severity)."""
    test_loss, clean_accuracy = score(task, data.test.images, data.test.labels, input_size, batch_size)
    labels = data.test.labels[: len(corrupted.images)]
    rows = []
    for name, severity, images in corrupted:
        loss, accuracy = score(task, images, labels, input_size, batch_size, clean=corrupted.images)
        rows.append({"corruption": name, "severity": severity, "loss": loss, "accuracy": accuracy})
    accuracies = [row["accuracy"] for row in rows if row["accuracy"] is not None]
    return {
        "test_loss": test_loss,
        "clean_accuracy": clean_accuracy,
        "corrupted_loss": sum(row["loss"] for row in rows) / len(rows) if rows else None,
        "corrupted_accuracy": sum(accuracies) / len(accuracies) if accuracies else None,
        "n_test": len(data.test.images),
        "n_corrupted": len(corrupted.images) if rows else 0,
        "corrupted": rows,
    }


def _frame(rows: list[dict[str, Any]]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=METRICS_SCHEMA)


def _put_torch(store: Store, key: str, value: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    store.put(key, buffer.getvalue())


@dataclass(frozen=True)
class SavedProgress:
    """Where a run at an output stands: the epoch of its last checkpoint, whether it was
    trained with the same settings, and the optimizer/schedule and task state to resume."""

    epoch: int
    same_settings: bool
    trainer: dict[str, Any]
    task: dict[str, Any]
    stage: str = "ft"
    network: dict[str, Any] | None = None
    # resume_settings() of the run that saved it (None: saved before they were recorded)
    settings: dict[str, Any] | None = None


def resume_settings(config: FinetuneConfig) -> dict[str, Any]:
    """Every setting a resumed run must share with the run it continues: those of the fingerprint
    (they change the weights; the data and task among them, which also say what the test metrics
    are of) and those that change what a metrics column means without touching the weights (the
    corruption set, the kNN probe). Paths as written, as the fingerprint takes them."""
    settings = config.settings_as_written({"output", "storage_options", "resources", "sweep", "checkpoint_every"})
    # stored in the run's resume state (a binary file, not redacted on write): paths without their
    # credentials (a presigned pretrained URL's signature, userinfo), compared the same way
    return json.loads(redact(json.dumps(settings)))


_ABSENT = "(not set)"  # a key the saved settings lack (a key newer than the run)


def _differences(old: Any, new: Any, key: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, old, new) of every setting that differs; a section on one side only is one entry."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [difference for name in sorted(set(old) | set(new), key=str)
                for difference in _differences(old.get(name, _ABSENT), new.get(name, _ABSENT),
                                               f"{key}.{name}" if key else name)]  # fmt: skip
    return [] if old == new else [(key, old, new)]


def check_resume(config: FinetuneConfig, progress: SavedProgress | None, store: Store | None = None) -> None:
    """ConfigError when the run saved at ``config.output`` cannot be continued by ``config``: it was
    trained with other settings (its weights), or scored on another corruption set or kNN probe
    (its later epochs would sit under the same metrics columns, meaning something else). The data,
    the labels and the task are in the fingerprint: they change the weights and the metrics alike.
    The message names each key that differs, with both values."""
    if progress is None:
        return
    store = store or Store(config.output, dict(config.storage_options))
    if progress.settings is not None:
        differences = _differences(progress.settings, resume_settings(config))
        if progress.same_settings:  # a key newer than the run, at its default: the same run
            differences = [(key, old, new) for key, old, new in differences if old is not _ABSENT]
    elif progress.same_settings:  # saved before the settings were recorded: the metrics rows tell
        differences = _corruption_differences(config, progress, store)
    else:
        differences = []  # ... and the fingerprint tells that something differs, not what
    if progress.same_settings and not differences:
        return
    listed = "; ".join(f"{key}: {old!r} before, {new!r} now" for key, old, new in differences)
    if progress.same_settings:
        problem = (f"whose metrics (epochs 1..{progress.epoch}) were scored with other settings: {listed}; resumed, its "
                   "later epochs would be scored on other data under the same metrics columns")  # fmt: skip
    else:
        problem = "trained with other settings" + (f": {listed}" if listed else "")
    raise ConfigError(f"output: {store.url(FINETUNE_STATE)} belongs to a run {problem}. Give this run a new output, or "
                      f"resume with the old settings (or delete {store.url('')} to start over)")  # fmt: skip


def _corruption_differences(config: FinetuneConfig, progress: SavedProgress, store: Store) -> list[tuple[str, Any, Any]]:
    """For a run saved before its settings were recorded: the corruption set of the metrics row of
    its last checkpoint epoch against ``config``'s (names and severities, as the row lists them)."""
    key = finetune_metrics_key(progress.epoch)
    if not store.exists(key):
        return []
    rows = store.read_parquet([key]).to_dicts()
    if not rows or rows[0].get("corrupted") is None:
        return []
    pairs = [(item["corruption"], item["severity"]) for item in rows[0]["corrupted"]]
    names, severities = list(dict.fromkeys(name for name, _ in pairs)), sorted({severity for _, severity in pairs})
    differences = []
    if pairs and names != config.corruptions.names:
        differences.append(("corruptions.names", names, config.corruptions.names))
    if pairs and severities != config.corruptions.severities:
        differences.append(("corruptions.severities", severities, config.corruptions.severities))
    if not pairs and config.corruptions.names and config.corruptions.severities:
        differences.append(("corruptions.names", [], config.corruptions.names))
    return differences


def saved_progress(config: FinetuneConfig) -> SavedProgress | None:
    """The progress saved at ``config.output``, or None when no checkpoint was saved there yet.

    The one reader of ``_state/last.pt`` (plain tensors and containers: ``weights_only``)."""
    store = Store(config.output, dict(config.storage_options))
    if not store.exists(FINETUNE_STATE):
        return None
    state = torch.load(io.BytesIO(store.get(FINETUNE_STATE)), map_location="cpu", weights_only=True)
    return SavedProgress(int(state["epoch"]), state["fingerprint"] == config.fingerprint(), state["trainer"], state["task"],
                         state.get("stage", "ft"), state.get("network"), _json_settings(state.get("settings")))  # fmt: skip


def _json_settings(value: Any) -> dict[str, Any] | None:
    # stored as JSON text: weights_only loading takes plain containers, and JSON keeps None and lists as written
    return json.loads(value) if isinstance(value, str) else None


def log_epoch(row: dict[str, Any]) -> None:
    """The default per-epoch log line (INFO)."""
    parts = [f"epoch {row['epoch']}: train loss {row['train_loss']:.4f}", f"test loss {row['test_loss']:.4f}"]
    if row["clean_accuracy"] is not None:
        parts.append(f"accuracy {row['clean_accuracy']:.1%}")
    if row["corrupted_accuracy"] is not None:
        parts.append(f"corrupted accuracy {row['corrupted_accuracy']:.1%}")
    elif row["corrupted_loss"] is not None:
        parts.append(f"corrupted loss {row['corrupted_loss']:.4f}")
    log.info("  %s", ", ".join(parts))


@dataclass
class Producer:
    """What a run trains and writes: the task around its network, the data, how a checkpoint is
    made from the network, and the run-config sections that read the checkpoints."""

    task: Task
    network: torch.nn.Module
    data: FinetuneData
    input_size: int
    checkpoint: Callable[[], dict[str, torch.Tensor]]
    analysis: dict[str, Any]
    # the checkpoint cannot be loaded back into the trained module (merged LoRA, CLIP image tower):
    # the resume state carries the module's own state_dict
    network_in_state: bool = False


def _model_section(config: FinetuneConfig) -> dict[str, Any]:
    return config.model.model_dump(mode="json", exclude_none=True, exclude={"strict"})


def build_producer(config: FinetuneConfig, store: Store) -> Producer:
    """The task, data and checkpoint function of ``config``; writes ``initial.safetensors`` (the
    plain network training starts from, new head included) on a fresh start."""
    if config.task == "contrastive":
        return _contrastive_producer(config, store)
    model = load_model(config.model, config.pretrained, config.storage_options)
    network, input_size = model.network.requires_grad_(True), model.input_size
    data = load_finetune_data(config, input_size)
    task = build_task(config.task, network, model.mean.flatten().tolist(), model.std.flatten().tolist(),
                      data.num_classes)  # fmt: skip
    if not store.exists(FINETUNE_INITIAL):
        store.put(FINETUNE_INITIAL, _state_bytes(network.state_dict()))
    plain = {**_model_section(config), "kwargs": {**config.model.kwargs, "num_classes": data.num_classes}}
    if config.task != "classification":
        plain = _model_section(config)
    analysis: dict[str, Any] = {"model": plain}
    checkpoint: Callable[[], dict[str, torch.Tensor]] = network.state_dict
    merged = False
    if config.adapter is not None:
        add_adapter(network, **config.adapter.factory_kwargs())
        merged = config.adapter.merge
        if merged:
            checkpoint = lambda: merged_state(network)  # noqa: E731
        else:
            source = {"arch": plain["arch"]} if config.model.arch else {"factory": config.model.factory}
            analysis["finetuned_model"] = {
                "factory": "invariance.training.adapters:adapted_model",
                "kwargs": {**source, "kwargs": plain["kwargs"], "adapter": config.adapter.factory_kwargs()},
                **{key: plain[key] for key in ("mean", "std") if key in plain},
            }
    return Producer(task, network, data, input_size, checkpoint, analysis, network_in_state=merged)


def _contrastive_producer(config: FinetuneConfig, store: Store) -> Producer:
    from invariance.training.contrastive import (
        DEFAULT_TEMPLATES,
        ContrastiveTask,
        build_clip,
        check_tower_conversion,
        image_tower_model,
        image_tower_state,
    )

    section = config.clip
    clip = build_clip(section.model_name, section.model_config_dict, section.pretrained, config.storage_options)
    check_tower_conversion(clip)
    data = load_finetune_data(config, clip.input_size)
    names = section.class_names or class_names(_split_config(config, config.data.train_split, None), config.storage_options)
    if names is None:
        raise ConfigError(f"clip.class_names: {config.data.path} stores no class names ({config.data.format}); list them, in label order")
    if len(names) < data.num_classes:
        raise ConfigError(f"clip.class_names: {len(names)} names, but the data has labels up to {data.num_classes - 1}")
    task = ContrastiveTask(clip, names, section.templates or DEFAULT_TEMPLATES, config.seed)
    if not store.exists(FINETUNE_INITIAL):
        store.put(FINETUNE_INITIAL, _state_bytes(image_tower_state(clip)))
    return Producer(task, clip.model.requires_grad_(True), data, clip.input_size, lambda: image_tower_state(clip),
                    {"model": image_tower_model(clip)}, network_in_state=False)  # fmt: skip


def trainable_parameters(config: FinetuneConfig, producer: Producer, stage: str) -> list[torch.nn.Parameter]:
    """Freeze everything, then unfreeze what ``stage`` trains: ``lp`` the head (the encoder then runs
    in eval mode, so it stays bitwise unchanged); ``ft`` the adapters and the head when there is an
    adapter, else every parameter."""
    task = producer.task
    task.requires_grad_(False)
    task.frozen_encoder = stage == "lp"
    if stage == "lp":
        parameters = task.head_parameters()
    elif config.adapter is not None:
        parameters = [parameter for _, parameter in adapter_parameters(producer.network)] + task.head_parameters()
    else:
        parameters = list(task.parameters())
    for parameter in parameters:
        parameter.requires_grad_(True)
    return parameters


@torch.no_grad()
def _features(task: Task, images: torch.Tensor, input_size: int, batch_size: int) -> torch.Tensor:
    """The pre-logits ``[n, d]`` of ``images: [n, 3, H, W]`` in [0, 1]."""
    device = task.mean.device
    task.eval()
    parts = [task.pre_logits(to_model_input(images[begin : begin + batch_size].to(device), input_size)).float()
             for begin in range(0, len(images), batch_size)]  # fmt: skip
    return torch.cat(parts)


def knn_scores(config: FinetuneConfig, task: Task, data: FinetuneData, input_size: int) -> dict[str, Any]:
    """``knn_k``, ``knn_top1``, ``knn_top5`` of the pre-logits (core/knn.py): the train split
    (its first ``knn.n_train`` images) as the labelled bank, the test split as queries."""
    if config.knn is None:
        return {"knn_k": None, "knn_top1": None, "knn_top5": None}
    n_bank = config.knn.n_train or len(data.train.images)
    bank = _features(task, data.train.images[:n_bank], input_size, config.batch_size)
    queries = _features(task, data.test.images, input_size, config.batch_size)
    scores = knn_accuracy(bank, data.train.labels[:n_bank], queries, data.test.labels, ks=(config.knn.k,),
                          temperature=config.knn.temperature, num_classes=data.num_classes)  # fmt: skip
    top1, top5 = scores[config.knn.k]
    return {"knn_k": config.knn.k, "knn_top1": top1, "knn_top5": top5}


def run_finetune(
    config: FinetuneConfig,
    on_epoch: Callable[[dict[str, Any]], None] | None = log_epoch,
    device: str | torch.device | None = None,
) -> FinetuneResult:
    """Train ``config`` (one run, no sweep), resuming after the last saved checkpoint if any.

    ``on_epoch(row)`` gets each epoch's metrics row once it is stored. ``device``: default
    CUDA when available, else CPU.
    """
    if config.sweep is not None:
        raise ConfigError("sweep: run_finetune trains one run; expand the grid with config.trials() (or `invariance finetune`)")
    store = Store(config.output, dict(config.storage_options))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(config.seed)
    progress = saved_progress(config)
    check_resume(config, progress, store)
    producer = build_producer(config, store)
    task, network, data, input_size = producer.task.to(device), producer.network, producer.data, producer.input_size
    if progress is None:
        resumed_from = 0
        store.put(FINETUNE_ANALYSIS, json.dumps(producer.analysis, indent=2, sort_keys=True).encode())
        if config.adapter is not None:  # the adapted model at init: its features are the base's
            store.put(finetune_checkpoint_key(0), _state_bytes(producer.checkpoint()))
    else:
        resumed_from = progress.epoch
        if progress.network is not None:
            network.load_state_dict(progress.network)
        elif config.task != "contrastive":
            url = store.url(finetune_checkpoint_key(resumed_from))
            load_weights(network, load_state_dict(url, config.storage_options), url)
        task.load_extra_state(progress.task)

    n_corrupted = min(config.corruptions.n_samples or len(data.test.images), len(data.test.images))
    corrupted = CorruptedTestSets(data.test.images[:n_corrupted], config.corruptions.names,
                                  config.corruptions.severities, config.corruptions.seed)  # fmt: skip
    rows = []
    trainer, trainer_stage = None, None
    for epoch in range(resumed_from + 1, config.epochs + 1):
        stage = config.stage(epoch)
        if stage != trainer_stage:  # a new stage starts with its own optimizer and schedule
            parameters = trainable_parameters(config, producer, stage)
            trainer = Trainer(parameters, config.train_settings(stage), len(data.train.images))
            if progress is not None and progress.stage == stage and epoch == resumed_from + 1:
                trainer.load_state_dict(progress.trainer)
            trainer_stage = stage
        started = time.time()
        lr = trainer.lr
        train_loss = trainer.run_epoch(epoch, task, task.loss, data.train.images, data.train.labels, input_size)
        row = {"epoch": epoch, "task": config.task, "method": config.method, "stage": stage, "train_loss": train_loss,
               "lr": lr, "n_train": len(data.train.images),
               **evaluate_epoch(task, data, corrupted, input_size, config.batch_size),
               **knn_scores(config, task, data, input_size)}  # fmt: skip
        row["checkpoint"] = epoch % config.checkpoint_every == 0 or epoch == config.epochs
        row["seconds"] = time.time() - started
        if row["checkpoint"]:
            store.put(finetune_checkpoint_key(epoch), _state_bytes(producer.checkpoint()))
        store.put_parquet(finetune_metrics_key(epoch), _frame([row]))
        if row["checkpoint"]:  # last: a state names a checkpoint that is already complete
            state = {"epoch": epoch, "fingerprint": config.fingerprint(), "stage": stage,
                     "settings": json.dumps(resume_settings(config), sort_keys=True),
                     "trainer": trainer.state_dict(), "task": task.extra_state()}  # fmt: skip
            if producer.network_in_state:
                state["network"] = {key: value.detach().cpu() for key, value in network.state_dict().items()}
            _put_torch(store, FINETUNE_STATE, state)
        rows.append(row)
        if on_epoch is not None:
            on_epoch(row)
    return FinetuneResult(store.url(""), resumed_from, len(rows), _frame(rows))


def _state_bytes(state: dict[str, torch.Tensor]) -> bytes:
    """A state_dict as safetensors bytes (CPU, contiguous)."""
    return safetensors_bytes({key: value.detach().cpu().contiguous() for key, value in state.items()})
