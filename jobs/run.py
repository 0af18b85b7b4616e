"""The run, plan and reduce jobs: read a config, plan, execute on Ray, reduce."""

from __future__ import annotations

import json
import math
import os
import secrets
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import polars as pl
import ray

from invariance.config import RunConfig, load_config, settings_hash
from invariance.analysis.report import epoch_span
from invariance.core.cost import cpu_throughput, duration, inversion_flops
from invariance.engine.compact import compact, compaction_pending
from invariance.engine.lease import RunLease
from invariance.core.models import FeatureModel, describe_layers, load_model
from invariance.engine.plan import Plan, check_output_location, make_plan
from invariance.engine.reduce import ReduceResult, reduce_is_stale, reduce_plan
from invariance.io.layout import REPORT, InversionUnit
from invariance.measures.stir import inversion_layers
from invariance.engine.steps import RunSpec
from invariance.io.storage import Store, redact, same_location
from invariance.engine.execute import ExecuteSummary
from invariance.errors import CheckpointError, ConfigError, DataError, StorageError
from invariance.io.paths import ResolvedPaths, config_folder, resolve_paths
from jobs.errors import RayStartError
from jobs.signals import terminate_on_sigterm
from jobs.execute import execute


# this project's top-level packages, each with a file only it has: a folder of the same name in the
# working directory is either a checkout of this project (a deliberate override, cluster/README.md)
# or something else that Ray's workers would import in its place
OUR_PACKAGES = {"invariance": "engine/steps.py", "jobs": "execute.py"}


def check_working_directory(folder: Path | None = None) -> None:
    """ConfigError when ``folder`` (the working directory) holds a Python package named like one of
    ours that is not a copy of it: Ray puts the driver's working directory (and a submitted
    --working-dir) first on its workers' import path, so every task would import that package
    and fail (``cannot import name '__version__' from 'invariance'``)."""
    folder = folder or Path.cwd()
    for name, marker in OUR_PACKAGES.items():
        found = folder / name
        if (found / "__init__.py").is_file() and not (found / marker).is_file():
            raise ConfigError(
                f"the working directory {folder} holds a Python package '{name}/' that is not this project's: "
                f"Ray puts the working directory first on its workers' import path, so every task would import "
                f"it in place of the installed {name}; rename that folder, or run (or `ray job submit "
                "--working-dir`) from a folder without it"
            )


def connect_ray(num_cpus: int | None = None) -> None:
    """Join the cluster named by RAY_ADDRESS (as under `ray job submit`), else start a local Ray."""
    if ray.is_initialized():
        return
    check_working_directory()
    address = os.environ.get("RAY_ADDRESS")
    if address:
        try:
            ray.init(address=address, log_to_driver=True)
        except (ConnectionError, RuntimeError, ValueError) as exc:  # Ray's own errors for a cluster it cannot join
            raise StorageError(f"RAY_ADDRESS={redact(address)}: cannot join the Ray cluster there "
                               f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); check the "
                               "address (under `ray job submit` Ray sets it) or unset it to start a local Ray") from None
    else:
        local_ray_auth()
        for attempt in (1, 2):  # Ray waits 30 s for its raylet: a busy machine can miss that once
            try:
                ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True,
                         _node_ip_address="127.0.0.1")  # fmt: skip
                break
            except Exception as exc:  # noqa: BLE001 - Ray raises bare Exceptions when its processes do not come up
                ray.shutdown()
                if attempt == 2:
                    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                    raise RayStartError(
                        f"the local Ray did not start, twice ({first}); the machine may be too busy or short of "
                        "memory: check `free -g` and `df -h /dev/shm`, stop a stale Ray (`ray stop`), retry when "
                        "the machine is quieter, or run on a cluster (set RAY_ADDRESS)"
                    ) from None
    terminate_on_sigterm()  # ray.init installed its own handler (sys.exit) in place of ours


def local_ray_auth() -> None:
    """Token auth for a Ray of our own (on 127.0.0.1 only), without a token file: Ray's default for a
    new local Ray writes ~/.ray/auth_token, after which every `ray start --head` on the machine turns
    token auth on by itself (and its workers and `ray job submit` fail without the token). A token
    of this process's own in RAY_AUTH_TOKEN (inherited by the Ray it starts) writes no file. A token
    the user set (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH) or RAY_AUTH_MODE is kept."""
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    if os.environ["RAY_AUTH_MODE"] == "token" and not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)


def load_run_config(config: RunConfig | str) -> tuple[RunConfig, ResolvedPaths]:
    """The validated config with every relative path made absolute, on the driver: against the
    config file's folder when ``config`` is a path or URL, else the working directory."""
    if isinstance(config, RunConfig):
        return resolve_paths(config)
    folder = config_folder(str(config))
    loaded = load_config(config)
    importable(folder, loaded)
    return resolve_paths(loaded, folder)


def importable(folder: str, config: RunConfig) -> None:
    """Make the user's modules beside a local config importable: a module the config names (a
    ``measures: [{function: "lab_measures:rsa"}]``, a ``model.factory``) that is not importable
    otherwise and lies in the config's folder. The folder is appended to this process's path and to
    PYTHONPATH, which a local Ray's workers inherit; nothing else of the folder is made importable
    (a folder is not put before installed packages for its own sake). On a cluster,
    ``ray job submit --working-dir`` puts the submitted folder on every worker's path."""
    import importlib.util

    if "://" in folder and not folder.startswith("file://"):
        return
    path = os.path.abspath(folder.removeprefix("file://"))
    specs = [entry["function"] for entry in config.measures if isinstance(entry, dict) and isinstance(entry.get("function"), str)]
    specs += [model.factory for model in (config.model, config.finetuned_model) if model is not None and model.factory]
    wanted = {spec.partition(":")[0].split(".")[0] for spec in specs}
    beside = {name for name in wanted if os.path.isfile(os.path.join(path, f"{name}.py"))
              or os.path.isdir(os.path.join(path, name))}  # fmt: skip
    missing = {name for name in beside if importlib.util.find_spec(name) is None}
    if not missing or path in sys.path:
        return
    sys.path.append(path)
    os.environ["PYTHONPATH"] = os.pathsep.join([*filter(None, [os.environ.get("PYTHONPATH", "")]), path])


def check_cluster_output(config: RunConfig, paths: ResolvedPaths) -> None:
    """ConfigError for a relative ``output`` that resolved to a local folder while RAY_ADDRESS is
    set: under `ray job submit --working-dir` the config's folder is a new unpack folder on every
    submission, so results would land there, unseen by the next one (and each node writes its
    own disk). A relative output beside a config at a URL resolved to that URL's folder: fine."""
    if "output" not in paths.relative or not os.environ.get("RAY_ADDRESS"):
        return
    if same_location(config.output, config.storage_options)[0] != "file":
        return
    raise ConfigError(
        f"output: {paths.relative['output']!r} is a relative path and RAY_ADDRESS is set (a Ray cluster): it "
        f"would resolve to {redact(config.output)}, inside the job's working directory, which Ray unpacks "
        "anew for every submission; give a URL every node can reach (s3://bucket/prefix) or an absolute "
        "path on shared storage"
    )


def open_run(config: RunConfig | str, computes: bool = False) -> tuple[RunConfig, Store, Plan, RunSpec]:
    """Load and validate the config, resolve its relative paths, check the output is writable (a
    named error for a wrong URL, bucket or credentials, before anything else; the check leaves
    nothing behind), and plan (which reads the eval images once: their fingerprint keys the
    results). A path error says how relative paths were resolved. ``computes``: for `run`,
    which refuses a relative local output on a cluster (``check_cluster_output``)."""
    config, paths = load_run_config(config)
    if computes:
        check_cluster_output(config, paths)
    try:
        check_output_location(config)  # before the write probe lands inside a data or checkpoint folder
        store = Store(config.output, dict(config.storage_options))
        store.check_writable()
        # a dataset that cannot be read fails here, before any task starts
        plan = make_plan(config, store)
    except (CheckpointError, DataError, StorageError) as error:
        if not paths.note():
            raise
        raise type(error)(f"{error} {paths.note()}") from error
    spec = RunSpec.from_plan(config, store, plan)
    return config, store, plan, spec


def plural(count: int, noun: str) -> str:
    """``1 checkpoint``, ``3 checkpoints``."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def epoch_list(epochs: list[int]) -> str:
    """``1..4`` for consecutive epochs, else ``1, 3, 8``."""
    if len(epochs) > 2 and epochs == list(range(epochs[0], epochs[-1] + 1)):
        return f"{epochs[0]}..{epochs[-1]}"
    return ", ".join(str(epoch) for epoch in epochs)


def describe_runs(plan: Plan) -> str:
    """A study's runs, one line each: its epochs and how many of its checkpoints are complete."""
    incomplete = plan.incomplete_checkpoints()
    lines = [f"  {plural(len(plan.runs), 'run')} (one set of pretrained inversions for all):"]
    for run, epochs in plan.runs.items():
        done = sum((run, epoch) not in incomplete for epoch in epochs)
        lines.append(f"    {run}: epochs {epoch_list(epochs)} ({done}/{plural(len(epochs), 'checkpoint')} complete)")
    return "\n".join(lines) + "\n"


def unit_counts(plan: Plan) -> dict[tuple[str, str], list[int]]:
    """{(kind of unit, word for done): [done, total]} in the order of the plan's measures."""
    counts: dict[tuple[str, str], list[int]] = {}
    for unit in plan.all_units():
        count = counts.setdefault(plan.measure(unit).unit_kind(unit), [0, 0])
        count[0] += plan.is_done(unit)
        count[1] += 1
    return counts


def describe_plan(plan: Plan, out: TextIO | None = None) -> None:
    n_missing = len(plan.missing())
    lines = "".join(f"  {label + ':':<12} {done}/{total} {verb}\n" for (label, verb), (done, total) in unit_counts(plan).items())
    print(
        f"settings {plan.settings_hash}: {plural(len(plan.checkpoints), 'checkpoint')} "
        f"({epoch_span([c.epoch for c in plan.checkpoints])}), layers {plan.layers}\n"
        + (describe_runs(plan) if plan.is_study else "") +
        f"  layers of the model: {describe_layers(plan.layer_names)}\n"
        f"  measures:    {', '.join(measure.name for measure in plan.measures)}\n"
        + lines +
        f"  to compute:  {plural(n_missing, 'unit')} (a unit: one pretrained inversion, or one shard of a measure)",
        file=out or sys.stdout,  # looked up when called: a redirected stdout is honoured
    )


def inversion_cache_note(config: RunConfig, plan: Plan) -> str | None:
    """A line when a worker's X' cache (resources.inversion_cache_gb) cannot hold every pretrained
    X' of the plan (float32 on the host): each checkpoint then reads the rest again."""
    size = config.data.image_size or plan.input_size
    each = config.data.n_samples * 3 * size * size * 4
    inversions = [unit for unit in plan.all_units() if isinstance(unit, InversionUnit)]
    total = each * len(inversions)
    held = config.resources.inversion_cache_gb * 1024**3
    if total <= held or len(plan.checkpoints) < 2:
        return None
    return (f"  X' cache: the {len(inversions)} pretrained X' take {total / 1024**3:.1f} GiB, a worker keeps "
            f"{config.resources.inversion_cache_gb:g} GiB of them (resources.inversion_cache_gb): the rest are read "
            f"again for each checkpoint; set it to {math.ceil(total / 1024**3 * 1.05)} (host memory per worker) to "
            "read each once")


def _inversion_flops_per_layer(config: RunConfig, plan: Plan) -> tuple[FeatureModel, dict[int, int]]:
    """The model (random weights: only its shapes count) and {layer: FLOPs of one inversion there}."""
    model = load_model(config.model, None, modules=config.layer_modules)
    per_layer = {
        layer: inversion_flops(model, layer, config.data.n_samples, config.inversion.iterations, config.token_policy,
                               config.data.image_size)  # the size the run feeds the model (a CNN at 32 px, not 224)
        for layer in plan.layers
    }
    return model, per_layer


def estimate_cost(config: RunConfig, plan: Plan) -> tuple[float, int]:
    """(inversion TFLOPs still to do, inversions still to do), measured on the model's layers."""
    _, per_layer = _inversion_flops_per_layer(config, plan)
    todo = inversion_layers(plan.missing())
    return sum(per_layer[layer] for layer in todo) / 1e12, len(todo)


def cpu_workload(config: RunConfig, layer: int, input_size: int) -> str:
    """What the CPU throughput is timed on, as its cache key names it: the model and its input
    (``data.image_size``, else the model's ``input_size``)."""
    model = settings_hash({"model": config.model.model_dump(mode="json"), "modules": config.layer_modules})[:10]
    size = config.data.image_size or input_size
    return (f"{config.model.arch} ({model}) at {size} px, layer {layer}, {config.token_policy}, "
            f"batch {min(config.data.n_samples, CPU_TIMING_BATCH)}")  # fmt: skip


CPU_TIMING_BATCH = 16  # images per timed step: the throughput of small batches is not a run's


def cpu_time_estimate(config: RunConfig, model: FeatureModel, layer: int, tflop: float, inversions: int,
                      cache: Path | None = None) -> str:  # fmt: skip
    """The line `plan` prints for CPU workers: the wall time of ``tflop`` of inversions on this
    machine's CPUs, at this CPU's throughput for the model (timed once, cached), as many tasks
    at once as the local Ray runs (CPUs / resources.num_cpus, at most one per inversion)."""
    threads = max(1, int(config.resources.num_cpus))
    measured = cpu_throughput(model, layer, cpu_workload(config, layer, model.input_size), threads=threads,
                              batch=min(config.data.n_samples, CPU_TIMING_BATCH), token_policy=config.token_policy,
                              image_size=config.data.image_size, cache=cache)  # fmt: skip
    cpus = os.cpu_count() or 1
    at_once = max(1, min(inversions, int(cpus // config.resources.num_cpus)))
    task_seconds = tflop * 1e3 / measured.gflops
    where = ("on this machine" if not os.environ.get("RAY_ADDRESS")
             else "if the workers' CPUs are like this machine's (RAY_ADDRESS is set: a cluster runs more at once)")
    return (f"  time, an estimate: ~{duration(task_seconds / at_once)} of inversions on CPU {where} "
            f"({at_once} task{'s' if at_once > 1 else ''} at once on {cpus} CPUs, resources.num_cpus "
            f"{config.resources.num_cpus:g}; {duration(task_seconds)} of one task at {measured.gflops:.3g} GFLOP/s, "
            f"{measured.describe()})")


@dataclass
class RunResult:
    plan: Plan
    execution: ExecuteSummary
    reduced: ReduceResult


def _merge(total: ExecuteSummary, part: ExecuteSummary) -> None:
    total.submitted += part.submitted
    total.completed += part.completed
    total.failures += part.failures
    total.seconds += part.seconds
    if total.first_task_seconds is None:
        total.first_task_seconds = part.first_task_seconds
    if part.stopped_early:
        total.stop(part.stop_reason)


def run(config: RunConfig | str, progress: bool = True, num_cpus: int | None = None,
        started: float | None = None) -> RunResult | None:  # fmt: skip
    """`invariance run`: compute every missing shard, then reduce. Idempotent.

    Returns None, computing nothing, when another run of the same settings holds the lease.
    With nothing to compute, Ray is not started: plan, reduce (if anything changed), done. A
    shard the reduce finds unreadable is missing again and recomputed once, here. ``started``:
    when the command began (time.time(); default: now): the time to the first task and the
    whole run's are printed from it.
    """
    started = time.time() if started is None else started
    config, store, plan, spec = open_run(config, computes=True)
    describe_plan(plan)
    if plan.missing_keys and (note := inversion_cache_note(config, plan)):
        print(note)
    lease = RunLease(store, plan.settings_hash)
    other = lease.acquire()
    if other is not None:
        print(f"another run of these settings is in progress: {other.describe()}; nothing to do here")
        return None
    execution = ExecuteSummary()
    try:
        # planned before the lease was ours: a run that finished meanwhile may have done some of it
        plan.refresh(store)
        for attempt in range(2):
            if plan.missing_keys:
                submitted = plan.missing()
                connect_ray(num_cpus)
                _merge(execution, execute(plan, spec, progress=progress, lease_lost=lambda: lease.lost,
                                          can_grow=bool(os.environ.get("RAY_ADDRESS")),
                                          run_started=started if execution.first_task_seconds is None else None))  # fmt: skip
                # under the lease only this execution wrote: its units' folders listed again, not the output
                plan.refresh(store, submitted)
            if lease.lost:  # the run that holds the lease now reduces; an older view must not overwrite it
                print("lost the run lease: reduced/ is left to the run that holds it", file=sys.stderr)
                reduced = ReduceResult(pl.DataFrame(), [], plan.incomplete_epochs())
                break
            if config.compaction.enabled:  # under the lease: one compaction of a prefix at a time
                compacted = compact(plan, store, keep_raw=config.compaction.keep_raw, progress=print,
                                    stop=lambda: lease.lost)  # fmt: skip
                if compacted.groups or compacted.removed:
                    print(compacted.describe())
            reduced = reduce_plan(plan, store, settings=config.numbers_settings(), compare_epochs=config.compare_epochs)
            if not reduced.unreadable or attempt or execution.stopped_early:
                break
            print(f"{len(reduced.unreadable)} shards were unreadable: recomputing them", file=sys.stderr)
    finally:
        lease.release()
    print(
        f"computed {execution.completed}/{plural(execution.submitted, 'unit')} in {execution.seconds:.1f}s, "
        f"{len(execution.failures)} failed; reduced {plural(len(reduced.complete_checkpoints or reduced.complete_epochs), 'complete checkpoint')} "
        f"-> {store.url('reduced/')}; report: {store.url(REPORT)}"
    )
    if execution.first_task_seconds is not None:
        when = f" (the first task submitted {execution.first_task_seconds:.1f} s after the start)"
    else:
        when = "" if execution.submitted else " (no task submitted: nothing to compute)"
    print(f"done in {time.time() - started:.1f} s{when}")
    print_incomplete(plan, reduced)
    for unit, message in execution.failures[:20]:
        print(f"  failed {unit}: {redact(message)}", file=sys.stderr)
    return RunResult(plan, execution, reduced)


def print_incomplete(plan: Plan, reduced: ReduceResult) -> None:
    """The robustness search's summary (where finetuning metrics gave one), the checkpoints left
    incomplete, with their missing shards (a study's by run), the weight-path points left out of
    the tables and the measures' units still to compute."""
    if reduced.robustness_summary:
        print(reduced.robustness_summary)
    if plan.incomplete_measures():
        print(f"measures with units still to compute (reduced as they come): {plan.incomplete_measures()}")
    if reduced.incomplete_path_points:
        print(f"weight-path points left out until computed (point: missing shards): {reduced.incomplete_path_points}")
    if not reduced.incomplete_epochs:
        return
    if plan.is_study:
        listed = {f"{run}/{epoch}": count for (run, epoch), count in sorted(plan.incomplete_checkpoints().items())}
        print(f"incomplete checkpoints (run/epoch: missing shards): {listed}")
    else:
        print(f"incomplete checkpoints (epoch: missing shards): {reduced.incomplete_epochs}")


def submission_id(plan: Plan) -> str:
    """A Ray job submission id for the work ``plan`` has left: its settings and missing units.

    `ray job submit --submission-id` refuses a second job with the same id. New checkpoints or
    seeds, or a failed run that got some of the work done, leave other units missing: a new id.
    """
    return f"invariance-{plan.settings_hash}-{settings_hash({'missing': plan.missing_keys})[:10]}"


def next_submission(config: RunConfig | str) -> tuple[str | None, str]:
    """For a scheduler: (submission id, why) when there is work to submit, else (None, why not):
    nothing is missing, or a run of these settings holds the lease."""
    config, store, plan, _ = open_run(config)
    missing = len(plan.missing_keys)
    if not missing:
        stale = reduce_is_stale(plan, store)  # every shard done, but a run stopped before its reduce
        uncompacted = compaction_pending(plan) if config.compaction.enabled else []  # an older output's
        if stale is None and not uncompacted:
            return None, "nothing to compute: every shard of every checkpoint is done"
        holder = RunLease(store, plan.settings_hash).current()
        if holder is not None:
            return None, f"a run of these settings is in progress: {holder.describe()}"
        if stale is not None:
            return f"invariance-{plan.settings_hash}-reduce-{stale[:10]}", "every shard is done, but reduced/ is not up to date"
        return (f"invariance-{plan.settings_hash}-compact-{settings_hash({'folders': uncompacted})[:10]}",
                f"every shard is done; {plural(len(uncompacted), 'folder')} of complete shards to compact")  # fmt: skip
    holder = RunLease(store, plan.settings_hash).current()
    if holder is not None:
        return None, f"a run of these settings is in progress: {holder.describe()}"
    return submission_id(plan), f"{missing} units to compute"


@dataclass
class Submission:
    """What `invariance submit` did: ``submitted`` (a new job), or not, and why."""

    submitted: bool
    submission_id: str | None
    why: str
    failed: bool = False  # the job of this id ended without computing anything: a person must look


def submit(config: str, runtime_env: dict | None = None) -> Submission:
    """For a scheduler: plan ``config`` and, when work is left and no run of its settings is live,
    submit `invariance run CONFIG` to the Ray cluster at RAY_ADDRESS (its dashboard URL) under
    the submission id of the work left. Ray refuses a second job with the same id: a tick that
    races another tick (or finds the job submitted and still starting) is told so, not failed."""
    from ray.job_submission import JobSubmissionClient

    address = os.environ.get("RAY_ADDRESS")
    if not address:
        raise ConfigError("RAY_ADDRESS: set it to the cluster's dashboard URL (http://<head>:8265) to submit a run")
    identifier, why = next_submission(config)
    if identifier is None:
        return Submission(False, None, why)
    for attempt in range(3):  # a busy head can miss one connection check
        try:
            client = JobSubmissionClient(address)
            break
        except Exception as exc:  # noqa: BLE001 - connection, auth and version errors of the job API
            if attempt < 2 and "Authentication" not in str(exc):
                time.sleep(5)
                continue
            raise StorageError(f"RAY_ADDRESS={redact(address)}: the job API does not answer ({type(exc).__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else ''}); with token auth export "
                               "RAY_AUTH_MODE=token and the cluster's RAY_AUTH_TOKEN") from None  # fmt: skip
    try:
        existing = client.get_job_info(identifier)
    except Exception:  # noqa: BLE001 - RuntimeError "does not exist" for a new id
        existing = None
    if existing is not None:
        status = str(getattr(existing.status, "value", existing.status))
        if status in ("FAILED", "STOPPED"):  # it computed nothing (else the work left, and the id, would differ)
            return Submission(False, identifier, f"job {identifier} ended {status} without finishing a shard and "
                              f"left the same work: see `ray job logs {identifier}`, fix the cause, then "
                              f"`ray job delete {identifier}` and submit again", failed=True)  # fmt: skip
        return Submission(False, identifier, f"job {identifier} is already submitted ({status})")
    try:
        client.submit_job(entrypoint=f"invariance run {shlex.quote(config)} --no-progress", submission_id=identifier,
                          runtime_env=runtime_env)  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - Ray's RuntimeError carries the server's message
        if "already exists" in str(exc):  # another tick submitted it between our look and our submit
            return Submission(False, identifier, f"job {identifier} is already submitted (by another tick)")
        raise StorageError(f"RAY_ADDRESS={redact(address)}: the job was not submitted ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''})") from None  # fmt: skip
    return Submission(True, identifier, why)


def local_gpu_name() -> str | None:
    """The name of this machine's first CUDA device (the one bench_throughput.py records), or None."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


# bench/bench_throughput.py --device cuda --record writes a device's measured inversion TFLOP/s here
# (package data: installed copies and the image read the figures the repository recorded)
THROUGHPUT_TABLE = Path(__file__).resolve().parent.parent / "invariance" / "core" / "throughput.json"
GUESSED_TFLOPS = 200.0  # achieved bf16 on an A100/H100-class GPU, not measured
GUESSED_GPU = "an A100/H100-class GPU in bf16, not measured"


def inversion_throughput(device_name: str | None, table: Path = THROUGHPUT_TABLE) -> tuple[float, str]:
    """(TFLOP/s, how it is known): the figure throughput.json records for ``device_name`` (a CUDA
    device's name, as torch reports it), else GUESSED_TFLOPS, said to be a guess (naming the
    devices that have a figure)."""
    try:
        devices = json.loads(table.read_text()).get("devices", {})
    except (OSError, ValueError):
        devices = {}
    if device_name and device_name in devices:
        entry = devices[device_name]
        return float(entry["tflops"]), f"measured on {device_name} ({entry.get('measured', 'undated')}, {table.name})"
    where = f"for {device_name}" if device_name else "(no GPU here to look up: name the workers' with --gpu)"
    known = f"; measured: {', '.join(sorted(devices))}" if devices else ""
    return GUESSED_TFLOPS, f"a guess: no throughput measured {where} in {table.name}{known}"


def gpu_time_estimate(tflop: float, gpu: str | None) -> str:
    """The wall time of ``tflop`` of inversions on one GPU (``gpu``: as torch names it): at the
    throughput throughput.json records for it, else GUESSED_TFLOPS, said to be a guess."""
    throughput, source = inversion_throughput(gpu)
    seconds = tflop / throughput
    assumed = gpu or GUESSED_GPU
    return (f"~{duration(seconds)} of inversions on one GPU ({seconds / 3600:.2g} GPU-hours at {throughput:g} TFLOP/s, "
            f"{source}; the GPU assumed: {assumed})")


def plan_only(config: RunConfig | str, with_cost: bool = True, gpu: str | None = None) -> Plan:
    """`invariance plan`: what is done, what is missing, and an estimate of the cost: inversion
    FLOPs and their wall time, on GPUs (resources.num_gpus > 0 or ``gpu`` named: the workers'
    CUDA device, else this machine's) at a recorded or assumed throughput, on CPUs at this CPU's
    throughput (timed once, cached)."""
    config, _, plan, _ = open_run(config)
    describe_plan(plan)
    if note := inversion_cache_note(config, plan):
        print(note)
    if with_cost:
        began = time.time()
        model, per_layer = _inversion_flops_per_layer(config, plan)
        todo = inversion_layers(plan.missing())
        tflop = sum(per_layer[layer] for layer in todo) / 1e12
        flop = f"{tflop:,.1f} TFLOP" if tflop >= 1 else f"{tflop * 1e3:,.2f} GFLOP"
        print(f"  cost: {plural(len(todo), 'inversion')}, {flop} (the inversions only: evaluations "
              f"and the other measures add less; counted in {time.time() - began:.1f}s)")  # fmt: skip
        if not todo:
            return plan
        if config.resources.num_gpus > 0 or gpu:
            print(f"  time, an estimate: {gpu_time_estimate(tflop, gpu or local_gpu_name())}")
        else:  # CPU workers (Ray gives a task without num_gpus no GPU, even on a machine with one)
            print(cpu_time_estimate(config, model, max(todo), tflop, len(todo)))
            print(f"  on GPUs (resources.num_gpus > 0): {gpu_time_estimate(tflop, local_gpu_name())}")
    return plan


def reduce_only(config: RunConfig | str) -> ReduceResult | None:
    """`invariance reduce`: rebuild the reduced tables and plots from what is complete.

    Holds the run lease while it reduces: while a run of these settings is live, it writes
    nothing (that run's view is newer) and returns None."""
    config, store, plan, _ = open_run(config)
    lease = RunLease(store, plan.settings_hash)
    lease.holder = f"reduce-{lease.holder}"  # what a run starting meanwhile reports
    other = lease.acquire()
    if other is not None:
        print(f"a run of these settings is in progress: {other.describe()}; reduce wrote nothing "
              "(that run rebuilds reduced/ when it finishes)", file=sys.stderr)  # fmt: skip
        return None
    try:
        plan.refresh(store)
        result = reduce_plan(plan, store, settings=config.numbers_settings(), compare_epochs=config.compare_epochs)
    finally:
        lease.release()
    print(f"reduced {plural(len(result.complete_checkpoints), 'complete checkpoint')} -> {store.url('reduced/')}; "
          f"report: {store.url(REPORT)}")  # fmt: skip
    print_incomplete(plan, result)
    if result.unreadable:
        print(f"{len(result.unreadable)} unreadable shards are missing again: the next run recomputes them")
    return result
