"""The robustness link: forgetting spread across layers vs corrupted accuracy, as Polars."""

from __future__ import annotations

import io

import numpy as np
import polars as pl
import pytest

from invariance.analysis import robustness
from invariance.engine import reduce as reduce_module
from invariance.io.checkpoints import Checkpoint, discover_checkpoints, run_folders
from invariance.io.layout import finetune_metrics_key
from invariance.io.storage import Store
from invariance.training.run import METRICS_SCHEMA

FORGETTING = {  # epoch -> forgetting per layer 0..4 (depth 4: layer 4 is the pre-logits)
    1: [0.0, 0.1, 0.1, 0.2, 0.3],
    2: [0.0, 0.1, 0.2, 0.2, 0.6],
    3: [0.1, 0.1, 0.3, 0.5, 0.9],
    4: [0.5, 0.5, 0.1, 0.1, 0.1],
}
CORRUPTED = {1: 0.80, 2: 0.70, 3: 0.55, 4: 0.9}


def curves(forgetting: dict[int, list[float]] = FORGETTING) -> pl.DataFrame:
    return pl.DataFrame(
        [
            {"checkpoint": f"epoch={epoch:02d}", "epoch": epoch, "layer": layer, "forgetting_mean": value}
            for epoch, values in forgetting.items()
            for layer, value in enumerate(values)
        ]
    )


def metric_rows(accuracy: dict[int, float | None] = CORRUPTED) -> list[dict]:
    return [
        {"epoch": epoch, "task": "classification", "train_loss": 1.0, "lr": 0.1, "test_loss": 1.0,
         "clean_accuracy": 0.9, "corrupted_loss": 1.0 + epoch * 0.1 if value is None else 2.0 - value,
         "corrupted_accuracy": value, "n_train": 8, "n_test": 8, "n_corrupted": 8, "checkpoint": True,
         "seconds": 1.0, "corrupted": []}
        for epoch, value in accuracy.items()
    ]  # fmt: skip


def test_spread_uses_layers_2_to_depth_with_population_std() -> None:
    spread = robustness.forgetting_spread(curves(), depth=4).sort("epoch")
    expected = [np.std(values[2:]) for values in FORGETTING.values()]
    np.testing.assert_allclose(spread["forgetting_std_across_layers"].to_numpy(), expected, atol=1e-12)
    assert spread["n_layers"].to_list() == [3, 3, 3, 3]


def test_spread_uses_every_layer_of_a_shallow_model() -> None:
    shallow = {epoch: values[:3] for epoch, values in FORGETTING.items()}  # depth 2: layers 0, 1, 2
    spread = robustness.forgetting_spread(curves(shallow), depth=2).sort("epoch")
    np.testing.assert_allclose(spread["forgetting_std_across_layers"].to_numpy(), [np.std(v) for v in shallow.values()])
    assert robustness.spread_layers(2) == (0, 2) and robustness.spread_layers(12) == (2, 12)


def test_table_joins_epochs_present_on_both_sides_and_correlates() -> None:
    metrics = pl.DataFrame(metric_rows({**CORRUPTED, 5: 0.5}), schema=METRICS_SCHEMA)  # epoch 5 has no curve
    table = robustness.robustness_table(curves(), metrics, depth=4, run="s3://lab/run")
    assert table.columns == ["run", "epoch", "checkpoint", "forgetting_std_across_layers", "corrupted_accuracy_mean",
                             "clean_accuracy", "corrupted_loss_mean", "n_layers"]  # fmt: skip
    assert table["epoch"].to_list() == [1, 2, 3, 4]
    correlation = robustness.robustness_correlation(table)
    assert correlation.height == 1 and correlation["n_epochs"][0] == 4 and correlation["run"][0] == "s3://lab/run"
    spread = [np.std(values[2:]) for values in FORGETTING.values()]
    expected = np.corrcoef(spread, list(CORRUPTED.values()))[0, 1]
    assert correlation["pearson_r"][0] == pytest.approx(expected, abs=1e-12)
    assert correlation["pearson_r_loss"][0] == pytest.approx(-expected, abs=1e-12)  # loss = 2 - accuracy


def test_correlation_is_null_without_accuracies_or_variation() -> None:
    reconstruction = pl.DataFrame(metric_rows({1: None, 2: None, 3: None}), schema=METRICS_SCHEMA)
    table = robustness.robustness_table(curves(), reconstruction, depth=4, run="r")
    row = robustness.robustness_correlation(table).row(0, named=True)
    assert row["pearson_r"] is None and row["pearson_r_loss"] is not None and row["n_epochs"] == 3
    flat = {epoch: [0.1] * 5 for epoch in (1, 2, 3)}
    table = robustness.robustness_table(curves(flat), pl.DataFrame(metric_rows(), schema=METRICS_SCHEMA), 4, "r")
    assert robustness.robustness_correlation(table)["pearson_r"][0] is None


def write_metrics(run) -> None:
    run_store = Store(str(run))
    for row in metric_rows():
        buffer = io.BytesIO()
        pl.DataFrame([row], schema=METRICS_SCHEMA).write_parquet(buffer)
        run_store.put(finetune_metrics_key(row["epoch"]), buffer.getvalue())


def test_reduce_writes_tables_and_plot_only_for_runs_with_metrics(tmp_path) -> None:
    run, other = tmp_path / "ckpt" / "run", tmp_path / "ckpt" / "plain"
    checkpoints = [Checkpoint(e, f"epoch={e:02d}", str(run / f"epoch={e:02d}.safetensors")) for e in FORGETTING]
    write_metrics(run)
    out = Store(str(tmp_path / "out"))
    written = reduce_module._robustness(out, curves(), checkpoints, depth=4, make_plots=True)[0]
    assert written == ["reduced/robustness.parquet", "reduced/robustness_correlation.parquet",
                       "reduced/robustness_search.parquet", "reduced/robustness_early.parquet", "plots/robustness.png"]
    search = pl.read_parquet(tmp_path / "out" / "reduced" / "robustness_search.parquet")
    assert set(search["combination"]) == {"forgetting"} and set(search["run"]) == {""}  # one run: "" as everywhere
    table = pl.read_parquet(tmp_path / "out" / "reduced" / "robustness.parquet")
    assert table["epoch"].to_list() == [1, 2, 3, 4] and set(table["run"]) == {""}  # no {run}: ""
    assert (tmp_path / "out" / "plots" / "robustness.png").read_bytes()[:4] == b"\x89PNG"

    plain = [Checkpoint(e, f"epoch={e:02d}", str(other / f"epoch={e:02d}.safetensors")) for e in FORGETTING]
    assert reduce_module._robustness(Store(str(tmp_path / "out2")), curves(), plain, 4, True)[0] == []
    assert not (tmp_path / "out2").exists()


def test_an_unreadable_metrics_file_skips_its_run_and_says_so(tmp_path, caplog) -> None:
    good, broken = tmp_path / "ckpt" / "good", tmp_path / "ckpt" / "broken"
    write_metrics(good)
    write_metrics(broken)
    (broken / "metrics" / "epoch=02.parquet").write_bytes(b"not parquet")
    # a study (checkpoints: ckpt/{run}/epoch={epoch}.safetensors) of two runs
    checkpoints = [Checkpoint(e, f"epoch={e:02d}", str(folder / f"epoch={e:02d}.safetensors"), run=folder.name)
                   for folder in (good, broken) for e in FORGETTING]  # fmt: skip
    study_curves = pl.concat([curves().with_columns(pl.lit(run).alias("run")) for run in ("good", "broken")])
    written = reduce_module._robustness(Store(str(tmp_path / "out")), study_curves, checkpoints, 4, False)[0]
    assert "reduced/robustness.parquet" in written
    table = pl.read_parquet(tmp_path / "out" / "reduced" / "robustness.parquet")
    assert set(table["run"]) == {"good"}
    assert "robustness link skipped for" in caplog.text and "epoch=02.parquet" in caplog.text
    # readable Parquet of the wrong form: no epoch at all, or without the accuracy columns
    for name, frame in (("no_epoch", pl.DataFrame({"foo": [1]})), ("no_accuracy", pl.DataFrame({"epoch": [1], "foo": [1]}))):
        folder = tmp_path / "ckpt" / name
        (folder / "metrics").mkdir(parents=True)
        frame.write_parquet(folder / "metrics" / "epoch=01.parquet")
        checkpoints.append(Checkpoint(1, "epoch=01", str(folder / "epoch=01.safetensors"), run=name))
        study_curves = pl.concat([study_curves, curves().filter(pl.col("epoch") == 1).with_columns(pl.lit(name).alias("run"))])
    caplog.clear()
    written = reduce_module._robustness(Store(str(tmp_path / "out3")), study_curves, checkpoints, 4, False)[0]
    assert "reduced/robustness.parquet" in written
    assert set(pl.read_parquet(tmp_path / "out3" / "reduced" / "robustness.parquet")["run"]) == {"good"}
    assert "no 'epoch' column" in caplog.text and "lack the columns ['clean_accuracy'" in caplog.text


def test_a_metrics_copy_in_a_subfolder_does_not_change_the_correlation_n(tmp_path) -> None:
    """Copies under metrics/old/ (a researcher's backup) are not the run's epochs: counted twice
    they would double n and shrink the Bonferroni p by orders of magnitude (issue 25)."""
    import shutil

    run = tmp_path / "ckpt" / "run"
    write_metrics(run)
    checkpoints = [Checkpoint(e, f"epoch={e:02d}", str(run / f"epoch={e:02d}.safetensors")) for e in FORGETTING]
    reduce_module._robustness(Store(str(tmp_path / "before")), curves(), checkpoints, depth=4, make_plots=False)[0]
    shutil.copytree(run / "metrics", run / "metrics" / "old")
    (run / "metrics" / "old" / "notes.parquet").write_bytes((run / "metrics" / "epoch=01.parquet").read_bytes())
    reduce_module._robustness(Store(str(tmp_path / "after")), curves(), checkpoints, depth=4, make_plots=False)[0]
    for name in ("robustness_correlation", "robustness_search"):
        before, after = (pl.read_parquet(tmp_path / side / "reduced" / f"{name}.parquet") for side in ("before", "after"))
        assert after.equals(before), name
    correlation = pl.read_parquet(tmp_path / "after" / "reduced" / "robustness_correlation.parquet")
    assert correlation["n_epochs"].to_list() == [4]


def test_two_metrics_files_of_one_epoch_are_refused_naming_both(tmp_path, caplog) -> None:
    from invariance.errors import StorageError
    from invariance.io.run_metrics import read_run_metrics

    run = tmp_path / "run"
    write_metrics(run)
    (run / "metrics" / "epoch=3.parquet").write_bytes((run / "metrics" / "epoch=03.parquet").read_bytes())
    with pytest.raises(StorageError, match=r"epoch 3 .*epoch=03.parquet.*epoch=3.parquet"):
        read_run_metrics(str(run))
    checkpoints = [Checkpoint(e, f"epoch={e:02d}", str(run / f"epoch={e:02d}.safetensors")) for e in FORGETTING]
    assert reduce_module._robustness(Store(str(tmp_path / "out")), curves(), checkpoints, 4, False)[0] == []
    assert "robustness link skipped for" in caplog.text and "epoch=3.parquet" in caplog.text


def test_run_folders_are_where_the_pattern_starts_to_vary(tmp_path) -> None:
    flat = discover(tmp_path / "flat", "epoch={epoch}.safetensors", ["epoch=1.safetensors", "epoch=2.safetensors"])
    nested = discover(tmp_path / "nested", "epoch={epoch}/model.safetensors",
                      ["epoch=1/model.safetensors", "epoch=2/model.safetensors"])  # fmt: skip
    assert run_folders(flat) == [str(tmp_path / "flat")]
    assert run_folders(nested) == [str(tmp_path / "nested")]  # one run, not one per epoch


def discover(folder, pattern: str, files: list[str]) -> list[Checkpoint]:
    for name in files:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"x")
    return discover_checkpoints(f"{folder}/{pattern}")


def test_the_plot_says_n_and_warns_below_five_epochs() -> None:
    few = {epoch: CORRUPTED[epoch] for epoch in (1, 2, 3)}
    metrics = pl.DataFrame(metric_rows(few), schema=METRICS_SCHEMA)
    table = robustness.robustness_table(curves(), metrics, depth=4, run="s3://lab/run")
    figure = robustness.robustness_figure(table, robustness.robustness_correlation(table), depth=4)
    assert "r from 3 epochs" in figure.get_suptitle()
    labels = [text.get_text() for text in figure.axes[1].get_legend().get_texts()]  # the scatter's: r per run
    assert labels == [labels[0]] and "(n = 3 epochs)" in labels[0] and labels[0].startswith("s3://lab/run: r = ")
    enough = pl.DataFrame(metric_rows({**CORRUPTED, 5: 0.4}), schema=METRICS_SCHEMA)
    table = robustness.robustness_table(curves({**FORGETTING, 5: [0.2] * 5}), enough, depth=4, run="r")
    assert robustness.robustness_figure(table, robustness.robustness_correlation(table), depth=4).get_suptitle() == ""


def test_runs_compared_over_the_first_epochs_lines_runs_up_by_epoch() -> None:
    """compare_epochs: N keeps each run's first N checkpoint epochs, complete or not: a run whose
    epoch 1 is incomplete shows epoch 2 only, not epochs 2 and 3 beside the others' 1 and 2."""
    both = pl.concat([curves().with_columns(pl.lit("a").alias("run")),
                      curves().filter(pl.col("epoch") != 1).with_columns(pl.lit("b").alias("run"))])  # fmt: skip
    compared = reduce_module.runs_compared(both, pl.DataFrame(), depth=4, first_epochs=2,
                                           run_epochs={"a": list(FORGETTING), "b": list(FORGETTING)})  # fmt: skip
    assert compared.select("run", "epoch").rows() == [("a", 1), ("a", 2), ("b", 2)]
    every = reduce_module.runs_compared(both, pl.DataFrame(), depth=4)
    assert every.height == 2 * len(FORGETTING) - 1
