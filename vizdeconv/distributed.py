"""Running a job across processes, GPUs and machines with torch.distributed (``torchrun``).

Each rank takes a deterministic share of the work, the ranks exchange small Python objects (top-k
lists, failures), and rank 0 writes what is shared. Outside ``torchrun`` there is one rank and
every exchange is a no-op, so the jobs run one code path either way.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from vizdeconv.errors import VizDeconvError

T = TypeVar("T")
# How long a rank waits for the others at an exchange (the slowest rank's scan included): a rank that
# dies is stopped by torchrun, which stops the others at once; this only ends a wait on a hung rank.
TIMEOUT = datetime.timedelta(hours=6)


class RankFailure(VizDeconvError):
    """Another rank stopped (or could not be reached) while this one waited for it."""


@dataclass(frozen=True)
class Ranks:
    """This process's place among the job's processes: ``rank`` of ``world``."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """Rank 0 writes the files every rank contributed to."""
        return self.rank == 0

    def share(self, items: Sequence[T]) -> list[T]:
        """This rank's items: every ``world``-th one from ``rank`` (round robin, so shares differ by at most one)."""
        return list(items[self.rank::self.world])

    def gather(self, value: T) -> list[T]:
        """Every rank's ``value``, in rank order, on every rank."""
        if self.world == 1:
            return [value]
        gathered: list = [None] * self.world
        try:
            dist.all_gather_object(gathered, value)
        except (RuntimeError, dist.DistError) as error:
            raise RankFailure(_lost(self, error)) from None
        return gathered

    def barrier(self) -> None:
        """Wait until every rank gets here (rank 0 then reads what the others wrote)."""
        self.gather(None)


def current() -> Ranks:
    """The ranks of the running process group, or one rank when there is none."""
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size())
    return Ranks()


@contextlib.contextmanager
def from_environment() -> Iterator[Ranks]:
    """Join the process group that ``torchrun`` describes in the environment, if any, for the ``with`` block.

    NCCL when this machine has CUDA (one device per local rank, made the current device so that
    ``--device auto`` picks it), else Gloo.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        yield current()
        return
    cuda = torch.cuda.is_available()
    if cuda:
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if per_node > torch.cuda.device_count():
            raise RankFailure(f"{per_node} ranks per machine but {torch.cuda.device_count()} GPUs: one rank per GPU "
                              "(--nproc-per-node), or CUDA_VISIBLE_DEVICES= for CPU ranks")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    except (RuntimeError, ValueError, dist.DistError) as error:
        raise RankFailure(f"could not join the torchrun process group ({_first_line(error)})") from None
    ranks = current()

    def stopped(signum, frame) -> None:  # torchrun stops every rank when one fails
        sys.stderr.write(f"Error: rank {ranks.rank} of {ranks.world}: stopped by torchrun (another rank failed, or the "
                         "job was cancelled); run the same command again to resume from the last checkpoint\n")
        raise SystemExit(2)  # not an Exception: nothing on the way may swallow it; files are left whole

    previous = signal.signal(signal.SIGTERM, stopped)
    try:
        yield ranks
    finally:
        signal.signal(signal.SIGTERM, previous)
        dist.destroy_process_group()


def _lost(ranks: Ranks, error: BaseException) -> str:
    return (f"rank {ranks.rank} of {ranks.world}: another rank stopped ({_first_line(error)}); run the same "
            "command again to resume from the last checkpoint")


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
