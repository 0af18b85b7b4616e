"""Messages a person reads: counts in the singular and the plural."""

from __future__ import annotations

import io
from pathlib import Path

from invariance.io.layout import InversionUnit
from invariance.config import parse_config
from invariance.engine.plan import make_plan
from invariance.io.storage import Store
from jobs.run import describe_plan, plural
from tests.helpers import tiny_config, write_checkpoints, write_eval_parquet


def test_plural() -> None:
    assert [plural(n, "epoch") for n in (0, 1, 2)] == ["0 epochs", "1 epoch", "2 epochs"]


def test_a_plan_of_one_checkpoint_says_so_in_the_singular(tmp_path: Path) -> None:
    write_checkpoints(tmp_path / "ckpt", epochs=[1])
    write_eval_parquet(tmp_path / "data")
    config = parse_config(tiny_config(tmp_path, str(tmp_path / "out")))
    out = io.StringIO()
    describe_plan(make_plan(config, Store(config.output)), out=out)
    text = out.getvalue()
    assert ": 1 checkpoint (epoch 1)" in text and "1 checkpoints" not in text
    assert "units (a unit: one pretrained inversion, or one shard of a measure)" in text


def test_every_command_help_gives_its_exit_codes_and_finetune_names_a_reference_that_exists(capsys) -> None:
    import re

    import pytest

    from jobs.cli import build_parser, finetune_reference

    for command in ("demo", "run", "plan", "reduce", "report", "finetune"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
        text = capsys.readouterr().out
        assert "exit codes:" in text and "  2    bad input" in text and "130" in text, command
    assert Path(finetune_reference()).is_file()
    with pytest.raises(SystemExit):
        build_parser().parse_args(["finetune", "--help"])
    assert re.sub(r"\s+", " ", capsys.readouterr().out).count(finetune_reference()) == 1


def test_an_unreachable_ray_address_is_a_named_error_not_a_traceback(monkeypatch) -> None:
    import ray

    from invariance.errors import StorageError
    from jobs.run import connect_ray

    def refuse(**kwargs):
        raise ConnectionError("Could not find any running Ray instance")

    monkeypatch.setenv("RAY_ADDRESS", "ray://user:TOKEN@127.0.0.1:1")
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)
    import pytest

    with pytest.raises(StorageError, match=r"RAY_ADDRESS=ray://\*\*\*@127\.0\.0\.1:1: cannot join") as caught:
        connect_ray()
    assert "TOKEN" not in str(caught.value)


def test_alphas_that_would_share_a_key_are_refused(tmp_path: Path) -> None:
    import pytest

    from invariance.errors import ConfigError

    raw = tiny_config(tmp_path, str(tmp_path / "out"), interpolation={"alphas": [0.1, 0.1000001]})
    with pytest.raises(ConfigError, match="agree to 6 significant digits"):
        parse_config(raw)


def test_the_plan_says_when_a_workers_x_cache_cannot_hold_every_pretrained_x(tmp_path: Path, capsys) -> None:
    """resources.inversion_cache_gb bounds the pretrained X' a worker keeps: smaller than the
    plan's X', every checkpoint reads the rest again, and `plan` says what to set."""
    import json

    from jobs.run import plan_only

    write_checkpoints(tmp_path / "ckpt", epochs=[1, 2])
    write_eval_parquet(tmp_path / "data")
    raw = tiny_config(tmp_path, str(tmp_path / "out"))
    (tmp_path / "run.json").write_text(json.dumps(raw))
    plan = plan_only(str(tmp_path / "run.json"), with_cost=False)
    assert "X' cache" not in capsys.readouterr().out  # a few KB: held
    (tmp_path / "small.json").write_text(json.dumps({**raw, "resources": {"inversion_cache_gb": 1e-6}}))
    plan_only(str(tmp_path / "small.json"), with_cost=False)
    out = capsys.readouterr().out
    n_inversions = len(plan.of_type(InversionUnit))
    assert f"X' cache: the {n_inversions} pretrained X' take" in out and "resources.inversion_cache_gb" in out


def _plan_config(tmp_path: Path, **overrides) -> Path:
    import json

    write_checkpoints(tmp_path / "ckpt", epochs=[1, 2])
    write_eval_parquet(tmp_path / "data")
    path = tmp_path / "run.json"
    path.write_text(json.dumps(tiny_config(tmp_path, str(tmp_path / "out"), **overrides)))
    return path


def test_the_plan_estimates_the_wall_time_on_cpu_naming_the_cpu_and_saying_it_is_an_estimate(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    """CPU work (resources.num_gpus 0) is priced at this CPU's inversion throughput for the model,
    read from the cache (timed once per CPU, torch, threads and model), not as GPU-hours."""
    import json
    import os

    import pytest

    import invariance.core.cost as cost
    from invariance.config import load_config
    from jobs.run import cpu_workload, estimate_cost, plan_only

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(cost, "cpu_name", lambda: "Test CPU 9000")
    monkeypatch.setattr(os, "cpu_count", lambda: 4)

    def no_timing(*args, **kwargs):
        raise AssertionError("timed although the cache holds this CPU's figure")

    monkeypatch.setattr(cost, "time_inversion_steps", no_timing)
    path = _plan_config(tmp_path)
    config = load_config(str(path))
    key = cost.cpu_throughput_key(cpu_workload(config, 2, 16), threads=1)
    cache = tmp_path / "cache" / "invariance" / "cpu_throughput.json"
    cache.parent.mkdir(parents=True)
    cache.write_text(json.dumps({"entries": {key: {"gflops": 0.5, "measured": "2026-12-01"}}}))
    plan_only(str(path))
    out = capsys.readouterr().out
    (estimate,) = [line for line in out.splitlines() if line.startswith("  time, an estimate:")]
    tflop, n_inversions = estimate_cost(config, make_plan(config, Store(config.output)))
    # 3 layers x 2 seeds pretrained + 2 checkpoints x 3 layers x 2 seeds ft-reference: 4 at once on 4 CPUs
    assert n_inversions == 6 + 12 and f"  cost: 18 inversions, {tflop * 1e3:,.2f} GFLOP (the inversions only" in out
    assert "of inversions on CPU on this machine (4 tasks at once on 4 CPUs, resources.num_cpus 1;" in estimate
    assert "at 0.5 GFLOP/s, measured on Test CPU 9000 (1 thread per task, torch " in estimate
    assert f"2026-12-01; cached in {cache})" in estimate
    assert estimate.startswith(f"  time, an estimate: ~{cost.duration(tflop * 1e3 / 0.5 / 4)} of inversions")
    assert "GPU-hours" not in estimate and "on GPUs (resources.num_gpus > 0): ~" in out
    # GPU workers: the GPU-hours, naming the GPU assumed
    capsys.readouterr()
    plan_only(str(_plan_config(tmp_path / "gpu", resources={"num_cpus": 1, "num_gpus": 1})))
    out = capsys.readouterr().out
    (estimate,) = [line for line in out.splitlines() if line.startswith("  time, an estimate:")]
    assert "GPU-hours at 200 TFLOP/s, a guess" in estimate
    assert estimate.endswith("the GPU assumed: an A100/H100-class GPU in bf16, not measured)")
    assert "on CPU" not in out
    with pytest.raises(AssertionError):  # a CPU, torch or thread count without a figure is timed
        cost.cpu_throughput(None, 0, "another model", threads=1)


def test_a_cpu_throughput_is_timed_once_then_read_from_the_cache(tmp_path: Path, monkeypatch) -> None:
    import json

    import invariance.core.cost as cost

    timings = []
    monkeypatch.setattr(cost, "time_inversion_steps", lambda *args, **kwargs: timings.append(args) or 12.5)
    cache = tmp_path / "nested" / "cpu_throughput.json"
    first = cost.cpu_throughput("model", 3, "vit (abc) at 32 px", threads=2, cache=cache)
    second = cost.cpu_throughput("model", 3, "vit (abc) at 32 px", threads=2, cache=cache)
    assert len(timings) == 1 and first.gflops == second.gflops == 12.5
    assert not first.cached and second.cached and "measured now" in first.describe()
    assert second.describe().startswith(f"measured on {cost.cpu_name()} (2 threads per task, torch ")
    (key,) = json.loads(cache.read_text())["entries"]
    assert key == f"{cost.cpu_name()} | torch {__import__('torch').__version__} | 2 threads | vit (abc) at 32 px"
    cost.cpu_throughput("model", 3, "vit (abc) at 32 px", threads=1, cache=cache)  # another thread count
    assert len(timings) == 2
    cache.write_text("not json")  # a damaged cache is measured again and rewritten
    assert cost.cpu_throughput("model", 3, "vit (abc) at 32 px", threads=2, cache=cache).gflops == 12.5
    assert len(timings) == 3 and len(json.loads(cache.read_text())["entries"]) == 1
