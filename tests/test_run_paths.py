"""Relative paths and refused runs (issues 13.1, 18.2): resolved one way, against the config
file's folder, on the driver; a refused run leaves nothing under `output`. No Ray."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from jobs.cli import main as cli_main
from jobs.run import open_run
from tests.helpers import tiny_config, write_checkpoints, write_eval_parquet


def _relative_config(tmp_path: Path, **overrides) -> Path:
    """tmp/configs/run.yaml naming ../ckpt, ../data and `results` relative to its own folder."""
    write_checkpoints(tmp_path / "ckpt", epochs=[1])
    write_eval_parquet(tmp_path / "data")
    raw = tiny_config(tmp_path, "results", seeds=[0])
    raw.update(pretrained="../ckpt/pretrained.safetensors", checkpoints="../ckpt/ft/epoch={epoch}.safetensors")
    raw["data"] = {**raw["data"], "path": "../data"}
    raw.update(overrides)
    folder = tmp_path / "configs"
    folder.mkdir(exist_ok=True)
    (folder / "run.yaml").write_text(yaml.safe_dump(raw))
    return folder / "run.yaml"


def test_relative_paths_resolve_against_the_config_folder_from_any_working_directory(tmp_path: Path, monkeypatch) -> None:
    path = _relative_config(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config, store, plan, spec = open_run("../configs/run.yaml")
    assert config.output == str(tmp_path / "configs" / "results")
    assert config.pretrained == str(tmp_path / "ckpt" / "pretrained.safetensors")
    assert config.checkpoints == str(tmp_path / "ckpt" / "ft" / "epoch={epoch}.safetensors")
    assert config.data.path == str(tmp_path / "data")
    assert [c.epoch for c in plan.checkpoints] == [1]
    assert spec.config.output == store.root == config.output  # what every task gets: absolute
    assert not (elsewhere / "results").exists() and not (tmp_path / "configs" / "results").exists()


def test_a_relative_output_under_a_ray_cluster_is_refused_before_anything_is_written(tmp_path: Path, monkeypatch) -> None:
    """Under `ray job submit --working-dir`, the config's folder is a new unpack folder on every
    submission: a relative output would scatter results there (issue 13.1). Inputs may stay relative."""
    import pytest

    from invariance.errors import ConfigError

    from invariance.config import load_config
    from invariance.io.paths import resolve_paths
    from jobs.run import check_cluster_output, run

    path = _relative_config(tmp_path)
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")  # nothing connects: refused before Ray
    with pytest.raises(ConfigError, match=r"^output: 'results' is a relative path and RAY_ADDRESS is set"):
        run(str(path))
    assert not (tmp_path / "configs" / "results").exists()
    open_run(str(path))  # plan, reduce and report start no Ray: they take it as it resolves
    absolute = _relative_config(tmp_path, output=str(tmp_path / "shared" / "results"))
    config, *_ = open_run(str(absolute), computes=True)  # relative inputs, absolute output: accepted
    assert config.output == str(tmp_path / "shared" / "results") and config.data.path == str(tmp_path / "data")
    # a config at a URL: its relative output is beside it, on that store (every node reaches it)
    check_cluster_output(*resolve_paths(load_config(str(path)), "s3://lab/configs"))


def test_a_path_error_shows_the_resolved_path_and_the_working_directory(tmp_path: Path, monkeypatch, capsys) -> None:
    path = _relative_config(tmp_path, checkpoints="ckpt/ft/epoch={epoch}.safetensors")
    monkeypatch.chdir(tmp_path)
    assert cli_main(["plan", str(path), "--no-cost"]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "configs" / "ckpt" / "ft" / "epoch={epoch}.safetensors") in err
    assert f"working directory: {tmp_path}" in err
    assert f"the config file's folder {tmp_path / 'configs'}" in err
    assert "checkpoints: 'ckpt/ft/epoch={epoch}.safetensors'" in err


def test_a_refused_run_leaves_the_output_untouched(tmp_path: Path, capsys) -> None:
    path = _relative_config(tmp_path, output=str(tmp_path / "new" / "out"))
    raw = yaml.safe_load(path.read_text())
    raw["data"]["path"] = "../no-such-data"
    path.write_text(yaml.safe_dump(raw))
    assert cli_main(["run", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "no-such-data") in err
    assert not (tmp_path / "new").exists()  # not even the writability probe's folders


def test_the_writability_check_leaves_an_existing_output_as_it_was(tmp_path: Path) -> None:
    from invariance.io.storage import Store

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    Store(str(tmp_path / "out")).check_writable()
    assert sorted(p.name for p in (tmp_path / "out").rglob("*")) == ["keep.txt"]
    Store(str(tmp_path / "a" / "b")).check_writable()
    assert not (tmp_path / "a").exists()


def test_the_settings_hash_does_not_depend_on_where_the_project_lies(tmp_path: Path) -> None:
    """`ray job submit --working-dir .` unpacks the project into a new folder per upload: the same
    config with the same relative paths must key the same results there."""
    first, second = tmp_path / "alice" / "proj", tmp_path / "ray" / "_ray_pkg_ab12"
    hashes = []
    for root in (first, second):
        path = _relative_config(root, output=str(tmp_path / "shared-out"))
        _, _, plan, _ = open_run(str(path))
        hashes.append((plan.settings_hash, plan.hashes["inversion"]))
    assert hashes[0] == hashes[1]


def test_the_knn_bank_path_is_resolved_against_the_config_folder_too(tmp_path: Path) -> None:
    from jobs.run import load_run_config

    path = _relative_config(tmp_path, knn={"train": {"format": "parquet", "path": "../bank", "n_samples": 4}, "k": [2]})
    config, resolved = load_run_config(str(path))
    assert config.knn.train.path == str(tmp_path / "bank")
    assert resolved.relative["knn.train.path"] == "../bank"
