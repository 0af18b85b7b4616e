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
