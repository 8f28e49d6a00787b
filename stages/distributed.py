"""What a stage needs to be right on N processes: the Accelerator its accelerate config asks for, each rank's share
of a global batch, statistics over the gathered batch, and full parameters for generating and saving sharded models.

Global means global: `batch_size`, `rollout_prompts`, `prompts_per_step`, `minibatch_size` are totals across
processes. Each rank takes a contiguous, disjoint share (whole groups stay on one rank), and every statistic of a
batch (whitening, baselines, logged means) is computed on the batch gathered from all ranks.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence, TypeVar

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import (DistributedDataParallelKwargs, DistributedType, FullyShardedDataParallelPlugin,
                              gather_object)

T = TypeVar("T")
TRACE_DIR_ENV = "RL4LLM_TRACE_DIR"  # when set, each rank writes the row ids it trained on there (tests read them)


def build_accelerator(config_file: str) -> Accelerator:
    """The Accelerator of a stage process, honouring the accelerate config's `mixed_precision` in one process too
    (a plain `Accelerator()` reads it only from the variables `accelerate launch` sets)."""
    config = yaml.safe_load(Path(config_file).read_text()) or {}
    mixed_precision = os.environ.get("ACCELERATE_MIXED_PRECISION") or str(config.get("mixed_precision", "no"))
    on_cpu = not torch.cuda.is_available()
    # LLMs have no running-statistics buffers (only constants such as rotary frequencies): DDP need not broadcast
    # them before every forward, which PPO (several forwards per step) would pay for in collectives
    no_buffer_sync = DistributedDataParallelKwargs(broadcast_buffers=False)
    accelerator = Accelerator(cpu=on_cpu, mixed_precision=mixed_precision, kwargs_handlers=[no_buffer_sync])
    if on_cpu and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        # accelerate only turns FSDP on for GPU-like devices; FSDP2 (`fully_shard`) itself runs on CPU with gloo.
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()
    return accelerator


def prepare(acc: Accelerator, *objects: Any) -> Any:
    """`acc.prepare`, keeping FSDP on where `build_accelerator` forced it (prepare re-derives the mode from the
    device and would report a CPU run as MULTI_CPU, so checkpoints and state dicts would not gather the shards)."""
    mode = acc.state.distributed_type
    prepared = acc.prepare(*objects)
    acc.state.distributed_type = mode
    return prepared


def is_fsdp(acc: Accelerator) -> bool:
    return acc.distributed_type == DistributedType.FSDP


def rank_seed(seed: int, acc: Accelerator) -> int:
    """The sampling seed of this rank: `seed` on rank 0 (a 1-process run is unchanged), distinct on every other."""
    return seed + 1_000_003 * acc.process_index


def seed_sampling(seed: int, acc: Accelerator) -> None:
    """Seed torch's global RNG (what `generate` draws from) per rank, after the models are built identically."""
    torch.manual_seed(rank_seed(seed, acc))


def check_divisible(what: str, value: int, acc: Accelerator) -> None:
    """Global sizes must split evenly over the processes."""
    if value % acc.num_processes:
        raise ValueError(f"{what}={value} is global and must be divisible by the number of processes "
                         f"({acc.num_processes})")


def shard(items: Sequence[T], acc: Accelerator) -> list[T]:
    """This rank's contiguous share of `items` (near-equal shares; rank order = item order)."""
    n, rank, size = len(items), acc.process_index, acc.num_processes
    start = rank * (n // size) + min(rank, n % size)
    return list(items[start:start + n // size + (rank < n % size)])


def gather_list(items: list[T], acc: Accelerator) -> list[T]:
    """Every rank's `items`, concatenated in rank order, on every rank."""
    return gather_object(items) if acc.num_processes > 1 else list(items)


def broadcast_object(acc: Accelerator, value: T) -> T:
    """The main process's `value` on every process (a barrier too)."""
    if acc.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


def gather_rows(acc: Accelerator, x: torch.Tensor) -> torch.Tensor:
    """Rows [B, T] of every rank, [N·B, T_max]: padded with 0 on the right to the longest T (B equal on all ranks)."""
    if acc.num_processes == 1:
        return x
    return acc.gather(acc.pad_across_processes(x, dim=1, pad_index=0))


def local_rows(acc: Accelerator, gathered: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a tensor made by `gather_rows`, cut back to the local shape of `like` [B, T]."""
    b, t = like.shape[0], like.shape[1]
    return gathered[acc.process_index * b:(acc.process_index + 1) * b, :t]


def global_means(acc: Accelerator, metrics: dict[str, float]) -> dict[str, float]:
    """Per-rank means → means over all ranks (equal weights: ranks hold equal shares)."""
    if acc.num_processes == 1 or not metrics:
        return metrics
    values = acc.reduce(torch.tensor(list(metrics.values()), dtype=torch.float64, device=acc.device), "mean")
    return dict(zip(metrics, values.tolist()))


def write_trace(acc: Accelerator, label: str, ids: list[Any]) -> None:
    """Record the row ids this rank trained on (only when RL4LLM_TRACE_DIR is set)."""
    trace_dir = os.environ.get(TRACE_DIR_ENV)
    if trace_dir:
        path = Path(trace_dir) / f"{label}.rank{acc.process_index}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(ids))


@contextmanager
def full_parameters(acc: Accelerator, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The model with full parameters, in eval mode, for generation and evaluation (TRL's
    `unwrap_model_for_generation`). Under FSDP2 every rank must enter, and run forwards inside: the shards are
    all-gathered once and kept until exit, so generation runs without a collective per token and the ranks may
    generate different numbers of tokens. (A rank that runs no forward inside leaves FSDP's state out of step.)"""
    was_training = model.training
    if is_fsdp(acc):
        from torch.distributed.fsdp import FSDPModule

        sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
        for module in sharded:
            module.unshard()
            module.set_reshard_after_forward(False)
        inner = model
    else:
        sharded, inner = [], acc.unwrap_model(model)
    inner.eval()
    try:
        yield inner
    finally:
        for module in sharded:
            module.set_reshard_after_forward(acc.state.fsdp_plugin.reshard_after_forward)
            module.reshard()
        model.train(was_training)


def full_state_dict(acc: Accelerator, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict (collective under FSDP: every rank must call it), without the second name of a tied
    parameter (e.g. `lm_head.weight` tied to the embeddings), as `save_pretrained` writes it."""
    from torch.distributed.tensor import DTensor

    inner = acc.unwrap_model(model)
    tied = {n for n, _ in inner.named_parameters(remove_duplicate=False)} - {n for n, _ in inner.named_parameters()}
    state = acc.get_state_dict(model)
    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in state.items() if k not in tied}
