"""How a model trains across processes: DDP, or FSDP2 sharding, and full state dicts either way.

Under FSDP2 each transformer block is a unit whose parameters are gathered just before it runs and freed after;
checkpoints still hold full (unsharded) state dicts, with the optimizer state numbered as on one process, so
that a sharded run's checkpoint opens, resumes and exports anywhere.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from mae.dist import Dist


def parallelize(model: nn.Module, dist: Dist, fsdp: bool, groups: list[dict[str, Any]] | None = None
                ) -> tuple[nn.Module, list[dict[str, Any]] | None]:
    """Shard ``model`` in place (FSDP2) or wrap it (DDP) for the world of ``dist``; a world of one is left as it is.

    Returns (the module the training step runs, ``groups`` over the parameters that now train). Optimiser
    groups hold parameter objects, which sharding replaces: they are carried over by name.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    by_name = None if groups is None else [{**g, "params": [names[id(p)] for p in g["params"]]} for g in groups]
    wrapped = model
    if fsdp:
        shard_model(model, dist)
    elif dist.enabled:
        wrapped = nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None
        )
    if by_name is None:
        return wrapped, None
    params = dict(model.named_parameters())
    return wrapped, [{**g, "params": [params[n] for n in g["params"]]} for g in by_name]


def shard_model(model: nn.Module, dist: Dist) -> None:
    """FSDP2 in place: each transformer block is a unit (its parameters gathered just before it runs and freed
    after), then the rest of the model (embeddings, norms, head) as the root unit."""
    from timm.models.vision_transformer import Block
    from torch.distributed.device_mesh import init_device_mesh

    fully_shard = _fully_shard()
    # The model returns pred as a slice of the decoder output (a view, as in the official code); FSDP warns that an
    # in-place op on it would skip the all-gather. Nothing modifies pred in place, so the warning only alarms.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(dist.device.type, (dist.world,))
    for module in model.modules():
        if isinstance(module, Block):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _fully_shard() -> Any:
    """``fully_shard`` (FSDP2): ``torch.distributed.fsdp`` from torch 2.6, the ``_composable`` path before."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        from torch.distributed._composable.fsdp import fully_shard
    return fully_shard


# ----------------------------------------------------------------------------------------------- full state dicts


def full_model_state(model: nn.Module, fsdp: bool) -> dict[str, torch.Tensor]:
    """The full (unsharded) model state dict; under FSDP every rank must call it (it gathers the shards)."""
    if not fsdp:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # A forward without backward (validation) leaves the root unit's parameters gathered; shard them back so
    # that the module holds the parameters the optimizer steps.
    model.reshard()
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, fsdp: bool) -> dict[str, Any]:
    """The optimizer state as ``optimizer.state_dict()`` has it on one process; under FSDP every rank must call it
    (it gathers) and only rank 0 gets it ({} elsewhere)."""
    if not fsdp:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    model.reshard()  # see full_model_state
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    gathered = get_optimizer_state_dict(model, optimizer, options=full)  # {} except on rank 0
    return optimizer_state_by_index(gathered) if gathered else {}


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, ckpt: dict[str, Any], fsdp: bool) -> None:
    """Load full model and optimizer state dicts (a checkpoint's) into a model sharded or not."""
    if not fsdp:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    full = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, ckpt["model"], options=full)
    set_optimizer_state_dict(model, optimizer, optimizer_state_by_name(ckpt["optimizer"], optimizer, model),
                             options=full)


def optimizer_state_by_index(state: dict[str, Any]) -> dict[str, Any]:
    """A full optimizer state dict keyed by parameter names (what torch.distributed.checkpoint gathers) -> the
    layout ``optimizer.state_dict()`` has on one process: parameters numbered in group order."""
    ids: dict[str, int] = {}
    groups = []
    for group in state["param_groups"]:
        for name in group["params"]:
            ids.setdefault(name, len(ids))
        groups.append({**group, "params": [ids[n] for n in group["params"]]})
    return {"state": {ids[n]: s for n, s in state["state"].items()}, "param_groups": groups}


def optimizer_state_by_name(state: dict[str, Any], optimizer: torch.optim.Optimizer, model: nn.Module
                            ) -> dict[str, Any]:
    """The inverse of ``optimizer_state_by_index`` for ``optimizer`` (numbers -> the names of its parameters)."""
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    groups = [{**saved, "params": [order[i] for i in saved["params"]]} for saved in state["param_groups"]]
    return {"state": {order[int(i)]: s for i, s in state["state"].items()}, "param_groups": groups}
