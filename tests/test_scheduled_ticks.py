"""Scheduled ticks gate on a plan, on every path (issue 30): the RayCronJob's submitter
(cluster/kuberay/raycronjob.yaml), the CronJob fallback's init container and kubectl script
(cronjob-fallback.yaml), and the cron recipe of cluster/README.md. Each command is taken from its
file as written and run by sh against a moto S3 server holding a finished run at the manifests'
own config URL (s3://lab/configs/cifar10-sgd/run.yaml), with fake `ray` and `kubectl` that log
their calls. Only the endpoint is changed (AWS_ENDPOINT_URL: the test server).

The S3 requests of each tick are counted by the server itself (moto's request recorder), the
seconds with a wall clock; ``-s`` prints them (bench/RESULTS.md, "Gated scheduled ticks").
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from tests.helpers import tiny_config, write_checkpoints, write_eval_parquet
from tests.servers import LOOPBACK, TEST_CREDENTIALS, S3Server, _moto_server
from tests.test_cluster_configs import CLUSTER, KUBERAY, dig, logical_lines, one_document

pytestmark = pytest.mark.slow

VENV_BIN = Path(sys.executable).parent
# What a gated no-op tick may cost in S3 requests on this store (one checkpoint): the config, the
# checkpoint listing, the completion records and the lease. Measured: bench/RESULTS.md.
NO_OP_REQUESTS = 40


def rayjob() -> dict[str, Any]:
    return one_document(KUBERAY / "rayjob.yaml", "RayJob")


def submitter_container() -> dict[str, Any]:
    template = one_document(KUBERAY / "raycronjob.yaml", "RayCronJob")["spec"]["jobTemplate"]
    (container,) = dig(template, "submitterPodTemplate.spec.containers", "raycronjob.yaml jobTemplate")
    return container


def fallback_pod() -> dict[str, Any]:
    return dig(one_document(KUBERAY / "cronjob-fallback.yaml", "CronJob")["spec"], "jobTemplate.spec.template.spec",
               "cronjob-fallback.yaml")  # fmt: skip


def fallback_gate() -> dict[str, Any]:
    (gate,) = [c for c in fallback_pod().get("initContainers") or [] if c["name"] == "gate"]
    return gate


def cron_recipe() -> str:
    """The shell command of cluster/README.md's cron line (after the five schedule fields)."""
    lines = [line for line in logical_lines((CLUSTER / "README.md").read_text())
             if line.startswith("0 * * * * ") and "invariance submit" in line]  # fmt: skip
    assert len(lines) == 1, lines
    return lines[0].split(None, 5)[5]


def values(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env") or [] if "value" in item}


def script(container: dict[str, Any]) -> list[str]:
    return [*container["command"], *container["args"]]


# ---------------------------------------------------------------- a finished run on the test server


@dataclass
class Tick:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    requests: list[tuple[str, str]]  # (method, url) as the S3 server saw them

    def counts(self) -> dict[str, int]:
        return dict(Counter(method for method, _ in self.requests))


@dataclass
class Lab:
    server: S3Server
    recording: Path
    folder: Path
    config_url: str

    def s3(self):
        import s3fs

        return s3fs.S3FileSystem(**self.server.fsspec_options())

    def _recorder(self, action: str) -> None:
        request = urllib.request.Request(f"{self.server.endpoint}/moto-api/recorder/{action}", data=b"", method="POST")
        urllib.request.urlopen(request, timeout=10).read()  # noqa: S310 - loopback only

    def env(self, container: dict[str, Any] | None = None, **extra: str) -> dict[str, str]:
        """A pod's environment: the container's literal env vars, the Secret's keys, the endpoint of
        the test server, and fake `ray` / `kubectl` first on PATH."""
        return {
            "PATH": os.pathsep.join([str(self.folder / "bin"), str(VENV_BIN), "/usr/bin", "/bin"]),
            "HOME": str(self.folder / "home"),
            **TEST_CREDENTIALS,
            **(values(container) if container else {}),
            "AWS_ENDPOINT_URL": self.server.endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
            "CALL_LOG": str(self.folder / "calls.log"),
            **extra,
        }

    def run(self, argv: list[str], env: dict[str, str]) -> Tick:
        """Runs a command, counting the S3 requests it makes (the recorder of the moto server)."""
        (self.folder / "calls.log").write_text("")
        self._recorder("reset-recording")
        self._recorder("start-recording")
        started = time.perf_counter()
        try:
            done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
        finally:
            seconds = time.perf_counter() - started
            self._recorder("stop-recording")
        entries = [json.loads(line) for line in self.recording.read_text().splitlines() if line.strip()]
        requests = [(entry["method"], entry["url"]) for entry in entries]
        return Tick(done.returncode, done.stdout, done.stderr, seconds, requests)

    def calls(self) -> list[str]:
        return (self.folder / "calls.log").read_text().splitlines()


FAKE_RAY = f"""#!{sys.executable}
# `ray job ...` as the submitter meets it: no job under the id yet (FAKE_JOB_EXISTS: it exists)
import os, shlex, sys
with open(os.environ["CALL_LOG"], "a") as log:
    log.write(shlex.join(["ray", *sys.argv[1:]]) + "\\n")
verb = " ".join(sys.argv[1:3])
if verb == "job status":
    sys.exit(0 if os.environ.get("FAKE_JOB_EXISTS") else 1)
if verb not in ("job submit", "job logs"):
    sys.exit(f"unexpected ray {{shlex.join(sys.argv[1:])}}")
print("Job submitted" if verb == "job submit" else "the job's log")
"""

FAKE_KUBECTL = """#!/bin/sh
# kubectl as the fallback's pod meets it: no RayJob of this slot, none of the config active
echo "kubectl $*" >> "$CALL_LOG"
case "$*" in
  "get rayjob slot-1-ray") exit 1 ;;
  "get rayjobs -l invariance.io/config=cifar10-sgd -o jsonpath="*) printf 'old-1-ray=Complete\\n' ;;
  "patch --local"*) echo "kind: RayJob" ;;
  "create -f -") cat > /dev/null ;;
  "get rayjob slot-1-ray -o jsonpath="*) echo "Complete/SUCCEEDED" ;;
  "get rayjobs -l invariance.io/config=cifar10-sgd --sort-by="*) printf 'old-1-ray=Complete\\nslot-1-ray=Complete\\n' ;;
  *) echo "unexpected kubectl $*" >&2; exit 9 ;;
esac
"""


class Healthy(BaseHTTPRequestHandler):
    """The head's /api/gcs_healthz, which the submitter waits for."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        body = b"success" if self.path == "/api/gcs_healthz" else b""
        self.send_response(200 if body else 404)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def head() -> Iterator[str]:
    server = ThreadingHTTPServer((LOOPBACK, 0), Healthy)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"{LOOPBACK}:{server.server_address[1]}"  # as KubeRay sets RAY_DASHBOARD_ADDRESS: no scheme
    finally:
        server.shutdown()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """moto with its request recorder; a tiny run with one checkpoint, computed to the end, at the
    manifests' config URL: checkpoints, data, config and output all in s3://lab."""
    from invariance.config import parse_config
    from invariance.engine.execute import execute_in_process
    from invariance.engine.compact import compact
    from invariance.engine.reduce import reduce_plan
    from invariance.engine.steps import Workspace
    from tests.helpers import open_in_process

    folder = tmp_path_factory.mktemp("ticks")
    recording = folder / "moto_recording.jsonl"
    servers = _moto_server({"MOTO_RECORDER_FILEPATH": str(recording)})
    server = next(servers)
    try:
        server.make_bucket("lab")
        config_url = values(submitter_container())["INVARIANCE_CONFIG"]
        lab = Lab(server, recording, folder, config_url)
        for name, text in (("ray", FAKE_RAY), ("kubectl", FAKE_KUBECTL)):
            (folder / "bin").mkdir(exist_ok=True)
            (folder / "bin" / name).write_text(text)
            (folder / "bin" / name).chmod(0o755)
        (folder / "home").mkdir()

        write_checkpoints(folder / "ckpt", epochs=[1])
        write_eval_parquet(folder / "data")
        fs = lab.s3()
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            if path.suffix in (".safetensors", ".parquet"):
                fs.pipe(f"lab/inputs/{path.relative_to(folder)}", path.read_bytes())
        raw = tiny_config(folder, "s3://lab/invariance/cifar10-sgd", seeds=[0],
                          storage_options={"client_kwargs": {"endpoint_url": server.endpoint, "region_name": "us-east-1"}})  # fmt: skip
        raw["pretrained"] = "s3://lab/inputs/ckpt/pretrained.safetensors"
        raw["checkpoints"] = "s3://lab/inputs/ckpt/ft/epoch={epoch}.safetensors"
        raw["data"]["path"] = "s3://lab/inputs/data"
        fs.pipe(config_url.removeprefix("s3://"), yaml.safe_dump(raw).encode())

        with pytest.MonkeyPatch.context() as patch:
            for name, value in {**TEST_CREDENTIALS, "AWS_ENDPOINT_URL": server.endpoint, "AWS_DEFAULT_REGION": "us-east-1"}.items():
                patch.setenv(name, value)  # the helper's Store takes no storage_options
            store, plan, spec = open_in_process(parse_config(raw))
            summary = execute_in_process(plan, spec, Workspace("cpu"))
            assert not summary.failures, summary.failures
            plan.refresh(store)  # a finished run: its compaction and reduce too (either left undone is work for the next tick)
            compact(plan, store)
            reduce_plan(plan, store, make_plots=False)
        yield lab
    finally:
        servers.close()


def new_checkpoint(lab: Lab) -> str:
    key = "lab/inputs/ckpt/ft/epoch=02.safetensors"
    lab.s3().pipe(key, (lab.folder / "ckpt" / "ft" / "epoch=01.safetensors").read_bytes())
    return key


def report(what: str, tick: Tick) -> None:
    print(f"\n{what}: exit {tick.returncode}, {tick.seconds:.1f} s, {len(tick.requests)} S3 requests {tick.counts()}")
    if os.environ.get("TICKS_VERBOSE"):
        print("\n".join(f"  {method} {url.split('?')[0].split('/', 3)[-1]}{' ?' + url.split('?')[1] if '?' in url else ''}"
                        for method, url in tick.requests))


def assert_read_only(tick: Tick) -> None:
    """Nothing written but the plan's probe that the output prefix takes writes (a put and its
    delete) and, once per release of the package, the verdict of its input checks."""
    writes = [(method, url) for method, url in tick.requests if method not in ("GET", "HEAD")]
    allowed = ("/_manifests/write-probe-", "/_manifests/checks/")
    assert all(any(part in url for part in allowed) for _, url in writes), f"a no-op tick wrote to the store: {writes}"


# ---------------------------------------------------------------- the RayCronJob's submitter


def test_the_raycronjob_submitter_skips_a_tick_with_nothing_new(lab: Lab, head: str) -> None:
    """The command rendered from raycronjob.yaml, against a store with nothing new: no run is
    submitted, a no-op job under the RayJob's id is (so the RayJob ends SUCCEEDED), at the cost
    of a plan."""
    container = submitter_container()
    env = lab.env(container, RAY_DASHBOARD_ADDRESS=head, RAY_JOB_SUBMISSION_ID="invariance-cifar10-sgd-29000000-abcde")
    tick = lab.run(script(container), env)
    report("RayCronJob submitter, nothing new", tick)
    assert tick.returncode == 0, tick.stdout + tick.stderr
    assert "nothing new" in tick.stdout and "nothing to compute" in tick.stderr
    submits = [call for call in lab.calls() if call.startswith("ray job submit")]
    assert len(submits) == 1 and "invariance run" not in submits[0], submits
    argv = shlex.split(submits[0])
    assert argv[argv.index("--submission-id") + 1] == "invariance-cifar10-sgd-29000000-abcde"
    assert argv[argv.index("--") + 1] == "echo"
    assert lab.calls()[-1].startswith("ray job logs") and "--follow" in lab.calls()[-1]
    assert 0 < len(tick.requests) <= NO_OP_REQUESTS, tick.counts()
    assert_read_only(tick)


def test_the_raycronjob_submitter_submits_the_entrypoint_when_work_is_left(lab: Lab, head: str) -> None:
    container = submitter_container()
    key = new_checkpoint(lab)
    try:
        env = lab.env(container, RAY_DASHBOARD_ADDRESS=head, RAY_JOB_SUBMISSION_ID="slot-2")
        tick = lab.run(script(container), env)
    finally:
        lab.s3().rm(key)
    report("RayCronJob submitter, one new checkpoint", tick)
    assert tick.returncode == 0, tick.stdout + tick.stderr
    (submit,) = [call for call in lab.calls() if call.startswith("ray job submit")]
    argv = shlex.split(submit)
    template = one_document(KUBERAY / "raycronjob.yaml", "RayCronJob")["spec"]["jobTemplate"]
    assert argv[argv.index("--") + 1 :] == shlex.split(template["entrypoint"]), "the gate submits spec.entrypoint"
    assert argv[argv.index("--submission-id") + 1] == "slot-2"
    assert argv[argv.index("--address") + 1] == f"http://{head}"
    assert json.loads(argv[argv.index("--runtime-env-json") + 1]) == yaml.safe_load(template["runtimeEnvYAML"])


def test_a_retried_submitter_follows_its_job_without_planning(lab: Lab, head: str) -> None:
    container = submitter_container()
    env = lab.env(container, RAY_DASHBOARD_ADDRESS=head, RAY_JOB_SUBMISSION_ID="slot-1", FAKE_JOB_EXISTS="1",
                  INVARIANCE_CONFIG="s3://lab/configs/missing/run.yaml")  # fmt: skip
    tick = lab.run(script(container), env)
    assert tick.returncode == 0, tick.stdout + tick.stderr
    assert [c.split()[:3] for c in lab.calls()] == [["ray", "job", "status"], ["ray", "job", "logs"]]
    assert tick.requests == []


@pytest.mark.parametrize("path", ["raycronjob", "fallback"])
def test_a_gate_that_cannot_plan_fails_the_tick(lab: Lab, head: str, path: str) -> None:
    """A missing config is an error, never a silent skip: the pod fails, no run, no no-op job."""
    container = submitter_container() if path == "raycronjob" else fallback_gate()
    env = lab.env(container, RAY_DASHBOARD_ADDRESS=head, RAY_JOB_SUBMISSION_ID="slot-1",
                  INVARIANCE_CONFIG="s3://lab/configs/missing/run.yaml", GATE_FILE=str(lab.folder / "gate-missing"))  # fmt: skip
    tick = lab.run(script(container), env)
    assert tick.returncode == 2, tick.stdout + tick.stderr
    assert "missing/run.yaml" in tick.stderr
    assert not [call for call in lab.calls() if "submit" in call]


# ---------------------------------------------------------------- the CronJob fallback


def run_fallback(lab: Lab) -> tuple[Tick, Tick, str]:
    """The pod as Kubernetes runs it: the gate (init container), then the kubectl container."""
    gate_file = lab.folder / "gate" / "submission-id"
    gate_file.parent.mkdir(exist_ok=True)
    gate_file.unlink(missing_ok=True)
    gate = lab.run(script(fallback_gate()), lab.env(fallback_gate(), GATE_FILE=str(gate_file)))
    assert gate.returncode == 0, gate.stdout + gate.stderr
    (main,) = fallback_pod()["containers"]
    kubectl = lab.run(script(main), lab.env(main, GATE_FILE=str(gate_file), SLOT_NAME="slot-1", POLL_SECONDS="0"))
    return gate, kubectl, gate_file.read_text()


def test_the_cronjob_fallback_creates_no_rayjob_when_nothing_is_new(lab: Lab) -> None:
    gate, kubectl, answer = run_fallback(lab)
    report("CronJob fallback gate, nothing new", gate)
    assert answer == "" and "nothing to compute" in gate.stderr
    assert kubectl.returncode == 0, kubectl.stdout + kubectl.stderr
    assert "nothing new for cifar10-sgd: no RayJob created" in kubectl.stdout
    assert lab.calls() == ["kubectl get rayjob slot-1-ray"], "only the look for a retried slot's RayJob"
    assert 0 < len(gate.requests) <= NO_OP_REQUESTS and not kubectl.requests
    assert_read_only(gate)


def test_the_cronjob_fallback_creates_the_rayjob_for_new_work(lab: Lab) -> None:
    key = new_checkpoint(lab)
    try:
        gate, kubectl, answer = run_fallback(lab)
    finally:
        lab.s3().rm(key)
    assert answer.startswith("invariance-"), answer
    assert kubectl.returncode == 0, kubectl.stdout + kubectl.stderr
    assert "created RayJob slot-1-ray" in kubectl.stdout
    (patch,) = [call for call in lab.calls() if call.startswith("kubectl patch --local")]
    assert f'"invariance.io/work":"{answer.strip()}"' in patch and '"jobId":"slot-1-ray"' in patch


# ---------------------------------------------------------------- the cron recipe


def test_the_cron_recipe_submits_nothing_when_nothing_is_new(lab: Lab) -> None:
    """The README's crontab line as cron runs it (sh -c), against the same store: `invariance
    submit` plans, says why not and exits 3 before it ever calls the cluster at RAY_ADDRESS."""
    tick = lab.run(["/bin/sh", "-c", cron_recipe()], lab.env())
    report("cron recipe (invariance submit), nothing new", tick)
    assert tick.returncode == 3, tick.stdout + tick.stderr
    assert tick.stdout == "" and "nothing to compute" in tick.stderr and "nothing submitted" in tick.stderr
    assert 0 < len(tick.requests) <= NO_OP_REQUESTS
    assert_read_only(tick)


# ---------------------------------------------------------------- one gate, three paths


def test_every_path_gates_the_config_its_run_computes() -> None:
    """The three gates plan the config that rayjob.yaml's entrypoint runs, with the plan's own
    verdict (exit 3: nothing to submit), and read the store where the run reads it."""
    config = shlex.split(rayjob()["spec"]["entrypoint"])[-1]
    runtime_env = yaml.safe_load(rayjob()["spec"]["runtimeEnvYAML"])["env_vars"]
    for where, container in (("raycronjob.yaml submitter", submitter_container()), ("cronjob-fallback.yaml gate", fallback_gate())):
        env = values(container)
        assert env["INVARIANCE_CONFIG"] == config, where
        assert {k: env[k] for k in runtime_env} == runtime_env, f"{where}: the gate reads another store than the run"
        assert 'invariance plan --submission-id "$INVARIANCE_CONFIG"' in container["args"][0], where
        assert '"$status" -eq 3' in container["args"][0], f"{where}: only exit 3 may skip a tick"
        assert container["image"] == rayjob()["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    assert f"invariance submit {config}" in cron_recipe()
