"""Measures as plug-ins (issue 26): the move kept every number, the registry is the engine's only
view of a measure, Procrustes against an independent computation, a user's own measure end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from tests.measures_golden import GOLDEN, KINDS, TABLES, run_golden
from tests.ray_fixtures import local_ray  # noqa: F401 - fixture


@pytest.fixture(scope="module")
def golden_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pl.DataFrame]:
    return run_golden(tmp_path_factory.mktemp("golden"))


# the kNN hash holds the listing of the bank's files (their paths): made in another folder, it differs
LOCATION_BOUND = {"knn": ["settings"], "reduced_knn": ["settings"]}


def _comparable(frame: pl.DataFrame, name: str) -> pl.DataFrame:
    return frame.drop(LOCATION_BOUND.get(name, []))


@pytest.mark.parametrize("kind", ["stir", "knn"])
def test_stir_and_knn_rows_equal_the_rows_before_the_move_bit_for_bit(golden_run, kind: str) -> None:
    before = pl.read_parquet(GOLDEN / f"{kind}.parquet")
    assert_frame_equal(_comparable(golden_run[kind], kind), _comparable(before, kind), check_exact=True)


def test_cka_rows_equal_and_subspace_moved_to_its_own_shards_with_the_same_values(golden_run) -> None:
    before = pl.read_parquet(GOLDEN / "cka.parquet")
    after = golden_run["cka"]
    assert_frame_equal(after.drop("subspace_similarity"), before.drop("subspace_similarity"), check_exact=True)
    assert after["subspace_similarity"].null_count() == after.height  # new CKA shards leave the column to the subspace measure
    subspace = golden_run["subspace"]
    expected = before.filter((pl.col("model_a") == "ft") & (pl.col("model_b") == "pt") & (pl.col("layer_a") == pl.col("layer_b")))
    joined = expected.select("epoch", "alpha", pl.col("layer_a").alias("layer"), "subspace_similarity").join(
        subspace.select("epoch", "alpha", "layer", pl.col("subspace_similarity").alias("moved")), on=["epoch", "alpha", "layer"]
    )
    assert joined.height == subspace.height == expected.height > 0
    assert joined["subspace_similarity"].drop_nulls().len() > 0
    assert (joined["subspace_similarity"] == joined["moved"]).all()  # bit for bit


@pytest.mark.parametrize("name", TABLES)
def test_reduced_tables_equal_the_tables_before_the_move(golden_run, name: str) -> None:
    before = pl.read_parquet(GOLDEN / f"reduced_{name}.parquet")
    after = golden_run[f"reduced_{name}"]
    assert set(after.columns) == set(before.columns)  # the curves' columns come in measure order now
    assert_frame_equal(_comparable(after.select(before.columns), f"reduced_{name}"), _comparable(before, f"reduced_{name}"),
                       check_exact=True)  # fmt: skip


def test_the_golden_kinds_cover_the_moved_measures() -> None:
    from invariance.measures import MEASURES

    assert set(KINDS) | {"subspace"} <= set(MEASURES)


# --- Orthogonal Procrustes: against scipy ------------------------------------------------------
def _scipy_procrustes(x: np.ndarray, y: np.ndarray) -> float:
    """||X R - Y||_F^2 at scipy's best rotation R, for X, Y centred and scaled to norm 1 (the
    narrower one padded with zero columns: a rotation needs square R)."""
    from scipy.linalg import orthogonal_procrustes

    x, y = x - x.mean(axis=0), y - y.mean(axis=0)
    x, y = x / np.linalg.norm(x), y / np.linalg.norm(y)
    width = max(x.shape[1], y.shape[1])
    x, y = (np.pad(m, ((0, 0), (0, width - m.shape[1]))) for m in (x, y))
    rotation, _ = orthogonal_procrustes(x, y)
    return float(np.linalg.norm(x @ rotation - y) ** 2)


@pytest.mark.parametrize("n, d_a, d_b", [(40, 8, 8), (30, 5, 12), (12, 300, 200)])
def test_procrustes_distance_equals_scipys_orthogonal_procrustes(n: int, d_a: int, d_b: int) -> None:
    import torch

    from invariance.measures.procrustes import procrustes_distance

    rng = np.random.default_rng(n + d_a)
    x = rng.normal(size=(n, d_a))
    y = np.hstack([x[:, : min(d_a, d_b)] @ rng.normal(size=(min(d_a, d_b), min(d_a, d_b))), rng.normal(size=(n, d_b - min(d_a, d_b)))]) \
        + 0.3 * rng.normal(size=(n, d_b))  # fmt: skip
    ours = procrustes_distance(torch.from_numpy(x), torch.from_numpy(y))
    assert abs(ours - _scipy_procrustes(x, y)) < 1e-10
    rotation = np.linalg.qr(rng.normal(size=(d_a, d_a)))[0]  # the same representation rotated: distance 0
    assert abs(procrustes_distance(torch.from_numpy(x), torch.from_numpy(3.0 * x @ rotation + 1.0))) < 1e-10
    assert 0.0 <= ours <= 2.0


# --- a run with Procrustes and a user's measure, in process --------------------------------------
def _run(tmp_path: Path, measures: list, epochs: tuple[int, ...] = (1, 2)):
    from invariance.config import parse_config
    from invariance.engine.execute import execute_in_process
    from invariance.engine.reduce import reduce_plan
    from invariance.engine.steps import Workspace
    from tests.helpers import open_in_process, tiny_config, write_checkpoints, write_eval_parquet

    if not (tmp_path / "ckpt").exists():
        write_checkpoints(tmp_path / "ckpt", epochs=list(epochs))
        write_eval_parquet(tmp_path / "data")
    config = parse_config(tiny_config(tmp_path, str(tmp_path / "out"), seeds=[0], measures=measures))
    store, plan, spec = open_in_process(config)
    summary = execute_in_process(plan, spec, Workspace("cpu"))
    plan.refresh(store)
    return spec, plan, summary, reduce_plan(plan, store)


def test_procrustes_and_a_users_measure_run_reduce_and_draw_like_the_builtins(tmp_path: Path, torch_single_thread) -> None:
    from invariance.core.shards import batched_features
    from invariance.core.workspace import Workspace
    from invariance.measures.procrustes import procrustes_distance
    from tests.lab_measures import gram_correlation

    spec, plan, summary, result = _run(tmp_path, ["procrustes", {"function": "tests.lab_measures:gram_correlation", "per": "pair"}])
    assert summary.failures == [] and [m.name for m in plan.measures] == ["stir", "cka", "subspace", "procrustes", "gram_correlation"]
    store, layers = spec.store, len(plan.layers)
    procrustes = pl.read_parquet(store.path("reduced/procrustes.parquet"))
    assert procrustes.height == 2 * 4 * layers * layers  # 2 checkpoints, {pt, ft}^2, every layer pair
    assert procrustes.filter((pl.col("model_a") == pl.col("model_b")) & (pl.col("layer_a") == pl.col("layer_b")))["procrustes"].abs().max() < 1e-9
    mine = pl.read_parquet(store.path("reduced/gram_correlation.parquet"))
    assert mine.height == 2 * layers * layers and set(mine["model_a"]) == {"pt"} and set(mine["model_b"]) == {"ft"}
    # against an independent computation from the models' features
    context = Workspace("cpu").context(spec, plan.checkpoints[1].url, fingerprint=plan.checkpoints[1].fingerprint)
    pt, ft = (batched_features(context.models[m], context.eval_images.images, plan.layers, context.token_policy) for m in ("pt", "ft"))
    row = procrustes.filter((pl.col("epoch") == 2) & (pl.col("model_a") == "pt") & (pl.col("layer_a") == 0)
                            & (pl.col("model_b") == "ft") & (pl.col("layer_b") == layers - 1))  # fmt: skip
    assert abs(row["procrustes"].item() - procrustes_distance(pt[0], ft[layers - 1])) < 1e-10
    row = mine.filter((pl.col("epoch") == 2) & (pl.col("layer_a") == 1) & (pl.col("layer_b") == 2))
    expected = gram_correlation(pt[1].flatten(1).double().numpy(), ft[2].flatten(1).double().numpy())
    assert abs(row["gram_correlation"].item() - expected) < 1e-12
    # heatmaps per checkpoint, and in the report
    for name in ("procrustes", "gram_correlation", "cka"):
        assert store.exists(f"plots/{name}/epoch=2.png"), name
    page = store.get("reports/index.html").decode()
    assert "Procrustes distance between pretrained and finetuned layers at epoch 2" in page
    assert "gram_correlation between pretrained and finetuned layers at epoch 2" in page
    # a rerun computes nothing, and adding a measure computes only its own shards
    _, again, _, _ = _run(tmp_path, ["procrustes", {"function": "tests.lab_measures:gram_correlation", "per": "pair"}])
    assert again.missing() == [] and again.settings_hash == plan.settings_hash
    _, fewer, _, _ = _run(tmp_path, [])
    assert fewer.missing() == []  # STIR, CKA, subspace: the same keys without the extra measures


@pytest.mark.parametrize("function, says", [("broken", "raised ValueError: the lab's measure has a bug"),
                                            ("undefined", "returned nan, not a finite number")])  # fmt: skip
def test_a_measure_that_raises_or_returns_nan_fails_its_own_shards_by_name_and_is_never_marked_done(
    tmp_path: Path, torch_single_thread, function: str, says: str
) -> None:
    spec, plan, summary, result = _run(tmp_path, [{"function": f"tests.lab_measures:{function}"}], epochs=(1,))
    failed = {unit: message for unit, message in summary.failures}
    assert set(failed) == {f"{function} epoch=01"}
    assert f"measure {function} (tests.lab_measures:{function}) at pt layer 0, ft layer 0 {says}" in failed[f"{function} epoch=01"]
    assert [str(u) for u in plan.missing()] == [f"{function} epoch=01"]  # no record, no shard
    assert not spec.store.exists(f"reduced/{function}.parquet")
    assert result.complete_epochs == [1]  # the other measures' results are reduced all the same
    assert json.loads(spec.store.get("reduced/status.json"))["incomplete_measures"] == {function: 1}


def test_measures_entries_are_checked_when_the_run_is_planned(tmp_path: Path) -> None:
    from invariance.errors import ConfigError

    for measures, says in (
        (["cca"], "measures[0].name: unknown measure 'cca'"),
        (["cka"], "measures[0].name: unknown measure 'cka' (cka is on by every run)"),
        (["procrustes", "procrustes"], "measures[1]: a measure named 'procrustes' is in the run already (measures[0])"),
        ([{"function": "tests.no_such_module:f"}], "measures[0].function: cannot import module 'tests.no_such_module'"),
        ([{"function": "tests.lab_measures:missing"}], "measures[0].function: module 'tests.lab_measures' has no function 'missing'"),
        ([{"function": "tests.lab_measures:broken", "per": "block"}], "measures[0].per: Input should be 'layer' or 'pair'"),
        ([{"function": "tests.lab_measures:broken", "name": "stir"}], "measures[0].name: 'stir' is a built-in measure's name"),
    ):  # fmt: skip
        with pytest.raises(ConfigError) as raised:
            _run(tmp_path, measures, epochs=(1,))
        assert says in str(raised.value), str(raised.value)


def test_a_users_measure_is_keyed_by_its_source_editing_it_computes_anew(tmp_path: Path, monkeypatch) -> None:
    import importlib
    import sys

    from invariance.config import parse_config
    from invariance.io.storage import Store
    from invariance.engine.plan import make_plan
    from tests.helpers import tiny_config, write_checkpoints, write_eval_parquet

    write_checkpoints(tmp_path / "ckpt", epochs=[1])
    write_eval_parquet(tmp_path / "data")
    module = tmp_path / "code" / "my_lab_measure.py"
    module.parent.mkdir()
    module.write_text("def similarity(a, b):\n    return 1.0\n")
    monkeypatch.syspath_prepend(str(module.parent))
    config = parse_config(tiny_config(tmp_path, str(tmp_path / "out"), measures=[{"function": "my_lab_measure:similarity"}]))

    def hashes() -> dict[str, str]:
        sys.modules.pop("my_lab_measure", None)
        importlib.invalidate_caches()
        return make_plan(config, Store(config.output)).hashes

    before = hashes()
    assert hashes() == before  # nothing changed: the same hash
    module.write_text("def similarity(a, b):\n    return 2.0\n")
    after = hashes()
    assert after["similarity"] != before["similarity"]
    assert {k: v for k, v in after.items() if k != "similarity"} == {k: v for k, v in before.items() if k != "similarity"}


@pytest.mark.slow
def test_a_users_measure_runs_on_ray_like_the_builtins(tmp_path: Path, local_ray: None) -> None:
    """``invariance run`` on a local Ray: the user's function is imported on the workers."""
    from invariance.config import parse_config
    from jobs.run import run
    from tests.helpers import tiny_config, write_checkpoints, write_eval_parquet

    write_checkpoints(tmp_path / "ckpt", epochs=[1, 2])
    write_eval_parquet(tmp_path / "data")
    config = parse_config(tiny_config(tmp_path, str(tmp_path / "out"), seeds=[0], measures=[
        "procrustes", {"function": "tests.lab_measures:gram_correlation", "per": "layer", "name": "rsa"}]))  # fmt: skip
    result = run(config, progress=False)
    assert result.execution.failures == [] and result.reduced.complete_epochs == [1, 2]
    rsa = pl.read_parquet(tmp_path / "out" / "reduced" / "rsa.parquet")
    assert rsa.height == 2 * len(result.plan.layers) and (rsa["layer_a"] == rsa["layer_b"]).all()
    assert rsa.filter(pl.col("epoch") == 1)["rsa"].is_finite().all()
    assert (tmp_path / "out" / "plots" / "rsa" / "epoch=2.png").exists()
    assert pl.read_parquet(tmp_path / "out" / "reduced" / "procrustes.parquet").height == 2 * 4 * len(result.plan.layers) ** 2


def test_a_measure_module_beside_the_config_is_importable(tmp_path: Path, monkeypatch) -> None:
    """`invariance plan my-analysis/run.yaml` with lab_measures.py beside run.yaml (README's example)."""
    import sys

    import yaml

    from jobs.run import open_run
    from tests.helpers import tiny_config, write_checkpoints, write_eval_parquet

    write_checkpoints(tmp_path / "ckpt", epochs=[1])
    write_eval_parquet(tmp_path / "data")
    folder = tmp_path / "my-analysis"
    folder.mkdir()
    (folder / "beside_config_measures.py").write_text("def rsa(a, b):\n    return 0.5\n")
    raw = tiny_config(tmp_path, str(tmp_path / "out"), seeds=[0], measures=[{"function": "beside_config_measures:rsa"}])
    (folder / "run.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", "")
    monkeypatch.chdir(tmp_path)
    _, _, plan, _ = open_run("my-analysis/run.yaml")
    assert [m.name for m in plan.measures][-1] == "rsa" and plan.missing("rsa")
    assert str(folder) in __import__("os").environ["PYTHONPATH"].split(":")
