"""Checkpoints: discovery from a ``{epoch}`` URL pattern, and loading without executing code.

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

from invariance.errors import CheckpointError
from invariance.io.storage import open_filesystem

EPOCH_PLACEHOLDER = "{epoch}"
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module", "ema")
_STRIPPED_PREFIXES = ("module.", "_orig_mod.")


@dataclass(frozen=True, order=True)
class Checkpoint:
    """One finetuning checkpoint: its epoch (sort key), name (its path from where the pattern
    varies, without extension: ``epoch=07``, ``epoch=07/model``) and URL."""

    epoch: int
    name: str
    url: str


def discover_checkpoints(pattern: str, storage_options: dict[str, Any] | None = None) -> list[Checkpoint]:
    """All files matching ``pattern`` (which holds ``{epoch}`` once, an integer), by epoch."""
    if pattern.count(EPOCH_PLACEHOLDER) != 1:
        raise CheckpointError(
            f"checkpoints: the pattern must contain {EPOCH_PLACEHOLDER} exactly once, "
            f"e.g. 's3://lab/run/epoch={EPOCH_PLACEHOLDER}.safetensors'; got {pattern!r}"
        )
    fs, path_pattern = open_filesystem(pattern.replace(EPOCH_PLACEHOLDER, "EPOCHPLACEHOLDER"), storage_options)
    path_pattern = path_pattern.replace("EPOCHPLACEHOLDER", EPOCH_PLACEHOLDER)
    before, after = path_pattern.split(EPOCH_PLACEHOLDER)
    matcher = re.compile(re.escape(before) + r"(\d+)" + re.escape(after) + "$")
    try:
        fs.invalidate_cache()
        candidates = fs.glob(before + "*" + after)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"checkpoints: cannot list {pattern!r}: {type(exc).__name__}: {exc}") from exc
    found: dict[int, Checkpoint] = {}
    for path in candidates:
        match = matcher.match(path)
        if match is None:
            continue
        epoch = int(match.group(1))
        url = path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)
        if epoch in found:
            raise CheckpointError(
                f"checkpoints: epoch {epoch} matches two files ({found[epoch].url} and {url}); "
                "make the pattern specific to one run"
            )
        found[epoch] = Checkpoint(epoch=epoch, name=_checkpoint_name(path, before), url=url)
    return sorted(found.values())


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
        raise CheckpointError(f"{url}: expected a state_dict (a dict of tensors), got {type(obj).__name__}")
    state: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{url}: entry {key!r} is a {type(value).__name__}, not a tensor; save "
                "model.state_dict() (optionally under 'state_dict' or 'model')"
            )
        for prefix in _STRIPPED_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        state[key] = value
    return state


def parse_state_dict(data: bytes, url: str) -> dict[str, torch.Tensor]:
    """Checkpoint bytes -> state_dict, never executing code from the file."""
    if url.endswith(".safetensors"):
        from safetensors.torch import load as load_safetensors

        try:
            state = load_safetensors(data)
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise CheckpointError(f"{url}: not a readable safetensors file ({exc})") from exc
    else:
        try:
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise CheckpointError(
                f"{url}: refused to load: the pickle holds objects other than tensors and plain "
                "containers (it could execute code). Re-save it as model.state_dict(), or as "
                f"safetensors. Detail: {str(exc).splitlines()[0]}"
            ) from exc
        except Exception as exc:  # noqa: BLE001 - corrupt zip, truncated file, ...
            raise CheckpointError(f"{url}: not a readable torch checkpoint ({type(exc).__name__}: {exc})") from exc
        state = _unwrap(obj, url)
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{url}: NaN or inf values in {len(bad)} tensors, e.g. {bad[:5]}")
    return state


def load_state_dict(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """Read a checkpoint from any fsspec URL into a CPU state_dict."""
    fs, path = open_filesystem(url, storage_options)
    try:
        data = fs.cat_file(path)
    except FileNotFoundError as exc:
        raise CheckpointError(f"checkpoint not found: {url}") from exc
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"cannot read checkpoint {url}: {type(exc).__name__}: {exc}") from exc
    return parse_state_dict(data, url)
