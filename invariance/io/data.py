"""Eval images X: n samples, chosen deterministically, as ``[n, 3, S, S]`` floats in [0, 1].

Sources (all read through fsspec): CIFAR-10/100 python batches, an image folder with one
subfolder per class, or a Parquet table of encoded images (the Hugging Face datasets
export: an ``image`` struct column with ``bytes``, or a plain binary column).
Images are resized (shorter side to S) and center-cropped to the model's input size.
The same readers give class labels for training (``load_labelled_images``): CIFAR's
``labels`` / ``fine_labels``, the class subfolder's index, or a Parquet label column.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from invariance.config import DataConfig
from invariance.errors import DataError
from invariance.io.storage import open_filesystem

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_CIFAR_SPLIT_FILES = {
    "test": (["test_batch"], ["test"]),
    "train": ([f"data_batch_{k}" for k in range(1, 6)], ["train"]),
}


@dataclass(frozen=True)
class EvalImages:
    """``images: [n, 3, S, S]`` float32 in [0, 1]; ``indices: [n]`` positions in the split;
    ``labels: [n]`` int64 class labels when they were asked for, else None."""

    images: torch.Tensor
    indices: torch.Tensor
    labels: torch.Tensor | None = None


@dataclass(frozen=True)
class _Request:
    """What a reader returns: ``config``'s selection or the whole split; labels or not."""

    whole_split: bool = False
    label_column: str | None = None  # None: images only; any name asks for labels (Parquet reads that column)

    def indices(self, total: int, config: DataConfig) -> np.ndarray:
        return np.arange(total) if self.whole_split else select_indices(total, config)

    def labels(self, all_labels: np.ndarray | None, indices: np.ndarray) -> torch.Tensor | None:
        if self.label_column is None or all_labels is None:
            return None
        try:
            labels = np.asarray(all_labels, dtype=np.int64)[indices]
        except (TypeError, ValueError) as exc:
            raise DataError(f"data.label_column {self.label_column!r}: class labels must be integers ({exc})") from exc
        return torch.from_numpy(labels.copy())


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """CIFAR batches are pickles by format: allow numpy arrays and plain data, nothing else."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load {module}.{name}: not part of a CIFAR batch")


def select_indices(total: int, config: DataConfig) -> np.ndarray:
    """The n positions to use, sorted: the first n, or n at random with ``selection_seed``."""
    if config.n_samples > total:
        raise DataError(f"data.n_samples is {config.n_samples} but {config.path} ({config.split}) holds only {total} images")
    if config.selection == "first":
        return np.arange(config.n_samples)
    rng = np.random.default_rng(config.selection_seed)
    return np.sort(rng.choice(total, size=config.n_samples, replace=False))


def to_model_input(images: torch.Tensor, size: int) -> torch.Tensor:
    """``[n, 3, H, W]`` in [0, 1] -> ``[n, 3, size, size]``: shorter side to size, center crop."""
    height, width = images.shape[-2:]
    scale = size / min(height, width)
    new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
    if (new_h, new_w) != (height, width):
        images = F.interpolate(images, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return images[..., top : top + size, left : left + size].clamp(0.0, 1.0).contiguous()


def _decode(data: bytes, where: str) -> torch.Tensor:
    """Encoded image bytes -> ``[3, H, W]`` float in [0, 1]."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    except Exception as exc:  # noqa: BLE001 - PIL raises many types
        raise DataError(f"cannot decode image {where}: {exc}") from exc
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def _stack_resized(decoded: list[torch.Tensor], size: int) -> torch.Tensor:
    return torch.cat([to_model_input(image.unsqueeze(0), size) for image in decoded])


def _load_cifar(config: DataConfig, size: int, options: dict[str, Any], request: _Request) -> EvalImages:
    if config.split not in _CIFAR_SPLIT_FILES:
        raise DataError(f"data.split for cifar must be 'test' or 'train', got {config.split!r}")
    fs, root = open_filesystem(config.path, options)
    if not fs.isdir(root):
        raise DataError(f"data.path {config.path} is not a folder (expected cifar-10-batches-py or cifar-100-python)")
    for names in _CIFAR_SPLIT_FILES[config.split]:
        paths = [f"{root.rstrip('/')}/{name}" for name in names]
        if all(fs.exists(p) for p in paths):
            break
    else:
        raise DataError(
            f"data.path {config.path}: no CIFAR {config.split} batches; expected 'test_batch' / "
            "'data_batch_1..5' (CIFAR-10) or 'test' / 'train' (CIFAR-100)"
        )
    arrays, labels = [], []
    for path in paths:
        try:
            batch = _ArraysOnlyUnpickler(io.BytesIO(fs.cat_file(path)), encoding="bytes").load()
            arrays.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            if request.label_column is not None:  # CIFAR-10: labels; CIFAR-100: fine_labels (100 classes)
                labels.append(np.asarray(batch[b"labels"] if b"labels" in batch else batch[b"fine_labels"]))
        except (pickle.UnpicklingError, KeyError, ValueError, EOFError) as exc:
            raise DataError(f"{path}: not a CIFAR python batch ({exc})") from exc
    data = np.concatenate(arrays)
    indices = request.indices(len(data), config)
    images = torch.from_numpy(data[indices].copy()).float().div_(255.0)
    all_labels = np.concatenate(labels) if labels else None
    return EvalImages(to_model_input(images, size), torch.from_numpy(indices), request.labels(all_labels, indices))


def _class_names(fs: Any, split_roots: list[str]) -> list[str]:
    """The class names of an image folder: the sorted union of the class subfolders of every
    split, so that a class missing from one split shifts no label of another."""
    names: set[str] = set()
    for split_root in split_roots:
        names.update(entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(split_root, detail=False) if fs.isdir(entry))
    return sorted(names)


def _class_indices(files: list[str], root: str, names: list[str]) -> np.ndarray:
    """The class of each file: the index among ``names`` of its subfolder below ``root``."""
    classes = [path[len(root) + 1 :].split("/", 1)[0] if "/" in path[len(root) + 1 :] else "" for path in files]
    if "" in classes:
        raise DataError(f"{root}: labels need one subfolder per class; found images directly in the folder")
    index = {name: position for position, name in enumerate(names)}
    return np.asarray([index[name] for name in classes], dtype=np.int64)


def _load_imagefolder(config: DataConfig, size: int, options: dict[str, Any], request: _Request) -> EvalImages:
    fs, root = open_filesystem(config.path, options)
    root = root.rstrip("/")
    split_roots = [root]
    if fs.isdir(f"{root}/{config.split}"):
        # <path>/<split>/<class>/...: every sibling of the split folder is a split too
        split_roots = [entry.rstrip("/") for entry in fs.ls(root, detail=False) if fs.isdir(entry)]
        root = f"{root}/{config.split}"
    if not fs.isdir(root):
        raise DataError(f"data.path {config.path} is not a folder of class subfolders")
    files = sorted(p for p in fs.find(root) if p.lower().endswith(IMAGE_SUFFIXES))
    if not files:
        raise DataError(f"data.path {config.path}: no images ({', '.join(IMAGE_SUFFIXES)}) found below {root}")
    indices = request.indices(len(files), config)
    decoded = [_decode(fs.cat_file(files[k]), files[k]) for k in indices]
    all_labels = _class_indices(files, root, _class_names(fs, split_roots)) if request.label_column is not None else None
    return EvalImages(_stack_resized(decoded, size), torch.from_numpy(indices), request.labels(all_labels, indices))


def _parquet_files(config: DataConfig, fs: Any, root: str) -> list[str]:
    if fs.isfile(root):
        return [root]
    files = sorted(p for p in fs.find(root) if p.endswith(".parquet"))
    split_files = [p for p in files if config.split in p.rsplit("/", 2)[-1] or f"/{config.split}/" in p]
    if not split_files:
        raise DataError(
            f"data.path {config.path}: no Parquet files for split {config.split!r} "
            f"(looked for *{config.split}*.parquet among {len(files)} files)"
        )
    return split_files


def _image_bytes(value: Any, column: str) -> bytes:
    if isinstance(value, dict):
        value = value.get("bytes")
    if not isinstance(value, (bytes, bytearray)):
        raise DataError(f"data.image_column {column!r}: expected encoded image bytes or a struct with 'bytes'")
    return bytes(value)


def _load_parquet(config: DataConfig, size: int, options: dict[str, Any], request: _Request) -> EvalImages:
    import pyarrow.parquet as pq

    fs, root = open_filesystem(config.path, options)
    if not fs.exists(root):
        raise DataError(f"data.path {config.path} does not exist")
    columns = [config.image_column] + ([request.label_column] if request.label_column is not None else [])
    tables = []
    for path in _parquet_files(config, fs, root):
        with fs.open(path, "rb") as handle:
            schema = pq.read_schema(handle)
            for name, key in zip(columns, ("data.image_column", "data.label_column")):
                if name not in schema.names:
                    raise DataError(f"{path}: no column {name!r} ({key}); columns: {schema.names}")
            handle.seek(0)
            tables.append(pq.read_table(handle, columns=columns))
    column = [value for table in tables for value in table.column(config.image_column).to_pylist()]
    indices = request.indices(len(column), config)
    decoded = [_decode(_image_bytes(column[k], config.image_column), f"row {k} of {config.path}") for k in indices]
    all_labels = None
    if request.label_column is not None:
        all_labels = np.concatenate([table.column(request.label_column).to_numpy() for table in tables])
    return EvalImages(_stack_resized(decoded, size), torch.from_numpy(indices), request.labels(all_labels, indices))


_LOADERS: dict[str, Callable[[DataConfig, int, dict[str, Any], _Request], EvalImages]] = {
    "cifar": _load_cifar,
    "imagefolder": _load_imagefolder,
    "parquet": _load_parquet,
}


def _load(config: DataConfig, image_size: int, storage_options: dict[str, Any] | None, request: _Request) -> EvalImages:
    size = config.image_size or image_size
    try:
        loader = _LOADERS[config.format]
    except KeyError:
        raise DataError(f"data.format must be one of {sorted(_LOADERS)}, got {config.format!r}") from None
    try:
        return loader(config, size, storage_options or {}, request)
    except FileNotFoundError as exc:
        raise DataError(f"data.path {config.path}: not found ({exc})") from exc


def load_eval_images(config: DataConfig, image_size: int, storage_options: dict[str, Any] | None = None) -> EvalImages:
    """The eval set X for ``config``, at ``config.image_size`` or else ``image_size``."""
    return _load(config, image_size, storage_options, _Request())


def load_labelled_images(
    config: DataConfig,
    image_size: int,
    storage_options: dict[str, Any] | None = None,
    label_column: str = "label",
    whole_split: bool = False,
) -> EvalImages:
    """Images of ``config.split`` with ``labels: [n]`` int64, for training and accuracy.

    ``config.n_samples`` / ``selection`` choose the images, or ``whole_split`` takes them all.
    Labels: CIFAR ``labels`` (CIFAR-10) or ``fine_labels`` (CIFAR-100); an image folder's class
    subfolders in sorted order; the Parquet column ``label_column``.
    """
    return _load(config, image_size, storage_options, _Request(whole_split=whole_split, label_column=label_column))
