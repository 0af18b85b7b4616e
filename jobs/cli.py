"""The `invariance` command: demo, run, plan, reduce, report, submit, finetune."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time

from invariance import __version__
from invariance.errors import ConfigError, InvarianceError
from invariance.io.storage import RedactingFormatter, redact
from jobs.errors import RayStartError
from jobs.signals import INTERRUPTED, Terminated, terminate_on_sigterm


# `invariance plan --submission-id`: no work to submit (a scheduler's `&& ray job submit` skips)
NOTHING_TO_SUBMIT = 3

_COMMON_EXITS = "  2    bad input (config, checkpoints, data, storage): the message names the key or path\n" \
                "  130  interrupted (Ctrl-C); 143: terminated (SIGTERM); the run lease is released\n"
EXIT_CODES = {
    "demo": "exit codes:\n  0    done: trained (or reused the checkpoints), computed and reduced\n"
            "  1    some shards failed (listed; the next demo retries them)\n" + _COMMON_EXITS,
    "run": "exit codes:\n  0    done (or another run of these settings holds the lease: it says so)\n"
           "  1    some shards failed (listed; the next run retries them), or the local Ray did not start\n"
           + _COMMON_EXITS,
    "plan": "exit codes:\n  0    planned\n"
            f"  {NOTHING_TO_SUBMIT}    with --submission-id: nothing to submit (nothing left, or a run is live)\n"
            + _COMMON_EXITS,
    "reduce": "exit codes:\n  0    reduced (or a run of these settings is live: it says so and writes nothing)\n"
              + _COMMON_EXITS,
    "report": "exit codes:\n  0    the report is up to date (or a run of these settings is live: it says so)\n"
              + _COMMON_EXITS,
    "submit": "exit codes:\n  0    submitted: prints the submission id\n"
              "  1    the job of this id ended (failed or stopped) without computing anything: fix, delete it, resubmit\n"
              f"  {NOTHING_TO_SUBMIT}    nothing to submit: nothing left, a run of these settings is live, or the job\n"
              "       is already submitted (another tick raced this one): one line on stderr\n" + _COMMON_EXITS,
    "finetune": "exit codes:\n  0    every trial finished\n  1    some trials failed (listed)\n" + _COMMON_EXITS,
}  # fmt: skip


class LineFormatter(argparse.HelpFormatter):
    """Wraps each line of a description or epilog on its own; indented lines (a table of exit
    codes) are kept as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n".join(indent + line if line.startswith(" ") else super(LineFormatter, self)._fill_text(line, width, indent)
                         for line in text.splitlines())  # fmt: skip


def finetune_reference() -> str:
    """Where the installed package keeps the finetune config reference."""
    from importlib import resources

    return str(resources.files("invariance.training") / "README.md")


def versions() -> str:
    """One line: this package, Python, Ray, torch and torch's CUDA ("none" for a CPU build). Nodes of
    one Ray cluster must agree on Python (to the patch release) and Ray: compare this line on each."""
    import platform

    import ray
    import torch

    return (f"invariance {__version__} python {platform.python_version()} ray {ray.__version__} "
            f"torch {torch.__version__} cuda {torch.version.cuda or 'none'}")  # fmt: skip


class VersionsAction(argparse.Action):
    """``--version``: the versions line (imports torch and Ray only when asked)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args, **kwargs) -> None:
        print(versions())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="invariance",
        description="What finetuning does to a vision model's invariances: STIR, forgetting, learning, "
        "CKA divergence and invariance flow for every checkpoint of a finetuning run.",
    )
    parser.add_argument("--version", action=VersionsAction,
                        help="print the versions of invariance, Python, Ray, torch and CUDA, and exit")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="the whole pipeline on a tiny ViT it trains itself (local Ray, a local folder)",
        description="Pretrain a tiny ViT on generated shapes, finetune it on another task saving a checkpoint "
        "per epoch, then run the same pipeline as `invariance run` on a local Ray. Needs no network.",
        epilog=EXIT_CODES["demo"], formatter_class=LineFormatter,
    )
    demo.add_argument("--out", default="invariance-demo", help="output folder (default: ./invariance-demo)")
    demo.add_argument("--epochs", type=int, default=3, help="finetuning epochs = checkpoints (default: 3)")

    for name, summary in (
        ("run", "compute every missing shard on Ray, then reduce (idempotent; reruns compute only new checkpoints)"),
        ("plan", "show what is done, what is missing and an estimate of its cost: inversion FLOPs and wall time "
                 "(on CPU at this CPU's throughput, timed once and cached; on GPUs at a recorded or assumed one); "
                 "computes nothing"),
        ("reduce", "rebuild reduced/curves.parquet, reduced/flow.parquet and plots/ from complete shards"),
        ("report", "rebuild reports/index.html, the page a person opens (with the reduced tables and plots it shows)"),
    ):
        joins = " Joins the cluster at RAY_ADDRESS when set (as under `ray job submit`), else starts a local Ray."
        sub = commands.add_parser(name, help=summary, description=summary + "." + (joins if name == "run" else ""),
                                  epilog=EXIT_CODES[name], formatter_class=LineFormatter)  # fmt: skip
        sub.add_argument("config", help="run config YAML: a local path or any fsspec URL (s3://...)")
        if name == "run":
            sub.add_argument("--no-progress", action="store_true",
                             help="no progress bar: a line per checkpoint whose units are all done, and one at least "
                             "every minute (for logs: `ray job logs`, a CronJob's)")
        if name == "plan":
            sub.add_argument("--no-cost", action="store_true", help="skip the FLOP count and the time estimate")
            sub.add_argument("--gpu", metavar="NAME",
                             help="the workers' CUDA device, as torch names it ('NVIDIA H100 80GB HBM3'): the estimate is in "
                             "GPU-hours at its measured throughput. Without it: GPU-hours when resources.num_gpus > 0 "
                             "(at this machine's GPU's figure, else an assumed one), else the wall time on this "
                             "machine's CPUs")
            sub.add_argument("--submission-id", action="store_true",
                             help="print only a Ray job submission id for the work left (for `ray job submit "
                             f"--submission-id`: a duplicate is refused); exit {NOTHING_TO_SUBMIT} printing nothing on "
                             "stdout when nothing is left or a run of these settings is in progress")

    submit = commands.add_parser(
        "submit", help="for schedulers: submit `invariance run CONFIG` to the cluster at RAY_ADDRESS when work is left",
        description="Plan CONFIG; when work is left and no run of its settings is live, submit `invariance run CONFIG` "
        "to the Ray cluster whose dashboard URL is RAY_ADDRESS, under a submission id that names the work left "
        "(Ray refuses a second job with that id, so two ticks never start two runs). Does not wait for the job: "
        "follow it with `ray job logs -f ID`. With token auth, export RAY_AUTH_MODE=token and RAY_AUTH_TOKEN.",
        epilog=EXIT_CODES["submit"], formatter_class=LineFormatter,
    )  # fmt: skip
    submit.add_argument("config", help="run config YAML: a URL every node can read (s3://...) or a path on the head")
    submit.add_argument("--runtime-env", metavar="YAML", help="a Ray runtime_env file for the job (cluster/runtime_env.yaml)")

    finetune = commands.add_parser(
        "finetune",
        help="produce checkpoints: finetune a timm ViT (or a Ray Tune grid of runs), a checkpoint and metrics per epoch",
        description="Finetune a timm ViT from a pretrained checkpoint (or from scratch) for classification or "
        "reconstruction, writing <output>/epoch=NN.safetensors and <output>/metrics/epoch=NN.parquet (clean and "
        "corrupted test accuracy) per epoch; with a `sweep` section, one Ray Tune trial per grid point, each in "
        "<output>/<trial name>/. Unfinished runs resume after their last checkpoint. Joins the cluster at "
        "RAY_ADDRESS when set, else starts a local Ray. Config reference: "
        f"{finetune_reference()} (invariance/training/README.md in the source tree).",
        epilog=EXIT_CODES["finetune"],
        formatter_class=LineFormatter,
    )
    finetune.add_argument("config", help="finetune config YAML: a local path or any fsspec URL (s3://...)")
    return parser


class StderrHandler(logging.StreamHandler):
    """Writes to the sys.stderr of the moment (main may run again in one process, a notebook or the
    tests, each time with another sys.stderr): never to a stream closed since."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # logging.StreamHandler sets it in __init__
        pass


def setup_logging() -> None:
    """The library and the jobs log through module loggers; the command shows their messages on
    stderr as plain lines, INFO and above. Once per process (main may be called again in tests)."""
    for name in ("invariance", "jobs"):
        logger = logging.getLogger(name)
        if not any(getattr(handler, "invariance_cli", False) for handler in logger.handlers):
            handler = StderrHandler()
            handler.setFormatter(RedactingFormatter("%(message)s"))  # URL credentials never shown
            handler.invariance_cli = True  # type: ignore[attr-defined]
            logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    started = time.time()  # before the command's imports (torch, Ray): the time to first task counts them
    args = build_parser().parse_args(argv)
    setup_logging()
    terminate_on_sigterm()
    try:
        if args.command == "demo":
            from jobs.demo import run_demo

            if run_demo(args.out, epochs=args.epochs):
                return 1
        elif args.command == "run":
            from jobs.run import run

            result = run(args.config, progress=not args.no_progress, started=started)
            if result is not None and result.execution.failures:
                return 1
        elif args.command == "plan":
            from jobs.run import next_submission, plan_only

            if args.submission_id:
                identifier, why = next_submission(args.config)
                if identifier is None:
                    print(f"invariance plan: {why}; nothing to submit", file=sys.stderr)
                    return NOTHING_TO_SUBMIT
                print(identifier)
            else:
                plan_only(args.config, with_cost=not args.no_cost, gpu=args.gpu)
        elif args.command == "submit":
            from jobs.run import submit

            runtime_env = None
            if args.runtime_env:
                import yaml

                try:
                    with open(args.runtime_env, encoding="utf-8") as handle:
                        runtime_env = yaml.safe_load(handle)
                except (OSError, yaml.YAMLError) as exc:
                    raise ConfigError(f"--runtime-env {args.runtime_env}: cannot read it as YAML "
                                      f"({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
                if not isinstance(runtime_env, dict):
                    raise ConfigError(f"--runtime-env {args.runtime_env}: a runtime_env is a mapping "
                                      "(env_vars:, working_dir:, ...)")
            done = submit(args.config, runtime_env)
            if done.failed:
                print(f"invariance submit: error: {done.why}", file=sys.stderr)
                return 1
            if not done.submitted:
                print(f"invariance submit: {done.why}; nothing submitted", file=sys.stderr)
                return NOTHING_TO_SUBMIT
            print(done.submission_id)
            print(f"invariance submit: {done.why}; follow it with `ray job logs -f {done.submission_id}`", file=sys.stderr)
        elif args.command in ("reduce", "report"):
            from jobs.run import reduce_only

            if reduce_only(args.config) is None:
                return 0  # a run of these settings is live: it said so, and that run reduces
        elif args.command == "finetune":
            from jobs.finetune import finetune

            if finetune(args.config).failures:
                return 1
    except InvarianceError as error:
        print(f"invariance {args.command}: error: {redact(str(error))}", file=sys.stderr)
        return 2
    except RayStartError as error:
        print(f"invariance {args.command}: error: {redact(str(error))}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Terminated) as interrupt:
        # the run has stopped submitting and released its lease on the way out (finally blocks)
        received = signal.SIGTERM if isinstance(interrupt, Terminated) else signal.SIGINT
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the exit short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print(f"invariance {args.command}: interrupted ({received.name}): stopped; what finished is kept, "
              "the next run computes the rest", file=sys.stderr)  # fmt: skip
        return INTERRUPTED[received]
    return 0


if __name__ == "__main__":
    sys.exit(main())
