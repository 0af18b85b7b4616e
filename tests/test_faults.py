"""Faults and bad input: nothing lost, nothing half-written, clear errors, safe loading."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
import torch
import yaml
from safetensors.torch import save_file

from invariance.config import parse_config
from invariance.errors import StorageError
from invariance.io.layout import MANIFESTS, InversionUnit, StirUnit
from invariance.io.storage import Store
from jobs.cli import main as cli_main
from jobs.run import reduce_only, run
from tests.helpers import tiny_config, tiny_state, write_checkpoints, write_eval_parquet
from tests.ray_fixtures import local_ray  # noqa: F401 - fixture
from tests.servers import TEST_CREDENTIALS, free_port, s3_server, s3_server_checking_credentials  # noqa: F401

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    write_checkpoints(tmp_path / "ckpt", epochs=[1, 2])
    write_eval_parquet(tmp_path / "data")
    return tmp_path


def _stir_table(out: Path) -> pl.DataFrame:
    return (
        pl.read_parquet(str(out / "stir" / "**" / "*.parquet"), hive_partitioning=True)
        .select("epoch", "ref_model", "ref_layer", "target_model", "target_layer", "seed", "stir", "stir_debiased")
        .sort("epoch", "ref_model", "ref_layer", "target_model", "target_layer", "seed")
    )


# --- node loss and killed driver -------------------------------------------------------


def test_node_loss_mid_run_leaves_every_shard_exactly_once(tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "tests.fault_scenarios", "node_loss", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-4000:]
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    assert report["removed_after_records"] < report["completed"]  # removed mid-run
    assert report["failures"] == []
    assert report["stir_files"] == report["unique_stir_files"] == report["expected_stir"]
    assert report["complete_epochs"] == [1, 2]


def test_killed_driver_rerun_gives_the_rows_of_an_uninterrupted_run(workspace: Path, local_ray) -> None:
    raw = tiny_config(workspace, str(workspace / "interrupted"), inversion={"iterations": 40, "step_size": 0.5})
    config_path = workspace / "run.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    command = [sys.executable, "-m", "jobs.cli", "run", str(config_path), "--no-progress"]
    driver = subprocess.Popen(command, cwd=REPO, env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    records = workspace / "interrupted" / MANIFESTS
    deadline = time.time() + 300
    while time.time() < deadline and driver.poll() is None:
        if records.exists() and len(list(records.rglob("*.json"))) >= 10:
            break
        time.sleep(0.05)
    assert driver.poll() is None, "the run finished before it could be interrupted"
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray it started
    driver.wait(timeout=60)
    interrupted_records = len(list(records.rglob("*.json")))

    resumed = run(parse_config(raw), progress=False)
    assert resumed.execution.failures == []
    assert resumed.execution.submitted < len(resumed.plan.of_type(StirUnit)) + len(resumed.plan.units["cka"]) + len(resumed.plan.of_type(InversionUnit))
    assert interrupted_records >= 10

    reference = run(parse_config({**raw, "output": str(workspace / "reference")}), progress=False)
    assert reference.execution.failures == []
    got, want = _stir_table(workspace / "interrupted"), _stir_table(workspace / "reference")
    assert got.height == want.height == len(reference.plan.of_type(StirUnit)) * 2 * 3
    assert got.select("epoch", "ref_model", "ref_layer", "target_model", "target_layer", "seed").is_duplicated().sum() == 0
    torch.testing.assert_close(got["stir"].to_torch(), want["stir"].to_torch(), atol=1e-6, rtol=0)
    torch.testing.assert_close(got["stir_debiased"].to_torch(), want["stir_debiased"].to_torch(), atol=1e-6, rtol=0)


# --- no partial shard ---------------------------------------------------------------------


def test_a_crash_during_a_write_leaves_nothing_under_the_key(tmp_path: Path, monkeypatch) -> None:
    store = Store(str(tmp_path / "out"))

    def crash(_fd: int) -> None:
        raise OSError("disk vanished")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(StorageError, match="cannot write"):
        store.put("stir/settings=x/epoch=1/pt_layer0_seed0.parquet", b"PAR1" + b"x" * 1000)
    assert list((tmp_path / "out").rglob("*")) == [tmp_path / "out" / "stir", tmp_path / "out" / "stir" / "settings=x",
                                                   tmp_path / "out" / "stir" / "settings=x" / "epoch=1"]  # fmt: skip


def test_leftovers_of_a_hard_crash_are_never_read(workspace: Path, local_ray) -> None:
    raw = tiny_config(workspace, str(workspace / "out"), seeds=[0])
    run(parse_config(raw), progress=False)
    shard = next((workspace / "out" / "stir").rglob("*.parquet"))
    # what a SIGKILL between open() and rename() leaves: a hidden, truncated temporary file
    (shard.parent / f".{shard.name}.deadbeef.tmp").write_bytes(shard.read_bytes()[:100])
    stir = pl.read_parquet(str(workspace / "out" / "stir" / "**" / "*.parquet"), hive_partitioning=True)
    assert stir.height == 2 * 2 * 3 * 2 * 3
    result = reduce_only(parse_config(raw))
    assert result.complete_epochs == [1, 2]


def test_reducer_names_incomplete_checkpoints_instead_of_averaging(workspace: Path, local_ray, capsys) -> None:
    raw = tiny_config(workspace, str(workspace / "out"), seeds=[0], compaction={"enabled": False})  # a shard's own files
    run(parse_config(raw), progress=False)
    record = next((workspace / "out" / MANIFESTS).rglob("epoch=2/ft_layer1_seed0*.json"))  # the name ends in the checkpoint's fingerprint
    record.unlink()
    result = reduce_only(parse_config(raw))
    assert result.complete_epochs == [1]
    assert result.incomplete_epochs == {2: 1}
    assert "incomplete checkpoints (epoch: missing shards): {2: 1}" in capsys.readouterr().out
    curves = pl.read_parquet(workspace / "out" / "reduced" / "curves.parquet")
    assert curves["epoch"].unique().to_list() == [1]
    status = json.loads((workspace / "out" / "reduced" / "status.json").read_text())
    assert status["incomplete_epochs"] == {"2": 1}


# --- bad input: clear errors, nothing marked done ------------------------------------------------


def _cli_error(config: dict, tmp_path: Path, capsys, command: str = "plan") -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    assert cli_main([command, str(path), *(["--no-cost"] if command == "plan" else [])]) == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda c: c.update(seeds=[0], seedz=[1]), "seedz: unknown key"),
        (lambda c: c.pop("pretrained"), "pretrained: required key is missing"),
        (lambda c: c["inversion"].update(iterations="many"), "inversion.iterations"),
        (lambda c: c.update(model={"arch": "vit_tinyy_patch16_224"}), "model.arch: unknown timm architecture"),
        (lambda c: c.update(checkpoints=c["checkpoints"].replace("epoch=", "step=")), "matches no file"),
        (lambda c: c.update(layers=[0, 7]), "layers: [7] out of range"),
        (lambda c: c["data"].update(path="/nonexistent/data"), "data.path /nonexistent/data"),
        (lambda c: c["data"].update(n_samples=500), "data.n_samples is 500 but"),
    ],
    ids=["misspelt-key", "missing-key", "wrong-type", "unknown-arch", "pattern-matches-nothing", "layer-out-of-range",
         "data-path-missing", "n-samples-too-large"],
)  # fmt: skip
def test_bad_config_gives_a_clear_error_and_marks_nothing_done(workspace: Path, capsys, change, expected) -> None:
    raw = tiny_config(workspace, str(workspace / "out"))
    change(raw)
    message = _cli_error(raw, workspace, capsys, command="run")
    assert expected in message
    assert not list((workspace / "out").rglob("*.json"))


def test_empty_dataset_folder_is_named(workspace: Path, capsys) -> None:
    (workspace / "empty").mkdir()
    raw = tiny_config(workspace, str(workspace / "out"), data={"format": "imagefolder", "path": str(workspace / "empty")})
    assert "no images" in _cli_error(raw, workspace, capsys, command="run")


def test_output_prefix_not_writable_is_named(workspace: Path, capsys) -> None:
    (workspace / "a_file").write_text("not a folder")
    raw = tiny_config(workspace, str(workspace / "a_file" / "out"))
    message = _cli_error(raw, workspace, capsys)
    assert "output: the prefix" in message and "is not writable" in message


@pytest.mark.parametrize("fault", ["corrupt", "mismatch", "nan", "pickle-with-code"])
def test_bad_checkpoint_fails_its_shards_only_and_names_the_file(workspace: Path, local_ray, fault: str) -> None:
    bad = workspace / "ckpt" / "ft" / "epoch=03.safetensors"
    if fault == "corrupt":
        bad.write_bytes(b"\x00" * 64)
    elif fault == "mismatch":
        state = tiny_state(0)
        state["blocks.0.mlp.fc1.weight"] = torch.zeros(7, 7)
        save_file(state, str(bad))
    elif fault == "nan":
        state = tiny_state(0)
        state["blocks.1.attn.qkv.weight"][0, 0] = float("nan")
        save_file(state, str(bad))
    else:
        bad = bad.with_suffix(".pt")
        torch.save({"state_dict": tiny_state(0), "hook": _Payload()}, bad)
    pattern = str(workspace / "ckpt" / "ft" / ("epoch={epoch}" + bad.suffix))
    if fault == "pickle-with-code":
        torch.save(tiny_state(0), workspace / "ckpt" / "ft" / "epoch=01.pt")
    raw = tiny_config(workspace, str(workspace / "out"), seeds=[0], checkpoints=pattern)
    result = run(parse_config(raw), progress=False)
    assert result.execution.failures, "a bad checkpoint must fail its shards"
    assert all(str(bad) in message for _, message in result.execution.failures)
    expected = {"corrupt": "not a readable safetensors", "mismatch": "does not match the model",
                "nan": "NaN or inf", "pickle-with-code": "refused to load"}[fault]  # fmt: skip
    assert all(expected in message for _, message in result.execution.failures)
    assert 3 not in result.reduced.complete_epochs
    assert not list((workspace / "out" / MANIFESTS).rglob("epoch=3*"))
    assert not (workspace / "pwned").exists()


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {Path.cwd() / 'pwned'}",))


# --- storage faults and credentials ---------------------------------------------------------------


def test_unreachable_bucket_is_named(workspace: Path, capsys) -> None:
    options = {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{free_port()}"},
               "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2}}  # fmt: skip
    raw = tiny_config(workspace, "s3://lab/out", storage_options=options)
    message = _cli_error(raw, workspace, capsys)
    assert "output: the prefix s3://lab/out is not writable" in message


def test_missing_bucket_and_wrong_credentials_are_named_and_secrets_never_logged(workspace: Path, s3_server, capsys) -> None:
    raw = tiny_config(workspace, "s3://no-such-bucket/out", storage_options=s3_server.fsspec_options())
    message = _cli_error(raw, workspace, capsys)
    assert "s3://no-such-bucket/out is not writable" in message
    for secret in TEST_CREDENTIALS.values():
        assert secret not in message


def test_wrong_credentials_are_named_and_never_logged(workspace: Path, s3_server_checking_credentials, capsys) -> None:
    options = s3_server_checking_credentials.fsspec_options()  # keys the server does not know
    raw = tiny_config(workspace, "s3://lab/out", storage_options=options)
    message = _cli_error(raw, workspace, capsys)
    assert "output: the prefix s3://lab/out is not writable" in message
    assert "Access Key Id you provided does not exist" in message
    for secret in TEST_CREDENTIALS.values():
        assert secret not in message


def test_a_corrupt_shard_is_named_when_read(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "out"))
    good = pl.DataFrame({"stir": [0.5]})
    store.put_parquet("stir/a.parquet", good)
    store.put("stir/b.parquet", b"not parquet at all")
    with pytest.raises(StorageError, match=r"stir/b\.parquet: not a readable Parquet file"):
        store.read_parquet(["stir/a.parquet", "stir/b.parquet"])
    assert store.read_parquet(["stir/a.parquet"]).equals(good)
