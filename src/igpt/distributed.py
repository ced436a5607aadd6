"""Everything that knows about ranks: who am I, process-group start/stop, wrapping the model, rank-0 printing.

Launch with torchrun (it sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); without it the run is a
single process and nothing here touches torch.distributed. gloo on CPU, nccl on CUDA. The model stays
single-device code: ``wrap_model`` applies torch.compile / DDP / FSDP2 from the outside, in one place.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist
from torch import nn

from igpt.errors import IgptError


@dataclass(frozen=True)
class DistInfo:
    rank: int  # global rank, 0 .. world_size - 1
    local_rank: int  # rank on this machine: picks the GPU
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def get_dist_info() -> DistInfo:
    """Rank layout from torchrun's environment (1 process when it is absent); no process group needed."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), _env_int("LOCAL_RANK", 0), dist.get_world_size())
    rank, local, world = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0), _env_int("WORLD_SIZE", 1)
    if world < 1 or not 0 <= rank < world or local < 0:  # RANK=1 alone: a "rank 1 of 1" that wrote nothing
        raise IgptError(f"RANK={rank}, LOCAL_RANK={local}, WORLD_SIZE={world} is not a rank of a job: torchrun sets "
                        "them; unset them to run one process")
    return DistInfo(rank, local, world)


def _env_int(name: str, default: int) -> int:
    """An integer environment variable as torchrun sets it; unset or empty: ``default``."""
    raw = os.environ.get(name, "")
    if raw.strip() == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise IgptError(f"environment variable {name}={raw!r} is not an integer (torchrun sets it)") from None


def pick_device(requested: str | None, info: DistInfo, flag: str = "--device") -> torch.device:
    """'cuda' -> this rank's GPU; None -> CUDA when present, else CPU. A name torch does not know, a device
    this machine lacks, or a numbered accelerator under torchrun (every rank would take that one device) is an
    IgptError naming it as ``flag`` (the setting it came from)."""
    name = requested or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device("cuda", info.local_rank) if name == "cuda" else torch.device(name)
    except (RuntimeError, ValueError):
        raise IgptError(f"{flag} {name!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "meta":  # tensors without data: training ended in a traceback from autocast
        raise IgptError(f"{flag} {name}: meta tensors hold no data; give cpu or cuda")
    if device.type == "cpu" and device.index not in (None, 0):  # torch takes it; loading weights to it fails
        raise IgptError(f"{flag} {name}: the CPU has no numbered devices; give {flag} cpu")
    if info.distributed and device.type != "cpu" and name != device.type:
        raise IgptError(f"{flag} {name}: under torchrun ({info.world_size} processes) every rank would use this "
                        f"one device; give {flag} {device.type} (each rank takes its LOCAL_RANK's device; "
                        f"choose the cards with CUDA_VISIBLE_DEVICES)")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise IgptError(f"{flag} {name}: not usable on this machine ({first})") from None
    return device


def init_distributed(device: torch.device) -> bool:
    """Start the process group when torchrun launched several processes and none exists yet; True when this
    call started it (so the caller should also stop it)."""
    info = get_dist_info()
    if not info.distributed or dist.is_initialized():
        return False
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:  # WORLD_SIZE > 1 without torchrun: rendezvous raised a ValueError (a traceback)
        raise IgptError(f"WORLD_SIZE={info.world_size} but {' and '.join(missing)} unset: launch several processes "
                        "with torchrun, or unset WORLD_SIZE and RANK to run one")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    from torch.distributed.rendezvous import rendezvous

    # torchrun's store outlives a restart (--max-restarts): without a per-attempt prefix a restarted rank can read
    # the dead attempt's addresses and fail to connect (seen with gloo, static and c10d rendezvous alike)
    store, rank, world = next(rendezvous("env://"))
    store = dist.PrefixStore(f"igpt/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", store)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=rank, world_size=world,
                            device_id=device if device.type == "cuda" else None)
    return True


def cleanup(started: bool) -> None:
    """After success: stop the process group if this process started it, after a barrier (a rank that tears
    gloo down while another still talks to it can abort: 'terminate called without an active exception', seen
    in tests). After an error, leave the group alone and end the rank with ``exit_failed_rank``."""
    if started and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def in_process_group() -> bool:
    """True while this process is a rank of a started process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def exit_failed_rank(code: int) -> NoReturn:
    """End a failed rank of a distributed run now: flush stdout and stderr, then ``os._exit(code)``, without
    tearing down the process group or the interpreter. torch's gloo process group joins its worker threads
    in its destructor while holding the GIL, and a worker still releasing the last collective's tensors waits
    for the GIL: destroying the group right after a failed step deadlocked now and then (4 of 51 runs of
    tests/test_faults.py's full-disk case on 2 loaded cores; the stacks showed exactly that), leaving the
    other ranks in their next collective until the 30-minute timeout. Every file is already complete (the
    writes are atomic, the run log closed); the kernel closes the sockets, and torchrun stops the other ranks."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def print0(*args, **kwargs) -> None:
    """print on rank 0 only."""
    if get_dist_info().is_main:
        print(*args, **kwargs, flush=True)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place (a no-op in one process)."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def wrap_model(model: nn.Module, device: torch.device, fsdp: bool = False, compile: bool = False) -> nn.Module:
    """The one place the single-device model is adapted for training: torch.compile per block (in place, so
    parameter names do not change), then DDP (default) or FSDP2 ``fully_shard`` (each block, then the root)
    when several processes run. Returns the module to call in the training step."""
    if compile:
        for blk in model.h:
            blk.compile()
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return model
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        for blk in model.h:
            fully_shard(blk, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def grad_sync(wrapped: nn.Module, enabled: bool) -> None:
    """Turn gradient all-reduce on (last micro-batch of an accumulation) or off (the others)."""
    if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2
        wrapped.set_requires_gradient_sync(enabled)
    elif hasattr(wrapped, "require_backward_grad_sync"):  # DDP (what no_sync() toggles)
        wrapped.require_backward_grad_sync = enabled
