"""Every Polars recipe of the README, run as written on a study with interpolation (two runs, one with
'=' and ',' in its name, a weight path at the last epoch, two seeds): the output where grouping by
epoch alone mixes runs and weight-path points. The recipes keep alpha 1.0 and group by run."""

from __future__ import annotations

import re
from pathlib import Path

import polars as pl
import pytest
from safetensors.torch import save_file

from invariance.config import parse_config
from invariance.engine.execute import execute_in_process
from invariance.engine.reduce import reduce_plan
from invariance.engine.steps import Workspace
from tests.helpers import open_in_process, tiny_config, tiny_state, write_eval_parquet
from tests.test_studies import EPOCHS, RUNS as STUDY_RUNS, write_run

README = Path(__file__).resolve().parent.parent / "README.md"
# two runs of a sweep with their finetuning metrics (the Fig. 6 recipe reads them), one named with '=' and ','
RUNS = {STUDY_RUNS[2]: 0.03, STUDY_RUNS[1]: 0.08}
LAYERS = [0, 1, 2]


def recipe_blocks() -> list[str]:
    """The ```python blocks of the README's "Polars recipes" section, in order."""
    section = README.read_text().split("## Polars recipes", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


@pytest.fixture(scope="module")
def study_with_paths(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("recipes")
    (tmp / "ckpt").mkdir()
    save_file(tiny_state(0), str(tmp / "ckpt" / "pretrained.safetensors"))
    write_eval_parquet(tmp / "data")
    for run, scale in RUNS.items():
        write_run(tmp / "sweep", run, scale)
    config = parse_config(tiny_config(tmp, str(tmp / "out"), checkpoints=str(tmp / "sweep" / "{run}" / "epoch={epoch}.safetensors"),
                                      inversion={"iterations": 8, "step_size": 0.5},
                                      interpolation={"alphas": [0.0, 0.5, 1.0], "epochs": "last"}))  # fmt: skip
    store, plan, spec = open_in_process(config)
    summary = execute_in_process(plan, spec, Workspace("cpu"))
    assert summary.failures == []
    plan.refresh(store)
    reduce_plan(plan, store, make_plots=False)
    return tmp / "out"


def test_every_recipe_runs_on_a_study_with_interpolation(study_with_paths: Path, torch_single_thread, capsys) -> None:
    blocks = recipe_blocks()
    assert len(blocks) == 3
    scope: dict = {}
    first = blocks[0].replace('out = "invariance-demo/results"', f'out = "{study_with_paths}"')
    assert first != blocks[0], "the first recipe names the demo's output"
    for block in [first, *blocks[1:]]:
        exec(compile(block, "README.md", "exec"), scope)  # noqa: S102 - the README's own code
    printed = capsys.readouterr().out
    assert all(run in printed for run in RUNS)

    # one row per run, epoch and layer: nothing averaged over runs or weight-path points
    kept, spread, curves = scope["kept"], scope["spread"], scope["curves"]
    assert kept.height == len(RUNS) * len(EPOCHS) * len(LAYERS)
    assert sorted(kept["run"].unique()) == sorted(RUNS)
    assert spread.height == len(RUNS) * len(EPOCHS)
    assert set(curves["alpha"].unique()) == {1.0}
    # the raw-STIR recipe agrees with the shards read without it, point by point
    direct = (pl.read_parquet(study_with_paths / "stir" / "**" / "*.parquet", hive_partitioning=False)
                .filter((pl.col("alpha") == 1.0) & (pl.col("ref_model") == "pt") & (pl.col("target_model") == "ft")
                        & (pl.col("ref_layer") == pl.col("target_layer")))
                .group_by("run", "epoch", "target_layer").agg(pl.col("stir").mean().alias("stir_ft_given_pt")))  # fmt: skip
    joined = kept.join(direct, on=["run", "epoch", "target_layer"], suffix="_direct")
    assert joined.height == kept.height
    assert (joined["stir_ft_given_pt"] - joined["stir_ft_given_pt_direct"]).abs().max() == 0.0
    # the weight-path recipe: one row per checkpoint with a path (each run's last epoch)
    first_alpha = scope["first_alpha"]
    assert sorted(zip(first_alpha["run"], first_alpha["epoch"])) == sorted((run, EPOCHS[-1]) for run in RUNS)
