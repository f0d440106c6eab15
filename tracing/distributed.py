"""Data-parallel runs on torch.distributed: which share of the work this process does, and
the few collectives factscope needs.

Launched by ``torchrun --nproc-per-node N -m factscope ...`` every process runs the same
command; :func:`init_from_env` joins the process group (gloo on the CPU, NCCL on CUDA, each
rank on ``cuda:LOCAL_RANK``) and checks that every rank was started with the same settings.

Devices under torchrun (:func:`local_cuda_index`): ``--device auto`` and a bare ``--device
cuda`` both mean this rank's own GPU, ``cuda:LOCAL_RANK``. An explicit ``cuda:N`` is kept as
given where it is the only process on its machine (one rank per node); where several ranks
share a machine it would put them all on one GPU, so it is refused with one line, as is a
device map naming GPUs (every rank would load onto the same ones).
Outside torchrun nothing here does anything: :func:`ranks` is rank 0 of 1 and every
collective is the identity, so the library never branches on "distributed or not".

Errors: a rank that fails must not leave the others waiting in a collective forever.
:func:`together` runs a rank's share of the work, then every rank learns whether any failed
and all raise the first error (naming its rank); caches written before stay valid, so the
run resumes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from tracing.errors import FactscopeError, InvalidInput

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: ``rank`` of ``world`` processes."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes shared outputs."""
        return self.rank == 0

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's items: every ``world``-th one starting at ``rank`` (disjoint, and
        together all of them)."""
        return list(items[self.rank :: self.world])


def ranks() -> Ranks:
    """The current process's :class:`Ranks` (0 of 1 outside a process group)."""
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size())
    return Ranks()


def launched() -> bool:
    """Whether this process was started by torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_ranks() -> int:
    """How many torchrun processes share this machine (``LOCAL_WORLD_SIZE``; 1 outside
    torchrun)."""
    if not launched():
        return 1
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))


def local_cuda_index(index: int | None) -> int:
    """The CUDA device index this process uses for ``cuda`` (``index`` None) or ``cuda:N``.

    Outside torchrun: ``N``, or 0 for a bare ``cuda``. Under torchrun a bare ``cuda`` is this
    rank's own GPU, ``LOCAL_RANK``; an explicit ``N`` is kept where this is the only rank on
    its machine and refused where several are (they would all share GPU ``N``). Reads only
    the environment, so it holds whether or not a GPU is present."""
    if not launched():
        return 0 if index is None else index
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if index is None:
        return local_rank
    if local_ranks() > 1:
        raise InvalidInput(
            f"device 'cuda:{index}' under torchrun would put all {local_ranks()} ranks of this "
            "machine on one GPU: use --device cuda or auto (each rank its own cuda:LOCAL_RANK)"
        )
    return index


def _nccl_device(device: str | torch.device | None) -> int:
    """The GPU a rank's NCCL communicator binds: an explicit ``cuda:N`` as
    :func:`local_cuda_index` keeps it (one rank on its machine; refused where several share
    it), else (None, ``auto``, a bare ``cuda``, the CPU, a device map) ``LOCAL_RANK``."""
    if device is not None and not isinstance(device, dict):
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError):
            dev = None
        if dev is not None and dev.type == "cuda" and dev.index is not None:
            return local_cuda_index(dev.index)
    return int(os.environ.get("LOCAL_RANK", "0"))


def init_from_env(
    settings: Any = None,
    timeout_minutes: float = 60.0,
    device: str | torch.device | None = None,
) -> Ranks:
    """Join the torchrun process group (once) and check that every rank has the same
    ``settings`` (e.g. its command line); returns this process's :class:`Ranks`.

    ``device``: the device the command was given (``--device``). On NCCL each rank's current
    GPU is set before the group is made: an explicit ``cuda:N`` wins (where it is allowed,
    see :func:`local_cuda_index`), anything else means ``cuda:LOCAL_RANK``."""
    if not launched():
        return Ranks()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(_nccl_device(device))
        dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes))
    here = ranks()
    if settings is not None:
        seen = gather_objects(settings)
        odd = [r for r, s in enumerate(seen) if s != seen[0]]
        if odd:
            raise InvalidInput(
                f"torchrun ranks were started with different settings (rank {odd[0]} differs "
                "from rank 0): start every rank with the same command"
            )
    return here


def leave() -> None:
    """Leave the process group (no-op outside one). Called once at the end of a command: a
    gloo group still alive at interpreter exit can abort the process from its worker
    threads ("terminate called without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def gather_objects(obj: T) -> list[T]:
    """``obj`` of every rank, in rank order (``[obj]`` outside a process group)."""
    here = ranks()
    if here.world == 1:
        return [obj]
    out: list[Any] = [None] * here.world
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place and return it. The reduction runs where the backend
    wants it (gloo: the CPU; NCCL: this rank's GPU), the tensor making the trip if it lives
    elsewhere."""
    if ranks().world == 1:
        return tensor
    if dist.get_backend() == "nccl":
        where = torch.device("cuda", torch.cuda.current_device())
    else:
        where = torch.device("cpu")
    work = tensor if tensor.device == where else tensor.to(where)
    dist.all_reduce(work)
    if work is not tensor:
        tensor.copy_(work)
    return tensor


def barrier() -> None:
    """Wait for every rank (no-op outside a process group)."""
    if ranks().world > 1:
        dist.barrier()


class RankFailed(FactscopeError):
    """Another rank's share of the work failed; this rank stops with its message."""


def together(work: Callable[[], T]) -> T:
    """Run this rank's ``work``; then every rank learns whether any rank failed, and all
    raise: the failing rank its own exception, the others :class:`RankFailed` naming it."""
    if ranks().world == 1:
        return work()
    error: BaseException | None = None
    result: Any = None
    try:
        result = work()
    except Exception as exc:  # noqa: BLE001  (re-raised below on every rank)
        error = exc
    reports = gather_objects(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(r, msg) for r, msg in enumerate(reports) if msg is not None]
    if failed:
        rank, msg = failed[0]
        raise RankFailed(f"rank {rank} failed: {msg}")
    return result


def main_first(work: Callable[[], T]) -> T:
    """Rank 0 runs ``work`` (filling a shared cache), then the other ranks run it (reading
    what rank 0 wrote); a failure on any rank raises on all of them."""
    here = ranks()
    if here.world == 1:
        return work()
    first: Any = together(work if here.is_main else (lambda: None))
    return together((lambda: first) if here.is_main else work)
