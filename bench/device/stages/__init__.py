"""The stages of the device run, in the order they run: the one list that names them.

Adding a stage: a module here that follows the protocol of ``bench.device.stage`` (``NAME``, ``BUDGET``, ``run``,
``report``, ``goals``), and its line below. Its GPU budget comes out of the run's (``harness.RUN_BUDGET``): the GPU
column of all stages must still sum to at most that.
"""

from __future__ import annotations

from bench.device.stages import (
    contrastive,
    embed,
    environment,
    finetune,
    pretrain_loop,
    pretrain_step,
    pytest_gpu,
    serving,
)

STAGES = (
    environment,  # first, always: the later stages see the site folder it installs the carried wheels into
    pytest_gpu,
    pretrain_step,
    pretrain_loop,
    finetune,  # finetunes the checkpoint pretrain_loop leaves
    contrastive,  # tunes the same checkpoint (MAE-CT)
    embed,
    serving,
)
BY_NAME = {stage.NAME: stage for stage in STAGES}
NAMES = tuple(BY_NAME)
