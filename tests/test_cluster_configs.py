"""Static checks of cluster/ and docker/: the files parse, carry the fields their kind needs,
call only real CLI subcommands, agree with each other, and keep credentials out.

Nothing here needs Docker, Kubernetes or a Ray cluster: the files are read as YAML and text.
"""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pip vendors the same parser
    from pip._vendor import tomli as tomllib

from invariance.config import DataConfig, InversionConfig, ModelConfig, ResourcesConfig, RunConfig, parse_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
DOCKER = ROOT / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
RUN_EXAMPLE = CLUSTER / "run.example.yaml"
RUNTIME_ENV = CLUSTER / "runtime_env.yaml"
KUBERAY = CLUSTER / "kuberay"

# The CLI contract (DESIGN.md); cross-checked against jobs.cli's parser when it imports.
CONTRACT_SUBCOMMANDS = {"demo", "run", "plan", "reduce"}
CREDENTIAL_NAMES = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}
# `invariance <word>` as a command: not part of a path, an image name or another word.
CLI_CALL = re.compile(r"(?<![\w/.@:-])invariance[ \t]+([A-Za-z][\w-]*)")


# ---------------------------------------------------------------- helpers


def cluster_yaml_files() -> list[Path]:
    return sorted(p for p in CLUSTER.rglob("*") if p.suffix in {".yaml", ".yml"})


def text_files(*folders: Path) -> list[Path]:
    return sorted(p for folder in folders for p in folder.rglob("*") if p.is_file() and p.suffix != ".pyc")


def load_documents(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def classify(doc: Any) -> str | None:
    """Kubernetes kind, or one of the Ray / invariance file kinds; None if unrecognised."""
    if not isinstance(doc, dict):
        return None
    if "apiVersion" in doc and "kind" in doc:
        return str(doc["kind"])
    if "cluster_name" in doc:
        return "ray-cluster-launcher"
    if {"output", "model", "checkpoints"} <= doc.keys():
        return "run-config"
    if "working_dir" in doc or "env_vars" in doc:
        return "runtime-env"
    return None


def documents_of_kind(kind: str) -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path in cluster_yaml_files() for doc in load_documents(path) if classify(doc) == kind]


def one_document(path: Path, kind: str) -> dict[str, Any]:
    found = [doc for doc in load_documents(path) if classify(doc) == kind]
    assert len(found) == 1, f"{path.relative_to(ROOT)}: expected one {kind}, found {len(found)}"
    return found[0]


def dig(mapping: Any, dotted: str, where: str) -> Any:
    node = mapping
    for part in dotted.split("."):
        assert isinstance(node, dict) and part in node, f"{where}: missing {dotted} (at {part!r})"
        node = node[part]
    return node


def walk(node: Any) -> Iterator[Any]:
    yield node
    if isinstance(node, dict):
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def logical_lines(text: str) -> list[str]:
    """Shell-style lines: backslash continuations joined."""
    return re.sub(r"\\\n\s*", " ", text).splitlines()


def subparser_choices(parser: argparse.ArgumentParser) -> set[str]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {name for action in actions for name in action.choices}


def cli_parser() -> argparse.ArgumentParser:
    # no fallback: a CLI that fails to import must fail these tests
    from jobs.cli import build_parser

    return build_parser()


def known_subcommands() -> set[str]:
    return subparser_choices(cli_parser())


_CRON_FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12), ("day of week", 0, 7))
_CRON_NAMES = {
    "month": {m: i + 1 for i, m in enumerate("JAN FEB MAR APR MAY JUN JUL AUG SEP OCT NOV DEC".split())},
    "day of week": {d: i for i, d in enumerate("SUN MON TUE WED THU FRI SAT".split())},
}


def cron_problems(expression: str) -> list[str]:
    """Problems of a standard 5-field cron expression (empty list: valid)."""
    fields = expression.split()
    if len(fields) != 5:
        return [f"{expression!r}: {len(fields)} fields, expected 5 (minute hour day-of-month month day-of-week)"]
    problems = []
    for text, (name, low, high) in zip(fields, _CRON_FIELDS):
        names = _CRON_NAMES.get(name, {})

        def value(token: str) -> int:
            token = token.upper()
            if token in names:
                return names[token]
            if not token.isdigit():
                raise ValueError(token)
            return int(token)

        for item in text.split(","):
            base, _, step = item.partition("/")
            try:
                if step and (not step.isdigit() or int(step) == 0):
                    raise ValueError(step)
                if base in ("*", "?"):
                    continue
                first, _, last = base.partition("-")
                bounds = [value(first)] + ([value(last)] if last else [])
                if any(not low <= b <= high for b in bounds) or bounds != sorted(bounds):
                    raise ValueError(base)
            except ValueError:
                problems.append(f"{expression!r}: bad {name} field {text!r} (allowed {low}-{high})")
                break
    return problems


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def pyproject_dependency_names() -> set[str]:
    dependencies = pyproject()["project"]["dependencies"]
    return {normalized(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", dep).group(0)) for dep in dependencies}


def dockerfile_instructions() -> list[str]:
    """Dockerfile instructions with continuations joined and comments dropped."""
    lines = [line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")]
    return [line.strip() for line in logical_lines("\n".join(lines)) if line.strip()]


def dockerfile_arg_defaults() -> dict[str, str]:
    defaults = {}
    for line in dockerfile_instructions():
        match = re.match(r"ARG\s+(\w+)=(.*)$", line)
        if match:
            defaults[match.group(1)] = match.group(2).strip().strip('"')
    return defaults


# ---------------------------------------------------------------- the set of files


def test_expected_files_exist() -> None:
    for path in (
        DOCKERFILE,
        DOCKER / "README.md",
        CLUSTER / "README.md",
        RUN_EXAMPLE,
        RUNTIME_ENV,
        KUBERAY / "rayjob.yaml",
        KUBERAY / "raycronjob.yaml",
        KUBERAY / "cronjob-fallback.yaml",
    ):
        assert path.is_file(), f"missing {path.relative_to(ROOT)}"
    assert documents_of_kind("ray-cluster-launcher"), "no Ray cluster-launcher YAML under cluster/"


@pytest.mark.parametrize("path", cluster_yaml_files(), ids=lambda p: str(p.relative_to(CLUSTER)))
def test_every_yaml_parses_and_is_a_known_kind(path: Path) -> None:
    documents = load_documents(path)
    assert documents, f"{path.relative_to(ROOT)} holds no YAML document"
    known = {
        "RayJob", "RayCronJob", "CronJob", "ServiceAccount", "Role", "RoleBinding", "ConfigMap",
        "ray-cluster-launcher", "run-config", "runtime-env",
    }  # fmt: skip
    for index, doc in enumerate(documents):
        kind = classify(doc)
        assert kind in known, f"{path.relative_to(ROOT)} document {index}: unrecognised ({kind!r}); add a check for it"


# ---------------------------------------------------------------- KubeRay


def _containers(pod_template: dict[str, Any], where: str) -> list[dict[str, Any]]:
    containers = dig(pod_template, "spec.containers", where)
    assert isinstance(containers, list) and containers, f"{where}: no containers"
    for container in containers:
        assert container.get("image"), f"{where}: container {container.get('name')} has no image"
    return containers


def _gpu_limit(container: dict[str, Any]) -> int:
    limits = (container.get("resources") or {}).get("limits") or {}
    return int(limits.get("nvidia.com/gpu", 0))


def _assert_credentials_from_secret(container: dict[str, Any], where: str) -> None:
    env = {item["name"]: item for item in container.get("env") or []}
    from_secret_wholesale = any("secretRef" in source for source in container.get("envFrom") or [])
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        if name in env:
            assert "secretKeyRef" in (env[name].get("valueFrom") or {}), f"{where}: {name} must come from a Secret"
            assert "value" not in env[name], f"{where}: {name} has a literal value"
        else:
            assert from_secret_wholesale, f"{where}: {name} not set from a Secret (env or envFrom)"


def check_rayjob_spec(spec: dict[str, Any], where: str) -> None:
    """What a RayJob spec (or a RayCronJob's job template) needs to run `invariance run`."""
    entrypoint = dig(spec, "entrypoint", where)
    argv = shlex.split(entrypoint)
    assert argv[:2] == ["invariance", "run"], f"{where}: entrypoint should be `invariance run CONFIG`, got {entrypoint!r}"
    config_url = argv[-1]
    assert re.match(r"^[a-z][a-z0-9+.-]*://", config_url) and config_url.endswith((".yaml", ".yml")), (
        f"{where}: the config should be a YAML file in object storage (s3://...), got {config_url!r}"
    )

    runtime_env = yaml.safe_load(dig(spec, "runtimeEnvYAML", where))
    assert isinstance(runtime_env, dict), f"{where}: runtimeEnvYAML must be a YAML mapping"
    working_dir = runtime_env.get("working_dir")
    assert working_dir is None or "://" in str(working_dir), f"{where}: a RayJob cannot upload a local working_dir"
    assert not CREDENTIAL_NAMES & set(runtime_env.get("env_vars") or {}), f"{where}: credentials in runtimeEnvYAML"

    cluster = dig(spec, "rayClusterSpec", where)
    assert dig(cluster, "rayVersion", where)
    head_template = dig(cluster, "headGroupSpec.template", where)
    head_containers = _containers(head_template, f"{where} head")
    groups = dig(cluster, "workerGroupSpecs", where)
    assert isinstance(groups, list) and groups, f"{where}: no workerGroupSpecs"

    gpu_groups = []
    images = {c["image"] for c in head_containers}
    for group in groups:
        name = f"{where} worker group {group.get('groupName')}"
        containers = _containers(dig(group, "template", name), name)
        images |= {c["image"] for c in containers}
        if any(_gpu_limit(c) >= 1 for c in containers):
            gpu_groups.append(group)
        low, high = group.get("minReplicas", 0), group.get("maxReplicas", group.get("replicas", 0))
        assert low <= group.get("replicas", low) <= high, f"{name}: need minReplicas <= replicas <= maxReplicas"
        for container in containers:
            _assert_credentials_from_secret(container, name)
    assert gpu_groups, f"{where}: no worker group requests nvidia.com/gpu in its limits"
    if cluster.get("enableInTreeAutoscaling"):
        assert any(g["maxReplicas"] > g.get("minReplicas", 0) for g in gpu_groups), f"{where}: GPU group cannot scale"
    for container in head_containers:
        _assert_credentials_from_secret(container, f"{where} head")
    assert len(images) == 1, f"{where}: head and workers should run one image (same Ray, torch), got {images}"


def test_rayjob() -> None:
    doc = one_document(KUBERAY / "rayjob.yaml", "RayJob")
    assert doc["apiVersion"] == "ray.io/v1"
    check_rayjob_spec(doc["spec"], "rayjob.yaml")
    assert doc["spec"].get("shutdownAfterJobFinishes") is True, "rayjob.yaml: the cluster should go when the job ends"
    job_id = doc["spec"].get("jobId", "")
    assert job_id and doc["metadata"]["labels"]["invariance.io/config"] in job_id, (
        "rayjob.yaml: spec.jobId (the Ray submission id) should be derived from the config"
    )


def test_raycronjob() -> None:
    doc = one_document(KUBERAY / "raycronjob.yaml", "RayCronJob")
    assert doc["apiVersion"] == "ray.io/v1"
    spec = doc["spec"]
    assert not cron_problems(dig(spec, "schedule", "raycronjob.yaml")), cron_problems(spec["schedule"])
    template = dig(spec, "jobTemplate", "raycronjob.yaml")
    check_rayjob_spec(template, "raycronjob.yaml jobTemplate")
    assert "jobId" not in template, "raycronjob.yaml: a fixed jobId would repeat across scheduled RayJobs"


def test_raycronjob_template_matches_the_rayjob() -> None:
    """One run, two triggers: the cron template must not drift from rayjob.yaml."""
    rayjob = one_document(KUBERAY / "rayjob.yaml", "RayJob")["spec"]
    template = one_document(KUBERAY / "raycronjob.yaml", "RayCronJob")["spec"]["jobTemplate"]
    for key in ("entrypoint", "rayClusterSpec", "submissionMode"):
        assert template.get(key) == rayjob.get(key), f"raycronjob.yaml jobTemplate.{key} differs from rayjob.yaml"
    # The cluster goes when the job ends in both; the scheduled RayJob also deletes itself
    # (deletionRules, which KubeRay refuses beside shutdownAfterJobFinishes).
    assert rayjob.get("shutdownAfterJobFinishes") is True
    assert "shutdownAfterJobFinishes" not in template and template["deletionStrategy"]["deletionRules"]
    assert yaml.safe_load(template["runtimeEnvYAML"]) == yaml.safe_load(rayjob["runtimeEnvYAML"])


def test_cronjob_fallback() -> None:
    path = KUBERAY / "cronjob-fallback.yaml"
    cron = one_document(path, "CronJob")
    spec = cron["spec"]
    assert not cron_problems(dig(spec, "schedule", "CronJob")), cron_problems(spec["schedule"])
    assert spec.get("concurrencyPolicy") == "Forbid"
    pod = dig(spec, "jobTemplate.spec.template.spec", "CronJob")
    assert pod.get("restartPolicy") in {"Never", "OnFailure"}

    # The pod's ServiceAccount may create RayJobs, through a RoleBinding in the same file.
    account = pod.get("serviceAccountName")
    assert account == one_document(path, "ServiceAccount")["metadata"]["name"]
    binding = one_document(path, "RoleBinding")
    assert {"kind": "ServiceAccount", "name": account} in [
        {"kind": s.get("kind"), "name": s.get("name")} for s in binding["subjects"]
    ]
    role = one_document(path, "Role")
    assert binding["roleRef"]["kind"] == "Role" and binding["roleRef"]["name"] == role["metadata"]["name"]
    allowed = {
        verb
        for rule in role["rules"]
        if "ray.io" in rule["apiGroups"] and "rayjobs" in rule["resources"]
        for verb in rule["verbs"]
    }
    assert {"create", "get"} <= allowed, f"Role grants {allowed} on rayjobs; the pod creates and polls them"

    # It creates the RayJob from a template mounted from a ConfigMap made of rayjob.yaml.
    script = "\n".join(str(part) for c in pod["containers"] for part in (c.get("command") or []) + (c.get("args") or []))
    assert "kubectl" in script and "create" in script and "rayjob" in script
    assert re.search(r"jobId", script), "the fallback should set the RayJob's submission id (spec.jobId)"
    config_maps = {v["configMap"]["name"] for v in pod.get("volumes") or [] if "configMap" in v}
    assert config_maps, "the RayJob template should be mounted from a ConfigMap"
    readme = " ".join(logical_lines((CLUSTER / "README.md").read_text()))
    for name in config_maps:
        command = rf"kubectl create configmap {re.escape(name)} .*rayjob\.yaml=cluster/kuberay/rayjob\.yaml"
        assert re.search(command, readme), (
            f"cluster/README.md should show how to create ConfigMap {name} from rayjob.yaml"
        )

    # It finds this config's RayJobs by the label rayjob.yaml carries.
    env = {e["name"]: e.get("value") for c in pod["containers"] for e in c.get("env") or []}
    rayjob = one_document(KUBERAY / "rayjob.yaml", "RayJob")
    assert env.get("CONFIG_ID") == rayjob["metadata"]["labels"]["invariance.io/config"]
    # KubeRay caps RayJob names at 47: <cronjob>-<8-digit slot>-ray.
    assert len(cron["metadata"]["name"]) + len("-12345678-ray") <= 47


FAKE_KUBECTL = """#!/bin/sh
# kubectl as the fallback's pod would meet it: the slot's RayJob does not exist yet, two old
# ones finished, the new one succeeds at the first poll; every call is logged
echo "$*" >> "$KUBECTL_LOG"
case "$*" in
  "get rayjob slot-1-ray") exit 1 ;;
  "get rayjobs -l invariance.io/config=cifar10-sgd -o jsonpath="*) printf 'old-1-ray=Complete\\nold-2-ray=Failed\\n' ;;
  "patch --local"*) echo "kind: RayJob" ;;
  "create -f -") cat > /dev/null ;;
  "get rayjob slot-1-ray -o jsonpath="*) echo "Complete/SUCCEEDED" ;;
  "get rayjobs -l invariance.io/config=cifar10-sgd --sort-by="*)
    printf 'old-1-ray=Complete\\nold-2-ray=Failed\\nold-3-ray=Complete\\nold-4-ray=Complete\\n'
    printf 'by-hand-ray=Running\\nslot-1-ray=Complete\\n' ;;
  "delete rayjob "*) ;;
  *) echo "unexpected kubectl $*" >&2; exit 9 ;;
esac
"""


def test_cronjob_fallback_script_creates_waits_and_prunes_old_rayjobs(tmp_path: Path) -> None:
    """The pod's script, run by sh against a fake kubectl: it creates the slot's RayJob, waits
    for it, and deletes the finished RayJobs of its config beyond the newest KEEP_RAYJOBS."""
    import os
    import subprocess

    cron = one_document(KUBERAY / "cronjob-fallback.yaml", "CronJob")
    (container,) = dig(cron["spec"], "jobTemplate.spec.template.spec", "CronJob")["containers"]
    kubectl = tmp_path / "kubectl"
    kubectl.write_text(FAKE_KUBECTL)
    kubectl.chmod(0o755)
    log = tmp_path / "kubectl.log"
    env = {"PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}", "KUBECTL_LOG": str(log), "SLOT_NAME": "slot-1",
           **{e["name"]: e["value"] for e in container["env"] if "value" in e}, "POLL_SECONDS": "0"}  # fmt: skip
    done = subprocess.run([*container["command"], *container["args"]], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "created RayJob slot-1-ray" in done.stdout and "RayJob slot-1-ray succeeded" in done.stdout
    calls = log.read_text().splitlines()
    assert "create -f -" in calls
    # 5 finished, 3 kept (old-3, old-4 and this slot's); the one still running is never touched
    assert [c for c in calls if c.startswith("delete")] == ["delete rayjob old-1-ray", "delete rayjob old-2-ray"]


# ---------------------------------------------------------------- Ray cluster launcher


def test_cluster_launcher_configs() -> None:
    for path, doc in documents_of_kind("ray-cluster-launcher"):
        where = str(path.relative_to(ROOT))
        for key in ("cluster_name", "max_workers", "available_node_types", "head_node_type", "provider"):
            assert key in doc, f"{where}: missing {key}"
        node_types = doc["available_node_types"]
        assert doc["head_node_type"] in node_types, f"{where}: head_node_type is not an available node type"
        docker = doc.get("docker") or {}
        assert docker.get("image") or (docker.get("head_image") and docker.get("worker_image")), f"{where}: no docker image"

        workers = {name: t for name, t in node_types.items() if name != doc["head_node_type"]}
        assert workers, f"{where}: no worker node type"
        gpu_workers = {
            name: t
            for name, t in workers.items()
            if (t.get("resources") or {}).get("GPU")
            or re.match(r"^(p\d|g\d)", str((t.get("node_config") or {}).get("InstanceType", "")))
            or (t.get("node_config") or {}).get("guestAccelerators")
        }
        assert gpu_workers, f"{where}: no GPU worker node type"
        for name, t in gpu_workers.items():
            assert 0 <= t.get("min_workers", 0) < t["max_workers"] <= doc["max_workers"], (
                f"{where}: {name} should autoscale (min_workers < max_workers <= max_workers of the cluster)"
            )


# ---------------------------------------------------------------- runtime env and run config


def test_runtime_env_excludes_the_virtualenv() -> None:
    env = one_document(RUNTIME_ENV, "runtime-env")
    assert env.get("working_dir"), "runtime_env.yaml: show working_dir with its excludes"
    excludes = env.get("excludes") or []
    for pattern in (".venv", ".git", "invariance-demo", "*.safetensors"):
        assert pattern in excludes, f"runtime_env.yaml: excludes lacks {pattern!r}"
    env_vars = env.get("env_vars") or {}
    assert "AWS_ENDPOINT_URL" in env_vars
    assert not CREDENTIAL_NAMES & set(env_vars), "runtime_env.yaml: credentials do not belong in a runtime env"
    assert "pip" not in env and "conda" not in env, "runtime_env.yaml: the image already has the package"


def test_run_example_validates_and_uses_every_key() -> None:
    raw = yaml.safe_load(RUN_EXAMPLE.read_text())
    config = parse_config(raw)
    text = RUN_EXAMPLE.read_text()
    sections = {"model": ModelConfig, "data": DataConfig, "inversion": InversionConfig, "resources": ResourcesConfig}
    assert set(RunConfig.model_fields) <= set(raw), f"run.example.yaml lacks {set(RunConfig.model_fields) - set(raw)}"
    for section, model in sections.items():
        for key in model.model_fields:
            if section == "model" and key in {"arch", "factory"}:
                continue
            assert key in raw[section], f"run.example.yaml: {section}.{key} not shown"
    # model.arch and model.factory are exclusive: one is set, the other shown as a comment.
    shown = [key for key in ("arch", "factory") if key in raw["model"] or re.search(rf"#\s*{key}:", text)]
    assert shown == ["arch", "factory"], "run.example.yaml: show both model.arch and (commented) model.factory"

    assert config.model.arch == "vit_base_patch32_224"
    assert config.checkpoints == "s3://lab/runs/cifar10-sgd/epoch={epoch}.safetensors"
    assert (config.data.format, config.data.split, config.data.n_samples) == ("cifar", "test", 500)
    assert config.seeds == [0, 1, 2]
    assert (config.inversion.iterations, config.inversion.step_size) == (500, 0.5)
    assert config.resources.num_gpus == 1
    assert config.pretrained == "timm" or config.pretrained.startswith("s3://")


def test_example_config_is_the_one_the_cluster_runs() -> None:
    """The KubeRay entrypoints read the example config's run id; endpoints agree everywhere."""
    config = parse_config(yaml.safe_load(RUN_EXAMPLE.read_text()))
    config_id = config.output.rstrip("/").rsplit("/", 1)[-1]
    for path in (KUBERAY / "rayjob.yaml", KUBERAY / "raycronjob.yaml"):
        assert f"/{config_id}/" in path.read_text(), f"{path.name} should run the example config ({config_id})"

    endpoints = {config.storage_options.get("client_kwargs", {}).get("endpoint_url")}
    endpoints.add(one_document(RUNTIME_ENV, "runtime-env")["env_vars"]["AWS_ENDPOINT_URL"])
    for kind in ("RayJob", "RayCronJob"):
        for _, doc in documents_of_kind(kind):
            spec = doc["spec"].get("jobTemplate", doc["spec"])
            endpoints.add((yaml.safe_load(spec["runtimeEnvYAML"]).get("env_vars") or {}).get("AWS_ENDPOINT_URL"))
    assert len(endpoints) == 1, f"the S3 endpoint differs between files: {endpoints}"


# ---------------------------------------------------------------- the CLI the files call


def cli_calls() -> list[tuple[Path, str, str]]:
    """(file, subcommand, rest of the line) for every `invariance <sub>` in cluster/ and docker/."""
    calls = []
    for path in text_files(CLUSTER, DOCKER):
        for line in logical_lines(path.read_text()):
            for match in CLI_CALL.finditer(line):
                calls.append((path, match.group(1), line[match.end() :]))
    return calls


def test_files_call_only_real_subcommands() -> None:
    known = known_subcommands()
    calls = cli_calls()
    assert calls, "no `invariance <subcommand>` found in cluster/ or docker/"
    bad = sorted({f"{path.relative_to(ROOT)}: invariance {sub}" for path, sub, _ in calls if sub not in known})
    assert not bad, f"unknown subcommands (known: {sorted(known)}):\n" + "\n".join(bad)
    assert "run" in {sub for _, sub, _ in calls}


def test_cli_contract_matches_the_parser() -> None:
    parser = cli_parser()
    assert CONTRACT_SUBCOMMANDS <= subparser_choices(parser)


def test_entrypoints_parse_with_the_real_cli() -> None:
    parser = cli_parser()
    for kind in ("RayJob", "RayCronJob"):
        for path, doc in documents_of_kind(kind):
            spec = doc["spec"].get("jobTemplate", doc["spec"])
            argv = shlex.split(spec["entrypoint"])[1:]
            try:
                args = parser.parse_args(argv)
            except SystemExit:
                pytest.fail(f"{path.relative_to(ROOT)}: `invariance {' '.join(argv)}` does not parse")
            assert args.command == "run"


# The image (docker/Dockerfile) is checked in tests/test_deploy_image.py.


# ---------------------------------------------------------------- docs and secrets


def test_cluster_readme_walks_from_cluster_to_polars() -> None:
    text = (CLUSTER / "README.md").read_text()
    lines = logical_lines(text)
    needles = (
        "ray up", "helm install", "kubectl create -f cluster/kuberay/rayjob.yaml",
        "pl.scan_parquet(", "hive_partitioning=True", "storage_options",
    )  # fmt: skip
    for needle in needles:
        assert needle in text, f"cluster/README.md lacks {needle!r}"
    submits = [line for line in lines if "ray job submit" in line and "--working-dir" in line]
    assert any("--working-dir ." in line and "-- invariance run" in line for line in submits)
    for line in submits:
        match = re.search(r"--runtime-env[ =](\S+)", line)
        assert match, f"cluster/README.md: a --working-dir submission without runtime_env excludes: {line.strip()!r}"
        assert (ROOT / match.group(1)).is_file(), f"cluster/README.md: {match.group(1)} does not exist"


def test_no_credentials_in_cluster_or_docker_files() -> None:
    for path in text_files(CLUSTER, DOCKER):
        text = path.read_text()
        assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text), f"{path.relative_to(ROOT)}: looks like an AWS key id"
    for path in cluster_yaml_files():
        for doc in load_documents(path):
            for node in walk(doc):
                if not isinstance(node, dict):
                    continue
                if node.get("name") in CREDENTIAL_NAMES:  # a Kubernetes env entry
                    assert "value" not in node, f"{path.relative_to(ROOT)}: literal {node['name']}"
                for key in node:
                    assert str(key).upper() not in CREDENTIAL_NAMES, f"{path.relative_to(ROOT)}: literal {key}"
            if classify(doc) == "run-config":
                # s3fs takes keys as storage_options key/secret/token: never in a config.
                for node in walk(doc.get("storage_options") or {}):
                    if isinstance(node, dict):
                        leaked = {"key", "secret", "token", "password"} & set(node)
                        assert not leaked, f"{path.relative_to(ROOT)}: credentials {leaked} in storage_options"
