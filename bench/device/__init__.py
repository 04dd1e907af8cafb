"""One prepared GPU run that proves training, embedding and serving on one GPU machine, in at most 8 minutes.

    python -m bench.device OUT              # on the GPU machine (bench/device.sh OUT installs nothing else)
    python -m bench.device OUT --dry-run    # every stage at toy size on a CPU (~3 minutes on 2 cores)
    python -m bench.device OUT --only embed,serving    # a second run of some stages (environment always runs)

Why one script: GPU machines come rarely and in windows of ~15 minutes, start included; whoever gets one must
prove everything in one call, and the call must have been rehearsed. Each stage runs in its own process with a
time budget; a stage that raises is recorded and the next one runs, one that hangs is stopped at its budget
(SIGTERM, then SIGKILL) with what it had measured kept, and a stage that would start past the run's deadline is
skipped with that reason. ``OUT/device.json`` (everything), ``OUT/device.md`` (tables) and ``OUT/device.log``
(every stage's output) are rewritten after each stage, so a run cut short still leaves its report.

The package:

- ``harness``: budgets, a process per stage under its time limit, the run's record (``main``);
- ``stage``: the stage protocol (what a stage module exports) and ``Stage``, what a stage's process records with;
- ``report``: device.json, device.md and the goals judged from the figures;
- ``stages/``: one module per stage, listed in order in ``stages.STAGES`` (environment, pytest_gpu,
  pretrain_step, pretrain_loop, finetune, contrastive, embed, serving; each module's docstring says what it
  proves). Adding a stage is one module there and its line in that list;
- ``inputs``: what several stages share (photo-like JPEGs, the pretraining run's size, the finetuning stages'
  init checkpoint).

``--dry-run`` runs all of it at toy size on the CPU: tiny ViTs, a handful of steps, small images. What needs
CUDA is skipped by name with the reason; torch.compile uses the ``aot_eager`` backend there (the same
dynamo and AOTAutograd tracing, without inductor's C++ build, which costs ~1 minute per graph on 2 cores),
while the AOTInductor package is really compiled (for the CPU). Goals are judged on the GPU only.
"""
