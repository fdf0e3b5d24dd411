"""torchrun / DistributedDataParallel helpers: process-group setup from the env, rank queries, reductions."""
import os

import torch
import torch.distributed as dist


def is_initialized():
    """True inside an initialised torch.distributed process group."""
    return dist.is_available() and dist.is_initialized()


def rank():
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if is_initialized() else 0


def world_size():
    """Number of processes (1 when not distributed)."""
    return dist.get_world_size() if is_initialized() else 1


def is_main():
    """True on the process that writes files and shows progress (rank 0)."""
    return rank() == 0


def init_from_env(backend=None):
    """Join the process group that torchrun describes (WORLD_SIZE > 1 in the env); no-op otherwise.

    backend: default NCCL with one GPU per process (LOCAL_RANK) when CUDA is available, else gloo.
    Returns (rank, world_size).
    """
    if not is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        for var in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
            if var not in os.environ:
                raise ValueError(f"WORLD_SIZE > 1 but {var} is not set: launch with torchrun")
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return rank(), world_size()


def default_device():
    """This process's GPU when CUDA is available (cuda:LOCAL_RANK), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def barrier():
    """Wait for every process (no-op when not distributed)."""
    if is_initialized():
        dist.barrier()


def all_sum(values, device):
    """Element-wise sum of a list of numbers over all processes (returned as floats)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def all_true(flag, device):
    """True when the boolean tensor `flag` is True on every process."""
    t = flag.to(device=device, dtype=torch.int32).reshape(())
    if is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def all_gather(obj):
    """List of `obj` from every process, indexed by rank."""
    if not is_initialized():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj):
    """Rank 0's `obj` on every process."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
