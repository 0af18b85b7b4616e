"""Relative paths in a run config: resolved one way, against the config file's folder.

A config read from a file may name ``output``, ``pretrained``, ``checkpoints``, ``data.path`` and
``knn.train.path`` relative to that file's folder (``output: results`` beside ``run.yaml``), whatever the working
directory of the command. A config built in code (no file) resolves them against the working
directory. Either way they are made absolute on the driver, before any task starts: a Ray worker
on another node, or in another working directory, must read and write the same places.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass, field
from typing import Any

from invariance.config import RunConfig

# `pretrained: timm` loads timm's own weights: a name, not a path
NOT_PATHS = {"pretrained": {"timm"}}


def is_relative_path(value: str) -> bool:
    """A plain path (no ``scheme://``) that is not absolute, ``~`` aside."""
    return "://" not in value and not os.path.isabs(os.path.expanduser(value))


def config_folder(config_url: str) -> str:
    """The folder relative paths in the config at ``config_url`` are resolved against: an
    absolute local folder, or the URL's folder (``s3://lab/configs``)."""
    if "://" in config_url and not config_url.startswith("file://"):
        return posixpath.dirname(config_url.rstrip("/"))
    local = config_url[len("file://"):] if config_url.startswith("file://") else config_url
    return os.path.dirname(os.path.abspath(os.path.expanduser(local)))


def _join(base: str, value: str) -> str:
    if "://" in base:
        return posixpath.join(base, value)
    return os.path.normpath(os.path.join(base, os.path.expanduser(value)))


@dataclass(frozen=True)
class ResolvedPaths:
    """What was resolved: the folder, the working directory, and {key: the path as written}."""

    base: str
    working_directory: str
    relative: dict[str, str] = field(default_factory=dict)

    def note(self) -> str:
        """A line for path errors: where the relative paths came from ('' when none were)."""
        if not self.relative:
            return ""
        written = ", ".join(f"{key}: {value!r}" for key, value in self.relative.items())
        return (f"(relative paths are resolved against the config file's folder {self.base}; as written: "
                f"{written}; working directory: {self.working_directory})")  # fmt: skip


def resolve_paths(config: RunConfig, base: str | None = None) -> tuple[RunConfig, ResolvedPaths]:
    """``config`` with its relative paths made absolute against ``base`` (the config file's
    folder; the working directory when None); ``~`` is expanded too."""
    cwd = os.getcwd()
    base = base if base is not None else cwd
    relative: dict[str, str] = {}

    def resolved(key: str, value: str) -> str:
        if value in NOT_PATHS.get(key, ()):
            return value
        if is_relative_path(value):
            relative[key] = value
            return _join(base, value)
        return os.path.expanduser(value) if value.startswith("~") else value

    top: dict[str, Any] = {key: resolved(key, getattr(config, key)) for key in ("output", "pretrained", "checkpoints")}
    data = config.data.model_copy(update={"path": resolved("data.path", config.data.path)})
    knn = config.knn
    if knn is not None:
        knn = knn.model_copy(update={"train": knn.train.model_copy(update={"path": resolved("knn.train.path", knn.train.path)})})
    if not relative and all(top[key] == getattr(config, key) for key in top) and data == config.data and knn == config.knn:
        return config, ResolvedPaths(base, cwd)
    resolved_config = config.model_copy(update={**top, "data": data, "knn": knn})
    # the hashes take the paths as written (the folder a config runs from must not change them)
    resolved_config._paths_as_written = {**config._paths_as_written, **relative}
    return resolved_config, ResolvedPaths(base, cwd, relative)
