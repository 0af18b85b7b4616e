"""cluster/ against the real schemas: every KubeRay manifest against the CRDs of each KubeRay
version its header claims (vendored in tests/data/kuberay-crds/), every Kubernetes kind and pod
template with `kubernetes-validate --strict`, the cluster-launcher YAML with Ray's own schema
after `prepare_config`. Nothing here needs a cluster; each check takes a second or two.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import json
import re
import shlex
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.test_cluster_configs import CLUSTER, KUBERAY, ROOT, documents_of_kind, load_documents, one_document

CRDS = ROOT / "tests" / "data" / "kuberay-crds"
# The oldest Kubernetes the files are written for (CronJob.spec.timeZone is GA in 1.27) and the
# newest that kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.27.0", "latest")
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# ---------------------------------------------------------------- the CRD schemas


@lru_cache(maxsize=None)
def crd_schema(tag: str, plural: str) -> dict[str, Any]:
    """The v1 openAPIV3Schema of a vendored CRD, as a strict JSON Schema: an object schema with
    properties rejects other fields (as `kubectl apply`'s strict field validation does), unless
    it says x-kubernetes-preserve-unknown-fields."""
    path = CRDS / tag / f"ray.io_{plural}.yaml.gz"
    assert path.is_file(), f"no vendored CRD {path.relative_to(ROOT)}: vendor it (tests/data/kuberay-crds/README.md)"
    crd = yaml.load(gzip.decompress(path.read_bytes()), Loader=LOADER)  # noqa: S506 - safe loader
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return _strict(version["schema"]["openAPIV3Schema"])


def _strict(node: Any) -> Any:
    if isinstance(node, list):
        return [_strict(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _strict(value) for key, value in node.items()}
    if "properties" in out and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if out.pop("nullable", False) and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


def schema_errors(document: dict[str, Any], tag: str, plural: str) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft7Validator(crd_schema(tag, plural))
    return sorted(
        f"{'.'.join(str(p) for p in error.absolute_path) or '<root>'}: {error.message[:200]}"
        for error in validator.iter_errors(document)
    )


def claimed_versions(path: Path) -> list[str]:
    """The KubeRay tags a manifest's header says its CRDs were checked against."""
    header = " ".join(line.lstrip("# ") for line in path.read_text().splitlines() if line.startswith("#"))
    match = re.search(r"validates (?:this file|it) against\s+the CRDs of (.*?)\(vendored", header)
    assert match, f"{path.relative_to(ROOT)}: the header should name the KubeRay versions whose CRDs accept it"
    return re.findall(r"v\d+\.\d+\.\d+", match.group(1))


MANIFESTS = {"rayjob.yaml": ("RayJob", "rayjobs"), "raycronjob.yaml": ("RayCronJob", "raycronjobs")}


def test_vendored_crds_are_the_released_files() -> None:
    """Each vendored CRD is byte for byte the file of its release tag (sha256 in the README)."""
    table = re.findall(r"\| (v[\d.]+) \| ([0-9a-f]{40}) \| (\S+) \| ([0-9a-f]{64}) \|", (CRDS / "README.md").read_text())
    vendored = sorted(CRDS.glob("v*/ray.io_*.yaml.gz"))
    assert len(table) == len(vendored) >= 2
    for tag, _commit, source, sha256 in table:
        path = CRDS / tag / (Path(source).name + ".gz")
        assert hashlib.sha256(gzip.decompress(path.read_bytes())).hexdigest() == sha256, f"{path} was modified"
    assert "Apache License" in (CRDS / "LICENSE").read_text()


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_kuberay_manifest_matches_the_crd_of_every_version_it_claims(name: str) -> None:
    kind, plural = MANIFESTS[name]
    path = KUBERAY / name
    tags = claimed_versions(path)
    assert tags, f"{name}: no version claimed"
    document = one_document(path, kind)
    for tag in tags:
        errors = schema_errors(document, tag, plural)
        assert not errors, f"{name} is refused by KubeRay {tag}'s {kind} CRD:\n" + "\n".join(errors)


def test_rayjob_claims_every_release_from_1_5() -> None:
    """1.5 brought rayClusterSpec.authOptions (token auth): the file closes the job API with it."""
    tags = claimed_versions(KUBERAY / "rayjob.yaml")
    assert {"v1.5.1", "v1.6.2", "v1.7.0"} <= set(tags), tags
    header = (KUBERAY / "rayjob.yaml").read_text().split("apiVersion:")[0]
    assert ">= 1.1" not in header, "KubeRay 1.1's RayJob has no spec.backoffLimit"


def test_the_schema_check_refuses_what_kuberay_refuses() -> None:
    """The validator is not a pass-through: an unknown field, a wrong type, and a field newer than
    the version (1.4 has no deletionStrategy) are refused."""
    rayjob = one_document(KUBERAY / "rayjob.yaml", "RayJob")
    unknown = copy.deepcopy(rayjob)
    unknown["spec"]["shutdownAfterJobFinish"] = True
    assert any("shutdownAfterJobFinish" in e for e in schema_errors(unknown, "v1.7.0", "rayjobs"))
    wrong_type = copy.deepcopy(rayjob)
    wrong_type["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplicas"] = "eight"
    assert schema_errors(wrong_type, "v1.7.0", "rayjobs")
    in_pod = copy.deepcopy(rayjob)
    in_pod["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["volumeMount"] = []
    assert schema_errors(in_pod, "v1.2.2", "rayjobs")

    template = one_document(KUBERAY / "raycronjob.yaml", "RayCronJob")["spec"]["jobTemplate"]
    as_rayjob = {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": "x"}, "spec": template}
    assert not schema_errors(as_rayjob, "v1.6.2", "rayjobs")
    assert any("deletionStrategy" in e for e in schema_errors(as_rayjob, "v1.4.2", "rayjobs"))


# ---------------------------------------------------------------- KubeRay's own rules (validation.go)


def test_raycronjob_cleans_up_its_rayjobs() -> None:
    """KubeRay 1.6's rules: deletionRules exclude shutdownAfterJobFinishes (and its TTL); per
    condition the TTLs go DeleteCluster <= DeleteSelf. Both on success and on failure."""
    path = KUBERAY / "raycronjob.yaml"
    template = one_document(path, "RayCronJob")["spec"]["jobTemplate"]
    assert "shutdownAfterJobFinishes" not in template and "ttlSecondsAfterFinished" not in template
    rules = template["deletionStrategy"]["deletionRules"]
    ttl: dict[tuple[str, str], int] = {}
    for rule in rules:
        condition = rule["condition"]
        assert ("jobStatus" in condition) != ("jobDeploymentStatus" in condition), rule
        key = (condition.get("jobStatus") or condition["jobDeploymentStatus"], rule["policy"])
        assert key not in ttl, f"duplicate deletion rule {key}"
        ttl[key] = condition.get("ttlSeconds", 0)
    for status in ("SUCCEEDED", "FAILED"):
        assert (status, "DeleteCluster") in ttl and (status, "DeleteSelf") in ttl, f"no cleanup on {status}"
    for status in {s for s, _ in ttl}:
        if (status, "DeleteCluster") in ttl and (status, "DeleteSelf") in ttl:
            assert ttl[status, "DeleteCluster"] <= ttl[status, "DeleteSelf"], f"{status}: cluster must go first"
    header = path.read_text().split("apiVersion:")[0]
    for needle in ("ALPHA", "feature gate", "RayCronJob=true", "1.6"):
        assert needle in header, f"raycronjob.yaml header lacks {needle!r}"


def _pod_templates() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for kind in ("RayJob", "RayCronJob"):
        for path, doc in documents_of_kind(kind):
            spec = doc["spec"].get("jobTemplate", doc["spec"])
            cluster = spec["rayClusterSpec"]
            found.append((f"{path.name} head", cluster["headGroupSpec"]["template"]))
            for group in cluster["workerGroupSpecs"]:
                found.append((f"{path.name} worker group {group['groupName']}", group["template"]))
    return found


def _submitter_templates() -> list[tuple[str, dict[str, Any]]]:
    """The submitter pods the manifests give KubeRay (raycronjob.yaml's gate)."""
    found = []
    for kind in ("RayJob", "RayCronJob"):
        for path, doc in documents_of_kind(kind):
            spec = doc["spec"].get("jobTemplate", doc["spec"])
            if "submitterPodTemplate" in spec:
                found.append((f"{path.name} submitter", spec["submitterPodTemplate"]))
    return found


def test_the_raycronjob_gates_in_its_submitter() -> None:
    """KubeRay creates a tick's cluster before its submitter, so the RayCronJob's gate is the
    submitter: it must run the image of the cluster (same Ray, same package), in K8sJobMode (the
    only mode that takes a submitter pod), and its GPU group must start from 0 so that a tick with
    nothing new starts no GPU node. The gated command itself: tests/test_scheduled_ticks.py."""
    template = one_document(KUBERAY / "raycronjob.yaml", "RayCronJob")["spec"]["jobTemplate"]
    assert template["submissionMode"] == "K8sJobMode"
    (submitter,) = [t for where, t in _submitter_templates() if where.startswith("raycronjob.yaml")]
    (container,) = submitter["spec"]["containers"]
    head = template["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert container["image"] == head["image"]
    assert container.get("command"), "without a command of its own KubeRay submits the entrypoint ungated"
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert json.loads(env["RUNTIME_ENV_JSON"]) == yaml.safe_load(template["runtimeEnvYAML"])
    assert shlex.split(template["entrypoint"]) == ["invariance", "run", env["INVARIANCE_CONFIG"]]
    for group in template["rayClusterSpec"]["workerGroupSpecs"]:
        assert group.get("replicas", 0) == 0 == group.get("minReplicas", 0), f"{group['groupName']}: a no-op tick starts a worker"
    # the cluster of a no-op tick goes soon; a failed one stays for its dashboard
    ttl = {(r["condition"].get("jobStatus"), r["policy"]): r["condition"]["ttlSeconds"] for r in template["deletionStrategy"]["deletionRules"]}
    assert ttl["SUCCEEDED", "DeleteCluster"] <= 60 < ttl["FAILED", "DeleteCluster"]


def test_the_cronjob_fallback_gates_before_any_rayjob() -> None:
    """An init container plans first; the kubectl container reads its answer before it creates."""
    pod = one_document(KUBERAY / "cronjob-fallback.yaml", "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (gate,) = pod["initContainers"]
    (main,) = pod["containers"]
    gate_file = {e["name"]: e.get("value") for e in gate["env"]}["GATE_FILE"]
    assert {e["name"]: e.get("value") for e in main["env"]}["GATE_FILE"] == gate_file
    mounts = {m["mountPath"]: m for m in gate["volumeMounts"]}
    folder = str(Path(gate_file).parent)
    assert folder in mounts and not mounts[folder].get("readOnly")
    volume = mounts[folder]["name"]
    assert any(m["name"] == volume and m["mountPath"] == folder for m in main["volumeMounts"])
    assert "emptyDir" in {v["name"]: v for v in pod["volumes"]}[volume]
    script = main["args"][0]
    assert script.index('[ ! -s "$GATE_FILE" ]') < script.index("kubectl create"), "the gate is read before the RayJob"
    assert pod.get("imagePullSecrets"), "the gate runs the private image"


def test_every_ray_pod_mounts_shared_memory() -> None:
    """Ray's object store lives in /dev/shm: a pod without a memory volume there gets 64 MiB."""
    templates = _pod_templates()
    assert len(templates) >= 4
    for where, template in templates:
        volumes = {v["name"]: v for v in template["spec"].get("volumes") or []}
        for container in template["spec"]["containers"]:
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts") or []}
            assert "/dev/shm" in mounts, f"{where}: {container['name']} does not mount /dev/shm"
            assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory", f"{where}: /dev/shm not in memory"


# ---------------------------------------------------------------- Kubernetes kinds (kubernetes-validate)


def _kubernetes_validate() -> str:
    tool = shutil.which("kubernetes-validate", path=str(Path(sys.executable).parent))
    assert tool, "kubernetes-validate is missing: it comes with the test extras (make env)"
    return tool


@pytest.mark.parametrize("kubernetes", KUBERNETES_VERSIONS)
def test_kubernetes_kinds_validate_strictly(kubernetes: str, tmp_path: Path) -> None:
    """The plain Kubernetes objects (cronjob-fallback.yaml) and every pod template inside the
    KubeRay manifests, as Pods, through `kubernetes-validate --strict`."""
    import kubernetes_validate.utils

    version = kubernetes_validate.utils.latest_version() if kubernetes == "latest" else kubernetes
    plain = [p for p in sorted(KUBERAY.glob("*.yaml")) if not {d.get("kind") for d in load_documents(p)} & {"RayJob", "RayCronJob"}]
    assert KUBERAY / "cronjob-fallback.yaml" in plain
    pods = []
    for index, (where, template) in enumerate(_pod_templates() + _submitter_templates()):
        metadata = {"name": f"pod-{index}", **(template.get("metadata") or {})}
        pods.append({"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": template["spec"]})
    pods_file = tmp_path / "pod-templates.yaml"
    pods_file.write_text(yaml.safe_dump_all(pods))
    result = subprocess.run(
        [_kubernetes_validate(), "--strict", "--no-warn", "-k", version, *map(str, plain), str(pods_file)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed") == len(pods) + sum(len(load_documents(p)) for p in plain), result.stdout


def test_kubernetes_validate_refuses_an_unknown_pod_field(tmp_path: Path) -> None:
    bad = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"},
           "spec": {"containers": [{"name": "c", "image": "i", "volumeMount": []}]}}  # fmt: skip
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    result = subprocess.run([_kubernetes_validate(), "--strict", str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "volumeMount" in result.stdout + result.stderr


# ---------------------------------------------------------------- Ray cluster launcher


def test_cluster_launcher_yaml_validates_with_rays_schema() -> None:
    """Ray's own check, as `ray up` does it: prepare_config (defaults merged) then validate_config
    against ray/autoscaler/ray-schema.json."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    launchers = documents_of_kind("ray-cluster-launcher")
    assert launchers
    for path, doc in launchers:
        prepared = prepare_config(copy.deepcopy(doc))
        validate_config(prepared)  # raises on a schema violation
        assert prepared["docker"]["image"] == doc["docker"]["image"]

    broken = copy.deepcopy(launchers[0][1])
    broken["available_node_types"]["head"]["resourcez"] = {}
    with pytest.raises(Exception, match="resourcez"):
        validate_config(prepare_config(broken))


def test_cluster_readme_states_the_versions() -> None:
    text = (CLUSTER / "README.md").read_text()
    for needle in ("RayCronJob", "feature gate", "deletionRules", "1.2", "1.6"):
        assert needle in text, f"cluster/README.md lacks {needle!r}"
