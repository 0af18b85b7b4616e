"""The README's library example runs as printed (with fewer inversion steps) and says what it shows."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_forgetting_example_runs_and_shows_zero_then_growth() -> None:
    text = README.read_text()
    section = text.split("## A forgetting curve in a few lines of Python", 1)[1]
    code = section.split("```python", 1)[1].split("```", 1)[0]
    code = code.replace("InversionConfig(iterations=100)", "InversionConfig(iterations=5)")
    code = code.replace("print(metrics.curves", "result = (metrics.curves")
    namespace: dict = {}
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - our own README
    curves = namespace["result"].sort("layer")
    assert curves["forgetting_mean"][:2].to_list() == [0.0, 0.0]
    assert curves["learning_mean"][:2].to_list() == [0.0, 0.0]
    assert curves["forgetting_mean"][4] > curves["forgetting_mean"][2] > 0
    assert curves["learning_mean"][4] > 0.1


def test_readme_names_only_real_commands_and_config_keys() -> None:
    from invariance.config import (
        DataConfig, InterpolationConfig, InversionConfig, KnnProbeConfig, ModelConfig, ResourcesConfig, RunConfig,
    )  # fmt: skip
    from jobs.cli import build_parser

    text = README.read_text()
    subcommands = set(build_parser()._subparsers._group_actions[0].choices)
    for command in re.findall(r"`invariance (\w+)", text):
        assert command in subcommands, command
    sections = {"model": ModelConfig, "data": DataConfig, "inversion": InversionConfig, "resources": ResourcesConfig,
                "interpolation": InterpolationConfig, "knn": KnnProbeConfig}  # fmt: skip
    reference = text.split("## Config reference", 1)[1].split("## Output layout", 1)[0]
    documented = set(re.findall(r"^\| `([a-z0-9_.]+)`", reference, flags=re.M))
    for row in re.findall(r"^\| `([a-z0-9_.]+)`(?:, `([a-z0-9_.]+)`)?", reference, flags=re.M):
        documented.update(k for k in row if k)
    expected = {k for k in RunConfig.model_fields if k not in sections}
    expected |= {f"{name}.{k}" for name, model in sections.items() for k in model.model_fields}
    assert expected == documented
