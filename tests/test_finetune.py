"""The checkpoint producer: finetune configs, a 2-trial Ray Tune sweep of a tiny ViT on
generated data, resuming a killed trial, reconstruction, and the robustness tables that
`invariance run` builds over a trial's checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import torch
import yaml
from safetensors.torch import load_file

from invariance.config import parse_config
from invariance.errors import ConfigError
from invariance.io.run_metrics import read_run_metrics
from invariance.training.run import run_finetune, saved_progress
from invariance.training.config import parse_finetune_config, trial_name
from invariance.io.storage import Store
from invariance.training.loop import augment
from jobs.cli import main
from jobs.finetune import finetune
from jobs.run import run
from tests.helpers import TINY_MODEL, write_shapes_splits
from tests.ray_fixtures import local_ray  # noqa: F401 - fixture

# the 'texture' task has 4 classes: the finetuned head has 4 outputs, and so has the run config's model
MODEL = {"arch": TINY_MODEL["arch"], "kwargs": {**TINY_MODEL["kwargs"], "num_classes": 4}}
EPOCHS = 3
CORRUPTIONS = {"names": ["gaussian_noise", "contrast"], "severities": [1, 3, 5], "n_samples": 12}


class Killed(Exception):
    """Stands in for a worker killed right after an epoch's checkpoint was stored."""


def kill_after(epoch: int):
    def on_epoch(row: dict[str, Any]) -> None:
        if row["epoch"] == epoch:
            raise Killed

    return on_epoch


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shapes_splits(tmp_path_factory.mktemp("shapes"), n_train=48, n_test=24)


def finetune_raw(data_dir: Path, output: Path, **overrides: Any) -> dict[str, Any]:
    raw = {
        "output": str(output),
        "model": MODEL,
        "pretrained": None,
        "data": {"format": "parquet", "path": str(data_dir), "n_test": 24},
        "task": "classification",
        "optimizer": "sgd",
        "lr": 0.05,
        "epochs": EPOCHS,
        "batch_size": 16,
        "corruptions": CORRUPTIONS,
        "resources": {"num_cpus": 1, "max_failures": 0},
    }
    return {**raw, **overrides}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory, data_dir: Path, local_ray: None, torch_single_thread: None):
    """A 2-trial sweep whose sgd trial was killed after epoch 2 before the sweep ran.

    Everything trains in one intra-op thread (Tune trials: resources.num_cpus = 1), so that
    the resumed trial can be compared bit for bit with an uninterrupted run: another thread
    count changes the float summation order (measured: 6e-8 apart after 3 epochs)."""
    tmp = tmp_path_factory.mktemp("sweep")
    config = parse_finetune_config({**finetune_raw(data_dir, tmp / "runs"), "sweep": {"optimizer": ["sgd", "adamw"]}})
    killed = config.for_trial({"optimizer": "sgd"})
    with pytest.raises(Killed):
        run_finetune(killed, on_epoch=kill_after(2))
    before = {path.name: path.stat().st_mtime_ns for path in Path(killed.output).glob("epoch=*.safetensors")}
    result = finetune(config, tune_storage=str(tmp / "tune"))
    return tmp, config, result, before


# --- config ------------------------------------------------------------------------------------


def test_sweep_expands_to_named_trials(tmp_path) -> None:
    raw = finetune_raw(tmp_path, tmp_path / "out", sweep={"optimizer": ["sgd", "adamw"], "lr": [1e-3, 1e-2], "augment": [True, False]})
    trials = parse_finetune_config(raw).trials()
    assert len(trials) == 8
    name, first = trials[0]
    assert name == "optimizer-sgd_lr-0.001_augment-true"
    assert first.output == f"{tmp_path / 'out'}/optimizer-sgd_lr-0.001_augment-true"
    assert (first.optimizer, first.lr, first.augment, first.sweep) == ("sgd", 1e-3, True, None)
    assert trial_name({"weight_decay": 0.0, "data.n_train": 100}) == "weight_decay-0.0_data.n_train-100"
    nested = parse_finetune_config({**raw, "sweep": {"data.n_train": [8, 16]}}).trials()
    assert [trial.data.n_train for _, trial in nested] == [8, 16]
    assert parse_finetune_config(finetune_raw(tmp_path, tmp_path / "one")).trials()[0][1].output == str(tmp_path / "one")


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"optimiser": "sgd"}, "optimiser: unknown key"),
        ({"task": "segmentation"}, "task"),
        ({"sweep": {"output": ["a", "b"]}}, "'output' cannot be swept"),
        ({"sweep": {"lr": [0.1, -1.0]}}, "sweep: the trial lr--1.0 is not a valid config"),
        ({"sweep": {"lr": []}}, "lr: give a non-empty list"),
        ({"corruptions": {"names": ["fog"]}}, "corruptions.names"),
        ({"data": {"format": "parquet", "path": "x", "n_train": 0}}, "data.n_train"),
    ],
)
def test_config_errors_name_the_key(tmp_path, change, key) -> None:
    with pytest.raises(ConfigError, match="invalid finetune config") as error:
        parse_finetune_config({**finetune_raw(tmp_path, tmp_path / "out"), **change})
    assert key in str(error.value)


# --- the sweep ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_every_trial_writes_a_checkpoint_and_metrics_every_epoch(sweep) -> None:
    tmp, config, result, _ = sweep
    assert [t.name for t in result.trials] == ["optimizer-sgd", "optimizer-adamw"]
    assert result.failures == []
    for trial in result.trials:
        folder = tmp / "runs" / trial.name
        assert trial.output == str(folder)
        names = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
        assert names == {"initial.safetensors", "_state/last.pt", "analysis.json"} | {
            f"epoch={e:02d}.safetensors" for e in range(1, EPOCHS + 1)
        } | {f"metrics/epoch={e:02d}.parquet" for e in range(1, EPOCHS + 1)}
        metrics = read_run_metrics(str(folder))
        assert metrics["epoch"].to_list() == [1, 2, 3]
        for column in ("train_loss", "clean_accuracy", "corrupted_accuracy"):
            assert metrics[column].is_not_null().all()
        assert metrics["clean_accuracy"].is_between(0, 1).all() and metrics["corrupted_accuracy"].is_between(0, 1).all()
        detail = metrics.filter(pl.col("epoch") == 3).explode("corrupted").unnest("corrupted")
        assert detail.height == 2 * 3 and set(detail["corruption"]) == set(CORRUPTIONS["names"])
        assert detail["accuracy"].mean() == pytest.approx(metrics["corrupted_accuracy"][2])
        assert trial.metrics["epoch"] == EPOCHS
    # the two trials differ in the optimizer only, and it shows in the weights
    sgd, adamw = (load_file(tmp / "runs" / name / "epoch=03.safetensors") for name in ("optimizer-sgd", "optimizer-adamw"))
    assert not torch.equal(sgd["blocks.0.attn.qkv.weight"], adamw["blocks.0.attn.qkv.weight"])


@pytest.mark.slow
def test_killed_trial_resumes_and_ends_as_an_uninterrupted_run(sweep, data_dir, torch_single_thread) -> None:
    tmp, config, result, before = sweep
    outcome = {t.name: t for t in result.trials}
    assert outcome["optimizer-sgd"].metrics["resumed_from"] == 2
    assert outcome["optimizer-adamw"].metrics["resumed_from"] == 0
    folder = tmp / "runs" / "optimizer-sgd"
    assert sorted(before) == ["epoch=01.safetensors", "epoch=02.safetensors"]
    for name, mtime in before.items():  # epochs 1 and 2 were not trained again
        assert (folder / name).stat().st_mtime_ns == mtime
    reference = config.for_trial({"optimizer": "sgd"}).model_copy(update={"output": str(tmp / "reference")})
    run_finetune(reference, on_epoch=None)
    resumed, uninterrupted = load_file(folder / "epoch=03.safetensors"), load_file(tmp / "reference" / "epoch=03.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    for key in resumed:  # same optimizer state, cosine schedule and data order: the same weights
        assert torch.equal(resumed[key], uninterrupted[key]), key
    progress = saved_progress(config.for_trial({"optimizer": "sgd"}))
    assert progress.epoch == 3 and progress.same_settings
    assert progress.trainer["schedule"]["last_epoch"] == 3 * 3  # 48 images / 16 per step
    lrs = read_run_metrics(str(folder))["lr"].to_list()
    assert lrs == pytest.approx([0.05, 0.05 * 0.5 * (1 + np.cos(np.pi / 3)), 0.05 * 0.5 * (1 + np.cos(2 * np.pi / 3))])


@pytest.mark.slow
def test_rerunning_a_finished_sweep_trains_nothing(sweep) -> None:
    tmp, config, _, _ = sweep
    stamps = {p: p.stat().st_mtime_ns for p in (tmp / "runs").rglob("*") if p.is_file()}
    again = finetune(config, tune_storage=str(tmp / "tune-again"))
    assert again.failures == [] and all(t.metrics["finished_before"] for t in again.trials)
    assert [t.metrics["epoch"] for t in again.trials] == [EPOCHS, EPOCHS]
    assert {p: p.stat().st_mtime_ns for p in (tmp / "runs").rglob("*") if p.is_file()} == stamps
    assert not (tmp / "tune-again").exists()  # not even a Tune experiment was started


@pytest.mark.slow
def test_invariance_run_over_a_trial_writes_the_robustness_correlation(sweep, data_dir) -> None:
    tmp, _, _, _ = sweep
    trial = tmp / "runs" / "optimizer-sgd"
    raw = {
        "output": str(tmp / "stir"),
        "model": MODEL,
        "pretrained": str(trial / "initial.safetensors"),
        "checkpoints": str(trial / "epoch={epoch}.safetensors"),
        "data": {"format": "parquet", "path": str(data_dir), "n_samples": 12},
        "seeds": [0],
        "inversion": {"iterations": 10},
        "resources": {"num_cpus": 1},
    }
    result = run(parse_config(raw), progress=False)
    assert result.execution.failures == [] and result.reduced.complete_epochs == [1, 2, 3]
    reduced = tmp / "stir" / "reduced"
    table = pl.read_parquet(reduced / "robustness.parquet")
    assert table.select("epoch", "run").rows() == [(e, "") for e in (1, 2, 3)]  # one run, no {run}: ""
    assert {"forgetting_std_across_layers", "corrupted_accuracy_mean", "clean_accuracy"} <= set(table.columns)
    # depth 2 < 3: the spread is over every layer (0, 1, 2) of the forgetting curve
    curves = pl.read_parquet(reduced / "curves.parquet").sort("epoch", "layer")
    spread = [np.std(curves.filter(pl.col("epoch") == e)["forgetting_mean"].to_numpy()) for e in (1, 2, 3)]
    np.testing.assert_allclose(table["forgetting_std_across_layers"].to_numpy(), spread, atol=1e-12)
    accuracy = read_run_metrics(str(trial))["corrupted_accuracy"].to_numpy()
    np.testing.assert_allclose(table["corrupted_accuracy_mean"].to_numpy(), accuracy)
    correlation = pl.read_parquet(reduced / "robustness_correlation.parquet").row(0, named=True)
    assert correlation["run"] == "" and correlation["n_epochs"] == 3
    if np.std(accuracy) > 0 and np.std(spread) > 0:
        assert correlation["pearson_r"] == pytest.approx(np.corrcoef(spread, accuracy)[0, 1], abs=1e-9)
    else:
        assert correlation["pearson_r"] is None
    assert (tmp / "stir" / "plots" / "robustness.png").read_bytes()[:4] == b"\x89PNG"


# --- single runs -------------------------------------------------------------------------------


def test_reconstruction_trains_a_decoder_on_the_patch_tokens(tmp_path, data_dir, torch_single_thread) -> None:
    raw = finetune_raw(data_dir, tmp_path / "rec", task="reconstruction", optimizer="adamw", lr=0.01)
    result = run_finetune(parse_finetune_config(raw), on_epoch=None)
    metrics = result.metrics
    assert metrics["train_loss"][-1] < metrics["train_loss"][0]
    assert metrics["test_loss"][-1] < metrics["test_loss"][0]
    assert metrics["clean_accuracy"].is_null().all() and metrics["corrupted_accuracy"].is_null().all()
    assert metrics["corrupted_loss"].is_not_null().all()
    progress = saved_progress(parse_finetune_config(raw))
    assert any(key.startswith("body.") for key in progress.task)  # the decoder resumes with the run
    weights = load_file(tmp_path / "rec" / "epoch=03.safetensors")
    assert not any(key.startswith("body.") for key in weights)  # checkpoints hold the ViT only


def test_finetuning_from_a_pretrained_checkpoint_with_another_head(tmp_path, data_dir, torch_single_thread) -> None:
    # "pretrained" on 3 classes; finetuned on the 4 texture classes with a new head
    first = finetune_raw(data_dir, tmp_path / "pre", model=TINY_MODEL, num_classes=3, epochs=1, corruptions={"names": []})
    with pytest.raises(ConfigError, match="num_classes: 3"):
        run_finetune(parse_finetune_config(first), on_epoch=None)  # labels go up to 3
    pretrained = tmp_path / "pre.safetensors"
    from invariance.core.models import build_network
    from invariance.config import ModelConfig
    from safetensors.torch import save_file

    save_file(build_network(ModelConfig(**TINY_MODEL)).state_dict(), str(pretrained))
    raw = finetune_raw(data_dir, tmp_path / "ft", model=TINY_MODEL, pretrained=str(pretrained), epochs=1,
                       corruptions={"names": []})  # fmt: skip
    run_finetune(parse_finetune_config(raw), on_epoch=None)
    start, pre = load_file(tmp_path / "ft" / "initial.safetensors"), load_file(pretrained)
    assert start["head.weight"].shape == (4, 16) and pre["head.weight"].shape == (3, 16)
    assert torch.equal(start["blocks.1.mlp.fc1.weight"], pre["blocks.1.mlp.fc1.weight"])
    # a run config with num_classes 0 (no head) and strict: false reads both
    from invariance.core.models import load_model

    headless = ModelConfig(arch=TINY_MODEL["arch"], kwargs={**TINY_MODEL["kwargs"], "num_classes": 0}, strict=False)
    for path in (pretrained, tmp_path / "ft" / "epoch=01.safetensors"):
        assert load_model(headless, str(path)).depth == 2


def test_resuming_with_other_settings_is_refused(tmp_path, data_dir, torch_single_thread) -> None:
    raw = finetune_raw(data_dir, tmp_path / "run", epochs=1, corruptions={"names": []})
    run_finetune(parse_finetune_config(raw), on_epoch=None)
    with pytest.raises(ConfigError, match="other settings"):
        run_finetune(parse_finetune_config({**raw, "lr": 0.5}), on_epoch=None)


@pytest.mark.slow
def test_cli_single_run_without_sweep(tmp_path, data_dir, local_ray) -> None:
    raw = finetune_raw(data_dir, tmp_path / "single", epochs=1, corruptions={"names": ["contrast"], "severities": [2]})
    path = tmp_path / "finetune.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["finetune", str(path)]) == 0
    assert (tmp_path / "single" / "epoch=01.safetensors").exists()
    assert read_run_metrics(str(tmp_path / "single"))["corrupted_accuracy"].is_not_null().all()


def test_augment_draws_flip_and_shift_per_image():
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    batch = image.expand(32, -1, -1, -1)
    out = augment(batch, torch.Generator().manual_seed(1))
    assert out.shape == batch.shape and out.is_contiguous()
    padded = {flip: torch.nn.functional.pad(image.flip(-1) if flip else image, (2, 2, 2, 2), mode="reflect")[0]
              for flip in (False, True)}  # fmt: skip
    crops = {(flip, dy, dx): padded[flip][:, dy : dy + 16, dx : dx + 16] for flip in (False, True)
             for dy in range(5) for dx in range(5)}  # fmt: skip
    drawn = [next(key for key, crop in crops.items() if torch.equal(crop, out[i])) for i in range(32)]
    assert len(set(drawn)) > 10  # one image, 32 copies: the draws differ from copy to copy
    assert {flip for flip, _, _ in drawn} == {False, True}
