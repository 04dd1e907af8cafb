"""NNCLR's pieces, as MAE-CT uses them (``training.contrastive``): the projector and predictor heads, the
nearest-neighbour queue, and the InfoNCE loss over every rank's batch.

After the official code (github.com/ml-jku/MAE-CT: ``contrastive_heads/nnclr_head.py``,
``nnclr_ema_queue_head.py``, ``losses/nnclr_loss.py``) and NNCLR (Dwibedi et al. 2021).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import nn

from mae.dist import Dist
from mae.errors import UsageError


def projector(dim: int, hidden: int, out: int) -> nn.Sequential:
    """NNCLR's projector (the official ``create_projector``): 3 Linear layers, BN after each, ReLU between."""
    return nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(),
                         nn.Linear(hidden, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(),
                         nn.Linear(hidden, out, bias=False), nn.BatchNorm1d(out))


def predictor(dim: int, hidden: int) -> nn.Sequential:
    """NNCLR's predictor (the official ``create_predictor``): Linear-BN-ReLU, Linear."""
    return nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(),
                         nn.Linear(hidden, dim, bias=False))


class NNCLRHead(nn.Module):
    """Projector, predictor and the EMA target projector (no gradient; it fills and searches the queue)."""

    def __init__(self, dim: int, proj_hidden: int, pred_hidden: int, out: int):
        super().__init__()
        self.projector = projector(dim, proj_hidden, out)
        self.predictor = predictor(out, pred_hidden)
        self.target = copy.deepcopy(self.projector)
        self.target.requires_grad_(False)

    def forward(self, pooled: torch.Tensor, use_target: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """pooled (N, D) -> (prediction (N, P), the projection the queue sees (N, P), without gradient)."""
        projected = self.projector(pooled)
        predicted = self.predictor(projected)
        if not use_target:  # stage 1 (the official NnclrHead): the projector's own output
            return predicted, projected.detach()
        with torch.no_grad():
            return predicted, self.target(pooled)

    @torch.no_grad()
    def copy_to_target(self) -> None:
        """target <- projector (the official stage-3 start: its target projector is loaded from stage 2's)."""
        for t, o in zip(self.target.parameters(), self.projector.parameters()):
            t.copy_(o)
        for t, o in zip(self.target.buffers(), self.projector.buffers()):
            t.copy_(o)

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        """target <- momentum x target + (1 - momentum) x projector; buffers copied (the official ``update_ema``)."""
        for t, o in zip(self.target.parameters(), self.projector.parameters()):
            t.mul_(momentum).add_(o, alpha=1.0 - momentum)
        for t, o in zip(self.target.buffers(), self.projector.buffers()):
            t.copy_(o)


# ----------------------------------------------------------------------------------------------- the queue


class NeighbourQueue:
    """The support set: ``size`` L2-normalised projections with the label and sample index each came from.

    Starts as random unit vectors (index -1), as the official head's buffer; every rank pushes the whole gathered
    batch, so every rank holds the same queue. Its state travels in the checkpoint (``state``/``load``).
    """

    def __init__(self, size: int, dim: int, device: torch.device, seed: int):
        gen = torch.Generator().manual_seed(seed)
        self.vectors = F.normalize(torch.randn(size, dim, generator=gen), dim=1).to(device)
        self.labels = torch.full((size,), -1, dtype=torch.int64, device=device)
        self.ids = torch.full((size,), -1, dtype=torch.int64, device=device)
        self.ptr = 0

    @property
    def size(self) -> int:
        return len(self.vectors)

    @torch.no_grad()
    def nearest(self, z: torch.Tensor, ids: torch.Tensor, topk: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """z (N, P) normalised -> (queue index (N,), that projection (N, P)): the nearest entry that is not the
        image itself, or one drawn uniformly from the ``topk`` nearest (``torch``'s generator, reseeded per step)."""
        sim = z @ self.vectors.T  # (N, Q)
        sim[(self.ids[None, :] == ids[:, None]) & (ids[:, None] >= 0)] = -1.0
        if topk <= 1:
            idx = sim.argmax(dim=1)
        else:
            candidates = sim.topk(min(topk, self.size), dim=1).indices  # (N, k)
            pick = torch.randint(candidates.shape[1], (len(z),), device=z.device)
            idx = candidates[torch.arange(len(z), device=z.device), pick]
        return idx, self.vectors[idx]

    @torch.no_grad()
    def push(self, z: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor) -> None:
        """Replace the oldest entries with a batch (wrapping around; any batch size)."""
        n = min(len(z), self.size)
        at = (self.ptr + torch.arange(n, device=z.device)) % self.size
        self.vectors[at] = z[-n:].to(self.vectors.dtype)
        self.labels[at] = labels[-n:]
        self.ids[at] = ids[-n:]
        self.ptr = int((self.ptr + n) % self.size)

    def state(self) -> dict[str, Any]:
        return {"vectors": self.vectors.cpu(), "labels": self.labels.cpu(), "ids": self.ids.cpu(), "ptr": self.ptr}

    def load(self, state: dict[str, Any]) -> None:
        if tuple(state["vectors"].shape) != tuple(self.vectors.shape):
            raise UsageError(f"the checkpoint's queue holds {tuple(state['vectors'].shape)} projections, this run "
                             f"expects {tuple(self.vectors.shape)} (contrastive.queue_size x output_dim)")
        device = self.vectors.device
        self.vectors = state["vectors"].to(device, torch.float32)
        self.labels, self.ids = state["labels"].to(device), state["ids"].to(device)
        self.ptr = int(state["ptr"])


# ----------------------------------------------------------------------------------------------- across ranks


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's slice (solo-learn's, as the official
    ``AllGatherGradAutograd``); works on gloo, which has no reduce_scatter."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = [torch.zeros_like(x) for _ in range(torch_dist.get_world_size())]
        torch_dist.all_gather(out, x.contiguous())
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> torch.Tensor:
        stacked = torch.stack(grads)
        torch_dist.all_reduce(stacked)
        return stacked[torch_dist.get_rank()]


def gather(x: torch.Tensor, dist: Dist, grad: bool = False) -> tuple[torch.Tensor, int]:
    """Every rank's rows of ``x`` in rank order, and where this rank's start. Batches may differ in size (an
    unreadable image is skipped on one rank), so rows are padded for the collective and the padding dropped."""
    if not dist.enabled:
        return x, 0
    sizes = torch.tensor([len(x)], device=x.device)
    all_sizes = [torch.zeros_like(sizes) for _ in range(dist.world)]
    torch_dist.all_gather(all_sizes, sizes)
    counts = [int(s) for s in all_sizes]
    pad = max(counts) - len(x)
    padded = torch.cat([x, x.new_zeros(pad, *x.shape[1:])]) if pad else x
    if grad:
        parts = _GatherWithGrad.apply(padded)
    else:
        parts = [torch.zeros_like(padded) for _ in range(dist.world)]
        torch_dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:c] for p, c in zip(parts, counts)]), sum(counts[: dist.rank])


def nnclr_loss(predicted: torch.Tensor, positive: torch.Tensor, temperature: float, dist: Dist) -> torch.Tensor:
    """InfoNCE of the official ``nnclr_loss_fn``: each row's positive (N, P) against the normalised predictions of
    the whole batch (all ranks, with gradient); the matching prediction is the target class."""
    p = F.normalize(predicted.float(), dim=-1)
    everyone, start = gather(p, dist, grad=True)
    logits = positive.float() @ everyone.T / temperature  # (N, N_all)
    target = torch.arange(start, start + len(p), device=p.device)
    return F.cross_entropy(logits, target)


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """The Kozachenko-Leonenko entropy estimate's loss (SSCD's and DINOv2's ``KoLeoLoss``): for the L2-normalised
    rows of ``x`` (N, D), -mean log of each row's distance to its nearest other row. Minimising it pushes every
    image away from its closest neighbour in the batch, spreading the embedding over the sphere."""
    if len(x) < 2:
        return x.sum() * 0.0
    v = F.normalize(x, dim=-1, eps=eps)
    with torch.no_grad():  # the nearest other row; the distance to it carries the gradient
        sim = v @ v.T
        sim.fill_diagonal_(-2.0)
        nearest = sim.argmax(dim=1)
    distance = F.pairwise_distance(v, v[nearest], eps=eps)
    return -torch.log(distance + eps).mean()
