"""Masked Autoencoders that ship: the shared core (config, model, checkpoints, artifact, data, pictures, CLI)."""

__version__ = "0.1.0"
