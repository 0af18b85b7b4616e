"""Storage at production scale (issue 30 item 5): what a scheduled tick, the reduce and a Polars recipe
cost in files, bytes, requests and seconds over an output of ~40,000 shards, before and after
compaction.

The output is production-shaped: 5 runs x 100 epochs of a 13-layer model (a tiny ViT of depth 12:
blocks 0..11 and the pre-logits), 3 seeds: per checkpoint 78 STIR shards (2 reference models x 13
layers x 3 seeds, 26 rows each: 2 target models x 13 layers), 1 CKA and 1 subspace shard: 40,000
shards and as many completion records, in the real layout (``Plan.data_key`` / ``record_key``) with
the real schemas. It is made as bench_reruns.py makes its history: the checkpoint files are copies of
one perturbed state (one content fingerprint); the first checkpoint is computed for real
(``execute_in_process``: 2 inversion steps, 8 images), its shards and records are cloned to every other
checkpoint's keys (epoch / checkpoint / run rewritten), and the history is reduced once (setup).
Then, on each store:

- (a) a no-op tick: ``jobs.run.next_submission`` (the gate of ``invariance plan --submission-id``),
  and ``jobs.run.run`` with nothing new (no Ray: nothing to execute);
- (b) a one-new-checkpoint tick: a new checkpoint in the last run, the gate, then ``jobs.run.run``
  (Ray replaced by ``execute_in_process``: the new checkpoint's 80 units computed here);
- (c) the reduce: ``jobs.run.reduce_only`` (``invariance reduce``) after removing
  ``reduced/index.json``, so every shard is read (what a new release or a lost index costs);
- (d) a recipe: the raw-STIR recipe of docs/recipes.md ("Raw STIR rows, lazily", every epoch of
  every run), and the one-checkpoint recipe ("Raw STIR rows of one checkpoint");

each BEFORE and AFTER compaction (``invariance.engine.compact.compact`` called once between them;
the "before" phases run with ``compaction: false`` so that the tick leaves its new shards raw, the
"after" phases with the default). Stores: a local folder, and moto's S3 server on 127.0.0.1 behind
the counting proxy of tests/s3_counting.py (the history is loaded into the server's memory directly,
uncounted; the checkpoints, pretrained weights and eval data stay local, as in bench_reruns.py: a
production tick adds the checkpoint listing). Figures are not storage: they are replaced by a
1-pixel PNG (``--draw-figures`` draws them), their keys, writes and the index stay real.

    python bench/bench_storage.py                                   # 5 x 100, local and S3 (~40 min here)
    python bench/bench_storage.py --runs 2 --epochs 3 --layers 2 --stores local --json storage.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.servers, tests.s3_counting, tests.helpers
sys.path.insert(0, str(ROOT / "bench"))  # bench_reruns

import polars as pl  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import invariance.engine.reduce as reduce_module  # noqa: E402
import jobs.run as run_module  # noqa: E402
from bench_reruns import clone_missing, compute_first_and_copy, pin_code_fingerprints  # noqa: E402
from invariance.config import ModelConfig, parse_config  # noqa: E402
from invariance.core.models import build_network  # noqa: E402
from invariance.engine.execute import execute_in_process  # noqa: E402
from invariance.engine.plan import make_plan  # noqa: E402
from invariance.engine.steps import Workspace  # noqa: E402
from invariance.errors import ConfigError  # noqa: E402
from invariance.io.layout import MANIFESTS, REDUCED_INDEX  # noqa: E402
from invariance.io.storage import Store  # noqa: E402
from tests.helpers import perturbed, write_eval_parquet  # noqa: E402

TICK_SECONDS = 20.0  # the targets for a no-op tick at 39,500 shards
TICK_REQUESTS = 100
BUCKET = "bench"
RECIPES = ROOT / "docs" / "recipes.md"
RECIPE_ALL = "Raw STIR rows, lazily"
RECIPE_ONE = "Raw STIR rows of one checkpoint"
SCALE = 0.05


@dataclass(frozen=True)
class Shape:
    runs: int = 5
    epochs: int = 100
    layers: int = 13  # the model's depth + 1 (the pre-logits)
    seeds: int = 3

    @property
    def checkpoints(self) -> int:
        return self.runs * self.epochs

    @property
    def units_per_checkpoint(self) -> int:
        return 2 * self.layers * self.seeds + 2  # STIR (pt, ft) x layers x seeds, CKA, subspace

    @property
    def run_names(self) -> list[str]:
        return [f"run{r}" for r in range(self.runs)] if self.runs > 1 else [""]

    def model(self) -> dict:
        return {"arch": "vit_tiny_patch16_224",
                "kwargs": {"img_size": 16, "patch_size": 8, "embed_dim": 16, "depth": self.layers - 1, "num_heads": 2,
                           "num_classes": 3}}  # fmt: skip


# --- the inputs and the history ------------------------------------------------------------------


def checkpoint_path(root: Path, shape: Shape, run: str, epoch: int) -> Path:
    folder = root / "ckpt" / run if run else root / "ckpt"
    return folder / f"epoch={epoch:03d}.safetensors"


def pretrained_state(shape: Shape) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return build_network(ModelConfig(**shape.model())).state_dict()


def write_checkpoint(root: Path, shape: Shape, run: str, epoch: int, seed: int) -> Path:
    path = checkpoint_path(root, shape, run, epoch)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(perturbed(pretrained_state(shape), SCALE, seed=seed), str(path))
    return path


def config_dict(root: Path, shape: Shape, output: str, storage_options: dict | None = None) -> dict:
    folder = root / "ckpt"
    pattern = folder / "{run}" / "epoch={epoch}.safetensors" if shape.runs > 1 else folder / "epoch={epoch}.safetensors"
    raw: dict[str, Any] = {
        "output": output,
        "model": shape.model(),
        "pretrained": str(root / "inputs" / "pretrained.safetensors"),
        "checkpoints": str(pattern),
        "data": {"format": "parquet", "path": str(root / "inputs" / "data"), "n_samples": 8},
        "layers": "all",
        "seeds": list(range(shape.seeds)),
        "inversion": {"iterations": 2, "step_size": 0.5},
        "resources": {"num_cpus": 1},
    }
    if storage_options:
        raw["storage_options"] = storage_options
    return raw


def run_config(root: Path, shape: Shape, output: str, storage_options: dict | None = None,
               compaction: bool | None = None) -> Any:  # fmt: skip
    """The run config; ``compaction``: False leaves a run's shards raw (``compaction: {enabled: false}``),
    None is the default (set only where the config knows the key)."""
    if compaction is None or not compaction_available():
        return parse_config(config_dict(root, shape, output, storage_options))
    raw = config_dict(root, shape, output, storage_options)
    try:
        return parse_config({**raw, "compaction": {"enabled": compaction}})
    except ConfigError:  # the key as a flag
        return parse_config({**raw, "compaction": compaction})


def compaction_available() -> bool:
    try:
        import invariance.engine.compact  # noqa: F401
    except ImportError:
        return False
    return True


def build_history(root: Path, shape: Shape, output: Path, log: Callable[[str], None]) -> dict:
    """Every checkpoint of ``shape`` done (one computed, the others cloned) and reduced once."""
    started = time.perf_counter()
    (root / "inputs").mkdir(parents=True, exist_ok=True)
    save_file(pretrained_state(shape), str(root / "inputs" / "pretrained.safetensors"))
    write_eval_parquet(root / "inputs" / "data")
    first = write_checkpoint(root, shape, shape.run_names[0], 1, seed=1)
    config = run_config(root, shape, str(output), compaction=False)
    store = Store(config.output, config.storage_options)
    compute_first_and_copy(config, store, first, (checkpoint_path(root, shape, run, epoch)
                                                  for run in shape.run_names for epoch in range(1, shape.epochs + 1)))
    computed = time.perf_counter() - started
    plan = make_plan(config, store)
    cloned = clone_missing(plan, store)
    plan.refresh(store)
    assert not plan.missing(), f"{len(plan.missing())} units still missing after cloning"
    build = time.perf_counter() - started
    log(f"history: first checkpoint computed in {computed:.0f} s, {cloned} units cloned, {build:.0f} s in all; first reduce ...")
    began = time.perf_counter()
    with quiet():
        reduce_module.reduce_plan(plan, store, settings=config.numbers_settings(), compare_epochs=config.compare_epochs)
    first_reduce = time.perf_counter() - began
    log(f"history: first reduce {first_reduce:.0f} s")
    return {"build_s": build, "cloned_units": cloned, "first_reduce_s": first_reduce}


# --- what is stored ------------------------------------------------------------------------------


def kind_of(key: str) -> str:
    """shards | compacted | records (a shard's, a compacted file's) | other (reduced/, plots/, reports/,
    _cache/, leases, ...)."""
    if key.startswith(f"{MANIFESTS}/"):
        return "records" if key.startswith((f"{MANIFESTS}/settings=", f"{MANIFESTS}/compacted/")) else "other"
    if re.match(r"[^/_][^/]*/settings=", key) and key.endswith(".parquet"):
        return "compacted" if key.rsplit("/", 1)[-1].startswith("compacted-") else "shards"
    return "other"


def inventory(listing: dict[str, int]) -> dict[str, dict[str, int]]:
    """{kind: {"files", "bytes"}} and "all", from {key: size}."""
    out: dict[str, dict[str, int]] = {}
    for key, size in listing.items():
        for kind in (kind_of(key), "all"):
            entry = out.setdefault(kind, {"files": 0, "bytes": 0})
            entry["files"] += 1
            entry["bytes"] += size
    return out


def local_listing(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


# --- S3 ------------------------------------------------------------------------------------------

# moto's server in its own process on 127.0.0.1, the history put into its memory before it serves
# (80,000 uploads through HTTP would take ~20 min here); the same server as ``python -m moto.server``
SERVE = r"""
import sys
from pathlib import Path
from moto.core import DEFAULT_ACCOUNT_ID
from moto.s3.models import s3_backends
from moto.server import ThreadedMotoServer
host, port, bucket = sys.argv[1], int(sys.argv[2]), sys.argv[3]
backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
backend.create_bucket(bucket, "us-east-1")
for spec in sys.argv[4:]:
    folder, prefix = spec.split("::")
    root = Path(folder)
    for path in sorted(root.rglob("*")):
        if path.is_file():
            backend.put_object(bucket, f"{prefix}/{path.relative_to(root).as_posix()}", path.read_bytes())
server = ThreadedMotoServer(ip_address=host, port=port, verbose=False)
server.start()
server._thread.join()
"""


class S3:
    """moto on loopback, preloaded, with the counting proxy in front of it."""

    def __init__(self, folder: Path, prefix: str) -> None:
        from tests.s3_counting import CountingProxy
        from tests.servers import LOOPBACK, TEST_CREDENTIALS, S3Server, free_port, wait_for_http

        port = free_port()
        self.process = subprocess.Popen([sys.executable, "-c", SERVE, LOOPBACK, str(port), BUCKET, f"{folder}::{prefix}"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        env={**os.environ, **TEST_CREDENTIALS})  # fmt: skip
        self.server = S3Server(f"http://{LOOPBACK}:{port}")
        wait_for_http(self.server.endpoint + "/moto-api/", seconds=3600)
        self.proxy = CountingProxy(self.server)
        Store(self.url("warm-up"), self.options()).list("")  # s3fs's imports and client: not in the first phase
        self.proxy.reset()

    def url(self, prefix: str) -> str:
        return f"s3://{BUCKET}/{prefix}"

    def options(self) -> dict:
        return self.proxy.server().fsspec_options()

    def polars_options(self) -> dict:
        return self.proxy.server().polars_options()

    def listing(self, prefix: str) -> dict[str, int]:
        """{key under prefix: size}, straight from the server (not counted)."""
        import fsspec

        fs = fsspec.filesystem("s3", skip_instance_cache=True, **self.server.fsspec_options())
        found = fs.find(f"{BUCKET}/{prefix}", detail=True)
        return {path[len(f"{BUCKET}/{prefix}/"):]: info["size"] for path, info in found.items()}

    def close(self) -> None:
        self.proxy.close()
        self.process.terminate()
        self.process.wait(timeout=30)


# --- phases --------------------------------------------------------------------------------------


@dataclass
class Phase:
    store: str
    stage: str  # before | after
    name: str
    seconds: float
    requests: dict[str, int] = field(default_factory=dict)  # S3 only
    objects_read: int = 0  # S3: distinct keys GET
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def total_requests(self) -> int:
        return sum(self.requests.values())


@contextlib.contextmanager
def quiet():
    """The commands' own prints (plan descriptions, summaries) kept out of the bench's output."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


STUB_PNG: bytes = b""


def stub_png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    return buffer.getvalue()


def stub_figures() -> None:
    """Every figure the reducer draws is a 1-pixel PNG: drawing is CPU, not storage; which figures
    are drawn and written, and their index, stay as they are."""
    global STUB_PNG
    STUB_PNG = stub_png()
    original = reduce_module._draw

    def draw(store, figures, *args, **kwargs):  # noqa: ANN001, ANN202
        return original(store, [dataclasses.replace(f, render=lambda: STUB_PNG) for f in figures], *args, **kwargs)

    reduce_module._draw = draw


def in_process_executor() -> None:
    """``jobs.run.run`` without Ray: its execute is ``execute_in_process`` (the one-new tick's units
    are computed in this process, one after the other)."""

    def execute(plan, spec, **_: Any):  # noqa: ANN001, ANN202
        return execute_in_process(plan, spec, Workspace("cpu"), progress=None)

    run_module.connect_ray = lambda *args, **kwargs: None
    run_module.execute = execute


def recipe_code(title: str) -> str:
    text = RECIPES.read_text()
    section = text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


class PolarsWithOptions:
    """``polars`` whose scan_parquet / read_parquet get ``storage_options`` (what the recipes' prose
    tells a user of a bucket to pass)."""

    def __init__(self, options: dict | None) -> None:
        self._options = options

    def __getattr__(self, name: str) -> Any:
        return getattr(pl, name)

    def scan_parquet(self, *args: Any, **kwargs: Any) -> pl.LazyFrame:
        return pl.scan_parquet(*args, **({"storage_options": self._options} if self._options else {}), **kwargs)

    def read_parquet(self, *args: Any, **kwargs: Any) -> pl.DataFrame:
        return pl.read_parquet(*args, **({"storage_options": self._options} if self._options else {}), **kwargs)


def run_recipe(title: str, out: str, options: dict | None) -> pl.DataFrame:
    """The recipe as written, with ``out`` set; returns the frame it printed (its last assignment)."""
    code = recipe_code(title)
    scope: dict[str, Any] = {"pl": PolarsWithOptions(options), "out": out}
    with quiet():
        exec(compile(code, f"{RECIPES} ({title})", "exec"), scope)  # noqa: S102 - the guide's own code
    name = re.findall(r"^print\((\w+)\)", code, flags=re.M)[-1]
    return scope[name]


def frame_digest(frame: pl.DataFrame) -> str:
    import hashlib

    # floats to 12 digits: a mean over rows read in another order may differ in its last bit
    ordered = frame.with_columns(pl.col(pl.Float32, pl.Float64).round(12)).sort(frame.columns)
    return hashlib.sha256(ordered.hash_rows(seed=0).to_numpy().tobytes() + str(ordered.schema).encode()).hexdigest()[:16]


class Measure:
    """Times a phase and counts its S3 requests (``proxy``: None for the local store)."""

    def __init__(self, store: str, proxy: Any, log: Callable[[str], None]) -> None:
        self.store, self.proxy, self.log = store, proxy, log
        self.phases: list[Phase] = []

    def __call__(self, stage: str, name: str, action: Callable[[], dict | None]) -> Phase:
        if self.proxy is not None:
            self.proxy.reset()
        started = time.perf_counter()
        detail = action() or {}
        seconds = time.perf_counter() - started
        requests = dict(self.proxy.counts) if self.proxy is not None else {}
        read = len({path for kind, path in self.proxy.keys if kind == "GET"}) if self.proxy is not None else 0
        phase = Phase(self.store, stage, name, seconds, requests, read, detail)
        self.phases.append(phase)
        said = f", {phase.total_requests} requests {requests}, {read} objects read" if self.proxy is not None else ""
        self.log(f"  {self.store} {stage}: {name}: {seconds:.2f} s{said} {detail if detail else ''}")
        return phase


def measure_store(root: Path, shape: Shape, store_name: str, output: str, options: dict | None,
                  polars_options: dict | None, proxy: Any, listing: Callable[[], dict[str, int]],
                  log: Callable[[str], None]) -> tuple[list[Phase], dict]:  # fmt: skip
    """Before compaction: the one-new tick (epoch N+1 of the last run), the no-op tick, the reduce, the
    recipes; compaction; after: the no-op tick, the reduce, the recipes (the same checkpoints as
    before: their results must be equal), the one-new tick (epoch N+2)."""
    measure = Measure(store_name, proxy, log)
    inventories: dict[str, Any] = {}
    digests: dict[str, str] = {}
    last_run = shape.run_names[-1]

    def one_new(stage: str, config: Any, epoch: int) -> None:
        write_checkpoint(root, shape, last_run, epoch, seed=10_000 + epoch)
        measure(stage, "one-new gate", lambda: gate(config))
        measure(stage, "one-new run", lambda: run(config))

    def gate(config: Any) -> dict:
        with quiet():
            submission, why = run_module.next_submission(config)
        return {"submission": submission is not None, "why": why}

    def run(config: Any) -> dict:
        with quiet():
            result = run_module.run(config, progress=False)
        return {"computed": result.execution.completed, "written": len(result.reduced.written)}

    def reduce(config: Any) -> dict:
        Store(output, options).remove([REDUCED_INDEX])
        with quiet():
            result = run_module.reduce_only(config)
        return {"checkpoints": len(result.complete_checkpoints), "written": len(result.written)}

    def recipe(stage: str, title: str) -> dict:
        frame = run_recipe(title, output, polars_options)
        digests[f"{stage} {title}"] = frame_digest(frame)
        return {"rows": frame.height, "digest": digests[f"{stage} {title}"]}

    def reads(stage: str, config: Any) -> None:
        measure(stage, "no-op gate", lambda: gate(config))
        measure(stage, "no-op run", lambda: run(config))
        measure(stage, "reduce (no index)", lambda: reduce(config))
        for title in (RECIPE_ALL, RECIPE_ONE):
            measure(stage, f"recipe: {title}", lambda title=title: recipe(stage, title))

    before = run_config(root, shape, output, options, compaction=False)
    inventories["history"] = inventory(listing())
    one_new("before", before, shape.epochs + 1)
    reads("before", before)
    inventories["before"] = inventory(listing())
    if compaction_available():
        from invariance.engine.compact import compact

        after = run_config(root, shape, output, options)

        def compaction() -> dict:
            with quiet():
                _, store, plan, _ = run_module.open_run(after)
                summary = compact(plan, store)
            return {name: getattr(summary, name) for name in ("groups", "shards", "bytes_before", "bytes_after")}

        measure("compact", "compact", compaction)
        inventories["compacted"] = inventory(listing())
        reads("after", after)
        one_new("after", after, shape.epochs + 2)
        inventories["after"] = inventory(listing())
    return measure.phases, {"inventory": inventories, "recipe_digests": digests}


# --- the bench -----------------------------------------------------------------------------------


@contextlib.contextmanager
def bench_patches() -> Iterator[None]:
    """The bench's stand-ins (pinned code fingerprints, the in-process executor, stub figures),
    undone on the way out: a test that runs the bench in its process leaves the library as it was."""
    import invariance.engine.plan as plan_module

    saved = [(module, name, getattr(module, name)) for module, name in (
        (reduce_module, "code_version"), (reduce_module, "_draw"), (plan_module, "package_fingerprint"),
        (run_module, "connect_ray"), (run_module, "execute"))]  # fmt: skip
    try:
        pin_code_fingerprints()
        in_process_executor()
        stub_figures()
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def run_bench(shape: Shape, stores: Sequence[str], root: Path, log: Callable[[str], None]) -> dict:
    with bench_patches():
        return _run_bench(shape, stores, root, log)


def _run_bench(shape: Shape, stores: Sequence[str], root: Path, log: Callable[[str], None]) -> dict:
    local_out = root / "out"
    history = build_history(root, shape, local_out, log)
    history["inventory"] = inventory(local_listing(local_out))
    results: dict[str, Any] = {"shape": asdict(shape), "history": history, "stores": {}, "phases": []}
    s3 = None
    if "s3" in stores:  # the history's copy, taken before the local phases change it
        began = time.perf_counter()
        s3 = S3(local_out, "out")
        log(f"history loaded into the S3 server in {time.perf_counter() - began:.0f} s")
    try:
        for kind in stores:
            if kind == "local":
                phases, extra = measure_store(root, shape, "local", str(local_out), None, None, None,
                                              lambda: local_listing(local_out), log)  # fmt: skip
            else:
                phases, extra = measure_store(root, shape, "s3", s3.url("out"), s3.options(), s3.polars_options(),
                                              s3.proxy, lambda: s3.listing("out"), log)  # fmt: skip
            results["phases"] += [asdict(p) | {"total_requests": p.total_requests} for p in phases]
            results["stores"][kind] = extra
            for epoch in (shape.epochs + 1, shape.epochs + 2):  # the next store starts from the history's checkpoints
                checkpoint_path(root, shape, shape.run_names[-1], epoch).unlink(missing_ok=True)
    finally:
        if s3 is not None:
            s3.close()
    return results


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def markdown(results: dict) -> str:
    lines = ["| store | stage | phase | seconds | requests (GET / HEAD / LIST / PUT / other) | objects read | detail |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    kinds = ("GET", "HEAD", "LIST", "PUT")
    for p in results["phases"]:
        if p["store"] == "s3":
            other = sum(v for k, v in p["requests"].items() if k not in kinds)
            requests = f"{p['total_requests']} (" + " / ".join(str(p["requests"].get(k, 0)) for k in kinds) + f" / {other})"
            read = str(p["objects_read"])
        else:
            requests, read = "-", "-"
        detail = ", ".join(f"{k} {v}" for k, v in p["detail"].items() if k not in ("why", "digest"))
        lines.append(f"| {p['store']} | {p['stage']} | {p['name']} | {p['seconds']:.2f} | {requests} | {read} | {detail} |")
    lines += ["", "| store | when | shard files | compacted files | records | other files | all files | all bytes |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for store, extra in results["stores"].items():
        for when, inv in extra["inventory"].items():
            get = lambda kind: inv.get(kind, {"files": 0, "bytes": 0})  # noqa: E731
            lines.append(f"| {store} | {when} | {get('shards')['files']} ({fmt_bytes(get('shards')['bytes'])}) "
                         f"| {get('compacted')['files']} ({fmt_bytes(get('compacted')['bytes'])}) | {get('records')['files']} "
                         f"| {get('other')['files']} | {get('all')['files']} | {fmt_bytes(get('all')['bytes'])} |")  # fmt: skip
    return "\n".join(lines)


def verdicts(results: dict) -> list[str]:
    """The issue's targets for a no-op tick, and whether the recipes agree before and after."""
    out = []
    for p in results["phases"]:
        if p["name"].startswith("no-op"):
            requests = f", {p['total_requests']} requests (target < {TICK_REQUESTS})" if p["store"] == "s3" else ""
            ok = p["seconds"] < TICK_SECONDS and (p["store"] != "s3" or p["total_requests"] < TICK_REQUESTS)
            out.append(f"{p['store']} {p['stage']} {p['name']}: {p['seconds']:.1f} s (target < {TICK_SECONDS:g} s)"
                       f"{requests}: {'met' if ok else 'NOT met'}")  # fmt: skip
    for store, extra in results["stores"].items():
        digests = extra["recipe_digests"]
        for title in (RECIPE_ALL, RECIPE_ONE):
            if f"after {title}" in digests:
                same = digests[f"before {title}"] == digests[f"after {title}"]
                out.append(f"{store} recipe {title!r}: {'same result' if same else 'DIFFERENT results'} before and after compaction")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--layers", type=int, default=13, help="the model's layers (depth + 1)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--stores", nargs="+", choices=["local", "s3"], default=["local", "s3"])
    parser.add_argument("--draw-figures", action="store_true", help="draw the figures (default: a 1-pixel PNG each)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--keep", type=Path, help="build under this folder and keep it (default: a temporary one)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    shape = Shape(args.runs, args.epochs, args.layers, args.seeds)
    units = shape.checkpoints * shape.units_per_checkpoint
    print(f"# storage: {shape.runs} runs x {shape.epochs} epochs, {shape.layers} layers, {shape.seeds} seeds: {units:,} "
          f"shards; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"compaction {'available' if compaction_available() else 'NOT available (before only)'}", flush=True)  # fmt: skip
    started = time.perf_counter()

    def log(line: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {line}", flush=True)

    global stub_figures
    if args.draw_figures:
        stub_figures = lambda: None  # noqa: E731
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        results = run_bench(shape, args.stores, args.keep, log)
    else:
        with tempfile.TemporaryDirectory(prefix="bench_storage_") as folder:
            results = run_bench(shape, args.stores, Path(folder), log)
    results["verdicts"] = verdicts(results)
    results["total_s"] = time.perf_counter() - started
    print()
    print(markdown(results))
    print()
    for line in results["verdicts"]:
        print(line)
    print(f"total {results['total_s']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
