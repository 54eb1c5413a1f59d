"""Ray Tune sweeps over the attention's ``local_window`` and ``global_k`` (or any config field).

Each trial runs a *driver function* (the Ray Train V2 way to combine Train and Tune) that builds
the normal ``TorchTrainer`` for the trial's config and forwards the workers' reports to Tune with
``TuneReportCallback``; the workers report ``val_loss`` at every evaluation, so ASHA (Li et al.
2020, "A System for Massively Parallel Hyperparameter Tuning") can stop bad trials early.

The sweep folder ``SWEEP_DIR = (cluster.storage_path or run.dir) / (run.name + "-sweep")`` holds
Tune's experiment state (``mla tune ... --resume`` restores an interrupted sweep), one run folder
per trial under ``trials/``, and at the end ``trials.json``, ``best.yaml`` (a job config that
``mla train`` accepts unchanged) and ``val_loss.png``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from orchestrator.config import JobConfig, apply_override, validate_job_dict
from orchestrator.contract.errors import ConfigError, JobFailedError
from orchestrator.contract.io import atomic_write, atomic_write_with, write_json_atomic

#: A trial's driver only waits on its Ray Train run, whose workers hold the CPUs; Tune refuses an
#: empty request, so the driver asks for a little memory and no CPU.
DRIVER_RESOURCES: dict[str, float] = {"cpu": 0, "memory": 64 * 1024 * 1024}


def parse_search(items: list[str]) -> dict[str, list]:
    """``["model.local_window=16,32"]`` -> ``{"model.local_window": [16, 32]}`` (values parsed as YAML).

    Raises:
        ConfigError: an item is not ``KEY=V1,V2,...`` or a value is invalid for its field.
    """
    space: dict[str, list] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        values = [_number_or_value(yaml.safe_load(v)) for v in raw.split(",") if v.strip()]
        if not sep or not key.strip() or not values:
            raise ConfigError(
                f"--search {item!r}: expected KEY=V1,V2,..., e.g. --search model.local_window=16,32,64"
            )
        space[key.strip()] = values
    if not space:
        raise ConfigError(
            "give at least one --search KEY=V1,V2,... (e.g. --search model.global_k=4,8,16)"
        )
    return space


def _number_or_value(value):
    """YAML 1.1 reads ``3e-3`` (no dot) as a string: make it the number it spells, so a list
    mixing ``0.001`` and ``3e-3`` sorts numerically."""
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        return number if math.isfinite(number) else value
    return value


def value_order(value) -> tuple:
    """Sort key that orders numbers numerically before everything else (by text)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, float(value), "")
    return (1, 0.0, str(value))


def pick_best(rows: list[dict], space: dict, metric: str) -> dict | None:
    """The trial with the lowest finite ``best_<metric>``; ties go to the numerically smallest
    searched values (in the order of ``space``). Diverged trials are never best."""
    col = f"best_{metric}"
    done = [
        r for r in rows if r[col] is not None and math.isfinite(r[col]) and not r.get("diverged")
    ]
    if not done:
        return None
    return min(done, key=lambda r: (r[col], [value_order(r[k]) for k in space]))


def trial_job(base: dict, params: dict, trials_dir: str, trial_id: str) -> JobConfig:
    """The job of one trial: the base job with ``params`` applied and its own run folder."""
    data = copy.deepcopy(base)
    for key, value in params.items():
        apply_override(data, f"{key}={json.dumps(value)}")
    data["run"] = {**data.get("run", {}), "name": trial_id, "dir": trials_dir}
    data["cluster"] = {**data.get("cluster", {}), "storage_path": None, "address": None}
    return validate_job_dict(data, source=f"trial {trial_id}")


def _trial_driver(config: dict) -> None:
    """Tune trial: run the normal Ray Train + DeepSpeed training for this trial's parameters."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from orchestrator.distill import attach_distill
    from orchestrator.finetune import attach_finetune
    from orchestrator.launcher import build_trainer
    from orchestrator.layouts import build_run_plan
    from orchestrator.privacy import attach_privacy

    params = {k: v for k, v in config.items() if not k.startswith("_")}
    trial_id = ray.tune.get_context().get_trial_id()
    job = trial_job(config["_base"], params, config["_trials_dir"], trial_id)
    plan = attach_finetune(job, attach_privacy(job, build_run_plan(job)))
    plan = attach_distill(job, plan)
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    trainer = build_trainer(plan, callbacks=[TuneReportCallback()])
    trainer.fit()


def validate_space(job: JobConfig, space: dict[str, list]) -> None:
    """Every value of the space must give a valid job (checked before any trial starts).

    Raises:
        ConfigError: naming the field and the value that fails.
    """
    base = job.model_dump(mode="json")
    for key, values in space.items():
        for value in values:
            trial_job(base, {key: value}, "/tmp", "check").model_config_()


@dataclass
class SweepResult:
    """What a sweep produced: its folder, one row per trial and the best row."""

    sweep_dir: Path
    rows: list[dict]
    best: dict


#: Metrics a trial reports to Tune that make sense to minimise (the trainer reports ``loss``,
#: ``val_loss``, ``tokens_per_s``, ``epsilon`` and ``diverged``: workers/train_loop.py
#: ``_last_metrics``; the last three are not losses).
TUNE_METRICS = ("val_loss", "loss")


def check_metric(metric: str) -> None:
    """Refuse a ``--metric`` the trainer does not report, before Ray or any folder is touched.

    Raises:
        ConfigError: naming the metric and the ones a sweep can minimise.
    """
    if metric not in TUNE_METRICS:
        raise ConfigError(
            f"--metric {metric!r} is not a metric the trainer reports to minimise: "
            f"choose one of {', '.join(TUNE_METRICS)}"
        )


def run_sweep(
    job: JobConfig,
    space: dict[str, list],
    samples: int = 1,
    scheduler: str = "asha",
    metric: str = "val_loss",
    max_steps: int | None = None,
    search_mode: str = "grid",
    resume: bool = False,
    preflight: bool = True,
) -> SweepResult:
    """Run (or resume) a Tune sweep of ``space`` and write the sweep's outputs.

    With ``cluster.address`` set and ``preflight``, every node's Python and the job's paths are
    checked before any trial starts (:func:`orchestrator.preflight.preflight_connected`).

    Raises:
        ConfigError: bad space, scheduler, or nothing to resume.
        ClusterError: a node of ``cluster.address`` fails the preflight.
        JobFailedError: every trial failed.
    """
    from orchestrator.launcher import connect_ray, load_torch_before_ray

    check_metric(metric)
    if scheduler not in ("asha", "fifo"):
        raise ConfigError(f"--scheduler {scheduler!r}: choose asha or fifo")
    if samples < 1:
        raise ConfigError(f"--samples {samples}: give at least 1 sample per grid point (or trial)")
    if max_steps is not None and max_steps < 1:
        raise ConfigError(f"--max-steps {max_steps}: give at least 1 step per trial")
    if max_steps:
        job = validate_job_dict(
            {**job.model_dump(mode="json"), "train": {**job.train.model_dump(), "steps": max_steps}}
        )
    validate_space(job, space)
    sweep_dir = (Path(job.cluster.storage_path or job.run.dir) / f"{job.run.name}-sweep").resolve()
    load_torch_before_ray()
    handle = connect_ray(job, num_cpus=os.cpu_count(), dashboard=True)
    if preflight and job.cluster.address:
        from orchestrator.launcher import check_cluster

        check_cluster(job, handle)
    from ray import tune

    param_space = {
        key: (tune.grid_search(v) if search_mode == "grid" else tune.choice(v))
        for key, v in space.items()
    }
    param_space |= {"_base": job.model_dump(mode="json"), "_trials_dir": str(sweep_dir / "trials")}
    try:
        tuner = (
            _restore(sweep_dir)
            if resume
            else _new_tuner(job, param_space, sweep_dir, samples, scheduler, metric)
        )
        with _inside(sweep_dir):
            grid = tuner.fit()
    finally:
        handle.close()
    rows = sorted(
        (_row(r, space, job.train.steps, metric) for r in grid),
        key=lambda r: [value_order(r[k]) for k in space],
    )
    best = pick_best(rows, space, metric)
    if best is None:
        errors = "; ".join(str(r.get("error")) for r in rows if r.get("error"))
        raise JobFailedError(
            f"every trial failed or diverged: {errors or 'no metrics reported'} "
            f"(sweep folder: {sweep_dir})"
        )
    write_outputs(job, sweep_dir, rows, best, space, metric)
    return SweepResult(sweep_dir, rows, best)


def _new_tuner(
    job: JobConfig, param_space: dict, sweep_dir: Path, samples: int, scheduler: str, metric: str
):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    steps = job.train.steps
    sched = (
        ASHAScheduler(
            time_attr="step",
            max_t=steps,
            grace_period=max(1, min(job.train.eval_every * 2, steps)),
            reduction_factor=2,
        )
        if scheduler == "asha"
        else FIFOScheduler()
    )
    per_trial = job.cluster.num_workers * job.cluster.cpus_per_worker
    concurrent = max(1, int(_cluster_cpus() // per_trial))
    return tune.Tuner(
        tune.with_resources(_trial_driver, DRIVER_RESOURCES),
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=metric,
            mode="min",
            scheduler=sched,
            num_samples=samples,
            max_concurrent_trials=concurrent,
        ),
        run_config=tune.RunConfig(
            name=sweep_dir.name, storage_path=str(sweep_dir.parent), verbose=0
        ),
    )


def _restore(sweep_dir: Path):
    from ray import tune

    if not tune.Tuner.can_restore(str(sweep_dir)):
        raise ConfigError(
            f"--resume: no sweep to restore in {sweep_dir}; run it once without --resume"
        )
    return tune.Tuner.restore(
        str(sweep_dir),
        trainable=tune.with_resources(_trial_driver, DRIVER_RESOURCES),
        resume_unfinished=True,
        resume_errored=True,
    )


@contextlib.contextmanager
def _inside(folder: Path):
    """Run with ``folder`` as the working directory. In a Ray job the driver's working directory
    is the job's unpacked ``working_dir``, which Ray may garbage-collect once the trials' workers
    release it; Tune's final listing of the experiment folder then fails in ``os.getcwd()``."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        before = os.getcwd()
    except FileNotFoundError:
        before = None
    os.chdir(folder)
    try:
        yield
    finally:
        if before and os.path.isdir(before):
            os.chdir(before)


def _cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 1))


def _row(result, space: dict, max_steps: int, metric: str) -> dict:
    """One trial's row: its best ``metric`` over *trained* evaluations (step > 0: the step-0
    evaluation of the untrained model is not a result), whether it diverged, its steps."""
    frame = result.metrics_dataframe
    has = frame is not None and len(frame) and "step" in frame
    trained = frame[frame["step"] > 0] if has else None
    values = (
        [float(v) for v in trained[metric] if v is not None and v == v]
        if trained is not None and metric in trained
        else []
    )
    diverged = bool(
        has and "diverged" in frame and frame["diverged"].fillna(False).astype(bool).any()
    )
    diverged = diverged or any(not math.isfinite(v) for v in values)
    best = min(values) if values and not diverged else None
    steps = int(frame["step"].max()) if has else 0
    error = None if result.error is None else str(result.error).splitlines()[0]
    return {
        **{k: result.config.get(k) for k in space},
        f"best_{metric}": best,
        "steps": steps,
        "stopped_early": result.error is None and not diverged and steps < max_steps,
        "diverged": diverged,
        "error": error or ("diverged (non-finite loss or skipped steps)" if diverged else None),
    }


def write_outputs(
    job: JobConfig, sweep_dir: Path, rows: list[dict], best: dict, space: dict, metric: str
) -> None:
    """Write ``trials.json``, ``best.yaml`` and ``val_loss.png`` into the sweep folder."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(sweep_dir / "trials.json", {"metric": metric, "trials": rows, "best": best})
    best_job = trial_job(
        job.model_dump(mode="json"),
        {k: best[k] for k in space},
        job.run.dir,
        f"{job.run.name}-best",
    )
    data = best_job.model_dump(mode="json")
    data["cluster"]["storage_path"] = job.cluster.storage_path
    atomic_write(sweep_dir / "best.yaml", yaml.safe_dump(data, sort_keys=False))
    plot_sweep(rows, list(space), metric, sweep_dir / "val_loss.png")


def plot_sweep(rows: list[dict], keys: list[str], metric: str, path: Path) -> None:
    """Heat map of the best metric over the first two searched fields (a line for one field)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    col = f"best_{metric}"
    fig, ax = plt.subplots(figsize=(6, 4.5))
    if len(keys) >= 2:
        xs = sorted({r[keys[0]] for r in rows}, key=value_order)
        ys = sorted({r[keys[1]] for r in rows}, key=value_order)
        grid = [
            [
                min(
                    (
                        r[col]
                        for r in rows
                        if r[keys[0]] == x and r[keys[1]] == y and r[col] is not None
                    ),
                    default=float("nan"),
                )
                for x in xs
            ]
            for y in ys
        ]
        im = ax.imshow(grid, origin="lower", cmap="viridis_r", aspect="auto")
        ax.set_xticks(range(len(xs)), [str(x) for x in xs])
        ax.set_yticks(range(len(ys)), [str(y) for y in ys])
        ax.set_xlabel(keys[0])
        ax.set_ylabel(keys[1])
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, "-" if v != v else f"{v:.3f}", ha="center", va="center", color="w")
        fig.colorbar(im, ax=ax, label=f"best {metric}")
    else:
        pts = sorted(
            ((r[keys[0]], r[col]) for r in rows if r[col] is not None),
            key=lambda p: value_order(p[0]),
        )
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-")
        ax.set_xlabel(keys[0])
        ax.set_ylabel(f"best {metric}")
    ax.set_title(f"best {metric} per trial (ASHA-stopped trials included)")
    fig.tight_layout()
    try:
        atomic_write_with(path, lambda tmp: fig.savefig(tmp, dpi=100))
    finally:
        plt.close(fig)
