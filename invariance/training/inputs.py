"""A finetune config's inputs, checked before any training starts (on the driver, before Ray
Tune starts a trial): every error names the key. What fails here would otherwise fail inside a
trial, minutes later, after the data was loaded and Tune had retried it.

Checked: ``output`` not inside the data; ``data.path`` exists; both splits exist with
``data.image_column`` and ``data.label_column`` (Parquet: from the files' schemas, no image
read; image folders and CIFAR: the first image of each split is read, with its label);
``pretrained`` and a ``clip.pretrained`` checkpoint file exist; a run saved at ``output`` can be
resumed by this config (``run.check_resume``).
"""

from __future__ import annotations

import re
from typing import Any

from invariance.config import DataConfig
from invariance.errors import ConfigError, DataError
from invariance.io.checkpoints import weights_fingerprint
from invariance.io.data import check_labelled, load_labelled_images
from invariance.io.storage import Store, is_inside, open_filesystem, redact
from invariance.training.config import FinetuneConfig, clip_pretrained_is_file
from invariance.training.run import check_resume, saved_progress

# the side an image is resized to when a split is checked by reading its first image
_CHECK_SIZE = 8


def check_finetune_inputs(config: FinetuneConfig, checked: set[str] | None = None) -> None:
    """Raise ConfigError, DataError or CheckpointError naming the key when ``config`` (one run or
    one trial) cannot train. ``checked``: the inputs (data sections, weight files) already checked
    for another trial of the same sweep, skipped here and added to."""
    checked = set() if checked is None else checked
    check_output_location(config)
    data_key = "data:" + config.data.model_dump_json()
    if data_key not in checked:
        check_finetune_data(config)
        checked.add(data_key)
    weights = [("pretrained", config.pretrained)]
    if config.clip is not None and config.clip.pretrained is not None and clip_pretrained_is_file(config):
        weights.append(("clip.pretrained", config.clip.pretrained))
    for key, url in weights:
        if url is not None and url != "timm" and f"{key}:{url}" not in checked:
            weights_fingerprint(url, config.storage_options, key=key)
            checked.add(f"{key}:{url}")
    check_resume(config, saved_progress(config))


def check_output_location(config: FinetuneConfig) -> None:
    """ConfigError naming ``output`` when it lies inside the data folder: the run's checkpoints and
    metrics Parquet files would be read as data (as a run config's output is checked)."""
    if is_inside(config.output, config.data.path, config.storage_options):
        raise ConfigError(f"output: {redact(config.output)} lies inside the data.path folder {redact(config.data.path)}; "
                          "the run's own files (checkpoints, metrics Parquet) would be read as data: choose an output "
                          "outside it")  # fmt: skip


def _split_data(config: FinetuneConfig, split: str) -> DataConfig:
    data = config.data
    return DataConfig(format=data.format, path=data.path, split=split, n_samples=1, selection="first",
                      image_size=_CHECK_SIZE, image_column=data.image_column)  # fmt: skip


def _named(error: DataError, key: str, split: str) -> DataError:
    """The loaders name the split ``data.split``; a finetune config names it ``key``."""
    message = re.sub(r"\bdata\.split\b", key, str(error))
    prefix = f"{key} {split!r}"
    return DataError(message if message.startswith(prefix) else f"{prefix}: {message}")


def check_finetune_data(config: FinetuneConfig) -> None:
    """DataError naming the key when ``data.path`` is missing, a split (``data.train_split``,
    ``data.test_split``) is not in it, or its files lack ``data.image_column`` or
    ``data.label_column`` (or an image folder its class subfolders)."""
    data, options = config.data, config.storage_options
    fs, root = open_filesystem(data.path, options)
    try:
        exists = fs.exists(root)
    except Exception as exc:  # noqa: BLE001 - every backend raises its own types
        raise DataError(f"data.path: cannot read {redact(data.path)} ({type(exc).__name__}: {redact(str(exc))})") from exc
    if not exists:
        raise DataError(f"data.path {redact(data.path)}: not found")
    for key, split in (("data.train_split", data.train_split), ("data.test_split", data.test_split)):
        _check_split(config, key, split, options)


def _check_split(config: FinetuneConfig, key: str, split: str, options: dict[str, Any]) -> None:
    data, part = config.data, _split_data(config, split)
    if data.format == "parquet":  # the schemas only: the split's files hold both columns
        for column_key, column in (("data.image_column", data.image_column), ("data.label_column", data.label_column)):
            try:
                check_labelled(part, column, options)
            except DataError as exc:
                if str(exc).startswith("data.split"):
                    raise _named(exc, key, split) from None
                raise DataError(f"{column_key} {column!r}: {exc}") from None
        return
    try:  # the loaders' own split and label checks, on the first image
        load_labelled_images(part, _CHECK_SIZE, options, data.label_column)
    except DataError as exc:
        raise _named(exc, key, split) from None
