"""The README and the user guide under docs/ stay true: every relative link lands on a file (and a
heading), the library example runs as printed (with fewer inversion steps), the README's own-run
example plans what its comment says, and the config reference names exactly the config's keys.

Other tests read the guide's text through ``doc_section`` / ``python_blocks``, which find a section
wherever it lives (README.md or a page under docs/)."""

from __future__ import annotations

import contextlib
import io
import re
import unicodedata
from pathlib import Path

import pytest
import yaml
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
# README.md stays a front page: what it is, a picture, two commands, one example, links
README_MAX_LINES = 80


def doc_pages() -> list[Path]:
    """README.md and every page of the guide."""
    return [README, *sorted(DOCS.glob("*.md"))]


def _outside_fences(text: str) -> list[tuple[int, str]]:
    """(line number, line) of the lines outside ``` fences."""
    lines, fence = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fence = not fence
        elif not fence:
            lines.append((number, line))
    return lines


def headings(text: str) -> list[tuple[int, str]]:
    """(level, title) of every Markdown heading outside code fences."""
    found = []
    for _, line in _outside_fences(text):
        match = re.match(r"^(#{1,6}) (.+?)\s*#*\s*$", line)
        if match:
            found.append((len(match.group(1)), match.group(2)))
    return found


def doc_section(title: str) -> tuple[Path, str]:
    """The page holding the heading ``title`` and the section's text, up to the next heading of the
    same or a higher level. Exactly one page may hold it."""
    found = []
    for page in doc_pages():
        lines = page.read_text().splitlines()
        fence, start, level = False, None, 0
        for index, line in enumerate(lines):
            if line.lstrip().startswith("```"):
                fence = not fence
                continue
            match = None if fence else re.match(r"^(#{1,6}) (.+?)\s*$", line)
            if match and start is None and match.group(2) == title:
                start, level = index + 1, len(match.group(1))
            elif match and start is not None and len(match.group(1)) <= level:
                found.append((page, "\n".join(lines[start:index])))
                start = None
        if start is not None:
            found.append((page, "\n".join(lines[start:])))
    assert len(found) == 1, f"heading {title!r} should stand on exactly one page of README.md and docs/, found {[str(p) for p, _ in found]}"
    return found[0]


def python_blocks(text: str) -> list[str]:
    """The ```python blocks of a text, in order."""
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def slug(title: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|\[([^\]]*)\]\([^)]*\)", r"\1", title).lower()
    text = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, title in headings(page.read_text()):
        base = slug(title)
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.add(base if count == 0 else f"{base}-{count}")
    return out


def relative_links(page: Path) -> list[tuple[int, str]]:
    """(line, target) of every Markdown link or image of a page that is not a URL."""
    links = []
    for number, line in _outside_fences(page.read_text()):
        line = re.sub(r"`[^`]*`", "", line)  # code spans are not links
        for target in re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", line):
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target):
                links.append((number, target))
    return links


def test_every_relative_link_of_the_readme_and_the_guide_lands_on_a_file_and_heading() -> None:
    assert (DOCS / "README.md").is_file(), "docs/README.md is the guide's index"
    broken = []
    checked = 0
    for page in doc_pages():
        for line, target in relative_links(page):
            path_part, _, anchor = target.partition("#")
            destination = (page.parent / path_part).resolve() if path_part else page
            where = f"{page.relative_to(ROOT)}:{line}: {target}"
            checked += 1
            if not destination.exists():
                if destination == DOCS / "measures.md":
                    continue  # written by the measures work, in flight beside this page set
                broken.append(f"{where}: no such file")
            elif anchor and destination.suffix == ".md" and anchor not in anchors(destination):
                broken.append(f"{where}: no heading with anchor #{anchor} in {destination.relative_to(ROOT)}")
    assert checked > 50
    assert not broken, "\n".join(broken)


def test_every_file_of_the_project_the_guide_names_exists() -> None:
    """`tests/test_x.py`, `bench/x.py`, `cluster/...` in code spans: the tests a page says cover it, the
    scripts it says to run."""
    missing = []
    for page in doc_pages():
        for name in re.findall(r"`((?:tests|bench|cluster|docker|invariance|jobs)/[\w./-]+\.(?:py|yaml|md|json))`", page.read_text()):
            if not (ROOT / name).is_file():
                missing.append(f"{page.relative_to(ROOT)}: {name}")
    assert not missing, "\n".join(missing)


def test_the_slugs_are_githubs() -> None:
    assert slug("Adapters and another head: `finetuned_model`") == "adapters-and-another-head-finetuned_model"
    assert slug("2a. A Ray cluster on VMs: `ray up`") == "2a-a-ray-cluster-on-vms-ray-up"
    assert slug("Is it real? Forgetting with its 95% interval") == "is-it-real-forgetting-with-its-95-interval"


def test_the_readme_starts_short_and_links_the_guide() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= README_MAX_LINES, (
        f"README.md has {len(text.splitlines())} lines: keep it a front page (at most {README_MAX_LINES}) "
        "and put the rest in a page under docs/, linked from docs/README.md"
    )
    assert "docs/images/layer_curves.png" in text
    assert "make demo" in text and "make test" in text
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, flags=re.M) and re.search(r"^test:", makefile, flags=re.M)
    linked = {target.partition("#")[0] for _, target in relative_links(README)}
    pages = {f"docs/{page.name}" for page in DOCS.glob("*.md")} | {"docs/measures.md"}
    assert pages <= linked, f"README.md should link every page of the guide; missing {sorted(pages - linked)}"
    index = {target.partition("#")[0] for _, target in relative_links(DOCS / "README.md")}
    assert {page.name for page in DOCS.glob("*.md") if page.name != "README.md"} | {"measures.md"} <= index


def _demo_shaped_folder(root: Path, model: dict, epochs: int, n_images: int) -> None:
    """What `make demo` leaves under invariance-demo/: the weights (random here) and the eval images."""
    from invariance.config import ModelConfig
    from invariance.core.models import build_network
    from invariance.io.synthetic import make_shapes, to_parquet_bytes
    from tests.helpers import perturbed

    checkpoints = root / "invariance-demo" / "checkpoints"
    (checkpoints / "finetune").mkdir(parents=True)
    state = build_network(ModelConfig(**model)).state_dict()
    save_file(state, str(checkpoints / "pretrained.safetensors"))
    for epoch in range(1, epochs + 1):
        save_file(perturbed(state, 0.01 * epoch, seed=epoch), str(checkpoints / "finetune" / f"epoch={epoch:02d}.safetensors"))
    (root / "invariance-demo" / "data").mkdir()
    images = make_shapes(n_images, size=model["kwargs"]["img_size"], seed=5)
    (root / "invariance-demo" / "data" / "test-00000-of-00001.parquet").write_bytes(to_parquet_bytes(images, "texture"))


def test_the_readmes_own_run_plans_what_its_comment_says(tmp_path: Path, monkeypatch, capsys) -> None:
    from jobs.cli import main
    from jobs.demo import DEMO_MODEL, demo_config

    text = README.read_text()
    config_text = re.search(r"```yaml\n(# my-analysis/run\.yaml\n.*?)```", text, flags=re.S).group(1)
    commands = re.search(r"```bash\n(invariance plan my-analysis/run\.yaml.*?)```", text, flags=re.S).group(1)
    raw = yaml.safe_load(config_text)
    assert len(config_text.splitlines()) + len(commands.splitlines()) <= 20
    # it reads the demo's files with the demo's model (its checkpoints load into it)
    assert raw["model"] == DEMO_MODEL
    demo = demo_config(Path("invariance-demo"))
    assert raw["data"]["n_samples"] == demo["data"]["n_samples"] and raw["seeds"] == demo["seeds"]
    claim = re.search(r"# (\d+) checkpoints, (\d+) units: (\d+) pretrained inversions, (\d+) STIR, (\d+) CKA and (\d+) "
                      r"subspace shards", commands)  # fmt: skip
    n_checkpoints, n_units, n_inversions, n_stir, n_cka, n_subspace = map(int, claim.groups())

    _demo_shaped_folder(tmp_path, raw["model"], epochs=n_checkpoints, n_images=raw["data"]["n_samples"])
    (tmp_path / "my-analysis").mkdir()
    (tmp_path / "my-analysis" / "run.yaml").write_text(config_text)
    monkeypatch.chdir(tmp_path)
    plan_line = commands.splitlines()[0].split("#")[0].split()
    assert plan_line[:2] == ["invariance", "plan"]
    assert main([*plan_line[1:], "--no-cost"]) == 0
    printed = capsys.readouterr().out
    assert f"{n_checkpoints} checkpoints" in printed
    assert f"pretrained inversions: 0/{n_inversions} cached" in printed
    assert f"STIR shards: 0/{n_stir} done" in printed and f"CKA shards:  0/{n_cka} done" in printed
    assert f"subspace shards: 0/{n_subspace} done" in printed
    assert f"to compute:  {n_units} units" in printed
    assert n_units == n_inversions + n_stir + n_cka + n_subspace
    # `output: results` lands beside the config, where the commands open the report
    assert "my-analysis/results/reports/index.html" in commands


def test_readme_forgetting_example_runs_and_shows_zero_then_growth() -> None:
    page, section = doc_section("A forgetting curve in a few lines of Python")
    code = python_blocks(section)[0]
    code = code.replace("InversionConfig(iterations=100)", "InversionConfig(iterations=5)")
    code = code.replace("print(metrics.curves", "result = (metrics.curves")
    namespace: dict = {}
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(code, str(page), "exec"), namespace)  # noqa: S102 - our own guide
    curves = namespace["result"].sort("layer")
    assert curves["forgetting_mean"][:2].to_list() == [0.0, 0.0]
    assert curves["learning_mean"][:2].to_list() == [0.0, 0.0]
    assert curves["forgetting_mean"][4] > curves["forgetting_mean"][2] > 0
    assert curves["learning_mean"][4] > 0.1


def test_readme_names_only_real_commands_and_config_keys() -> None:
    from invariance.config import (
        CompactionConfig, DataConfig, InterpolationConfig, InversionConfig, KnnProbeConfig, ModelConfig, ResourcesConfig,
        RunConfig,
    )  # fmt: skip
    from jobs.cli import build_parser

    subcommands = set(build_parser()._subparsers._group_actions[0].choices)
    for page in doc_pages():
        for command in re.findall(r"`invariance (\w+)", page.read_text()):
            assert command in subcommands, f"{page.relative_to(ROOT)}: invariance {command}"
    sections = {"model": ModelConfig, "data": DataConfig, "inversion": InversionConfig, "resources": ResourcesConfig,
                "interpolation": InterpolationConfig, "knn": KnnProbeConfig, "compaction": CompactionConfig}  # fmt: skip
    _, reference = doc_section("Config reference")
    documented = set(re.findall(r"^\| `([a-z0-9_.]+)`", reference, flags=re.M))
    for row in re.findall(r"^\| `([a-z0-9_.]+)`(?:, `([a-z0-9_.]+)`)?", reference, flags=re.M):
        documented.update(k for k in row if k)
    expected = {k for k in RunConfig.model_fields if k not in sections}
    expected |= {f"{name}.{k}" for name, model in sections.items() for k in model.model_fields}
    # `measures` (the measures as plug-ins) is documented with the work that adds it to RunConfig
    assert expected == documented - ({"measures"} - set(RunConfig.model_fields))


def test_the_map_of_the_library_has_the_floors_the_imports_keep() -> None:
    from tests.test_architecture import FLOORS

    _, section = doc_section("Map of the library")
    rows = re.findall(r"^\| (\d+) \| `([a-z_]+)(?:/|\.py)` \|", section, flags=re.M)
    floors = {package: int(floor) for floor, package in rows}
    library = ROOT / "invariance"
    for package in floors:
        if package != "measures" or (library / "measures").is_dir():
            assert (library / package).is_dir() or (library / f"{package}.py").is_file(), package
    assert set(FLOORS) <= set(floors), f"the map lacks {sorted(set(FLOORS) - set(floors))}"
    for a in FLOORS:
        for b in FLOORS:
            assert (FLOORS[a] < FLOORS[b]) == (floors[a] < floors[b]), f"the map orders {a} and {b} otherwise than the imports"
    assert "`jobs/` is the only Ray layer" in section


@pytest.mark.parametrize("title", ["Polars recipes", "Config reference", "Output layout and schema", "Faults and bad input"])
def test_each_section_stands_on_one_page(title: str) -> None:
    page, text = doc_section(title)
    assert page.parent == DOCS and text.strip()
