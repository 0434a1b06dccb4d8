"""Data parallelism with torch.distributed, set up from torchrun's environment variables.

Every process holds the whole (frozen) base and the adapter; each takes its rows of every
global batch (``rows[rank::world]``), and after the backward pass only the *trainable* gradients
are summed across processes, as one flat buffer. Losses are normalised by the global token (or
example) count, so the summed gradient equals the single-process gradient of the same global
batch. Rank 0 writes all files. gloo on CPU, NCCL on CUDA.

``train.parallel: fsdp`` shards instead (:func:`shard_model`): PyTorch FSDP2's ``fully_shard``
per transformer block and once at the root, frozen base and adapter alike, so each process holds
1/N of every parameter between uses and all-gathers one block at a time. FSDP's reduce-scatter
then sums the trainable gradients (divide factor 1: the loss is already normalised by the global
count), and the adapter is gathered (:func:`gathered_trainable`) to be written once, by rank 0.
A 4-bit base is sharded too: its packed codes become frozen uint8 parameters
(:meth:`lorakit.quant.Linear4bit.store_as_parameter_`); the small quant states stay whole on
every process.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)

@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    sharded: bool = False  # FSDP: parameters are DTensors, every process must run every forward


    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def backend_for(use_cuda: bool) -> str:
    """NCCL for CUDA tensors, gloo for CPU ones."""
    return "nccl" if use_cuda else "gloo"


def setup(device: str = "auto") -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); pick the device.

    The backend follows the device: NCCL when CUDA is used, gloo otherwise (:func:`backend_for`).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            from lorakit.errors import ConfigError

            raise ConfigError(f"process {local_rank} of this node has no GPU of its own ({torch.cuda.device_count()} "
                              "visible; NCCL needs one per process): start at most that many with "
                              "--nproc_per_node, or set train.device: cpu")
        torch.cuda.set_device(local_rank)
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend_for(use_cuda))
    return DistInfo(rank, world, local_rank, dev)


def teardown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_grads(params: list[torch.nn.Parameter], info: DistInfo) -> None:
    """Sum the gradients of `params` over processes: one flat all-reduce, trainable params only."""
    if not info.enabled or info.sharded:  # FSDP's reduce-scatter has summed them already
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])  # (Σ numel,)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def broadcast_params(params: list[torch.nn.Parameter], info: DistInfo) -> None:
    """Start every process from rank 0's trainable weights."""
    if info.enabled:
        with torch.no_grad():
            for p in params:
                dist.broadcast(p.data, src=0)


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


# ---------------------------------------------------------------------- FSDP2


def shard_model(model: nn.Module, info: DistInfo) -> nn.Module:
    """FSDP2: ``fully_shard`` every transformer block, then the root; gradients summed, not averaged.

    Call after rank 0's trainable weights are broadcast and before the optimizer is built (the
    parameters become DTensors). A 4-bit base's packed codes are turned into frozen parameters
    first, so they are sharded with the rest.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lorakit.models import embedding_units, transformer_blocks

    for module in model.modules():
        if hasattr(module, "store_as_parameter_"):
            module.store_as_parameter_()
    mesh = init_device_mesh(info.device.type, (info.world_size,))
    blocks = transformer_blocks(model)
    if not blocks:
        from lorakit.errors import ConfigError

        raise ConfigError("train.parallel: fsdp found no transformer blocks to shard in this model "
                          "(no _no_split_modules, no ModuleList); use train.parallel: ddp")
    for block in blocks + embedding_units(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)  # what is left: final norm, a tied embedding, heads
    for module in model.modules():
        if hasattr(module, "set_gradient_divide_factor"):
            module.set_gradient_divide_factor(1.0)  # a sum: each process's loss is already / global count
            module.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM); ×1 is skipped
    info.sharded = True
    return model


def held_bytes(model: nn.Module) -> tuple[int, int, int]:
    """(bytes this process holds, bytes of the whole model, bytes every process holds whole):
    parameters (their local shards when sharded), plus buffers and 4-bit quant states (whole)."""
    from torch.distributed.tensor import DTensor

    local = whole = 0
    for p in model.parameters():
        size = p.element_size()
        whole += p.numel() * size
        local += (p.to_local().numel() if isinstance(p, DTensor) else p.numel()) * size
    extra = sum(b.numel() * b.element_size() for b in model.buffers())
    for module in model.modules():
        state = getattr(module, "quant_state", None)
        if state is not None and hasattr(state, "as_dict"):
            extra += sum(t.numel() * t.element_size() for t in state.as_dict(packed=True).values()
                         if torch.is_tensor(t))
    return local + extra, whole + extra, extra


def full_tensor(value: Any) -> Any:
    """The whole tensor behind a DTensor (a collective: every process calls it in the same order)."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


def like_param(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`full` laid out as `param` is: this process's shard when `param` is a DTensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(param, DTensor):
        return full
    return distribute_tensor(full.to(param.device), param.device_mesh, param.placements, src_data_rank=None)


@contextlib.contextmanager
def gathered_trainable(model: nn.Module, info: DistInfo) -> Iterator[dict[str, torch.Tensor]]:
    """Every trainable tensor whole, by parameter name; on rank 0 the model shows them in place
    of its shards for the duration (to save the PEFT folder from), other ranks only take part in
    the gathers. Without sharding: the parameters themselves."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not info.sharded:
        yield dict(named)
        return
    full = {n: full_tensor(p.detach()) for n, p in named}
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    try:
        if info.is_main:
            for name, _ in named:
                owner, _, leaf = name.rpartition(".")
                module = model.get_submodule(owner)
                swapped.append((module, leaf, module._parameters[leaf]))
                module._parameters[leaf] = nn.Parameter(full[name], requires_grad=True)
        yield full
    finally:
        for module, leaf, param in swapped:
            module._parameters[leaf] = param


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with every sharded tensor gathered whole (as one process's)."""
    state = optimizer.state_dict()
    state["state"] = {k: {name: full_tensor(v) for name, v in sorted(s.items())}
                      for k, s in sorted(state["state"].items())}
    return state


def shard_optimizer_state(state: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """A whole optimizer state (from :func:`full_optimizer_state` or one process) laid out like the
    optimizer's parameters, ready for ``load_state_dict``."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    out = dict(state)
    out["state"] = {k: {name: like_param(v, params[int(k)]) if torch.is_tensor(v) and v.dim() else v
                        for name, v in s.items()} for k, s in state["state"].items()}
    return out
