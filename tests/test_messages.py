"""Messages a person reads: counts in the singular and the plural."""

from __future__ import annotations

import io
from pathlib import Path

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
    assert ": 1 checkpoint (epochs 1..1)" in text and "1 checkpoints" not in text
    assert "units (a unit: one pretrained inversion, or one STIR or CKA shard)" in text


def test_every_command_help_gives_its_exit_codes_and_finetune_names_a_reference_that_exists(capsys) -> None:
    import re

    import pytest

    from jobs.cli import build_parser, finetune_reference

    for command in ("run", "plan", "reduce", "report", "finetune"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
        text = capsys.readouterr().out
        assert "exit codes:" in text and "  2    bad input" in text and "130" in text, command
    assert Path(finetune_reference()).is_file()
    with pytest.raises(SystemExit):
        build_parser().parse_args(["finetune", "--help"])
    assert re.sub(r"\s+", " ", capsys.readouterr().out).count(finetune_reference()) == 1
