"""Compaction (issue 30): the shards of a complete folder (a measure's settings, run and epoch)
become one Parquet file with a row group per shard; every reader (the plan, the reduce, a recipe's
scan) gets the same rows before and after, after a crash anywhere in between, beside a run that
writes a compacted shard again, and on outputs of older releases."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
from polars.testing import assert_frame_equal

from invariance.config import parse_config
from invariance.engine.compact import compact
from invariance.engine.execute import execute_in_process
from invariance.engine.plan import make_plan
from invariance.engine.reduce import reduce_plan
from invariance.engine.steps import Workspace
from invariance.io.compacted import compacted_members
from invariance.io.layout import is_compacted
from invariance.io.storage import Store
from tests.helpers import open_in_process, tiny_config, write_checkpoints, write_eval_parquet

ROOT = Path(__file__).resolve().parents[1]
_INPUTS: list[Path] = []  # the computed fixture's folder: its checkpoints and images are every test's inputs
TABLES = ("reduced/curves.parquet", "reduced/flow.parquet", "reduced/cka.parquet", "reduced/procrustes.parquet")


def _config(folder: Path, alphas: list[float] | None = None, **overrides):
    """The config of the output ``folder/out``; its inputs (checkpoints, images) are the computed
    fixture's, as written there (paths are in the settings hash)."""
    inputs = _INPUTS[0]
    interpolation = {"interpolation": {"alphas": alphas, "epochs": "all"}} if alphas else {}
    return parse_config(tiny_config(inputs, str(folder / "out"), measures=["procrustes"], **interpolation, **overrides))


@pytest.fixture(scope="module")
def computed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A computed output, never compacted (2 epochs, 3 layers, 2 seeds, a weight path at 0.5): copied by each test."""
    tmp_path = tmp_path_factory.mktemp("computed")
    _INPUTS[:] = [tmp_path]
    write_checkpoints(tmp_path / "ckpt", [1, 2])
    write_eval_parquet(tmp_path / "data")
    config = _config(tmp_path, alphas=[0.5, 1.0])
    store, plan, spec = open_in_process(config)
    execute_in_process(plan, spec, Workspace("cpu"))
    plan.refresh(store)
    assert not plan.missing()
    return tmp_path


def _copy(computed: Path, tmp_path: Path) -> Path:
    _INPUTS[:] = [computed]
    folder = tmp_path / "study"
    shutil.copytree(computed / "out", folder / "out")
    return folder


def _open(folder: Path, alphas: list[float] | None = (0.5, 1.0)):
    config = _config(folder, alphas=list(alphas) if alphas else None)
    store = Store(config.output)
    return config, store, make_plan(config, store)


def _data_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder / "out")) for p in (folder / "out").rglob("*.parquet")
                  if not p.relative_to(folder / "out").parts[0] in ("reduced", "_raw"))  # fmt: skip


def _raw_rows(folder: Path, measure: str = "stir") -> pl.DataFrame:
    """The recipe's scan of a measure's data folders, in a fixed order."""
    frame = pl.scan_parquet(f"{folder}/out/{measure}/**/*.parquet", hive_partitioning=True).collect()
    return frame.sort(frame.columns)


def _tables(folder: Path, alphas: list[float] | None = (0.5, 1.0)) -> dict[str, pl.DataFrame]:
    config, store, plan = _open(folder, alphas)
    shutil.rmtree(folder / "out" / "reduced", ignore_errors=True)
    reduce_plan(plan, store, make_plots=False)
    return {key: pl.read_parquet(folder / "out" / key) for key in TABLES}


def _assert_same_tables(left: dict[str, pl.DataFrame], right: dict[str, pl.DataFrame]) -> None:
    for key in TABLES:
        assert_frame_equal(left[key].sort(left[key].columns), right[key].sort(right[key].columns), check_exact=True)


def test_a_complete_folder_becomes_one_file_with_a_row_group_per_shard(computed: Path, tmp_path: Path) -> None:
    folder = _copy(computed, tmp_path)
    before_files = _data_files(folder)
    before_rows = {measure: _raw_rows(folder, measure) for measure in ("stir", "cka", "procrustes")}
    before_tables = _tables(folder)
    config, store, plan = _open(folder)
    groups = plan.folder_units()
    summary = compact(plan, store)

    after_files = _data_files(folder)
    assert summary.groups == len(groups) > 0 and summary.shards == sum(map(len, groups.values()))
    assert summary.removed == summary.shards and summary.bytes_after < summary.bytes_before
    # each folder of two or more shards is one compacted file; a folder of one shard is as it was
    assert sorted(str(Path(f).parent) for f in after_files if is_compacted(f)) == sorted(groups)
    assert len(after_files) == len(before_files) - summary.shards + summary.groups
    # the shards' completion records move into one record per compacted file: the listing shrinks with them
    records = sorted(str(p.relative_to(folder / "out")) for p in (folder / "out" / "_manifests").rglob("*.json"))
    compaction_records = [r for r in records if r.startswith("_manifests/compacted/")]
    assert len(compaction_records) == len(groups)
    assert not [u for units in groups.values() for u in units if (folder / "out" / plan.record_key(u)).exists()]
    kept = json.loads((folder / "out" / compaction_records[0]).read_text())
    assert len(kept["records"]) == len(kept["shards"]) and all("rows" in r for r in kept["records"].values())
    stir_file = next(f for f in after_files if f.startswith("stir/") and is_compacted(f))
    metadata = pq.ParquetFile(folder / "out" / stir_file).metadata
    members = compacted_members(store, stir_file)
    assert metadata.num_row_groups == len(members) == 2 * 3 * 2 * 2  # pt/ft x 3 layers x 2 seeds x 2 alphas
    schema = metadata.schema.to_arrow_schema()
    for group in range(metadata.num_row_groups):  # statistics name each row group's shard: Polars prunes on them
        columns = {schema.field(i).name: metadata.row_group(group).column(i).statistics for i in range(len(schema))}
        for name in ("ref_model", "ref_layer", "seed", "alpha"):
            assert columns[name].has_min_max and columns[name].min == columns[name].max
    # the same rows for every reader: the recipe's scan, the plan, a reduce from scratch
    for measure, rows in before_rows.items():
        assert_frame_equal(_raw_rows(folder, measure), rows, check_exact=True)
    assert not _open(folder)[2].missing()
    _assert_same_tables(_tables(folder), before_tables)
    # again: nothing to do
    config, store, plan = _open(folder)
    assert compact(plan, store).groups == 0 and _data_files(folder) == after_files


def test_raw_shards_are_kept_outside_the_scanned_folders_with_keep_raw(computed: Path, tmp_path: Path) -> None:
    folder = _copy(computed, tmp_path)
    before = _raw_rows(folder)
    raw = [f for f in _data_files(folder) if f.startswith("stir/")]
    config, store, plan = _open(folder)
    compact(plan, store, keep_raw=True)
    assert all((folder / "out" / "_raw" / f).is_file() for f in raw)
    assert_frame_equal(_raw_rows(folder), before, check_exact=True)


_KILLED = """
import os, signal, sys
from invariance.config import parse_config
from invariance.engine.compact import compact
from invariance.engine.plan import make_plan
from invariance.io.storage import Store
from tests.helpers import tiny_config

point, after = sys.argv[2], int(sys.argv[3])
calls = {"n": 0}
original = getattr(Store, point)

def dying(self, *args, **kwargs):
    if point == "put" and "compacted-" not in args[0]:
        return original(self, *args, **kwargs)
    calls["n"] += 1
    if calls["n"] > after:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, *args, **kwargs)

setattr(Store, point, dying)
folder = sys.argv[1]
config = parse_config(tiny_config(__import__("pathlib").Path(os.environ["COMPACTION_INPUTS"]), folder + "/out", measures=["procrustes"],
                                  interpolation={"alphas": [0.5, 1.0], "epochs": "all"}))
store = Store(config.output)
compact(make_plan(config, store), store)
"""


@pytest.mark.parametrize(("point", "after"), [("put", 0), ("put", 2), ("remove", 0), ("remove", 3)])
def test_a_compaction_killed_anywhere_loses_and_doubles_no_row(computed: Path, tmp_path: Path, point: str, after: int) -> None:
    """SIGKILL before the first compacted file, between files, after a file before its raw shards
    are removed, and halfway through the folders: every reader sees each row once (the recipe's
    scan after the next compaction, which finishes the work)."""
    folder = _copy(computed, tmp_path)
    before_rows, before_tables = _raw_rows(folder), _tables(folder)
    script = tmp_path / "killed.py"
    script.write_text(textwrap.dedent(_KILLED))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COMPACTION_INPUTS": str(computed)}
    done = subprocess.run([sys.executable, str(script), str(folder), point, str(after)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == -9, done.stderr[-2000:]
    config, store, plan = _open(folder)
    assert not plan.missing()  # nothing lost: every shard done, in a raw shard or a compacted file
    _assert_same_tables(_tables(folder), before_tables)  # the reduce reads each row once
    config, store, plan = _open(folder)
    compact(plan, store)
    assert_frame_equal(_raw_rows(folder), before_rows, check_exact=True)
    assert not [f for f in _data_files(folder) if f.startswith("stir/") and not is_compacted(f)]


def test_a_shard_written_again_beside_its_compacted_file_is_read_once(computed: Path, tmp_path: Path) -> None:
    """A run that lost its lease may still put a shard the run holding it has compacted since (the
    same key): the plan and the reduce read the compacted file, the next compaction removes the shard."""
    folder = _copy(computed, tmp_path)
    raw = next(f for f in _data_files(folder) if f.startswith("stir/"))
    data = (folder / "out" / raw).read_bytes()
    before_rows, before_tables = _raw_rows(folder), _tables(folder)
    config, store, plan = _open(folder)
    compact(plan, store)
    (folder / "out" / raw).write_bytes(data)
    config, store, plan = _open(folder)
    assert not plan.missing()
    _assert_same_tables(_tables(folder), before_tables)
    config, store, plan = _open(folder)
    assert compact(plan, store).removed == 1
    assert not (folder / "out" / raw).exists()
    assert_frame_equal(_raw_rows(folder), before_rows, check_exact=True)


def test_a_folder_that_grows_or_shrinks_keeps_every_row_in_one_file(computed: Path, tmp_path: Path) -> None:
    """Compacted with alpha 1 only, then a weight-path point added (new shards in the same
    folders), then dropped from the config again: one file per folder holds every shard, the
    dropped point's rows included; plans of either config find their shards done."""
    folder = _copy(computed, tmp_path)
    full_rows, checkpoint_tables = _raw_rows(folder), _tables(folder, alphas=None)
    config, store, plan = _open(folder, alphas=None)
    compact(plan, store)
    assert any(not is_compacted(f) for f in _data_files(folder) if f.startswith("stir/"))  # alpha 0.5 shards still raw
    config, store, plan = _open(folder)  # alpha 0.5 back in the config: its shards done, raw
    assert not plan.missing()
    compact(plan, store)
    stir = [f for f in _data_files(folder) if f.startswith("stir/")]
    assert all(is_compacted(f) for f in stir) and len(stir) == 2
    assert_frame_equal(_raw_rows(folder), full_rows, check_exact=True)
    config, store, plan = _open(folder, alphas=None)  # and out again: found in the footers
    assert not plan.missing()
    assert compact(plan, store).groups == 0
    assert_frame_equal(_raw_rows(folder), full_rows, check_exact=True)
    _assert_same_tables(_tables(folder, alphas=None), checkpoint_tables)  # the file's alpha-1 shards only


def test_an_unreadable_compacted_file_is_recomputed(computed: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = _copy(computed, tmp_path)
    config, store, plan = _open(folder)
    compact(plan, store)
    stir_file = next(f for f in _data_files(folder) if f.startswith("stir/") and is_compacted(f))
    held = len(compacted_members(store, stir_file))
    (folder / "out" / stir_file).write_bytes(b"not parquet")
    config, store, plan = _open(folder)
    result = reduce_plan(plan, store, make_plots=False)
    assert result.unreadable and "not a readable Parquet file" in caplog.text and stir_file in caplog.text
    assert not (folder / "out" / stir_file).exists()
    config, store, plan = _open(folder)
    assert len(plan.missing("stir")) == held  # its shards computed anew by the next run


def test_a_run_compacts_older_outputs_and_reports_it(computed: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """An output written raw (before compaction existed, or with ``compaction.enabled: false``) is
    compacted by the next run, which computes nothing and starts no Ray; ``enabled: false`` leaves it."""
    from jobs.run import run

    folder = _copy(computed, tmp_path)
    before = _data_files(folder)
    config = _config(folder, alphas=[0.5, 1.0], compaction={"enabled": False})
    run(config, progress=False)
    assert _data_files(folder) == before
    run(_config(folder, alphas=[0.5, 1.0]), progress=False)
    out = capsys.readouterr().out
    assert "compaction: " in out and "shards of" in out
    assert all(is_compacted(f) for f in _data_files(folder) if f.startswith("stir/"))


def test_two_compactions_at_once_leave_each_row_once(computed: Path, tmp_path: Path) -> None:
    """A run compacts under its lease; two compactions of one prefix at once (a lease that lapsed
    mid-compaction) still leave every row once: the same file written twice, a shard the other one
    removed first found gone and the folder's state read again."""
    import threading

    folder = _copy(computed, tmp_path)
    before = _raw_rows(folder)
    plans = [_open(folder) for _ in range(2)]
    errors: list[BaseException] = []

    def compaction(opened) -> None:
        try:
            compact(opened[2], opened[1])
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=compaction, args=(opened,)) for opened in plans]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert all(is_compacted(f) for f in _data_files(folder) if f.startswith("stir/"))
    assert_frame_equal(_raw_rows(folder), before, check_exact=True)
    assert not _open(folder)[2].missing()


def test_a_refresh_of_the_units_an_execution_wrote_lists_their_folders_and_finds_what_a_full_one_does(
    computed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`invariance run` refreshes after its execution only the folders of the units it submitted
    (under the lease nothing else changes): the same done units, shards, records and compacted
    holders as a full refresh, here with a weight-path point's shards written raw beside a folder's
    compacted file and a checkpoint's CKA record among the other checkpoints' records."""
    folder = _copy(computed, tmp_path)
    config, store, plan = _open(folder, alphas=None)
    compact(plan, store)  # alpha 1's shards compacted; alpha 0.5's stay raw beside them
    config, store, plan = _open(folder)
    gone = [u for u in plan.all_units() if getattr(u, "epoch", None) == 2 and (getattr(u, "alpha", 1.0) != 1.0 or u.measure == "cka")]
    assert any(u.measure == "stir" for u in gone) and any(u.measure == "cka" for u in gone)
    for unit in gone:  # the units to compute again: their shards and records removed
        for key in (plan.data_key(unit), plan.record_key(unit)):
            if (folder / "out" / key).exists():
                (folder / "out" / key).unlink()
    store, plan, spec = open_in_process(config)
    assert {plan.record_key(u) for u in plan.missing()} == {plan.record_key(u) for u in gone}
    submitted = plan.missing()
    execute_in_process(plan, spec, Workspace("cpu"))
    listed: list[str] = []  # what the refresh asks for (a local disk lists a prefix's folder and filters it)
    original_list, original_starting = Store.list, Store.list_starting
    monkeypatch.setattr(Store, "list", lambda self, prefix: listed.append(prefix) or original_list(self, prefix))
    monkeypatch.setattr(Store, "list_starting", lambda self, start: listed.append(start) or
                        [key for key in original_list(self, start.rpartition("/")[0]) if key.startswith(start)])  # fmt: skip
    plan.refresh(store, submitted)
    assert listed and all("epoch=2" in prefix for prefix in listed), [p for p in listed if "epoch=2" not in p]
    assert any("/cka/epoch=2" in prefix for prefix in listed if prefix.startswith("_manifests/")), listed  # not every epoch's
    monkeypatch.undo()
    full = make_plan(config, store)
    assert not plan.missing() and not full.missing()
    assert (plan.done, plan.present, plan.records, plan.holder) == (full.done, full.present, full.records, full.holder)
    compact(plan, store)
    assert_frame_equal(_raw_rows(folder), _raw_rows(_copy(computed, tmp_path / "again")), check_exact=True)
    # more folders than a partial refresh lists one by one: one listing of everything instead
    import invariance.engine.plan as plan_module

    monkeypatch.setattr(plan_module, "PARTIAL_REFRESH_FOLDERS", 2)
    monkeypatch.setattr(Store, "list", lambda self, prefix: listed.append(prefix) or original_list(self, prefix))
    listed.clear()
    plan.refresh(store, submitted)
    assert "_manifests" in listed
