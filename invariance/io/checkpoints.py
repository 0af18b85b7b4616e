"""Checkpoints: discovery from a ``{epoch}`` URL pattern (with ``{run}`` once before it: a study of
many finetuning runs), and loading without executing code.

Formats: safetensors, and torch files read with ``torch.load(weights_only=True)`` holding a
plain state_dict or one under ``state_dict`` / ``model`` / ``model_state_dict``, with
``module.`` (DDP) or ``_orig_mod.`` (torch.compile) prefixes stripped.
"""

from __future__ import annotations

import io
import pickle
import re
from dataclasses import dataclass
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem

from invariance.errors import CheckpointError, StorageError
from invariance.io.fingerprint_cache import FingerprintCache
from invariance.io.storage import fingerprint_file, open_filesystem, redact

EPOCH_PLACEHOLDER = "{epoch}"
RUN_PLACEHOLDER = "{run}"
# epochs are stored as Int64 (shard rows, hive folders): a larger number cannot be reduced
MAX_EPOCH = 2**63 - 1
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module", "ema")
_STRIPPED_PREFIXES = ("module.", "_orig_mod.")


def empty_weights_error(key: str, url: str) -> CheckpointError:
    """The error for a 0-byte weights file under config key ``key``."""
    return CheckpointError(f"{key}: {redact(url)} is empty (0 bytes); a failed save or a copy still being "
                           "written? Replace it with the weights, or remove it")  # fmt: skip


@dataclass(frozen=True, order=True)
class Checkpoint:
    """One finetuning checkpoint: its epoch (sort key), name (its path from where the pattern
    varies, without extension: ``epoch=07``, ``epoch=07/model``), URL, and fingerprint (the
    file's identity: content hash, ETag or size and mtime; a file replaced in place changes it)."""

    epoch: int
    name: str
    url: str
    fingerprint: str = ""
    run: str = ""  # the text ``{run}`` matched (a study of many runs); empty without ``{run}``

    @property
    def key(self) -> tuple[str, int]:
        """(run, epoch): what tells one checkpoint of a study from another."""
        return self.run, self.epoch


def glob_escape(path: str) -> str:
    """``path`` with glob's special characters (``*?[``) matched literally: ``run[1]`` -> ``run[[]1]``."""
    return "".join(f"[{char}]" if char in "*?[" else char for char in path)


def weights_fingerprint(url: str, storage_options: dict[str, Any] | None = None, key: str = "pretrained") -> str:
    """Identity of the weights at ``url`` (``timm`` names timm's own weights: its version)."""
    if url == "timm":
        import timm

        return f"timm-{timm.__version__}"
    try:
        fs, path = open_filesystem(url, storage_options)
        return fingerprint_file(fs, path)
    except StorageError as exc:
        raise CheckpointError(f"{key}: {exc}") from exc
    except FileNotFoundError:
        raise CheckpointError(f"{key}: no file at {redact(url)}") from None
    except Exception as exc:  # noqa: BLE001 - every backend raises its own types
        raise CheckpointError(f"{key}: cannot read {redact(url)} ({type(exc).__name__}: {redact(str(exc))})") from exc


def check_pattern(pattern: str) -> None:
    """CheckpointError unless ``pattern`` holds ``{epoch}`` once and at most one ``{run}``, before it."""
    if pattern.count(EPOCH_PLACEHOLDER) != 1:
        raise CheckpointError(
            f"checkpoints: the pattern must contain {EPOCH_PLACEHOLDER} exactly once, "
            f"e.g. 's3://lab/run/epoch={EPOCH_PLACEHOLDER}.safetensors'; got {redact(pattern)!r}"
        )
    if pattern.count(RUN_PLACEHOLDER) > 1 or (RUN_PLACEHOLDER in pattern
                                              and pattern.index(RUN_PLACEHOLDER) > pattern.index(EPOCH_PLACEHOLDER)):
        raise CheckpointError(
            f"checkpoints: {RUN_PLACEHOLDER} may stand once, before {EPOCH_PLACEHOLDER}, e.g. "
            f"'s3://lab/runs/{RUN_PLACEHOLDER}/epoch={EPOCH_PLACEHOLDER}.safetensors'; got {redact(pattern)!r}"
        )


def pattern_root(pattern: str) -> str:
    """The fixed folder of a checkpoint pattern: everything before the folder where it starts to vary."""
    first = min(pattern.index(p) for p in (EPOCH_PLACEHOLDER, RUN_PLACEHOLDER) if p in pattern)
    return pattern[:first].rsplit("/", 1)[0]


def discover_checkpoints(pattern: str, storage_options: dict[str, Any] | None = None) -> list[Checkpoint]:
    """All files matching ``pattern`` (which holds ``{epoch}`` once, an integer, and optionally
    ``{run}`` once before it: any text without '/'), by (run, epoch)."""
    check_pattern(pattern)
    has_run = RUN_PLACEHOLDER in pattern
    marked = pattern.replace(EPOCH_PLACEHOLDER, "EPOCHPLACEHOLDER").replace(RUN_PLACEHOLDER, "RUNPLACEHOLDER")
    fs, path_pattern = open_filesystem(marked, storage_options)
    path_pattern = path_pattern.replace("EPOCHPLACEHOLDER", EPOCH_PLACEHOLDER).replace("RUNPLACEHOLDER", RUN_PLACEHOLDER)
    before, after = path_pattern.split(EPOCH_PLACEHOLDER)
    # ASCII digits only: \d would read Unicode digits (epoch=\uff12) as an epoch
    if has_run:
        before_run, between = before.split(RUN_PLACEHOLDER)
        matcher = re.compile(re.escape(before_run) + r"([^/]+)" + re.escape(between) + r"([0-9]+)" + re.escape(after) + "$")
        # the fixed parts are literal: a '[' in a folder name is not a glob character class
        glob = glob_escape(before_run) + "*" + glob_escape(between) + "*" + glob_escape(after)
    else:
        matcher = re.compile(re.escape(before) + r"([0-9]+)" + re.escape(after) + "$")
        glob = glob_escape(before) + "*" + glob_escape(after)
    try:
        fs.invalidate_cache()
        candidates = fs.glob(glob, detail=True)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(
            f"checkpoints: cannot list {redact(pattern)!r}: {type(exc).__name__}: {redact(str(exc))}"
        ) from exc
    found: dict[tuple[str, int], Checkpoint] = {}
    hashes = FingerprintCache()  # local files' hashes by stat: an unchanged file is not read again
    for path, info in sorted(candidates.items()):
        match = matcher.match(path)
        if match is None or info.get("type", "file") != "file":
            continue
        run, digits = (match.group(1), match.group(2)) if has_run else ("", match.group(1))
        epoch = int(digits)
        url = path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)
        if epoch > MAX_EPOCH:
            raise CheckpointError(
                f"checkpoints: {redact(url)}: epoch {digits} is beyond the largest epoch a table can "
                f"hold ({MAX_EPOCH}); rename the file or narrow the pattern"
            )
        if (run, epoch) in found:
            where = f"run {run!r}: epoch {epoch}" if has_run else f"epoch {epoch}"
            raise CheckpointError(
                f"checkpoints: {where} matches two files ({redact(found[run, epoch].url)} and {redact(url)}); "
                "make the pattern specific to one file per " + ("run and epoch" if has_run else "epoch")
            )
        if info.get("size") == 0:  # from the listing: a 0-byte file would fail each of its shards in the workers
            raise empty_weights_error("checkpoints", url)
        fingerprint = fingerprint_file(fs, path, info, hashes)  # as a worker reads it (weights_fingerprint): one function
        name_from = before.replace(RUN_PLACEHOLDER, run)
        found[run, epoch] = Checkpoint(epoch=epoch, name=_checkpoint_name(path, name_from), url=url,
                                       fingerprint=fingerprint, run=run)  # fmt: skip
    hashes.save()
    return sorted(found.values(), key=lambda c: c.key)


def run_folders(checkpoints: list[Checkpoint]) -> list[str]:
    """The run folders of the checkpoints (where their pattern starts to vary, e.g. ``run`` for
    ``run/epoch=07.safetensors`` and ``run/epoch=07/model.safetensors``), in order of first appearance."""
    return list(dict.fromkeys(c.url[: c.url.rfind(c.name)].rstrip("/") for c in checkpoints))


def _checkpoint_name(path: str, before_epoch: str) -> str:
    """The path from the folder where the pattern starts to vary, without the file extension:
    ``epoch=07`` for ``.../epoch={epoch}.safetensors``, ``epoch=07/model`` for
    ``.../epoch={epoch}/model.safetensors`` (not ``model`` for every epoch)."""
    varying = path[before_epoch.rfind("/") + 1 :]
    folder, _, file_name = varying.rpartition("/")
    stem = file_name.rsplit(".", 1)[0] if "." in file_name else file_name
    return f"{folder}/{stem}" if folder else stem


def _unwrap(obj: Any, url: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in _WRAPPER_KEYS:
            if key in obj and isinstance(obj[key], dict) and obj[key]:
                inner = obj[key]
                if all(isinstance(v, torch.Tensor) for v in inner.values()):
                    obj = inner
                    break
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{redact(url)}: expected a state_dict (a dict of tensors), got {type(obj).__name__}")
    state: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{redact(url)}: entry {key!r} is a {type(value).__name__}, not a tensor; save "
                "model.state_dict() (optionally under 'state_dict' or 'model')"
            )
        for prefix in _STRIPPED_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        state[key] = value
    return state


def is_safetensors(url: str) -> bool:
    """Whether ``url`` names a safetensors file, by its path: a presigned or signed URL ends with its
    query (``.../pt.safetensors?X-Amz-Signature=...``), a plain path may hold '?' or '#'."""
    path = re.split(r"[?#]", url, maxsplit=1)[0] if "://" in url else url
    return path.endswith(".safetensors")


def parse_state_dict(data: bytes, url: str) -> dict[str, torch.Tensor]:
    """Checkpoint bytes -> state_dict, never executing code from the file."""
    if is_safetensors(url):
        from safetensors.torch import load as load_safetensors

        try:
            state = load_safetensors(data)
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise CheckpointError(f"{redact(url)}: not a readable safetensors file ({redact(str(exc))})") from exc
    else:
        try:
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise CheckpointError(
                f"{redact(url)}: refused to load: the pickle holds objects other than tensors and plain "
                "containers (it could execute code). Re-save it as model.state_dict(), or as "
                f"safetensors. Detail: {str(exc).splitlines()[0]}"
            ) from exc
        except Exception as exc:  # noqa: BLE001 - corrupt zip, truncated file, ...
            raise CheckpointError(f"{redact(url)}: not a readable torch checkpoint ({type(exc).__name__}: {redact(str(exc))})") from exc
        state = _unwrap(obj, url)
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{redact(url)}: NaN or inf values in {len(bad)} tensors, e.g. {bad[:5]}")
    return state


def check_float_weights(state: dict[str, torch.Tensor], model_state: dict[str, torch.Tensor], source: str) -> None:
    """CheckpointError naming the tensors that hold integers where the model has floats (an int8 /
    quantized checkpoint), which loading would otherwise cast to float silently."""
    integer = [
        f"{key}: {state[key].dtype}"
        for key in sorted(set(model_state) & set(state))
        if model_state[key].is_floating_point() and not state[key].is_floating_point()
    ]
    if integer:
        raise CheckpointError(
            f"{redact(source)}: {len(integer)} tensors hold integers where the model has floats, e.g. "
            f"{integer[:5]}; a quantized (int8) checkpoint cannot be compared: save the float weights"
        )


def load_state_dict(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """Read a checkpoint from any fsspec URL into a CPU state_dict."""
    fs, path = open_filesystem(url, storage_options)
    try:
        data = fs.cat_file(path)
    except FileNotFoundError as exc:
        raise CheckpointError(f"checkpoint not found: {redact(url)}") from exc
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"cannot read checkpoint {redact(url)}: {type(exc).__name__}: {redact(str(exc))}") from exc
    return parse_state_dict(data, url)
