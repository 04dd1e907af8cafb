"""Pretraining, finetuning, linear probing and evaluation.

run (the lifecycle every training stage goes through) -> loop (the Trainer: schedule, precision, steps,
checkpoints) -> data (train/val datasets and their loaders) and parallel (DDP, FSDP2); rundir is a run's folder,
augment the training augmentations; pretrain, finetune and evaluate are the stages.
"""
