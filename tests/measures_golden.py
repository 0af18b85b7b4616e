"""A fixed tiny run whose shard rows and reduced tables pin the measures (issue 26).

``python -m tests.measures_golden`` wrote tests/data/measures_golden/ with the code from before
measures became plug-ins (commit 15be14f); tests/test_measures.py runs the same run with today's
code and compares every row bit for bit. The run: the tiny ViT (3 layers), 2 seeds, 2 checkpoints,
a weight path at alpha 0.5 for the last one, a kNN probe; paths written relative to the config's
folder, so that the settings hashes do not depend on where the run is made.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import polars as pl
import yaml

from tests.helpers import tiny_config, write_checkpoints, write_eval_parquet

GOLDEN = Path(__file__).resolve().parent / "data" / "measures_golden"
# shard kinds: the folder under the output and the columns that order its rows
KINDS = {
    "stir": ["epoch", "alpha", "ref_model", "ref_layer", "seed", "target_model", "target_layer"],
    "cka": ["epoch", "alpha", "model_a", "layer_a", "model_b", "layer_b"],
    "knn": ["model", "epoch", "alpha", "layer", "k"],
}
# written since measures are plug-ins (issue 26): compared with the CKA shards' old column
NEW_KINDS = {"subspace": ["epoch", "alpha", "layer"]}
TABLES = ["curves", "flow", "knn"]


def golden_config(folder: Path) -> Path:
    """Checkpoints, eval images, a kNN bank and run.yaml (relative paths) in ``folder``."""
    write_checkpoints(folder / "ckpt", epochs=[1, 2])
    write_eval_parquet(folder / "data")
    shutil.copytree(folder / "data", folder / "bank")
    config = tiny_config(Path("."), "out", interpolation={"alphas": [0.5, 1.0]},
                         knn={"train": {"format": "parquet", "path": "bank", "n_samples": 24}, "k": [3, 5]})  # fmt: skip
    config["pretrained"], config["checkpoints"] = "ckpt/pretrained.safetensors", "ckpt/ft/epoch={epoch}.safetensors"
    config["data"]["path"], config["data"]["n_samples"] = "data", 16  # above the subspace k (10)
    (folder / "run.yaml").write_text(yaml.safe_dump(config))
    return folder / "run.yaml"


def shard_rows(output: Path, kind: str) -> pl.DataFrame:
    """Every shard row of ``kind`` under ``output``, in a fixed order."""
    files = sorted((output / kind).rglob("*.parquet"))
    if not files:
        return pl.DataFrame()
    frame = pl.concat([pl.read_parquet(f) for f in files], how="diagonal_relaxed")
    return frame.sort({**KINDS, **NEW_KINDS}[kind], nulls_last=False)


def run_golden(folder: Path) -> dict[str, pl.DataFrame]:
    """Run the fixed tiny run in process in ``folder``; {shard kind or reduced table: rows}."""
    import torch

    from invariance.config import load_config
    from invariance.io.paths import resolve_paths
    from invariance.engine.execute import execute_in_process
    from invariance.engine.reduce import reduce_plan
    from invariance.engine.steps import Workspace
    from tests.helpers import open_in_process

    torch.set_num_threads(1)
    path = golden_config(folder)
    config, _ = resolve_paths(load_config(path), str(folder))
    store, plan, spec = open_in_process(config)
    summary = execute_in_process(plan, spec, Workspace("cpu"))
    assert not summary.failures, summary.failures
    plan.refresh(store)
    reduce_plan(plan, store, make_plots=False)
    output = Path(config.output)
    found = {kind: shard_rows(output, kind) for kind in [*KINDS, *NEW_KINDS]}
    found.update({f"reduced_{name}": pl.read_parquet(output / "reduced" / f"{name}.parquet") for name in TABLES})
    return found


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tables = run_golden(Path(tmp))
        GOLDEN.mkdir(parents=True, exist_ok=True)
        for name, frame in tables.items():
            frame.write_parquet(GOLDEN / f"{name}.parquet")
            print(name, frame.shape, file=sys.stderr)
