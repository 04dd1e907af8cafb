"""Masked Autoencoders that ship: the core every other folder builds on.

config (frozen dataclasses, presets), model, checkpoint, artifact (+ artifact_config), sources (where images come
from: ``open_data``, splits), images (decoding and geometry, torch-free), datasets (torch datasets, on-device
normalisation, GPU decode), shards, dist, files, hardware, errors, visualize. It imports torch, timm, numpy and
PIL only, never a folder above it (training, export, retrieval, serving, cli); the command line is ``cli/``.
"""

__version__ = "0.1.0"
