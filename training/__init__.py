"""Pretraining, finetuning, linear probing and evaluation."""
