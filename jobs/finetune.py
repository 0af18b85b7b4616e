"""The finetune job: one run or a Ray Tune grid of them, each trial a library finetuning run.

Every trial calls ``invariance.training.run.run_finetune`` (the code the demo trains with) on its
own output ``<output>/<trial name>/`` (or ``<output>/`` without a sweep), with the CPUs and
GPUs of ``resources``. Durable state lives in the store, not in Tune: a trial that fails is
restarted by Tune (``resources.max_failures``) and resumes after its last checkpoint, and
rerunning the job resumes every unfinished trial; finished trials are not started at all.

Every trial's inputs are checked on the driver before Tune starts (``training/inputs.py``). A
trial that still fails on bad input (a ConfigError, DataError, CheckpointError or NumericsError:
the same on every try) is not retried; the job then raises that error, by its own message, after
the other trials finished (`invariance finetune` exits 2, as `invariance run` does on bad input).
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch
from ray import tune

from invariance.errors import CheckpointError, ConfigError, DataError, InvarianceError, NumericsError, StorageError
from invariance.io.paths import ResolvedPaths, config_folder
from invariance.io.run_metrics import read_run_metrics
from invariance.io.storage import Store
from invariance.training.config import (
    FinetuneConfig,
    FinetuneResources,
    from_portable,
    parse_finetune_config,
    portable,
    resolve_finetune_paths,
)
from invariance.training.inputs import check_finetune_inputs
from invariance.training.run import run_finetune, saved_progress
from invariance.config import read_yaml
from jobs.run import check_cluster_output, connect_ray

# bad input: a retry meets it again, so a trial that raises one is not retried
_NOT_TRANSIENT = (ConfigError, DataError, CheckpointError, NumericsError)


@dataclass
class TrialOutcome:
    """One trial: its name, output, last reported metrics, and the error if it failed."""

    name: str
    output: str
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    # the InvarianceError the trial failed with (bad input, a store it cannot reach), else None
    invariance_error: InvarianceError | None = None


@dataclass
class FinetuneJobResult:
    trials: list[TrialOutcome]

    @property
    def failures(self) -> list[TrialOutcome]:
        return [trial for trial in self.trials if trial.error is not None]


def _train_trial(params: dict[str, Any], trial_configs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A Tune function trainable: train the trial named ``params['trial']``, report every epoch."""
    config = from_portable(trial_configs[params["trial"]])
    torch.set_num_threads(max(1, int(config.resources.num_cpus)))
    summary: dict[str, Any] = {}

    def report(row: dict[str, Any]) -> None:
        summary.update({key: value for key, value in row.items() if key != "corrupted" and value is not None})
        tune.report(dict(summary))

    try:
        summary["resumed_from"] = _resume_point(config)
        result = run_finetune(config, on_epoch=report)
    except _NOT_TRANSIENT as error:  # reported, not raised: Tune would retry it max_failures times
        summary.update({_ERROR_TYPE: type(error).__name__, _ERROR_MESSAGE: str(error)})
        tune.report(dict(summary))
        return summary
    if result.epochs_run == 0:  # finished meanwhile (a retry after the last epoch): report once
        summary.update({"epoch": config.epochs, "finished_before": True})
        tune.report(dict(summary))
    return summary


_ERROR_TYPE, _ERROR_MESSAGE = "invariance_error_type", "invariance_error"
_ERROR_TYPES = {kind.__name__: kind for kind in (*_NOT_TRANSIENT, StorageError, InvarianceError)}


def invariance_error(error: BaseException | None) -> InvarianceError | None:
    """The InvarianceError a trial failed with, found inside Ray's and Tune's wrappers
    (``RayTaskError(DataError)``, a TuneError caused by one), as the library raised it: its own
    type and message, without the remote traceback; None when there is none inside."""
    seen: set[int] = set()
    todo = [error]
    while todo:
        current = todo.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        cause = getattr(current, "cause", None)  # RayTaskError: the exception the task raised
        if isinstance(current, InvarianceError) and not isinstance(cause, BaseException):
            return current
        todo += [cause, current.__cause__, current.__context__]
        todo += [arg for arg in getattr(current, "args", ()) if isinstance(arg, BaseException)]
    return None


def _trial_error(metrics: dict[str, Any], error: BaseException | None) -> tuple[str | None, InvarianceError | None]:
    """(the line the job prints, the InvarianceError) of a trial's outcome."""
    if metrics.get(_ERROR_TYPE) is not None:
        found = _ERROR_TYPES.get(metrics[_ERROR_TYPE], InvarianceError)(metrics.get(_ERROR_MESSAGE, ""))
        return f"{type(found).__name__}: {found}", found
    if error is None:
        return None, None
    found = invariance_error(error)
    if found is not None:
        return f"{type(found).__name__}: {found}", found
    cause = getattr(error, "cause", None)
    shown = cause if isinstance(cause, BaseException) else error
    return f"{type(shown).__name__}: {shown}", None


def _resume_point(config: FinetuneConfig) -> int:
    progress = saved_progress(config)
    return 0 if progress is None else progress.epoch


def _finished_outcome(name: str, config: FinetuneConfig) -> TrialOutcome | None:
    """The outcome of a trial that already trained every epoch, else None."""
    progress = saved_progress(config)
    if progress is None or not progress.same_settings or progress.epoch < config.epochs:
        return None  # to train (a trial with other settings at this output fails there, saying so)
    metrics = read_run_metrics(config.output, config.storage_options)
    last = metrics.row(-1, named=True) if metrics is not None else {"epoch": progress.epoch}
    summary = {key: value for key, value in last.items() if key != "corrupted" and value is not None}
    return TrialOutcome(name, config.output, {**summary, "resumed_from": progress.epoch, "finished_before": True})


def _run_trials(trials: list[tuple[str, FinetuneConfig]], resources: FinetuneResources,
                tune_storage: str | None) -> list[TrialOutcome]:  # fmt: skip
    """One Tune trial per (name, config); the outcomes in the order of ``trials``."""
    trainable = tune.with_resources(
        tune.with_parameters(_train_trial, trial_configs={name: portable(trial) for name, trial in trials}),
        {"cpu": resources.num_cpus, "gpu": resources.num_gpus},
    )
    with tempfile.TemporaryDirectory(prefix="invariance-tune-") as scratch:
        tuner = tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search([name for name, _ in trials])},
            tune_config=tune.TuneConfig(
                trial_name_creator=lambda t: t.config["trial"], trial_dirname_creator=lambda t: t.config["trial"]
            ),
            run_config=tune.RunConfig(
                name="invariance-finetune",
                # Tune's own records only: checkpoints and metrics go to each trial's output
                storage_path=tune_storage or scratch,
                failure_config=tune.FailureConfig(max_failures=resources.max_failures),
                verbose=1,
            ),
        )
        grid = list(tuner.fit())
    outputs = dict(trials)
    outcomes = {}
    for result in grid:
        name = result.config["trial"]
        metrics = dict(result.metrics or {})
        error, found = _trial_error(metrics, result.error)
        metrics.pop(_ERROR_TYPE, None)
        metrics.pop(_ERROR_MESSAGE, None)
        outcomes[name] = TrialOutcome(name, outputs[name].output, metrics, error, found)
    return [outcomes[name] for name, _ in trials]


def finetune(config: FinetuneConfig | str, num_cpus: int | None = None, tune_storage: str | None = None) -> FinetuneJobResult:
    """`invariance finetune`: every unfinished trial of the config on Ray Tune (one trial
    without a sweep); trials that trained every epoch before are reported, not started."""
    config, paths = load_finetune_job_config(config)
    check_cluster_output(config, paths)  # a relative local output on a cluster: each submission's own unpack folder
    trials = config.trials()
    check_trials(config, trials, paths)
    finished = {name: outcome for name, trial in trials if (outcome := _finished_outcome(name, trial)) is not None}
    todo = [(name, trial) for name, trial in trials if name not in finished]
    print(f"finetune: {len(trials)} trial(s) -> {config.output}; {len(finished)} finished before", flush=True)
    for name, trial in todo:
        print(f"  to train: {name} -> {trial.output}", flush=True)
    if todo:
        connect_ray(num_cpus)
        ran = {outcome.name: outcome for outcome in _run_trials(todo, config.resources, tune_storage)}
    else:
        ran = {}
    outcomes = [finished.get(name) or ran[name] for name, _ in trials]
    for outcome in outcomes:
        status = f"failed: {outcome.error.splitlines()[0]}" if outcome.error else _summary(outcome.metrics)
        print(f"  {outcome.name}: {status}", file=sys.stderr if outcome.error else sys.stdout, flush=True)
    bad_input = [outcome for outcome in outcomes if outcome.invariance_error is not None]
    if bad_input:  # by its own message and type: the command exits 2, as `invariance run` on bad input
        first = bad_input[0].invariance_error
        if config.sweep is None:
            raise first
        lines = [f"trial {outcome.name}: {outcome.invariance_error}" for outcome in bad_input]
        raise type(first)(lines[0] if len(lines) == 1 else f"{len(lines)} trials failed:\n  " + "\n  ".join(lines))
    return FinetuneJobResult(outcomes)


def load_finetune_job_config(config: FinetuneConfig | str) -> tuple[FinetuneConfig, ResolvedPaths]:
    """The validated config with every relative path made absolute, on the driver: against the
    config file's folder when ``config`` is a path or URL, else the working directory."""
    if isinstance(config, FinetuneConfig):
        return resolve_finetune_paths(config)
    return resolve_finetune_paths(parse_finetune_config(read_yaml(config)), config_folder(str(config)))


def check_trials(config: FinetuneConfig, trials: list[tuple[str, FinetuneConfig]], paths: ResolvedPaths) -> None:
    """Every trial's inputs, before any trial starts (``check_finetune_inputs``), and the output
    writable; a path error says how relative paths were resolved."""
    checked: set[str] = set()
    try:
        Store(config.output, dict(config.storage_options)).check_writable()
        for name, trial in trials:
            try:
                check_finetune_inputs(trial, checked)
            except InvarianceError as error:
                if config.sweep is None:
                    raise
                raise type(error)(f"trial {name}: {error}") from None
    except (CheckpointError, DataError, StorageError) as error:
        if not paths.note():
            raise
        raise type(error)(f"{error} {paths.note()}") from None


def _summary(metrics: dict[str, Any]) -> str:
    parts = [f"epoch {metrics.get('epoch')}"]
    for key in ("train_loss", "clean_accuracy", "corrupted_accuracy", "corrupted_loss"):
        if metrics.get(key) is not None:
            parts.append(f"{key} {metrics[key]:.4f}")
    return ", ".join(parts)
