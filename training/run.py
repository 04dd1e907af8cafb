"""The lifecycle of a training run, the same for every training stage (pretraining, finetuning, probing, ...).

``run_training`` joins the process group (torchrun; a world of one otherwise), opens the run folder, refuses to
overwrite a checkpoint unless asked to resume, builds the stage's ``Trainer``, continues its checkpoint, writes
config.json, trains, writes summary.json and the loss curve, and leaves the process group however the run ends.
``resumed_config`` is the config a ``--resume`` continues. A stage gives only its ``Trainer`` and what the run was
given (its data source, its init)::

    def contrastive(cfg, init, out, data, state, resume=False):
        return run_training(out, lambda run, dist: ContrastiveTrainer(cfg, run, dist, data, state), resume=resume,
                            record={"task": "contrastive", "init": str(init), "data_source": data})
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mae.checkpoint import load_checkpoint
from mae.config import Config
from mae.dist import Dist, init_distributed, shutdown_distributed
from mae.errors import AlreadyExistsError, UsageError
from training.loop import Trainer
from training.rundir import CHECKPOINT, RunDir


def run_training(out: str | Path, build: Callable[[RunDir, Dist], Trainer], *, resume: bool = False,
                 record: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train one run from its start (or its checkpoint) to its end; returns its summary.

    Args:
        out: the run folder (``--out``).
        build: makes the stage's trainer (its data, model and optimiser) for the run folder and this process.
        resume: continue the checkpoint in ``out``; a finished run trains nothing and reports where it stands.
            Without it a checkpoint in ``out`` is refused (``AlreadyExistsError``), never overwritten.
        record: what the run was given (data source, init, task), written to config.json and summary.json.

    Returns:
        The summary, on every process (only rank 0 writes files): ``record``, where the run is, its length, lr,
        last loss, skipped images, time and world, the trainer's ``summary(last)`` and (rank 0) the loss curve.
    """
    dist = init_distributed()
    trainer = None
    try:
        run = RunDir(out, dist)
        if run.checkpoint.exists() and not resume:
            raise AlreadyExistsError(f"{run.checkpoint} exists: pass --resume to continue that run, "
                                     "or choose another --out")
        trainer = build(run, dist)
        resumed_from = None
        if resume and run.checkpoint.exists():
            trainer.resume()
            resumed_from = trainer.step
        record = dict(record or {})
        run.write_config(trainer.cfg, {**record, "world_size": dist.world, "effective_batch": trainer.effective_batch,
                                       "lr": trainer.base_lr, **trainer.run_record()})
        started = time.perf_counter()
        last = trainer.fit()
        seconds = time.perf_counter() - started
        summary = _summary(run, trainer, record, last, resumed_from, seconds)
        if dist.is_main:
            from mae.visualize import loss_curve

            summary["loss_curve"] = str(loss_curve(run.metrics, run.path / "loss_curve.png", ("loss", "val_loss")))
            run.write_summary(summary)
        return summary
    finally:
        trainer = None  # the wrapped model goes before its process group (see shutdown_distributed)
        shutdown_distributed()


def _summary(run: RunDir, trainer: Trainer, record: dict[str, Any], last: dict[str, Any], resumed_from: int | None,
             seconds: float) -> dict[str, Any]:
    dist = trainer.dist
    return {
        **record,
        "run": str(run.path),
        "checkpoint": str(run.checkpoint),
        "steps": trainer.step,
        "total_steps": trainer.total_steps,
        "steps_per_epoch": trainer.steps_per_epoch,
        "effective_batch": trainer.effective_batch,
        "lr": trainer.base_lr,
        "resumed_from_step": resumed_from,
        "loss": last.get("loss"),
        "skipped_images": trainer.skipped_images,
        **trainer.summary(last),
        "seconds": round(seconds, 1),
        "world_size": dist.world,
        "rank": dist.rank,
        "device": str(dist.device),
    }


def resumed_config(out: str | Path, cfg: Config, *, resume: bool, asked: bool) -> Config:
    """The config a run in ``out`` trains with: ``cfg`` for a new run; for ``--resume`` of a run that has a
    checkpoint, the config saved in it (``resume_config``)."""
    checkpoint = Path(out) / CHECKPOINT
    if resume and checkpoint.exists():
        return resume_config(checkpoint, cfg, asked)
    return cfg


def resume_config(checkpoint: Path, cfg: Config, asked: bool) -> Config:
    """The config ``--resume`` continues: the one saved in ``checkpoint``. Options given on the command line
    (``asked``) that would change it are refused with the fields that differ, never silently applied."""
    saved = Config.from_dict(load_checkpoint(checkpoint)["config"])
    if asked and saved != cfg:
        raise UsageError(f"--resume continues the saved run's config; these options differ from it: "
                         f"{saved.differences(cfg)}")
    return saved
