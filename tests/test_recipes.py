"""Every Polars recipe of docs/recipes.md, run as written after its setup block, on both kinds of
output a user has: the demo's (one run, no weight path) and a study with interpolation (two runs,
one with '=' and ',' in its name, a weight path at the last epoch, two seeds), where grouping by
epoch alone mixes runs and weight-path points. Each recipe says what it does with `run` and
`alpha`; the recipes keep alpha 1.0 (unless about the path) and group by run."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import polars as pl
import pytest
from safetensors.torch import save_file

from invariance.config import parse_config
from invariance.engine.execute import execute_in_process
from invariance.engine.reduce import reduce_plan
from invariance.engine.steps import Workspace
from tests.helpers import open_in_process, tiny_config, tiny_state, write_eval_parquet
from tests.s3_counting import CountingProxy
from tests.servers import s3_server  # noqa: F401 - a fixture
from tests.test_readme import doc_section, python_blocks
from tests.test_studies import EPOCHS, RUNS as STUDY_RUNS, write_run

# two runs of a sweep with their finetuning metrics (the Fig. 6 recipe reads them), one named with '=' and ','
RUNS = {STUDY_RUNS[2]: 0.03, STUDY_RUNS[1]: 0.08}
# the demo's kind of output: one finetuning run (no {run}), its metrics beside the checkpoints
DEMO_RUN = STUDY_RUNS[0]
LAYERS = [0, 1, 2]
DEMO_OUT = 'out = "invariance-demo/results"'


def recipe_page() -> tuple[Path, str]:
    return doc_section("Polars recipes")


def recipes() -> list[tuple[str, str, str]]:
    """(title, prose, code) of each recipe: a `## ` section of docs/recipes.md holding one python block."""
    page, text = recipe_page()
    found = []
    for section in re.split(r"^## ", text, flags=re.M)[1:]:
        title, _, body = section.partition("\n")
        blocks = python_blocks(body)
        if blocks and title != "Setup":
            assert len(blocks) == 1, f"{page.name}: recipe {title!r} holds {len(blocks)} python blocks"
            found.append((title, body.split("```python", 1)[0], blocks[0]))
    return found


def setup_block(out: Path) -> str:
    _, text = doc_section("Setup")
    setup = python_blocks(text)[0]
    assert DEMO_OUT in setup, "the setup names the demo's output"
    return setup.replace(DEMO_OUT, f'out = "{out}"')


def run_recipes(out: Path, capsys) -> dict[str, tuple[dict, str]]:
    """Each recipe in its own scope after the setup: {title: (its variables, what it printed)}."""
    page, _ = recipe_page()
    base: dict = {}
    exec(compile(setup_block(out), str(page), "exec"), base)  # noqa: S102 - the guide's own code
    capsys.readouterr()
    results = {}
    for title, _, code in recipes():
        scope = dict(base)
        with pl.Config(tbl_cols=-1, tbl_width_chars=2000, fmt_str_lengths=200):
            exec(compile(code, f"{page} ({title})", "exec"), scope)  # noqa: S102
        printed = capsys.readouterr().out
        assert "shape:" in printed, f"recipe {title!r} printed no frame"
        results[title] = (scope, printed)
    return results


def _reduce(config) -> None:
    store, plan, spec = open_in_process(config)
    summary = execute_in_process(plan, spec, Workspace("cpu"))
    assert summary.failures == []
    plan.refresh(store)
    reduce_plan(plan, store, make_plots=False)


def study_config(tmp: Path, output: Path) -> Any:
    """The study's run config, its output at ``output`` (a copy of it keeps its keys)."""
    return parse_config(tiny_config(tmp, str(output), checkpoints=str(tmp / "sweep" / "{run}" / "epoch={epoch}.safetensors"),
                                    inversion={"iterations": 8, "step_size": 0.5},
                                    interpolation={"alphas": [0.0, 0.5, 1.0], "epochs": "last"}))  # fmt: skip


@pytest.fixture(scope="module")
def study_with_paths(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("recipes")
    (tmp / "ckpt").mkdir()
    save_file(tiny_state(0), str(tmp / "ckpt" / "pretrained.safetensors"))
    write_eval_parquet(tmp / "data")
    for run, scale in RUNS.items():
        write_run(tmp / "sweep", run, scale)
    _reduce(study_config(tmp, tmp / "out"))
    return tmp / "out"


@pytest.fixture(scope="module")
def demo_like(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's shape: one run without {run}, finetuning metrics beside it, no interpolation."""
    tmp = tmp_path_factory.mktemp("recipes_demo")
    (tmp / "ckpt").mkdir()
    save_file(tiny_state(0), str(tmp / "ckpt" / "pretrained.safetensors"))
    write_eval_parquet(tmp / "data")
    write_run(tmp / "checkpoints", DEMO_RUN, 0.05)
    _reduce(parse_config(tiny_config(tmp, str(tmp / "out"), checkpoints=str(tmp / "checkpoints" / DEMO_RUN / "epoch={epoch}.safetensors"),
                                     inversion={"iterations": 8, "step_size": 0.5})))  # fmt: skip
    return tmp / "out"


def test_every_recipe_says_what_it_does_with_run_and_alpha() -> None:
    found = recipes()
    assert len(found) >= 7
    for title, prose, _ in found:
        said = prose.split("**Filters on:**", 1)
        assert len(said) == 2, f"recipe {title!r}: no '**Filters on:**' line"
        assert "`run`" in said[1] and "alpha" in said[1], f"recipe {title!r}: says nothing of run or alpha"
        assert "**Opens:**" in prose, f"recipe {title!r}: does not say which files it opens"


def test_every_recipe_runs_on_a_study_with_interpolation(study_with_paths: Path, torch_single_thread, capsys) -> None:
    results = run_recipes(study_with_paths, capsys)
    scope = {k: v for variables, _ in results.values() for k, v in variables.items()}
    assert all(run in "".join(printed for _, printed in results.values()) for run in RUNS)

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
    # every recipe that keeps one epoch per run keeps each run's own last one
    last = scope["last"]
    assert sorted(last["run"].unique()) == sorted(RUNS) and set(last["epoch"].unique()) == {EPOCHS[-1]}


def check_single_run(results: dict[str, tuple[dict, str]], epochs: list[int], n_layers: int) -> None:
    scope = {k: v for variables, _ in results.values() for k, v in variables.items()}
    kept, spread, first_alpha = scope["kept"], scope["spread"], scope["first_alpha"]
    assert kept["run"].unique().to_list() == [""] and kept.height == len(epochs) * n_layers
    assert spread.height == len(epochs)
    assert first_alpha.height == 0  # no weight path: no row, and no error
    printed = "".join(p for _, p in results.values())
    assert "forgetting_above_noise" in printed and "stir_ft_given_pt" in printed and "forgetting_std_across_layers" in printed


def test_every_recipe_runs_on_the_demos_kind_of_output(demo_like: Path, torch_single_thread, capsys) -> None:
    check_single_run(run_recipes(demo_like, capsys), EPOCHS, len(LAYERS))


@pytest.mark.slow
def test_every_recipe_runs_on_the_demo_itself(tmp_path: Path, capsys) -> None:
    invariance = str(Path(sys.executable).with_name("invariance"))
    demo = subprocess.run([invariance, "demo", "--out", str(tmp_path / "demo"), "--epochs", "2"], capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    assert demo.returncode == 0, demo.stderr[-3000:]
    curves = pl.read_parquet(tmp_path / "demo" / "results" / "reduced" / "curves.parquet")
    check_single_run(run_recipes(tmp_path / "demo" / "results", capsys), [1, 2], curves["layer"].n_unique())


# --- what the raw-shard recipes open, and compaction -------------------------------------------

RECIPE_ONE = "Raw STIR rows of one checkpoint"
RECIPE_ALL = "Raw STIR rows, lazily"


class _PolarsWithOptions:
    """``polars`` whose scan_parquet / read_parquet get a bucket's ``storage_options``, as the
    recipes' prose tells a user of a bucket to pass them."""

    def __init__(self, options: dict) -> None:
        self._options = options

    def __getattr__(self, name: str) -> Any:
        return getattr(pl, name)

    def scan_parquet(self, *args: Any, **kwargs: Any) -> pl.LazyFrame:
        return pl.scan_parquet(*args, storage_options=self._options, **kwargs)

    def read_parquet(self, *args: Any, **kwargs: Any) -> pl.DataFrame:
        return pl.read_parquet(*args, storage_options=self._options, **kwargs)


def run_recipe_on_bucket(title: str, out: str, options: dict, capsys) -> dict:
    code = dict((t, c) for t, _, c in recipes())[title]
    scope: dict = {"pl": _PolarsWithOptions(options), "out": out}
    exec(compile(code, f"recipes.md ({title})", "exec"), scope)  # noqa: S102 - the guide's own code
    capsys.readouterr()
    return scope


def opened(proxy: CountingProxy, bucket: str, prefix: str) -> set[str]:
    """The keys under ``prefix`` that the proxy saw read (GET), decoded."""
    start = f"/{bucket}/{prefix}/"
    return {unquote(path)[len(start):] for kind, path in proxy.keys if kind == "GET" and unquote(path).startswith(start)}


def compacted_copy(study: Path, target: Path) -> Path:
    """A copy of the study's output, compacted (every complete folder one file)."""
    from invariance.engine.compact import compact

    shutil.copytree(study, target)
    store, plan, _ = open_in_process(study_config(study.parent, target))
    summary = compact(plan, store)
    assert summary.groups > 0 and summary.shards > summary.groups
    return target


@pytest.fixture(scope="module")
def compacted_study(study_with_paths: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("invariance.engine.compact")
    return compacted_copy(study_with_paths, tmp_path_factory.mktemp("recipes_compacted") / "out")


def test_a_filter_on_partition_columns_prunes_files_locally(study_with_paths: Path) -> None:
    """Locally, a filter on the hive columns (folders) keeps Polars to their files: the scan's plan
    lists only the files of that run and epoch."""
    stir = sorted((study_with_paths / "stir").rglob("*.parquet"))
    run = sorted(RUNS)[0]
    query = (pl.scan_parquet(f"{study_with_paths}/stir/**/*.parquet", hive_partitioning=True)
               .filter((pl.col("run") == run) & (pl.col("epoch") == EPOCHS[0])))  # fmt: skip
    plan = query.explain()
    # "Parquet SCAN [<first file>, ... <n> other sources]": the files left after pruning
    listed = re.search(r"Parquet SCAN \[([^,\]]+)(?:, \.\.\. (\d+) other sources)?\]", plan)
    assert listed, plan
    in_folder = [p for p in stir if p.parent.name == f"epoch={EPOCHS[0]}" and unquote(p.parent.parent.name) == f"run={run}"]
    assert listed.group(1) in map(str, in_folder), plan
    assert 1 + int(listed.group(2) or 0) == len(in_folder) < len(stir), plan


def test_the_one_checkpoint_recipe_opens_only_its_folder(study_with_paths: Path, s3_server, tmp_path: Path, capsys) -> None:  # noqa: F811
    """On a bucket (moto behind the counting proxy), the one-checkpoint recipe reads the reduced
    curves and the files of its one folder, nothing else; after compaction one file of that folder."""
    import fsspec

    bucket = "recipes"
    s3_server.make_bucket(bucket)
    proxy = CountingProxy(s3_server)
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **s3_server.fsspec_options())
    outputs = {"raw": study_with_paths}
    if _compaction_landed():
        outputs["compacted"] = compacted_copy(study_with_paths, tmp_path / "compacted")
    try:
        results = {}
        for name, folder in outputs.items():
            files = [p for p in folder.rglob("*") if p.is_file()]
            fs.put([str(p) for p in files], [f"{bucket}/{name}/{p.relative_to(folder).as_posix()}" for p in files])
            options = proxy.server().polars_options()
            proxy.reset()
            scope = run_recipe_on_bucket(RECIPE_ONE, f"s3://{bucket}/{name}", options, capsys)
            read = opened(proxy, bucket, name)
            settings, run, epoch = scope["settings"], scope["run"], scope["epoch"]
            folder_key = f"stir/settings={settings}/run={run}/epoch={epoch}/"
            in_folder = {p.relative_to(folder).as_posix() for p in files
                         if unquote(p.relative_to(folder).as_posix()).startswith(folder_key)}  # fmt: skip
            assert in_folder and {unquote(k) for k in in_folder} | {"reduced/curves.parquet"} == read, (name, read)
            assert proxy.counts["LIST"] == 1, proxy.counts  # one folder's listing
            results[name] = (scope["one"], len(in_folder))
        one = results["raw"][0]
        assert one.height == 2 * len(LAYERS) and set(one["seeds"]) == {2}
        if "compacted" in results:
            assert results["compacted"][1] == 1 < results["raw"][1]
            compare = results["compacted"][0].join(one, on=["target_model", "target_layer"], suffix="_raw")
            assert compare.height == one.height
            assert (compare["stir"] - compare["stir_raw"]).abs().max() < 1e-12
    finally:
        proxy.close()


def _compaction_landed() -> bool:
    try:
        import invariance.engine.compact  # noqa: F401
    except ImportError:
        return False
    return True


def test_every_recipe_gives_the_same_results_after_compaction(study_with_paths: Path, compacted_study: Path,
                                                               torch_single_thread, capsys) -> None:  # fmt: skip
    """Compaction changes the files, not the rows: every recipe prints the same on the raw output
    and on its compacted copy (the raw-shard recipes' frames equal to 1e-12)."""
    raw_files = list((study_with_paths / "stir").rglob("*.parquet"))
    compacted_files = list((compacted_study / "stir").rglob("*.parquet"))
    assert len(compacted_files) < len(raw_files)
    assert all(p.name.startswith("compacted-") for p in compacted_files)
    raw = run_recipes(study_with_paths, capsys)
    compacted = run_recipes(compacted_study, capsys)
    for title, (scope, printed) in raw.items():
        if title in (RECIPE_ALL, RECIPE_ONE):
            name = "kept" if title == RECIPE_ALL else "one"
            left, right = scope[name], compacted[title][0][name]
            assert left.columns == right.columns and left.height == right.height, title
            keys = [c for c, t in left.schema.items() if not t.is_float()]
            joined = left.join(right, on=keys, suffix="_compacted", nulls_equal=True)
            assert joined.height == left.height, title
            for column in (c for c, t in left.schema.items() if t.is_float()):
                assert (joined[column] - joined[f"{column}_compacted"]).abs().max() < 1e-12, (title, column)
        else:
            assert printed == compacted[title][1], title
