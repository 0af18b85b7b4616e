"""Studies (issue 16 items 1 and 2): many finetuning runs in one config (``{run}`` in ``checkpoints``),
one set of pretrained inversions for all, a run added later computing only its own shards, and the
runs compared (the paper's Fig. 6). In process, on the tiny ViT."""

from __future__ import annotations

import io
import json
from pathlib import Path

import polars as pl
import pytest
from safetensors.torch import save_file

from invariance.config import parse_config
from invariance.engine.execute import execute_in_process
from invariance.engine.reduce import reduce_plan
from invariance.engine.report_pages import runs_listing
from invariance.engine.steps import Workspace
from invariance.errors import CheckpointError, ConfigError
from invariance.io.checkpoints import discover_checkpoints
from invariance.io.layout import (
    REDUCED_CURVES, REDUCED_FLOW, REDUCED_ROBUSTNESS, REDUCED_STATUS, REPORT, RUNS_COMPARED_PLOT, InversionUnit, PointUnit,
    StirUnit, dynamics_plot_key, finetune_metrics_key, flow_plot_key, layer_curves_plot_key,
)  # fmt: skip
from invariance.training.config import trial_name
from invariance.training.run import METRICS_SCHEMA
from jobs.run import describe_plan
from tests.helpers import perturbed, tiny_config, tiny_state, write_eval_parquet, open_in_process

# the finetune sweep's trial folders, and a hand-named run whose name a hive folder must encode
RUNS = [trial_name({"optimizer": "sgd", "lr": 0.01}), trial_name({"optimizer": "adam", "lr": 0.001}),
        "lr=0.01,optimizer=sgd"]  # fmt: skip
LATE_RUN = trial_name({"optimizer": "sgd", "lr": 0.1})
EPOCHS = [1, 2]
# per run: the corrupted accuracy of each epoch (its finetuning metrics)
ACCURACY = {RUNS[0]: {1: 0.7, 2: 0.6}, RUNS[1]: {1: 0.5, 2: 0.55}, RUNS[2]: {1: 0.65, 2: 0.4}, LATE_RUN: {1: 0.3, 2: 0.2}}


def write_run(sweep: Path, run: str, scale: float) -> None:
    """A finetuning run's folder as ``invariance finetune`` writes it: epoch=NN.safetensors, metrics/."""
    folder = sweep / run
    folder.mkdir(parents=True)
    for epoch in EPOCHS:
        save_file(perturbed(tiny_state(0), scale * epoch, seed=epoch), str(folder / f"epoch={epoch:02d}.safetensors"))
        row = {"epoch": epoch, "task": "classification", "train_loss": 1.0, "lr": 0.1, "test_loss": 1.0,
               "clean_accuracy": 0.9, "corrupted_loss": 1.0, "corrupted_accuracy": ACCURACY[run][epoch], "n_train": 8,
               "n_test": 8, "n_corrupted": 8, "checkpoint": True, "seconds": 1.0, "corrupted": []}  # fmt: skip
        buffer = io.BytesIO()
        pl.DataFrame([row], schema=METRICS_SCHEMA).write_parquet(buffer)
        (folder / finetune_metrics_key(epoch)).parent.mkdir(exist_ok=True)
        (folder / finetune_metrics_key(epoch)).write_bytes(buffer.getvalue())


def study_config(tmp: Path):
    return parse_config(tiny_config(tmp, str(tmp / "out"), checkpoints=str(tmp / "sweep" / "{run}" / "epoch={epoch}.safetensors"),
                                    layers=[0, 2], seeds=[0, 1], inversion={"iterations": 8, "step_size": 0.5}))  # fmt: skip


def test_a_study_shares_the_pretrained_inversions_and_a_later_run_computes_only_its_own_shards(
    tmp_path: Path, torch_single_thread, capsys
) -> None:
    (tmp_path / "ckpt").mkdir()
    save_file(tiny_state(0), str(tmp_path / "ckpt" / "pretrained.safetensors"))
    write_eval_parquet(tmp_path / "data")
    for index, run in enumerate(RUNS):
        write_run(tmp_path / "sweep", run, scale=0.03 * (index + 1))
    config = study_config(tmp_path)
    store, plan, spec = open_in_process(config)

    assert plan.runs == {run: EPOCHS for run in sorted(RUNS)}
    per_checkpoint = 2 * len(plan.layers) * len(config.seeds)  # pt and ft references x layers x seeds
    assert len(plan.of_type(InversionUnit)) == len(plan.layers) * len(config.seeds)  # one set, not one per run
    assert len(plan.of_type(StirUnit)) == len(RUNS) * len(EPOCHS) * per_checkpoint and len(plan.units["cka"]) == len(RUNS) * len(EPOCHS)
    # the run sits in every unit's keys, as a hive folder after settings= (encoded where it holds '=' or ',')
    unit = next(u for u in plan.of_type(StirUnit) if u.run == "lr=0.01,optimizer=sgd")
    assert plan.data_key(unit).startswith(f"stir/settings={plan.settings_hash}/run=lr%3D0.01%2Coptimizer%3Dsgd/epoch=")
    assert {plan.data_key(u).split("/")[2] for u in plan.units["cka"]} == {f"run={r}" for r in RUNS[:2]} | {"run=lr%3D0.01%2Coptimizer%3Dsgd"}
    describe_plan(plan)
    printed = capsys.readouterr().out
    assert "3 runs (one set of pretrained inversions for all)" in printed
    assert all(f"    {run}: epochs 1, 2 (0/2 checkpoints complete)" in printed for run in RUNS)

    summary = execute_in_process(plan, spec, Workspace("cpu"))
    assert summary.failures == []
    assert summary.completed == len(plan.of_type(InversionUnit)) + len(plan.of_type(StirUnit)) + len(plan.units["cka"]) + len(plan.units["subspace"])
    assert len(store.list("_cache/inversions")) == len(plan.of_type(InversionUnit))
    plan.refresh(store)
    result = reduce_plan(plan, store)
    assert sorted(result.complete_checkpoints) == sorted((run, epoch) for run in RUNS for epoch in EPOCHS)

    # every reduced table has the run; the rows of a run are its own checkpoints
    curves = pl.read_parquet(store.path(REDUCED_CURVES))
    flow = pl.read_parquet(store.path(REDUCED_FLOW))
    robustness = pl.read_parquet(store.path(REDUCED_ROBUSTNESS))
    for table in (curves, flow, robustness):
        assert sorted(table["run"].unique().to_list()) == sorted(RUNS)
        assert table.group_by("run").agg(pl.col("epoch").unique().sort())["epoch"].to_list() == [EPOCHS] * len(RUNS)
    # runs differ: each run has its own weights
    last_forgetting = curves.filter((pl.col("epoch") == 2) & (pl.col("layer") == 2)).select("run", "forgetting_mean")
    assert last_forgetting["forgetting_mean"].n_unique() == len(RUNS)
    # the robustness link reads each run's metrics/, under the run's name
    accuracy = {(r, e): a for r, e, a in robustness.select("run", "epoch", "corrupted_accuracy_mean").iter_rows()}
    assert accuracy == {(run, epoch): ACCURACY[run][epoch] for run in RUNS for epoch in EPOCHS}
    # Fig. 6: the spread of forgetting across layers beside the accuracy, per run and epoch
    compared = result.runs_compared
    assert compared.height == len(RUNS) * len(EPOCHS)
    # depth 2 (< 3 blocks): every layer enters the spread, here 0 and 2; population std = |f0 - f2| / 2
    expected = (
        curves.group_by("run", "epoch")
        .agg(((pl.col("forgetting_mean").filter(pl.col("layer") == 0).first()
               - pl.col("forgetting_mean").filter(pl.col("layer") == 2).first()).abs() / 2).alias("expected"))
    )  # fmt: skip
    checked = compared.join(expected, on=["run", "epoch"], how="inner")
    assert checked.height == compared.height
    assert (checked["forgetting_std_across_layers"] - checked["expected"]).abs().max() < 1e-12
    assert checked["forgetting_std_across_layers"].min() > 0
    assert compared.select("run", "epoch", "corrupted_accuracy_mean").sort("run", "epoch").equals(
        robustness.select("run", "epoch", "corrupted_accuracy_mean").sort("run", "epoch"))
    # compare_epochs: N keeps each run's first N epochs (the paper's "first N epochs"), the rest as they are
    first = reduce_plan(plan, store, make_plots=False, compare_epochs=1).runs_compared
    assert first.sort("run").rows() == compared.filter(pl.col("epoch") == EPOCHS[0]).sort("run").rows()
    # plots per run, the runs compared, the report
    for run in RUNS:
        for key in (layer_curves_plot_key(run), dynamics_plot_key(run), flow_plot_key(2, run)):
            assert store.get(key)[:8] == b"\x89PNG\r\n\x1a\n", key
    assert store.get(RUNS_COMPARED_PLOT)[:4] == b"\x89PNG"
    page = store.get(REPORT).decode()
    assert "Runs compared" in page and all(f"run {run}: Dynamics" in page for run in RUNS[:2])
    assert "<h2>Runs and epochs</h2>" in page and all(f"<td>{run}</td>" in page for run in RUNS)
    assert "Each run&#x27;s last checkpoint" in page or "Each run's last checkpoint" in page
    status = json.loads(store.get(REDUCED_STATUS))
    assert status["runs"] == {run: {"epochs": EPOCHS, "complete_epochs": EPOCHS, "incomplete_epochs": {}} for run in sorted(RUNS)}

    # a fourth run of the growing sweep: only its own shards are missing, no inversion
    write_run(tmp_path / "sweep", LATE_RUN, scale=0.2)
    store, later, spec = open_in_process(config)
    assert later.settings_hash == plan.settings_hash and later.hashes["inversion"] == plan.hashes["inversion"]
    assert later.missing_of_type(InversionUnit) == []
    missing = [*later.missing_of_type(StirUnit), *later.missing("cka"), *later.missing("subspace")]
    assert {u.run for u in missing} == {LATE_RUN} and len(missing) == len(EPOCHS) * (per_checkpoint + 2)
    # the report's "Runs and epochs": the new run's epochs listed as incomplete, with their missing shards
    listing = {row["run"]: row for row in runs_listing(later).iter_rows(named=True)}
    assert listing[RUNS[0]]["complete_epochs"] == EPOCHS and listing[RUNS[0]]["incomplete"] == []
    assert listing[LATE_RUN]["complete_epochs"] == [] and listing[LATE_RUN]["incomplete"] == [
        f"{epoch}: {per_checkpoint + 1} shards" for epoch in EPOCHS]
    summary = execute_in_process(later, spec, Workspace("cpu"))
    assert summary.failures == [] and summary.completed == len(missing)
    assert not any(isinstance(unit, InversionUnit) for unit, _ in later.work())
    later.refresh(store)
    reduce_plan(later, store)
    curves = pl.read_parquet(store.path(REDUCED_CURVES))
    assert sorted(curves["run"].unique().to_list()) == sorted([*RUNS, LATE_RUN])
    # the first three runs' rows are as before: nothing of theirs was recomputed
    before = last_forgetting.sort("run")
    after = curves.filter((pl.col("epoch") == 2) & (pl.col("layer") == 2) & pl.col("run").is_in(RUNS)).select("run", "forgetting_mean")
    assert after.sort("run").equals(before)
    # the raw rows scan with their run (hive folders decoded)
    scanned = pl.scan_parquet(store.path("stir") + "/**/*.parquet", hive_partitioning=True).select("run").unique().collect()
    assert sorted(scanned["run"].to_list()) == sorted([*RUNS, LATE_RUN])
    # the guide's recipe comparing runs (docs/recipes.md) runs on this output and prints a column per run
    from tests.test_readme import doc_section

    page, recipes = doc_section("Polars recipes")
    recipe = "# compare the runs of a study" + recipes.split("# compare the runs of a study", 1)[1].split("```", 1)[0]
    with pl.Config(tbl_cols=-1, tbl_width_chars=2000, fmt_str_lengths=200):
        exec(compile(recipe, str(page), "exec"), {"pl": pl, "out": store.path("")})  # noqa: S102 - the guide's own code
    printed = capsys.readouterr().out
    assert printed.count("shape:") == 3, printed
    header = [line for line in printed.splitlines() if "layer" in line][0]  # the first pivot's column names
    assert all(run in header for run in [*RUNS, LATE_RUN]), header


def test_run_folder_patterns_match_the_sweep_and_bad_run_patterns_are_refused(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    for run in RUNS:
        (sweep / run).mkdir(parents=True)
        for epoch in EPOCHS:
            (sweep / run / f"epoch={epoch:02d}.safetensors").write_bytes(b"x")
    (sweep / RUNS[0] / "notes.txt").write_text("not a checkpoint")
    found = discover_checkpoints(str(sweep / "{run}" / "epoch={epoch}.safetensors"))
    assert [(c.run, c.epoch, c.name) for c in found] == [(run, epoch, f"epoch={epoch:02d}") for run in sorted(RUNS) for epoch in EPOCHS]
    # a run's checkpoints keep their names; without {run} a single run's discovery is unchanged
    single = discover_checkpoints(str(sweep / RUNS[0] / "epoch={epoch}.safetensors"))
    assert [(c.run, c.epoch) for c in single] == [("", 1), ("", 2)]

    base = tiny_config(tmp_path, str(tmp_path / "out"))
    for pattern, words in [
        (str(sweep / "epoch={epoch}" / "{run}.safetensors"), "before {epoch}"),
        (str(sweep / "{run}" / "{run}" / "epoch={epoch}.safetensors"), "once"),
        (str(sweep / "{run:>8}" / "epoch={epoch}.safetensors"), "format spec"),
    ]:
        with pytest.raises(ConfigError, match="checkpoints") as caught:
            parse_config({**base, "checkpoints": pattern})
        assert words in str(caught.value)
    with pytest.raises(CheckpointError, match=r"checkpoints: \{run\} may stand once, before \{epoch\}"):
        discover_checkpoints(str(sweep / "epoch={epoch}" / "{run}.safetensors"))
    (sweep / RUNS[1] / "epoch=2.safetensors").write_bytes(b"x")  # beside epoch=02.safetensors
    with pytest.raises(CheckpointError, match=f"checkpoints: run '{RUNS[1]}': epoch 2 matches two files"):
        discover_checkpoints(str(sweep / "{run}" / "epoch={epoch}.safetensors"))


def test_without_run_the_keys_and_units_are_as_before() -> None:
    unit = StirUnit(3, "pt", 1, 0, "epoch=03", "u", "abc")
    assert unit.data_key("h") == "stir/settings=h/epoch=3/pt_layer1_seed0_abc.parquet"
    assert PointUnit("cka", 3, "epoch=03", "u", "abc").record_key("h") == "_manifests/settings=h/cka/epoch=3_abc.json"
    assert StirUnit(3, "pt", 1, 0, "epoch=03", "u", "abc", run="a").data_key("h") == \
        "stir/settings=h/run=a/epoch=3/pt_layer1_seed0_abc.parquet"  # fmt: skip


def test_interpolation_last_is_the_last_epoch_of_each_run(tmp_path: Path) -> None:
    from invariance.engine.plan import path_checkpoints
    from invariance.io.checkpoints import Checkpoint

    config = parse_config(tiny_config(tmp_path, str(tmp_path / "out"), checkpoints=str(tmp_path / "{run}" / "epoch={epoch}.pt"),
                                      interpolation={"alphas": [0.5]}))  # fmt: skip
    found = [Checkpoint(epoch, f"epoch={epoch}", f"/{run}/epoch={epoch}.pt", run=run) for run, last in (("a", 3), ("b", 5))
             for epoch in range(1, last + 1)]  # fmt: skip
    assert [(c.run, c.epoch) for c in path_checkpoints(config, found)] == [("a", 3), ("b", 5)]
