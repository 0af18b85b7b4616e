"""The finetune job's inputs, checked on the driver before any trial: relative paths resolved
against the config file's folder, data paths, splits and label columns that exist, a resume that
would change what a metrics column means, and trial errors that reach the user by their own
message and exit code (issue 25)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from invariance.errors import CheckpointError, ConfigError, DataError, InvarianceError
from invariance.training.config import load_finetune_config, parse_finetune_config
from invariance.training.inputs import check_finetune_inputs
from invariance.training.run import check_resume, run_finetune, saved_progress
from tests.helpers import TINY_MODEL, write_shapes_splits
from tests.ray_fixtures import local_ray  # noqa: F401 - fixture

MODEL = {"arch": TINY_MODEL["arch"], "kwargs": {**TINY_MODEL["kwargs"], "num_classes": 4}}
CORRUPTIONS = {"names": ["contrast"], "severities": [1], "n_samples": 8}


class Killed(Exception):
    """Stands in for a worker killed right after an epoch's checkpoint was stored."""


def kill_after_first(row: dict[str, Any]) -> None:
    if row["epoch"] == 1:
        raise Killed


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shapes_splits(tmp_path_factory.mktemp("shapes"), n_train=16, n_test=16)


def raw_config(data_dir: Path | str, output: Path | str, **overrides: Any) -> dict[str, Any]:
    raw = {
        "output": str(output),
        "model": MODEL,
        "data": {"format": "parquet", "path": str(data_dir), "n_test": 16},
        "optimizer": "sgd",
        "lr": 0.05,
        "epochs": 2,
        "batch_size": 16,
        "corruptions": CORRUPTIONS,
        "resources": {"num_cpus": 1, "max_failures": 0},
    }
    return {**raw, **overrides}


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> dict[str, Any]:
    """A 2-epoch run killed after its first checkpoint; the tests copy it before resuming."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        raw = raw_config(data_dir, tmp_path_factory.mktemp("killed") / "run")
        with pytest.raises(Killed):
            run_finetune(parse_finetune_config(raw), on_epoch=kill_after_first)
    finally:
        torch.set_num_threads(threads)
    return raw


def copy_of(killed: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    shutil.copytree(killed["output"], tmp_path / "run")
    return {**killed, "output": str(tmp_path / "run")}


# --- 1. a resume that would change what a metrics column means ---------------------------------


@pytest.mark.parametrize(
    ("change", "key", "old", "new"),
    [
        ({"corruptions": {**CORRUPTIONS, "names": ["gaussian_noise"]}}, "corruptions.names", "['contrast']", "['gaussian_noise']"),
        ({"corruptions": {**CORRUPTIONS, "severities": [5]}}, "corruptions.severities", "[1]", "[5]"),
        ({"corruptions": {**CORRUPTIONS, "n_samples": 4}}, "corruptions.n_samples", "8", "4"),
        ({"corruptions": {**CORRUPTIONS, "seed": 1}}, "corruptions.seed", "0", "1"),
        ({"knn": {"k": 3}}, "knn", "None", "k"),
    ],
)
def test_a_resume_with_other_corruptions_is_refused_naming_the_keys(killed_run, tmp_path, change, key, old, new,
                                                                     torch_single_thread) -> None:  # fmt: skip
    raw = {**copy_of(killed_run, tmp_path), **change}
    before = sorted(p.name for p in (tmp_path / "run" / "metrics").iterdir())
    for check in (lambda: check_finetune_inputs(parse_finetune_config(raw)),
                  lambda: run_finetune(parse_finetune_config(raw), on_epoch=None)):  # fmt: skip
        with pytest.raises(ConfigError) as error:
            check()
        message = str(error.value)
        assert key in message and old in message and new in message, message
        assert str(tmp_path / "run") in message and "new output" in message
    # nothing was scored on other corruptions under the same columns
    assert sorted(p.name for p in (tmp_path / "run" / "metrics").iterdir()) == before == ["epoch=01.parquet"]


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"task": "reconstruction"}, "task"),
        ({"data": {"format": "parquet", "path": "DATA", "n_test": 8}}, "data.n_test"),
        ({"data": {"format": "parquet", "path": "DATA", "n_test": 16, "test_split": "train"}}, "data.test_split"),
        ({"data": {"format": "parquet", "path": "DATA", "n_test": 16, "label_column": "shape"}}, "data.label_column"),
        ({"lr": 0.5}, "lr"),
    ],
)
def test_a_resume_with_other_data_or_task_names_the_keys_that_differ(killed_run, tmp_path, data_dir, change, key) -> None:
    raw = copy_of(killed_run, tmp_path)
    if "data" in change:
        change = {"data": {**change["data"], "path": str(data_dir)}}
    config = parse_finetune_config({**raw, **change})
    with pytest.raises(ConfigError) as error:  # the resume check alone: 'shape' is no column of the data
        check_resume(config, saved_progress(config))
    message = str(error.value)
    assert f"{key}:" in message and "other settings" in message, message


def test_a_resume_with_the_same_settings_passes_the_checks(killed_run, tmp_path, torch_single_thread) -> None:
    raw = copy_of(killed_run, tmp_path)
    check_finetune_inputs(parse_finetune_config(raw))
    result = run_finetune(parse_finetune_config({**raw, "checkpoint_every": 1}), on_epoch=None)  # not a metrics setting
    assert (result.resumed_from, result.epochs_run) == (1, 1)


# --- 3. relative paths ---------------------------------------------------------------------------


def test_relative_paths_resolve_against_the_finetune_config_folder(tmp_path, data_dir, monkeypatch) -> None:
    project = tmp_path / "project"
    shutil.copytree(data_dir, project / "data")
    (project / "weights").mkdir()
    (project / "weights" / "a.safetensors").write_bytes(b"")
    raw = raw_config("data", "runs", pretrained="weights/a.safetensors",
                     sweep={"pretrained": ["weights/a.safetensors", "weights/b.safetensors"]})  # fmt: skip
    (project / "finetune.yaml").write_text(yaml.safe_dump(raw))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_finetune_config(project / "finetune.yaml")
    assert (config.output, config.data.path) == (str(project / "runs"), str(project / "data"))
    assert config.pretrained == str(project / "weights" / "a.safetensors")
    names = [name for name, _ in config.trials()]
    assert names == ["pretrained-weights-a.safetensors", "pretrained-weights-b.safetensors"]  # as written
    for name, trial in config.trials():
        assert trial.output == str(project / "runs" / name) and trial.data.path == str(project / "data")
    second = config.trials()[1][1]
    assert second.pretrained == str(project / "weights" / "b.safetensors")
    # the fingerprint takes the paths as written: the folder a config runs from never changes it
    monkeypatch.chdir(project)
    assert second.fingerprint() == parse_finetune_config({**raw, "pretrained": "weights/b.safetensors",
                                                          "sweep": None}).fingerprint()  # fmt: skip
    # a trial config travels to its Tune worker with its paths and fingerprint
    from invariance.training.config import portable, from_portable

    travelled = from_portable(portable(second))
    assert travelled.model_dump() == second.model_dump() and travelled.fingerprint() == second.fingerprint()
    # the driver checks find the missing one, named by key and by how it was resolved
    with pytest.raises(CheckpointError, match=r"pretrained: no file at .*weights/b\.safetensors"):
        check_finetune_inputs(second)
    check_finetune_inputs(config.trials()[0][1])


def test_relative_clip_checkpoint_resolves_but_an_open_clip_tag_does_not(tmp_path) -> None:
    raw = {"output": "out", "task": "contrastive", "data": {"format": "parquet", "path": "data"},
           "clip": {"model_name": "ViT-B-32", "pretrained": "openai"}}  # fmt: skip
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    assert load_finetune_config(tmp_path / "c.yaml").clip.pretrained == "openai"
    raw["clip"]["pretrained"] = "clip/weights.pt"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    assert load_finetune_config(tmp_path / "c.yaml").clip.pretrained == str(tmp_path / "clip" / "weights.pt")


# --- 4. checked on the driver, before any trial ------------------------------------------------


@pytest.mark.parametrize(
    ("data", "error", "match"),
    [
        ({"label_column": "labels"}, DataError, r"data.label_column 'labels'.*no column 'labels'"),
        ({"image_column": "img"}, DataError, r"data.image_column 'img'.*no column 'img'"),
        ({"test_split": "validation"}, DataError, r"data.test_split 'validation'.*splits found"),
        ({"train_split": "trian"}, DataError, r"data.train_split 'trian'"),
        ({"path": "/nowhere/data"}, DataError, r"data.path.*/nowhere/data"),
    ],
)
def test_bad_data_fails_on_the_driver_naming_the_key(tmp_path, data_dir, data, error, match) -> None:
    raw = raw_config(data_dir, tmp_path / "out")
    raw["data"] = {**raw["data"], **data}
    with pytest.raises(error, match=match):
        check_finetune_inputs(parse_finetune_config(raw))


@pytest.mark.parametrize("layout", ["imagefolder", "cifar"])
def test_bad_splits_of_folders_and_cifar_fail_on_the_driver(tmp_path, layout) -> None:
    from PIL import Image

    if layout == "imagefolder":
        for split in ("train", "test"):
            (tmp_path / "data" / split / "red").mkdir(parents=True)
            Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "data" / split / "red" / "0.png")
        data = {"format": "imagefolder", "path": str(tmp_path / "data"), "test_split": "val"}
    else:
        import pickle

        import numpy as np

        (tmp_path / "data").mkdir()
        for k in range(1, 6):  # the train batches only
            batch = {b"data": np.zeros((2, 3072), dtype=np.uint8), b"labels": [0, 1]}
            (tmp_path / "data" / f"data_batch_{k}").write_bytes(pickle.dumps(batch))
        data = {"format": "cifar", "path": str(tmp_path / "data"), "test_split": "validation"}
    with pytest.raises(DataError, match=r"data.test_split 'val"):
        check_finetune_inputs(parse_finetune_config(raw_config(tmp_path, tmp_path / "out", data=data)))


def test_output_inside_the_data_and_a_missing_pretrained_fail_on_the_driver(tmp_path, data_dir) -> None:
    with pytest.raises(ConfigError, match=r"output: .* lies inside the data.path folder"):
        check_finetune_inputs(parse_finetune_config(raw_config(data_dir, data_dir / "runs")))
    with pytest.raises(CheckpointError, match=r"pretrained: no file at"):
        check_finetune_inputs(parse_finetune_config(raw_config(data_dir, tmp_path / "o", pretrained=str(tmp_path / "x.pt"))))


def test_a_wrong_label_column_exits_2_before_ray_starts(tmp_path, data_dir, monkeypatch, capsys) -> None:
    import jobs.finetune
    from jobs.cli import main

    def no_ray(*_: Any, **__: Any) -> None:
        raise AssertionError("Ray was started for a config that cannot run")

    monkeypatch.setattr(jobs.finetune, "connect_ray", no_ray)
    raw = raw_config(data_dir, tmp_path / "out", sweep={"lr": [0.01, 0.1]})
    raw["data"] = {**raw["data"], "label_column": "labels"}
    (tmp_path / "finetune.yaml").write_text(yaml.safe_dump(raw))
    assert main(["finetune", str(tmp_path / "finetune.yaml")]) == 2
    err = capsys.readouterr().err
    assert "invariance finetune: error:" in err and "data.label_column 'labels'" in err and "Traceback" not in err


def test_trial_errors_are_unwrapped_to_the_invariance_error_inside() -> None:
    from ray.exceptions import RayTaskError
    from ray.tune.error import TuneError

    from jobs.finetune import invariance_error

    cause = DataError("data.label_column 'labels': no column 'labels'")
    wrapped = RayTaskError("_train_trial", "Traceback (most recent call last):\n  ...", cause).as_instanceof_cause()
    for error in (wrapped, TuneError("trial failed"), RuntimeError("x")):
        if isinstance(error, TuneError):
            error.__cause__ = wrapped
        found = invariance_error(error)
        if isinstance(error, RuntimeError):
            assert found is None
            continue
        assert type(found) is DataError and str(found) == str(cause) and "Traceback" not in str(found)
    assert isinstance(invariance_error(wrapped), InvarianceError)


@pytest.mark.slow
def test_an_error_only_a_trial_finds_exits_2_by_its_own_message(tmp_path, data_dir, local_ray, capsys) -> None:
    """num_classes below the labels is found once the trial reads the labels: not retried (bad
    input is not transient), and the user reads the ConfigError, not RayTaskError."""
    from jobs.cli import main

    raw = raw_config(data_dir, tmp_path / "out", num_classes=2, epochs=1)
    raw["resources"] = {"num_cpus": 1, "max_failures": 2}
    (tmp_path / "finetune.yaml").write_text(yaml.safe_dump(raw))
    assert main(["finetune", str(tmp_path / "finetune.yaml")]) == 2
    err = capsys.readouterr().err
    assert "invariance finetune: error: num_classes: 2" in err and "RayTaskError" not in err, err
