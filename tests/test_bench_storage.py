"""bench_storage.py at a tiny scale (2 runs x 3 epochs of a 2-layer model, 3 seeds; local store only):
the history it builds is the plan's (every unit done, nothing computed by a no-op tick), a one-new
tick computes one checkpoint's units, and compaction leaves fewer files with the same rows: the
reduce reads every checkpoint and the recipes give the same results before and after."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import load_bench_module

pytestmark = pytest.mark.usefixtures("torch_single_thread")

storage = load_bench_module("bench_storage")

RUNS, EPOCHS, LAYERS, SEEDS = 2, 3, 2, 3


def test_bench_storage_at_a_tiny_scale(tmp_path: Path, capsys) -> None:
    out = tmp_path / "storage.json"
    assert storage.main(["--runs", str(RUNS), "--epochs", str(EPOCHS), "--layers", str(LAYERS), "--seeds", str(SEEDS),
                         "--stores", "local", "--json", str(out), "--keep", str(tmp_path / "work")]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "| store | stage | phase | seconds |" in printed and "| local | before | no-op gate |" in printed
    results = json.loads(out.read_text())
    per_checkpoint = 2 * LAYERS * SEEDS + 2  # STIR (pt, ft) x layers x seeds, CKA, subspace
    checkpoints = RUNS * EPOCHS
    history = results["history"]
    assert history["cloned_units"] == (checkpoints - 1) * per_checkpoint
    assert history["inventory"]["shards"]["files"] == checkpoints * per_checkpoint
    assert history["inventory"]["records"]["files"] == checkpoints * per_checkpoint

    phases = {(p["stage"], p["name"]): p for p in results["phases"]}
    stages = ("before", "after") if storage.compaction_available() else ("before",)
    for stage in stages:
        noop = phases[(stage, "no-op gate")]["detail"]
        assert noop["submission"] is False, noop
        assert phases[(stage, "no-op run")]["detail"]["computed"] == 0
        assert phases[(stage, "one-new gate")]["detail"]["submission"] is True
        assert phases[(stage, "one-new run")]["detail"]["computed"] == per_checkpoint
    # the reduce without an index reads every checkpoint: the history and the before tick's new one
    assert phases[("before", "reduce (no index)")]["detail"]["checkpoints"] == checkpoints + 1
    assert phases[("before", f"recipe: {storage.RECIPE_ALL}")]["detail"]["rows"] == (checkpoints + 1) * LAYERS
    assert phases[("before", f"recipe: {storage.RECIPE_ONE}")]["detail"]["rows"] == 2 * LAYERS
    if not storage.compaction_available():
        return
    assert phases[("after", "reduce (no index)")]["detail"]["checkpoints"] == checkpoints + 1

    inventory = results["stores"]["local"]["inventory"]
    before, compacted = inventory["before"], inventory["compacted"]
    # every STIR folder (a run's epoch) is one file now; CKA and subspace hold one shard per folder: left as they are
    assert compacted["compacted"]["files"] == checkpoints + 1
    assert compacted["shards"]["files"] == 2 * (checkpoints + 1)
    assert compacted["all"]["files"] < before["all"]["files"]
    # the compacted shards' records move into one record per compacted file; CKA's and subspace's stay
    assert compacted["records"]["files"] == 3 * (checkpoints + 1) < before["records"]["files"]
    summary = phases[("compact", "compact")]["detail"]
    assert summary["groups"] == checkpoints + 1 and summary["shards"] == (checkpoints + 1) * 2 * LAYERS * SEEDS
    # the after tick compacts its own new folder
    assert inventory["after"]["compacted"]["files"] == checkpoints + 2

    digests = results["stores"]["local"]["recipe_digests"]
    for title in (storage.RECIPE_ALL, storage.RECIPE_ONE):
        assert digests[f"before {title}"] == digests[f"after {title}"], title
    assert all("same result" in line for line in results["verdicts"] if "recipe" in line)


def test_the_bench_leaves_the_library_as_it_was(tmp_path: Path) -> None:
    """Its stand-ins (an in-process executor, stub figures, pinned fingerprints) are undone: a later
    test's `invariance run` in this process starts Ray and draws real figures."""
    import invariance.engine.plan as plan_module
    import invariance.engine.reduce as reduce_module
    import jobs.run as run_module

    before = (run_module.connect_ray, run_module.execute, reduce_module._draw, reduce_module.code_version,
              plan_module.package_fingerprint)  # fmt: skip
    with storage.bench_patches():
        assert run_module.execute is not before[1]
    assert (run_module.connect_ray, run_module.execute, reduce_module._draw, reduce_module.code_version,
            plan_module.package_fingerprint) == before  # fmt: skip
