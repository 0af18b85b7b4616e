"""A scheduled rerun costs its new work (issue 28 item 5): the time of a rerun with one new checkpoint
after N checkpoints already done, split into plan / execute / reduce / report, on a local store and
on S3 (moto behind a counting proxy: the requests of the rerun, by kind), for N in {1, 10, 100, 500}
and a study of 5 runs x 100 epochs. The ratio (rerun at N=500 minus its execute) / (rerun at N=1
minus its execute) is the issue's target: at most 1.5.

The history is made cheaply: the N checkpoint files are copies of one perturbed state (one content
fingerprint); the first checkpoint is computed for real (execute_in_process), its shards and
completion records are then cloned to every other checkpoint's keys (the plan's data_key/record_key;
the shards' epoch/checkpoint/run columns and the records' epoch/checkpoint/run/data fields
rewritten), the history compacted (one file and one record per data folder, as ``invariance run``
leaves every complete folder; ``--raw``: not, as with ``compaction.enabled: false``) and reduced once
(that first reduce is not the rerun's). The S3 store gets a copy of the local history's output
(uploaded straight to the server, not counted). Then one new checkpoint (another perturbation, the
last run's next epoch in a study) is written and the rerun timed on each store, in the order of
``invariance run``: ``make_plan``; ``execute_in_process`` (the new checkpoint's units, for real);
``plan.refresh`` of the new units' folders (counted with the plan); ``compact`` (the new
checkpoint's folders); ``reduce_plan`` less its report; ``write_report``. Before the rerun, one
untimed plan stands for the previous tick: it keeps the checkpoints' content hashes in the
per-user cache (``$XDG_CACHE_HOME``: a folder of the bench's own), so the rerun's plan reads only
the new file, as a scheduled tick does. Tiny ViT (3 layers), seeds [0], no kNN, no interpolation,
torch on 1 thread.

Memory of the reduce: the peak resident set of the process during ``reduce_plan`` (Linux: VmHWM
reset through /proc/self/clear_refs before it, read after), less the resident set before it; the
same for the history's first reduce (everything read and drawn). Falls back to ru_maxrss deltas
(which miss a peak below an earlier one) where clear_refs cannot be written.

    python bench/bench_reruns.py                                   # the issue's sizes (~10-15 min here)
    python bench/bench_reruns.py --sizes 1 10 --study 0 --stores local --json reruns.json
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import platform
import re
import resource
import shutil
import sys
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.helpers, tests.servers

import polars as pl  # noqa: E402
import torch  # noqa: E402
from fsspec.implementations.local import LocalFileSystem  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import invariance.engine.reduce as reduce_module  # noqa: E402
from invariance.config import parse_config  # noqa: E402
from invariance.engine.compact import compact  # noqa: E402
from invariance.engine.execute import execute_in_process  # noqa: E402
from invariance.engine.plan import Plan, make_plan  # noqa: E402
from invariance.io.fingerprint_cache import SETTLED_NS  # noqa: E402
from invariance.engine.reduce import reduce_plan  # noqa: E402
from invariance.engine.steps import RunSpec, Workspace  # noqa: E402
from invariance.io.storage import Store, parquet_bytes  # noqa: E402
from tests.helpers import TINY_MODEL, perturbed, tiny_state, write_eval_parquet  # noqa: E402

TARGET_RATIO = 1.5
SCALE = 0.05  # the perturbation of every checkpoint (history and new): one scale, other noise


@dataclass(frozen=True)
class Case:
    """A history of ``runs`` x ``epochs`` checkpoints (runs > 1: a study, ``{run}`` in the pattern)."""

    epochs: int
    runs: int = 1

    @property
    def name(self) -> str:
        return f"study {self.runs}x{self.epochs}" if self.runs > 1 else f"N={self.epochs}"

    @property
    def slug(self) -> str:
        return f"study{self.runs}x{self.epochs}" if self.runs > 1 else f"n{self.epochs}"

    @property
    def checkpoints(self) -> int:
        return self.runs * self.epochs

    @property
    def run_names(self) -> list[str]:
        return [f"run{r}" for r in range(self.runs)] if self.runs > 1 else [""]


@dataclass
class RerunResult:
    case: str
    store: str  # local | s3
    history: int  # checkpoints already done
    new_units: int  # units the plan found missing (the new checkpoint's)
    computed: int  # units executed
    computed_epochs: list[int]  # the epochs of the units executed
    plan_s: float  # make_plan + plan.refresh after the execute
    execute_s: float
    compact_s: float  # the new checkpoint's folders made one file each (0 with --raw)
    reduce_s: float  # reduce_plan less write_report
    report_s: float
    total_s: float
    figures_written: int  # plots/ keys written by the rerun's reduce
    old_epoch_figures_written: int  # of them, per-epoch figures of old epochs (a flow colour range crossing a step)
    reduce_rss_mib: float  # resident set before the rerun's reduce
    reduce_peak_mib: float  # its peak during the reduce, less the resident set before it
    requests: dict[str, int] = field(default_factory=dict)  # S3 requests of the whole rerun, by kind
    requests_by_phase: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def without_execute_s(self) -> float:
        return self.total_s - self.execute_s


@dataclass
class HistoryResult:
    case: str
    checkpoints: int
    build_s: float  # checkpoint files, the first checkpoint computed, the clones
    first_reduce_s: float
    first_reduce_rss_mib: float
    first_reduce_peak_mib: float
    compact_s: float = 0.0  # the history compacted before its first reduce, as the ticks that made it left it
    upload_s: float = 0.0  # the output copied to S3


# --- memory --------------------------------------------------------------------------------------


def _status_kib(field_name: str) -> int:
    match = re.search(rf"{field_name}:\s+(\d+)", Path("/proc/self/status").read_text())
    return int(match.group(1)) if match else 0


@contextmanager
def peak_memory() -> Iterator[dict[str, float]]:
    """{"rss_mib": resident set before, "peak_mib": peak resident set during, less that, "method"}."""
    out: dict[str, Any] = {}
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
        method = "VmHWM reset"
        before = _status_kib("VmRSS")
    except OSError:
        method = "ru_maxrss delta"
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        yield out
    finally:
        after = _status_kib("VmHWM") if method == "VmHWM reset" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out.update(rss_mib=before / 1024, peak_mib=max(after - before, 0) / 1024, method=method)


def pin_code_fingerprints() -> None:
    """The reducer's ``code_version`` and the plan's ``package_fingerprint`` hash the source files as
    they are on disk when called: an edit of the working tree while the bench runs (other processes
    share it) would rebuild everything at the rerun. Both are taken once, at the start, as a deployed
    tick's code is fixed."""
    import invariance.engine.plan as plan_module

    version, fingerprint = reduce_module.code_version(), plan_module.package_fingerprint()
    reduce_module.code_version = lambda: version
    plan_module.package_fingerprint = lambda: fingerprint


# --- the inputs and the history ------------------------------------------------------------------


def write_inputs(root: Path) -> Path:
    """The pretrained weights and the eval data every case shares; returns the pretrained file."""
    (root / "inputs").mkdir(parents=True, exist_ok=True)
    pretrained = root / "inputs" / "pretrained.safetensors"
    save_file(tiny_state(0), str(pretrained))
    write_eval_parquet(root / "inputs" / "data")
    return pretrained


def checkpoint_path(root: Path, case: Case, run: str, epoch: int) -> Path:
    folder = root / case.slug / "ckpt" / run if run else root / case.slug / "ckpt"
    return folder / f"epoch={epoch:02d}.safetensors"


def run_config(root: Path, case: Case, output: str, storage_options: dict | None = None) -> Any:
    folder = root / case.slug / "ckpt"
    pattern = folder / "{run}" / "epoch={epoch}.safetensors" if case.runs > 1 else folder / "epoch={epoch}.safetensors"
    raw = {
        "output": output,
        "model": TINY_MODEL,
        "pretrained": str(root / "inputs" / "pretrained.safetensors"),
        "checkpoints": str(pattern),
        "data": {"format": "parquet", "path": str(root / "inputs" / "data"), "n_samples": 12},
        "layers": "all",
        "seeds": [0],
        "inversion": {"iterations": 15, "step_size": 0.5},
        "resources": {"num_cpus": 1},
    }
    if storage_options:
        raw["storage_options"] = storage_options
    return parse_config(raw)


def write_checkpoint(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(perturbed(tiny_state(0), SCALE, seed=seed), str(path))
    return path


def _template(unit: Any) -> Any:
    """``unit`` with its checkpoint's identity blanked: the same unit at another checkpoint."""
    return dataclasses.replace(unit, epoch=0, checkpoint="", checkpoint_url="", run="")


def _has_point(unit: Any) -> bool:
    return all(hasattr(unit, name) for name in ("epoch", "checkpoint", "checkpoint_url", "run"))


def compute_first_and_copy(config: Any, store: Store, first: Path, paths: Iterable[Path]) -> None:
    """Compute every unit of ``config`` (only ``first`` exists yet) in process, then copy ``first``
    to every other checkpoint path of the history: ``clone_missing`` then copies its shards."""
    plan = make_plan(config, store)
    execute_in_process(plan, RunSpec.from_plan(config, store, plan), Workspace("cpu"), progress=None)
    for path in paths:
        if path != first:
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(first, path)


def clone_missing(plan: Plan, store: Store) -> int:
    """Write every missing unit's shard and completion record as copies of the done unit it equals
    at another checkpoint (the same content fingerprint), with its own epoch, checkpoint and run.
    Local files are written directly (no fsync): this is setup, not the product's write path."""
    sources = {_template(u): u for u in plan.all_units() if _has_point(u) and plan.is_done(u)}
    cache: dict[Any, tuple[pl.DataFrame, dict]] = {}
    local = isinstance(store.fs, LocalFileSystem)
    count = 0
    for unit in plan.missing():
        source = sources[_template(unit)]
        if source not in cache:
            cache[source] = (pl.read_parquet(io.BytesIO(store.get(plan.data_key(source)))),
                             json.loads(store.get(plan.record_key(source))))  # fmt: skip
        frame, record = cache[source]
        columns = {"epoch": unit.epoch, "checkpoint": unit.checkpoint, "run": unit.run}
        frame = frame.with_columns(pl.lit(value, dtype=frame.schema[name]).alias(name)
                                   for name, value in columns.items() if name in frame.columns)  # fmt: skip
        record = {**record, "epoch": unit.epoch, "checkpoint": unit.checkpoint, "data": plan.data_key(unit)}
        if "run" in record:
            record["run"] = unit.run
        for key, data in ((plan.data_key(unit), parquet_bytes(frame)), (plan.record_key(unit), json.dumps(record, indent=1).encode())):
            if local:
                path = Path(store.path(key))
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
            else:
                store.put(key, data)
        count += 1
    return count


def build_history(root: Path, case: Case, output: str, log, compaction: bool = True) -> HistoryResult:  # noqa: ANN001
    """``case``'s checkpoints done, compacted (as ``invariance run`` leaves every complete folder;
    not with ``compaction`` false) and reduced once, in ``output`` (a local folder)."""
    started = time.perf_counter()
    first = checkpoint_path(root, case, case.run_names[0], 1)
    write_checkpoint(first, seed=1)
    config = run_config(root, case, output)
    store = Store(config.output, config.storage_options)
    compute_first_and_copy(config, store, first, (checkpoint_path(root, case, run, epoch)
                                                  for run in case.run_names for epoch in range(1, case.epochs + 1)))
    plan = make_plan(config, store)
    cloned = clone_missing(plan, store)
    plan.refresh(store)
    assert not plan.missing(), f"{len(plan.missing())} units still missing after cloning"
    build = time.perf_counter() - started
    log(f"  {case.name}: history built in {build:.1f} s ({cloned} units cloned)")
    started = time.perf_counter()
    if compaction:
        summary = compact(plan, store)
        log(f"  {case.name}: {summary.describe()}")
    compacted = time.perf_counter() - started
    log(f"  {case.name}: first reduce ...")
    started = time.perf_counter()
    with peak_memory() as memory:
        reduce_plan(plan, store, settings=config.numbers_settings())
    first_reduce = time.perf_counter() - started
    log(f"  {case.name}: first reduce {first_reduce:.1f} s, peak +{memory['peak_mib']:.0f} MiB")
    # the previous tick's plan: it keeps the checkpoints' content hashes in the per-user cache (only of
    # files unchanged for SETTLED_NS before the read), as an hourly tick finds them
    newest = max(max((status := os.stat(checkpoint_path(root, case, run, epoch))).st_mtime_ns, status.st_ctime_ns)
                 for run in case.run_names for epoch in (1, case.epochs))  # fmt: skip
    time.sleep(max(0.0, (newest + SETTLED_NS - time.time_ns()) / 1e9 + 0.1))
    make_plan(config, store)
    return HistoryResult(case.name, case.checkpoints, build, first_reduce, memory["rss_mib"], memory["peak_mib"], compacted)


# --- the rerun -----------------------------------------------------------------------------------


class ReportTimer:
    """Wraps ``reduce.write_report`` (as the reducer calls it) and adds up its time."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.original = reduce_module.write_report

    def __enter__(self) -> "ReportTimer":
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return self.original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started

        reduce_module.write_report = timed
        return self

    def __exit__(self, *exc: object) -> None:
        reduce_module.write_report = self.original


def rerun(config: Any, case: Case, store_kind: str, new_epoch: int, proxy: Any = None,
          compaction: bool = True) -> RerunResult:  # fmt: skip
    """One scheduled tick in process, timed phase by phase (and its S3 requests counted), in the
    order of ``invariance run``: plan, execute, refresh, compact (with ``compaction``), reduce, report."""
    phases: dict[str, Counter] = {}

    def mark(name: str) -> None:
        if proxy is not None:
            phases[name] = Counter(proxy.counts)
            proxy.reset()

    if proxy is not None:
        proxy.reset()
    store = Store(config.output, config.storage_options)
    started = time.perf_counter()
    plan = make_plan(config, store)
    planned = time.perf_counter()
    mark("plan")
    missing = plan.missing()
    summary = execute_in_process(plan, RunSpec.from_plan(config, store, plan), Workspace("cpu"), progress=None)
    executed = time.perf_counter()
    mark("execute")
    plan.refresh(store, missing)  # as `invariance run`: the executed units' folders listed again
    refreshed = time.perf_counter()
    mark("refresh")
    if compaction:
        compact(plan, store)
    compacted = time.perf_counter()
    mark("compact")
    with ReportTimer() as report, peak_memory() as memory:
        result = reduce_plan(plan, store, settings=config.numbers_settings())
    reduced = time.perf_counter()
    mark("reduce+report")
    new_name = f"epoch={new_epoch}.png"
    figures = [key for key in result.written if key.startswith("plots/")]
    old = [key for key in figures if "epoch=" in key and not key.endswith(new_name)]
    requests: Counter = Counter()
    for counts in phases.values():
        requests.update(counts)
    return RerunResult(
        case=case.name, store=store_kind, history=case.checkpoints, new_units=len(missing), computed=summary.completed,
        computed_epochs=sorted({getattr(u, "epoch", -1) for u in missing}),
        plan_s=(planned - started) + (refreshed - executed), execute_s=executed - planned,
        compact_s=compacted - refreshed, reduce_s=(reduced - compacted) - report.seconds, report_s=report.seconds, total_s=reduced - started,
        figures_written=len(figures), old_epoch_figures_written=len(old),
        reduce_rss_mib=memory["rss_mib"], reduce_peak_mib=memory["peak_mib"],
        requests=dict(requests), requests_by_phase={k: dict(v) for k, v in phases.items()},
    )  # fmt: skip


# --- S3 ------------------------------------------------------------------------------------------


class S3:
    """moto's S3 server on loopback with the counting proxy in front of it (tests/servers.py,
    tests/s3_counting.py); the history is uploaded straight to the server, uncounted."""

    BUCKET = "bench"

    def __init__(self) -> None:
        from tests.s3_counting import CountingProxy
        from tests.servers import _moto_server

        self._server_gen = _moto_server()
        self.server = next(self._server_gen)
        self.server.make_bucket(self.BUCKET)
        self.proxy = CountingProxy(self.server)
        # s3fs's imports and its client (fsspec keeps one per options): once, not in the first rerun timed
        Store(self.url("warm-up"), self.options()).list("")
        self.proxy.reset()

    def upload(self, folder: Path, prefix: str) -> float:
        import fsspec

        started = time.perf_counter()
        fs = fsspec.filesystem("s3", **self.server.fsspec_options())
        files = [p for p in folder.rglob("*") if p.is_file()]
        fs.put([str(p) for p in files], [f"{self.BUCKET}/{prefix}/{p.relative_to(folder).as_posix()}" for p in files])
        return time.perf_counter() - started

    def url(self, prefix: str) -> str:
        return f"s3://{self.BUCKET}/{prefix}"

    def options(self) -> dict:
        return self.proxy.server().fsspec_options()

    def close(self) -> None:
        self.proxy.close()
        self._server_gen.close()


# --- the bench -----------------------------------------------------------------------------------


def run_bench(sizes: Sequence[int], study: tuple[int, int] | None, stores: Sequence[str], root: Path,
              log=print, compaction: bool = True) -> tuple[list[HistoryResult], list[RerunResult]]:  # fmt: skip
    cases = [Case(n) for n in sizes] + ([Case(study[1], study[0])] if study else [])
    pin_code_fingerprints()
    # the checkpoint fingerprints' per-user cache (io/fingerprint_cache.py): the bench's own
    user_cache = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(root / "cache")
    write_inputs(root)
    s3 = S3() if "s3" in stores else None
    histories, reruns = [], []
    try:
        for case in cases:
            log(f"{case.name}: {case.checkpoints} checkpoints done, then one new")
            local_out = root / case.slug / "out"
            histories.append(build_history(root, case, str(local_out), log, compaction))
            if s3 is not None:
                histories[-1].upload_s = s3.upload(local_out, case.slug)
                log(f"  {case.name}: history copied to S3 in {histories[-1].upload_s:.1f} s")
            new_epoch = case.epochs + 1
            write_checkpoint(checkpoint_path(root, case, case.run_names[-1], new_epoch), seed=10_000 + case.checkpoints)
            for kind in stores:
                if kind == "local":
                    config = run_config(root, case, str(local_out))
                    result = rerun(config, case, kind, new_epoch, compaction=compaction)
                else:
                    config = run_config(root, case, s3.url(case.slug), s3.options())
                    result = rerun(config, case, kind, new_epoch, s3.proxy, compaction)
                reruns.append(result)
                log(f"  {case.name} {kind}: rerun {result.total_s:.1f} s (plan {result.plan_s:.2f}, execute "
                    f"{result.execute_s:.1f}, compact {result.compact_s:.2f}, reduce {result.reduce_s:.2f}, report {result.report_s:.2f}), "
                    f"{result.computed} units computed" + (f", requests {result.requests}" if result.requests else ""))  # fmt: skip
    finally:
        if s3 is not None:
            s3.close()
        if user_cache is None:
            os.environ.pop("XDG_CACHE_HOME", None)
        else:
            os.environ["XDG_CACHE_HOME"] = user_cache
    return histories, reruns


def ratios(reruns: Sequence[RerunResult]) -> dict[str, float]:
    """{store: (rerun at the largest N minus its execute) / (rerun at N=1 minus its execute)}, and the
    study's against N=1 (``<store> study``)."""
    out: dict[str, float] = {}
    for kind in dict.fromkeys(r.store for r in reruns):
        plain = [r for r in reruns if r.store == kind and r.case.startswith("N=")]
        base = next((r for r in plain if r.history == 1), None)
        if base is None or len(plain) < 2:
            continue
        largest = max(plain, key=lambda r: r.history)
        out[f"{kind} N={largest.history}"] = largest.without_execute_s / base.without_execute_s
        for study in (r for r in reruns if r.store == kind and r.case.startswith("study")):
            out[f"{kind} {study.case}"] = study.without_execute_s / base.without_execute_s
    return out


def markdown(histories: Sequence[HistoryResult], reruns: Sequence[RerunResult]) -> str:
    kinds = ("GET", "HEAD", "LIST", "PUT")
    lines = ["| history | store | plan | execute | compact | reduce | report | rerun | rerun - execute | units computed "
             "| figures written (old epochs) | reduce peak | S3 requests GET / HEAD / LIST / PUT (other) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in reruns:
        other = sum(v for k, v in r.requests.items() if k not in kinds)
        requests = (" / ".join(str(r.requests.get(k, 0)) for k in kinds) + (f" ({other})" if other else "")) if r.store == "s3" else "-"
        lines.append(f"| {r.case} | {r.store} | {r.plan_s:.2f} s | {r.execute_s:.1f} s | {r.compact_s:.2f} s | {r.reduce_s:.2f} s | {r.report_s:.2f} s "
                     f"| {r.total_s:.1f} s | {r.without_execute_s:.2f} s | {r.computed} of epoch {r.computed_epochs} "
                     f"| {r.figures_written} ({r.old_epoch_figures_written}) | +{r.reduce_peak_mib:.0f} MiB "
                     f"| {requests} |")  # fmt: skip
    lines += ["", "| history | build (untimed setup) | its compaction | first reduce (everything) | its peak | S3 upload |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for h in histories:
        lines.append(f"| {h.case} | {h.build_s:.1f} s | {h.compact_s:.1f} s | {h.first_reduce_s:.1f} s | +{h.first_reduce_peak_mib:.0f} MiB "
                     f"(from {h.first_reduce_rss_mib:.0f}) | {h.upload_s:.1f} s |")  # fmt: skip
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 10, 100, 500], help="checkpoints done before the rerun")
    parser.add_argument("--study", type=int, nargs=2, default=[5, 100], metavar=("RUNS", "EPOCHS"),
                        help="a study of RUNS x EPOCHS checkpoints ({run} in the pattern); 0 0: none")  # fmt: skip
    parser.add_argument("--stores", nargs="+", choices=["local", "s3"], default=["local", "s3"])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--keep", type=Path, help="build under this folder and keep it (default: a temporary one)")
    parser.add_argument("--raw", action="store_true",
                        help="no compaction (an output of compaction.enabled: false): raw shards and one record each")  # fmt: skip
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    study = tuple(args.study) if args.study[0] > 1 and args.study[1] > 0 else None
    print(f"# reruns with one new checkpoint: {platform.processor() or platform.machine()}, torch threads "
          f"{torch.get_num_threads()}, Python {platform.python_version()}", flush=True)  # fmt: skip
    started = time.perf_counter()

    def log(line: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {line}", flush=True)

    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        histories, reruns = run_bench(args.sizes, study, args.stores, args.keep, log, not args.raw)
    else:
        with tempfile.TemporaryDirectory(prefix="bench_reruns_") as folder:
            histories, reruns = run_bench(args.sizes, study, args.stores, Path(folder), log, not args.raw)
    print()
    print(markdown(histories, reruns))
    found = ratios(reruns)
    print()
    for name, value in found.items():
        verdict = "" if "study" in name else (" (target <= 1.5: met)" if value <= TARGET_RATIO else " (target <= 1.5: NOT met)")
        print(f"ratio (rerun - execute) {name} / N=1: {value:.2f}{verdict}")
    memory_method = "VmHWM reset" if Path("/proc/self/clear_refs").exists() else "ru_maxrss delta"
    print(f"reduce peak: resident set ({memory_method}) during reduce_plan, less the resident set before it")
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"histories": [asdict(h) for h in histories], "reruns": [asdict(r) for r in reruns],
                                         "ratios": found, "target": TARGET_RATIO}, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
