"""Eval images X: n samples, chosen deterministically, as ``[n, 3, S, S]`` floats in [0, 1].

Sources (all read through fsspec): CIFAR-10/100 python batches, an image folder with one
subfolder per class, or a Parquet table of encoded images (the Hugging Face datasets
export: an ``image`` struct column with ``bytes``, or a plain binary column).
Images are resized (shorter side to S) and center-cropped to the model's input size.
The same readers give class labels for training (``load_labelled_images``): CIFAR's
``labels`` / ``fine_labels``, the class subfolder's index, or a Parquet label column (integers,
or strings: class names, indexed in sorted order over every split of the dataset). Labels that
are names come with their names (``EvalImages.classes``): two datasets (a kNN bank and the eval
images) index the same class alike only by name (``core/knn_probe.py``, ``align_labels``).
"""

from __future__ import annotations

import hashlib
import io
import pickle
import re
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from invariance.config import DataConfig
from invariance.errors import DataError
from invariance.io.storage import fingerprint_info, open_filesystem, redact

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# Bumped when decoding changes the pixels of unchanged files: it is part of every fingerprint.
# 2: 16-bit images scaled by their bit depth (were saturated by an 8-bit conversion)
DECODE_VERSION = 2
# split folder names an image-folder dataset is recognised by (with any folder of class folders)
KNOWN_SPLITS = ("train", "test", "validation", "valid", "val", "eval", "dev")
_INTEGER_MODES = {"I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I;16N": 65535.0, "I": 65535.0}
_CIFAR_SPLIT_FILES = {
    "test": (["test_batch"], ["test"]),
    "train": ([f"data_batch_{k}" for k in range(1, 6)], ["train"]),
}


@dataclass(frozen=True)
class EvalImages:
    """``images: [n, 3, S, S]`` float32 in [0, 1]; ``indices: [n]`` positions in the split;
    ``labels: [n]`` int64 class labels when they were asked for, else None; ``fingerprint``: the
    content of the chosen images (their stored bytes, positions, size and decoding), "" when
    built by hand. The same fingerprint means the same images on any machine. ``classes``: the
    name of each label (label k is ``classes[k]``) where the labels are names (an image folder's
    class subfolders, a Parquet column of strings); None for integer labels (CIFAR, Parquet
    integers), which mean the same class in every dataset."""

    images: torch.Tensor
    indices: torch.Tensor
    labels: torch.Tensor | None = None
    fingerprint: str = ""
    classes: tuple[str, ...] | None = None


def _fingerprint(config: DataConfig, size: int, indices: np.ndarray, sources: list[bytes]) -> str:
    """Hash of what the chosen images are made of: each one's stored bytes (encoded file, CIFAR
    row), its position, the output size and the decoding version. Not the decoded floats, which
    may differ in the last bit between CPUs; not the path, which does not change the numbers."""
    digest = hashlib.sha256(f"{config.format}|{size}|decode{DECODE_VERSION}|".encode())
    digest.update(np.asarray(indices, dtype=np.int64).tobytes())
    for source in sources:
        digest.update(len(source).to_bytes(8, "little"))
        digest.update(source)
    return digest.hexdigest()[:16]


def is_hidden(path: str, root: str) -> bool:
    """Whether ``path`` or a folder between ``root`` and it is hidden (``.DS_Store``, macOS ``._*``
    resource forks, ``.ipynb_checkpoints``): never data."""
    relative = path[len(root.rstrip("/")) + 1 :] if path.startswith(root.rstrip("/") + "/") else path.rsplit("/", 1)[-1]
    return any(part.startswith(".") for part in relative.split("/"))


def source_fingerprint(config: DataConfig, storage_options: dict[str, Any] | None = None, key: str = "data.path") -> str:
    """Identity of the files a dataset is read from, without reading them: its sorted listing (each
    file's name below ``config.path`` and the ETag / MD5 the store keeps, else size and modification
    time; hidden files left out). Replacing, adding or removing a file changes it; so does a copy
    to a new place (new times), which computes anew rather than reuse. For a dataset too large to
    load at plan time (the kNN bank); the eval images are fingerprinted by content."""
    fs, root = open_filesystem(config.path, storage_options)
    try:
        if fs.isfile(root):
            listing = {root: fs.info(root)}
        else:
            listing = fs.find(root, detail=True)
    except Exception as exc:  # noqa: BLE001 - every backend raises its own types
        raise DataError(f"{key}: cannot list {redact(config.path)} ({type(exc).__name__}: {redact(str(exc))})") from exc
    files = sorted((path, info) for path, info in listing.items() if not is_hidden(path, root))
    if not files:
        raise DataError(f"{key}: no file at or below {redact(config.path)}")
    digest = hashlib.sha256(f"{config.format}|decode{DECODE_VERSION}|".encode())
    for path, info in files:
        digest.update(f"{path[len(root.rstrip('/')):]}={fingerprint_info(info)}\n".encode())
    return digest.hexdigest()[:16]


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
        raise DataError(
            f"data.n_samples is {config.n_samples} but {redact(config.path)} ({config.split}) holds only {total} images"
        )
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
    """Encoded image bytes -> ``[3, H, W]`` float in [0, 1], scaled by the image's bit depth
    (16-bit PNGs by 65535: an 8-bit conversion would saturate them)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.mode in _INTEGER_MODES:
                array = np.asarray(image)
                if array.size and (array.min() < 0 or array.max() > _INTEGER_MODES[image.mode]):
                    raise DataError(
                        f"cannot decode image {where}: {image.mode} values {array.min()}..{array.max()} "
                        "are outside 16 bits; save it as 8- or 16-bit"
                    )
                gray = torch.from_numpy(array.astype(np.float32) / _INTEGER_MODES[image.mode])
                return gray.unsqueeze(0).expand(3, *gray.shape).contiguous()
            if image.mode == "F":
                array = np.asarray(image, dtype=np.float32)
                if array.size and not (np.isfinite(array).all() and array.min() >= 0.0 and array.max() <= 1.0):
                    raise DataError(f"cannot decode image {where}: a float image must hold values in [0, 1]")
                gray = torch.from_numpy(array.copy())
                return gray.unsqueeze(0).expand(3, *gray.shape).contiguous()
            array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    except DataError:
        raise
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
        raise DataError(
            f"data.path {redact(config.path)} is not a folder (expected cifar-10-batches-py or cifar-100-python)"
        )
    for names in _CIFAR_SPLIT_FILES[config.split]:
        paths = [f"{root.rstrip('/')}/{name}" for name in names]
        if all(fs.exists(p) for p in paths):
            break
    else:
        raise DataError(
            f"data.path {redact(config.path)}: no CIFAR {config.split} batches; expected 'test_batch' / "
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
            raise DataError(f"{redact(path)}: not a CIFAR python batch ({exc})") from exc
    data = np.concatenate(arrays)
    indices = request.indices(len(data), config)
    chosen = data[indices]
    images = torch.from_numpy(chosen.copy()).float().div_(255.0)
    all_labels = np.concatenate(labels) if labels else None
    fingerprint = _fingerprint(config, size, indices, [chosen.tobytes()])
    return EvalImages(to_model_input(images, size), torch.from_numpy(indices), request.labels(all_labels, indices), fingerprint)


def _class_names(fs: Any, split_roots: list[str]) -> list[str]:
    """The class names of an image folder: the sorted union of the class subfolders of every
    split, so that a class missing from one split shifts no label of another."""
    names: set[str] = set()
    for split_root in split_roots:
        names.update(entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(split_root, detail=False)
                     if fs.isdir(entry) and not is_hidden(entry, split_root))  # fmt: skip
    return sorted(names)


def _class_indices(files: list[str], root: str, names: list[str]) -> np.ndarray:
    """The class of each file: the index among ``names`` of its subfolder below ``root``."""
    classes = [path[len(root) + 1 :].split("/", 1)[0] if "/" in path[len(root) + 1 :] else "" for path in files]
    if "" in classes:
        raise DataError(f"{root}: labels need one subfolder per class; found images directly in the folder")
    index = {name: position for position, name in enumerate(names)}
    return np.asarray([index[name] for name in classes], dtype=np.int64)


def _subfolders(fs: Any, root: str) -> list[str]:
    """The visible subfolders of ``root`` (full paths, sorted)."""
    return sorted(entry.rstrip("/") for entry in fs.ls(root, detail=False) if fs.isdir(entry) and not is_hidden(entry, root))


def _load_imagefolder(config: DataConfig, size: int, options: dict[str, Any], request: _Request) -> EvalImages:
    fs, root = open_filesystem(config.path, options)
    root = root.rstrip("/")
    if not fs.isdir(root):
        raise DataError(f"data.path {redact(config.path)} is not a folder of class subfolders")
    split_roots = [root]
    folders = _subfolders(fs, root)
    if f"{root}/{config.split}" in folders:
        # <path>/<split>/<class>/...: every sibling of the split folder is a split too
        split_roots = folders
        root = f"{root}/{config.split}"
    else:
        names = [folder.rsplit("/", 1)[-1] for folder in folders]
        # split folders (train/, test/, or folders of class folders) but none named data.split:
        # a typo must not fall back to every split, train included
        if any(name in KNOWN_SPLITS for name in names) or any(_subfolders(fs, folder) for folder in folders):
            raise DataError(
                f"data.split {config.split!r}: no such split folder in {redact(config.path)}; splits found: {names}"
            )
    files = sorted(p for p in fs.find(root) if p.lower().endswith(IMAGE_SUFFIXES) and not is_hidden(p, root))
    if not files:
        raise DataError(
            f"data.path {redact(config.path)}: no images ({', '.join(IMAGE_SUFFIXES)}) found below {redact(root)}"
        )
    indices = request.indices(len(files), config)
    sources = [fs.cat_file(files[k]) for k in indices]
    decoded = [_decode(source, redact(files[k])) for source, k in zip(sources, indices)]
    names = _class_names(fs, split_roots) if request.label_column is not None else None
    all_labels = _class_indices(files, root, names) if names is not None else None
    fingerprint = _fingerprint(config, size, indices, sources)
    return EvalImages(_stack_resized(decoded, size), torch.from_numpy(indices), request.labels(all_labels, indices), fingerprint,
                      tuple(names) if names is not None else None)  # fmt: skip


_SPLIT_NAME = re.compile(r"^([^-_.]+)")


def _split_of_file(path: str, root: str, split: str) -> bool:
    """Whether a Parquet file belongs to ``split``: a folder named ``split`` below ``root``
    (``test/0000.parquet``), or a file name that is the split name, alone or followed by
    ``-``, ``_`` or ``.`` (``test-00000-of-00001.parquet``, ``test.parquet``). Not a substring:
    ``latest-00000.parquet`` is not ``test``."""
    relative = path[len(root) + 1 :]
    *folders, name = relative.split("/")
    stem = name[: -len(".parquet")]
    return split in folders or stem == split or any(stem.startswith(split + sep) for sep in "-_.")


def _parquet_files(config: DataConfig, fs: Any, root: str) -> list[str]:
    if fs.isfile(root):
        return [root]
    root = root.rstrip("/")
    files = sorted(p for p in fs.find(root) if p.endswith(".parquet") and not is_hidden(p, root))
    split_files = [p for p in files if _split_of_file(p, root, config.split)]
    if not split_files:
        found = _parquet_splits(files, root)
        raise DataError(
            f"data.split {config.split!r}: no Parquet files of that split in {redact(config.path)} "
            f"(a file named {config.split}[-_.]*.parquet or a {config.split}/ folder, among {len(files)} files); "
            f"splits found: {found}"
        )
    return split_files


def _parquet_splits(files: list[str], root: str) -> list[str]:
    """The split names a Parquet dataset's files suggest: their folders and file-name stems."""
    return sorted({part for p in files for part in
                   [*p[len(root) + 1 :].split("/")[:-1], _SPLIT_NAME.match(p.rsplit("/", 1)[-1]).group(1)]})  # fmt: skip


def _image_bytes(value: Any, column: str, where: str) -> bytes:
    if value is None or (isinstance(value, dict) and value.get("bytes") is None):
        raise DataError(f"data.image_column {column!r}: {where} holds no image (a null cell); drop the row or fill it")
    if isinstance(value, dict):
        value = value.get("bytes")
    if not isinstance(value, (bytes, bytearray)):
        raise DataError(f"data.image_column {column!r}: {where}: expected encoded image bytes or a struct with 'bytes'")
    return bytes(value)


def _load_parquet(config: DataConfig, size: int, options: dict[str, Any], request: _Request) -> EvalImages:
    import pyarrow.parquet as pq

    fs, root = open_filesystem(config.path, options)
    if not fs.exists(root):
        raise DataError(f"data.path {redact(config.path)} does not exist")
    columns = [config.image_column] + ([request.label_column] if request.label_column is not None else [])
    tables, origins = [], []  # origins: (file, row in it) of every row, for messages
    for path in _parquet_files(config, fs, root):
        with fs.open(path, "rb") as handle:
            schema = pq.read_schema(handle)
            for name, key in zip(columns, ("data.image_column", "data.label_column")):
                if name not in schema.names:
                    raise DataError(f"{redact(path)}: no column {name!r} ({key}); columns: {schema.names}")
            handle.seek(0)
            tables.append(pq.read_table(handle, columns=columns))
        origins += [(path, row) for row in range(tables[-1].num_rows)]
    column = [value for table in tables for value in table.column(config.image_column).to_pylist()]
    indices = request.indices(len(column), config)

    def where(k: int) -> str:
        return f"row {k} of the split (row {origins[k][1]} of {redact(origins[k][0])})"

    sources = [_image_bytes(column[k], config.image_column, where(k)) for k in indices]
    decoded = [_decode(source, where(k)) for source, k in zip(sources, indices)]
    all_labels, names = None, None
    if request.label_column is not None:
        values = [value for table in tables for value in table.column(request.label_column).to_pylist()]
        all_labels, names = _parquet_labels(values, request.label_column, where)
        if names is not None:  # names: indexed over every split, as an image folder's classes
            names = _parquet_label_names(config, fs, root, request.label_column, options)
            index = {name: position for position, name in enumerate(names)}
            all_labels = np.asarray([index[value] for value in values], dtype=np.int64)
    fingerprint = _fingerprint(config, size, indices, sources)
    return EvalImages(_stack_resized(decoded, size), torch.from_numpy(indices), request.labels(all_labels, indices), fingerprint,
                      tuple(names) if names is not None else None)  # fmt: skip


def _parquet_labels(values: list[Any], column: str, where: Callable[[int], str]) -> tuple[np.ndarray | None, list[str] | None]:
    """A Parquet label column's values -> (integer labels, None), or (None, sorted names) where
    they are strings (class names); DataError naming ``data.label_column`` for a null, a mix, a
    float or a negative integer, with the row (``where``)."""
    for k, value in enumerate(values):
        if value is None:
            raise DataError(f"label column {column!r}: {where(k)} has no label (a null cell); drop the row or fill it")
    if values and all(isinstance(value, str) for value in values):
        return None, sorted(set(values))
    for k, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise DataError(f"label column {column!r}: class labels must be integers >= 0 or strings (class names); "
                            f"{where(k)} holds {value!r}")  # fmt: skip
        if value < 0:
            raise DataError(f"label column {column!r}: class labels must be integers >= 0; {where(k)} holds {value}")
    return np.asarray(values, dtype=np.int64), None


def _parquet_label_names(config: DataConfig, fs: Any, root: str, column: str, options: dict[str, Any]) -> list[str]:
    """The sorted class names of a Parquet dataset with string labels: over every split (every
    Parquet file below ``root`` holding ``column``), so that a class missing from one split
    shifts no label of another."""
    import pyarrow.parquet as pq

    files = [root] if fs.isfile(root) else sorted(p for p in fs.find(root.rstrip("/")) if p.endswith(".parquet")
                                                  and not is_hidden(p, root.rstrip("/")))  # fmt: skip
    names: set[str] = set()
    for path in files:
        with fs.open(path, "rb") as handle:
            if column not in pq.read_schema(handle).names:
                continue
            handle.seek(0)
            names.update(value for value in pq.read_table(handle, columns=[column]).column(column).to_pylist()
                         if isinstance(value, str))  # fmt: skip
    return sorted(names)


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
        raise DataError(f"data.path {redact(config.path)}: not found ({redact(str(exc))})") from exc


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


def check_labelled(config: DataConfig, label_column: str, storage_options: dict[str, Any] | None = None) -> None:
    """DataError when ``config``'s split has no class labels, found without loading an image: a
    Parquet file of the split without ``label_column`` (its schema only), an image folder with
    no class subfolders. CIFAR batches always have labels."""
    fs, root = open_filesystem(config.path, storage_options or {})
    if config.format == "parquet":
        import pyarrow.parquet as pq

        for path in _parquet_files(config, fs, root):
            try:
                with fs.open(path, "rb") as handle:
                    names = pq.read_schema(handle).names
            except Exception as exc:  # noqa: BLE001 - pyarrow and every backend raise their own types
                raise DataError(f"{redact(path)}: not a readable Parquet file ({type(exc).__name__}: {exc})") from exc
            if label_column not in names:
                raise DataError(f"{redact(path)}: no column {label_column!r}; columns: {names}")
    elif config.format == "imagefolder" and not class_names(config, storage_options):
        raise DataError(f"{redact(config.path)}: labels need one subfolder per class; found no class subfolder")


def class_names(config: DataConfig, storage_options: dict[str, Any] | None = None) -> list[str] | None:
    """The name of each class label, label order: CIFAR's ``batches.meta`` (``label_names``) or
    ``meta`` (``fine_label_names``), an image folder's class subfolders (sorted, every split);
    None for Parquet (it stores no names) or a CIFAR folder without its meta file."""
    fs, root = open_filesystem(config.path, storage_options or {})
    root = root.rstrip("/")
    if config.format == "cifar":
        for name, key in (("batches.meta", b"label_names"), ("meta", b"fine_label_names")):
            path = f"{root}/{name}"
            if fs.exists(path):
                try:
                    meta = _ArraysOnlyUnpickler(io.BytesIO(fs.cat_file(path)), encoding="bytes").load()
                    return [value.decode() if isinstance(value, bytes) else str(value) for value in meta[key]]
                except (pickle.UnpicklingError, KeyError, ValueError, EOFError) as exc:
                    raise DataError(f"{redact(path)}: not a CIFAR meta file ({exc})") from exc
        return None
    if config.format == "imagefolder":
        folders = _subfolders(fs, root)
        if f"{root}/{config.split}" in folders:
            return _class_names(fs, folders)
        return _class_names(fs, [root])
    return None


@dataclass(frozen=True)
class SplitSummary:
    """What the plan knows of a dataset's split without decoding an image: ``files`` it reads
    (paths as the filesystem names them; the kNN bank must share none with the eval images),
    ``count`` (images in the split), the ``splits`` its folder holds, and its labels (when asked
    for): ``classes`` (names, label order) where they are names, else ``integer_labels`` (the
    distinct integers)."""

    files: tuple[str, ...]
    count: int
    splits: tuple[str, ...]
    classes: tuple[str, ...] | None = None
    integer_labels: tuple[int, ...] | None = None


def describe_split(config: DataConfig, label_column: str | None = None,
                   storage_options: dict[str, Any] | None = None) -> SplitSummary:  # fmt: skip
    """``config``'s split as a SplitSummary: listings, Parquet metadata and label columns, CIFAR
    batches (read whole: their labels and rows are in one pickle); no image decoded. DataError
    as the readers give it (a missing split, bad labels)."""
    options = storage_options or {}
    fs, root = open_filesystem(config.path, options)
    root = root.rstrip("/") or root
    try:
        if config.format == "parquet":
            return _describe_parquet(config, fs, root, label_column, options)
        if config.format == "imagefolder":
            return _describe_imagefolder(config, fs, root, label_column)
        if config.format == "cifar":
            return _describe_cifar(config, fs, root, label_column)
    except FileNotFoundError as exc:
        raise DataError(f"data.path {redact(config.path)}: not found ({redact(str(exc))})") from exc
    raise DataError(f"data.format must be one of {sorted(_LOADERS)}, got {config.format!r}")


def _describe_parquet(config: DataConfig, fs: Any, root: str, label_column: str | None, options: dict[str, Any]) -> SplitSummary:
    import pyarrow.parquet as pq

    if not fs.exists(root):
        raise DataError(f"data.path {redact(config.path)} does not exist")
    files = _parquet_files(config, fs, root)
    everything = [root] if fs.isfile(root) else sorted(p for p in fs.find(root) if p.endswith(".parquet") and not is_hidden(p, root))
    count, values, origins = 0, [], []
    for path in files:
        try:
            with fs.open(path, "rb") as handle:
                rows = pq.read_metadata(handle).num_rows
                if label_column is not None:
                    handle.seek(0)
                    values += pq.read_table(handle, columns=[label_column]).column(label_column).to_pylist()
                    origins += [(path, row) for row in range(rows)]
        except DataError:
            raise
        except Exception as exc:  # noqa: BLE001 - pyarrow and every backend raise their own types
            raise DataError(f"{redact(path)}: not a readable Parquet file ({type(exc).__name__}: {exc})") from exc
        count += rows
    splits = tuple(_parquet_splits(everything, root)) if not fs.isfile(root) else ()
    if label_column is None:
        return SplitSummary(tuple(files), count, splits)

    def where(k: int) -> str:
        return f"row {k} of the split (row {origins[k][1]} of {redact(origins[k][0])})"

    integers, names = _parquet_labels(values, label_column, where)
    if names is not None:
        return SplitSummary(tuple(files), count, splits, classes=tuple(_parquet_label_names(config, fs, root, label_column, options)))
    return SplitSummary(tuple(files), count, splits, integer_labels=tuple(sorted(set(integers.tolist()))))


def _describe_imagefolder(config: DataConfig, fs: Any, root: str, label_column: str | None) -> SplitSummary:
    if not fs.isdir(root):
        raise DataError(f"data.path {redact(config.path)} is not a folder of class subfolders")
    folders = _subfolders(fs, root)
    split_roots, splits = [root], ()
    if f"{root}/{config.split}" in folders:
        split_roots, splits = folders, tuple(folder.rsplit("/", 1)[-1] for folder in folders)
        root = f"{root}/{config.split}"
    elif any(folder.rsplit("/", 1)[-1] in KNOWN_SPLITS for folder in folders) or any(_subfolders(fs, f) for f in folders):
        names = [folder.rsplit("/", 1)[-1] for folder in folders]
        raise DataError(f"data.split {config.split!r}: no such split folder in {redact(config.path)}; splits found: {names}")
    files = tuple(sorted(p for p in fs.find(root) if p.lower().endswith(IMAGE_SUFFIXES) and not is_hidden(p, root)))
    if label_column is None:
        return SplitSummary(files, len(files), splits)
    return SplitSummary(files, len(files), splits, classes=tuple(_class_names(fs, split_roots)))


def _describe_cifar(config: DataConfig, fs: Any, root: str, label_column: str | None) -> SplitSummary:
    """The batches of the split, unpickled for their row counts and labels (no image decoded)."""
    if config.split not in _CIFAR_SPLIT_FILES:
        raise DataError(f"data.split for cifar must be 'test' or 'train', got {config.split!r}")
    splits = tuple(split for split, options in _CIFAR_SPLIT_FILES.items()
                   if any(all(fs.exists(f"{root}/{name}") for name in names) for names in options))  # fmt: skip
    paths = next(([f"{root}/{name}" for name in names] for names in _CIFAR_SPLIT_FILES[config.split]
                  if all(fs.exists(f"{root}/{name}") for name in names)), None)  # fmt: skip
    if paths is None:
        raise DataError(f"data.path {redact(config.path)}: no CIFAR {config.split} batches; expected 'test_batch' / "
                        "'data_batch_1..5' (CIFAR-10) or 'test' / 'train' (CIFAR-100)")  # fmt: skip
    count, labels = 0, set()
    for path in paths:
        try:
            batch = _ArraysOnlyUnpickler(io.BytesIO(fs.cat_file(path)), encoding="bytes").load()
            count += len(batch[b"data"])
            labels.update(int(v) for v in (batch[b"labels"] if b"labels" in batch else batch[b"fine_labels"]))
        except (pickle.UnpicklingError, KeyError, ValueError, EOFError, TypeError) as exc:
            raise DataError(f"{redact(path)}: not a CIFAR python batch ({exc})") from exc
    integers = tuple(sorted(labels)) if label_column is not None else None
    return SplitSummary(tuple(paths), count, splits, integer_labels=integers)
