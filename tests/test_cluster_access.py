"""The clusters' doors: token auth on every cluster path (KubeRay pods and submitter, the launcher's
nodes and dashboard), pods that fit the nodes the files name, a private image pullable, and the
IAM note that keeps Ray's autoscaler working."""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.test_cluster_configs import CLUSTER, documents_of_kind, load_documents
from tests.test_deploy_manifests import _pod_templates, _submitter_templates

LAUNCHER = CLUSTER / "ray-cluster.aws.yaml"
# EC2 instance types the launcher names: (vCPUs, GiB of memory)
INSTANCE_TYPES = {"g5.2xlarge": (8, 32), "m5.2xlarge": (8, 32)}


def _cluster_specs() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for kind in ("RayJob", "RayCronJob"):
        for path, doc in documents_of_kind(kind):
            spec = doc["spec"].get("jobTemplate", doc["spec"])
            found.append((path.name, spec))
    return found


@pytest.mark.parametrize("where,spec", _cluster_specs(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_kuberay_cluster_uses_token_auth(where: str, spec: dict[str, Any]) -> None:
    """KubeRay >= 1.5.1 makes the token and gives it to every Ray container (head, workers,
    autoscaler, the submitter) and to the operator's own job-API requests: authOptions, not env
    vars wired by hand (those miss the autoscaler and the operator)."""
    cluster = spec["rayClusterSpec"]
    assert cluster.get("authOptions") == {"mode": "token"}, f"{where}: the job API is open (no authOptions.mode: token)"
    for template in [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster["workerGroupSpecs"])]:
        for container in template["spec"]["containers"]:
            names = {item["name"] for item in container.get("env") or []}
            assert not names & {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}, f"{where}: {container['name']} wires the token by hand"


def _fallback_pod() -> tuple[str, dict[str, Any]]:
    (cron,) = [doc for doc in load_documents(CLUSTER / "kuberay" / "cronjob-fallback.yaml") if doc["kind"] == "CronJob"]
    return "cronjob-fallback.yaml pod", cron["spec"]["jobTemplate"]["spec"]["template"]


@pytest.mark.parametrize("where,template", [*_pod_templates(), *_submitter_templates(), _fallback_pod()],
                         ids=lambda v: v if isinstance(v, str) else "")  # fmt: skip
def test_every_pod_can_pull_a_private_image(where: str, template: dict[str, Any]) -> None:
    assert template["spec"].get("imagePullSecrets"), f"{where}: no imagePullSecrets"


@pytest.mark.parametrize("where,template", _submitter_templates(), ids=lambda v: v if isinstance(v, str) else "")
def test_a_submitter_of_our_own_takes_the_token_from_kuberay(where: str, template: dict[str, Any]) -> None:
    """KubeRay adds RAY_AUTH_MODE and RAY_AUTH_TOKEN (from the cluster's Secret) to a submitter pod
    it is given as well; wiring them by hand would point at a Secret that does not exist yet."""
    for container in template["spec"]["containers"]:
        names = {item["name"] for item in container.get("env") or []}
        assert not names & {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}, f"{where}: {container['name']} wires the token by hand"
        assert "--address" in container["args"][0] and "RAY_DASHBOARD_ADDRESS" in container["args"][0]


def kubelet_allocatable(vcpus: int, gib: int) -> tuple[float, float]:
    """(CPUs, GiB) a pod may request on an EKS node: the kubelet's reserve (EKS AMI formula: 6% of
    the first core, 1% of the second, 0.5% of the next two, 0.25% of the rest; 255 MiB + 11 MiB per
    pod, at most 58 pods on an 8-vCPU node), the eviction threshold (100 MiB), and room for the
    daemonsets every GPU node runs (aws-node, kube-proxy, the NVIDIA device plugin: 0.3 CPU, 1 GiB)."""
    shares = [0.06, 0.01, 0.005, 0.005] + [0.0025] * max(0, vcpus - 4)
    cpu = vcpus - sum(shares[:vcpus]) - 0.3
    memory = gib - (255 + 11 * 58 + 100) / 1024 - 1.0
    return cpu, memory


def _quantity(text: str) -> float:
    """A Kubernetes CPU or memory quantity in CPUs or GiB."""
    match = re.fullmatch(r"([\d.]+)(m|Gi|Mi)?", str(text))
    assert match, text
    value, unit = float(match.group(1)), match.group(2)
    return {None: value, "m": value / 1000, "Gi": value, "Mi": value / 1024}[unit]


def test_the_gpu_worker_fits_the_gpu_node_the_launcher_uses() -> None:
    (launcher,) = load_documents(LAUNCHER)
    instance = launcher["available_node_types"]["gpu_worker"]["node_config"]["InstanceType"]
    cpu, memory = kubelet_allocatable(*INSTANCE_TYPES[instance])
    for where, template in _pod_templates():
        if "worker" not in where:
            continue
        (container,) = template["spec"]["containers"]
        requests, limits = container["resources"]["requests"], container["resources"]["limits"]
        assert _quantity(requests["cpu"]) <= cpu, f"{where}: {requests['cpu']} CPUs; a {instance} offers {cpu:.2f}"
        assert _quantity(limits["memory"]) <= memory, f"{where}: {limits['memory']}; a {instance} offers {memory:.1f} GiB"
        shm = {v["name"]: v for v in template["spec"]["volumes"]}["dshm"]["emptyDir"]["sizeLimit"]
        # a memory-backed emptyDir counts against the container's memory limit
        assert _quantity(shm) <= _quantity(limits["memory"]) / 2, f"{where}: /dev/shm {shm} crowds out the worker"


def test_an_eks_gpu_node_allocates_what_the_formula_says() -> None:
    """The reserve formula on a g5.2xlarge: 7910m CPU (as EKS allocates), about 31 GiB of memory
    (32 GiB less 993 MiB), before daemonsets."""
    cpu, memory = kubelet_allocatable(8, 32)
    assert abs((cpu + 0.3) - 7.91) < 0.01
    assert 29.5 < memory + 1.0 < 31.5


def test_the_launcher_starts_every_node_with_token_auth_and_keeps_the_dashboard_inside() -> None:
    (launcher,) = load_documents(LAUNCHER)
    assert "--env RAY_AUTH_MODE=token" in launcher["docker"]["run_options"]
    assert launcher["file_mounts"].get("/home/ray/.ray/auth_token") == "~/.ray/auth_token"
    head = " ".join(launcher["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    text = LAUNCHER.read_text()
    assert "RAY_AUTH_MODE=token RAY_ADDRESS=http://127.0.0.1:8265 ray job submit" in text


def test_the_iam_note_keeps_the_autoscalers_rights() -> None:
    text = LAUNCHER.read_text()
    for needle in ("ray-autoscaler-v1", "ec2:RunInstances", "iam:PassRole"):
        assert needle in text, f"the IAM note of {LAUNCHER.name} does not name {needle}"
    assert "docker login" in text, "the launcher shows how nodes log in to a private registry"
