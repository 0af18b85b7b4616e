"""The finetune job: one run or a Ray Tune grid of them, each trial a library finetuning run.

Every trial calls ``invariance.training.run.run_finetune`` (the code the demo trains with) on its
own output ``<output>/<trial name>/`` (or ``<output>/`` without a sweep), with the CPUs and
GPUs of ``resources``. Durable state lives in the store, not in Tune: a trial that fails is
restarted by Tune (``resources.max_failures``) and resumes after its last checkpoint, and
rerunning the job resumes every unfinished trial; finished trials are not started at all.
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch
from ray import tune

from invariance.io.run_metrics import read_run_metrics
from invariance.training.run import run_finetune, saved_progress
from invariance.training.config import FinetuneConfig, FinetuneResources, load_finetune_config, parse_finetune_config
from jobs.run import connect_ray


@dataclass
class TrialOutcome:
    """One trial: its name, output, last reported metrics, and the error if it failed."""

    name: str
    output: str
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


@dataclass
class FinetuneJobResult:
    trials: list[TrialOutcome]

    @property
    def failures(self) -> list[TrialOutcome]:
        return [trial for trial in self.trials if trial.error is not None]


def _train_trial(params: dict[str, Any], trial_configs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A Tune function trainable: train the trial named ``params['trial']``, report every epoch."""
    config = parse_finetune_config(trial_configs[params["trial"]])
    torch.set_num_threads(max(1, int(config.resources.num_cpus)))
    resumed_from = _resume_point(config)
    summary: dict[str, Any] = {"resumed_from": resumed_from}

    def report(row: dict[str, Any]) -> None:
        summary.update({key: value for key, value in row.items() if key != "corrupted" and value is not None})
        tune.report(dict(summary))

    result = run_finetune(config, on_epoch=report)
    if result.epochs_run == 0:  # finished meanwhile (a retry after the last epoch): report once
        summary.update({"epoch": config.epochs, "finished_before": True})
        tune.report(dict(summary))
    return summary


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
        tune.with_parameters(_train_trial, trial_configs={name: trial.model_dump(mode="json") for name, trial in trials}),
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
        error = f"{type(result.error).__name__}: {result.error}" if result.error is not None else None
        outcomes[name] = TrialOutcome(name, outputs[name].output, dict(result.metrics or {}), error)
    return [outcomes[name] for name, _ in trials]


def finetune(config: FinetuneConfig | str, num_cpus: int | None = None, tune_storage: str | None = None) -> FinetuneJobResult:
    """`invariance finetune`: every unfinished trial of the config on Ray Tune (one trial
    without a sweep); trials that trained every epoch before are reported, not started."""
    if not isinstance(config, FinetuneConfig):
        config = load_finetune_config(config)
    trials = config.trials()
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
    return FinetuneJobResult(outcomes)


def _summary(metrics: dict[str, Any]) -> str:
    parts = [f"epoch {metrics.get('epoch')}"]
    for key in ("train_loss", "clean_accuracy", "corrupted_accuracy", "corrupted_loss"):
        if metrics.get(key) is not None:
            parts.append(f"{key} {metrics[key]:.4f}")
    return ", ".join(parts)
