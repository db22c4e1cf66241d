"""Search and fine-tune on several processes with ``torch.distributed``, launched by ``torchrun``.

    torchrun --nproc_per_node=2 -m mpqc compile ...                        # two processes on this machine
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 --rdzv_id=JOB \\
             -m mpqc compile ...                                           # on each of two machines

:func:`setup` joins the process group that ``torchrun`` describes in its environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``): gloo for CPU tensors, plus nccl for CUDA tensors where CUDA is
present. Without those variables (or with ``WORLD_SIZE=1``) everything below is the one-process code path,
unchanged. What a run on ``W`` processes guarantees:

* **The same global batch.** The train loader's batch size is the *global* batch. Every process iterates the
  batch sampler of the loader it was given, re-seeded per epoch exactly as in one process, so every process sees
  the sequence of global batches a one-process run would see, and loads only its contiguous slice of each
  (:class:`ShardedBatchSampler`; slice sizes differ by at most one). This is what ``DistributedSampler`` does,
  except that it keeps the loader's own order (``DistributedSampler`` draws its own permutation and pads the data
  set by repeating examples, so its run could not equal a one-process run). A global batch smaller than ``W``
  is refused with a :class:`~mpqc.errors.DataError`.
* **The same gradient.** Each process multiplies its slice's mean loss by ``W * slice / global_batch``
  (:meth:`World.global_batch_means`); DDP averages the gradients over the processes, so every parameter gets the
  gradient of the mean loss over the global batch, as in one process (up to float summation order), whatever the
  slice sizes. Terms that do not depend on the data (the budget penalty, the quantizers' ``extra_loss()``) are
  computed identically on every process and are not scaled: the average of equal gradients is that gradient.
* **The same model.** ``DistributedDataParallel`` wraps the whole training objective (model, budget penalty,
  extra losses), so quantizer parameters (bit-width parameters, step sizes, gates) are synchronized like any other
  parameter and DDP sees every use of every parameter; it runs with ``find_unused_parameters=True`` because some
  methods leave parameters out of a phase (CSQ's float weights while the search trains their bit-planes); for the
  other methods DDP warns once per process that it found no unused parameter, which is expected (the cost is one
  traversal of the autograd graph per step).
  :meth:`World.wrap` checks first that every process holds the same model (structure and integer bit-widths).
* **The same random draws.** Every process seeds torch's global RNG with ``seed + epoch`` at every epoch start,
  and on resume restores the RNG state rank 0 saved, so draws that do not depend on a process's slice (SDQ's
  one bit-width choice per quantizer per step) are the same on every process, and the same as in one process.
  (Draws whose number depends on the slice, such as dropout masks, cannot be: on an uneven last batch of an epoch
  they leave the processes' streams apart until the next epoch re-seeds them.)
* **Evaluation** (:func:`mpqc.train.evaluate` with a ``world``) is split the same way and the counts summed.
* **Rank 0 writes.** Only rank 0 writes the run directory, checkpoints, the report and the results, and shows
  progress bars; it reads a checkpoint to resume and sends it to the others (:meth:`World.call_on_main`), so the
  other processes need no shared file system. An error in such a rank-0 step is raised on every process.
* **Failures.** A process that fails makes ``torchrun`` stop the others and exit non-zero; checkpoints are
  written atomically, so the last one is intact and ``--resume`` continues from it (with any number of
  processes: the global batch, not the process count, defines the run). Collectives time out after ``timeout``
  (default :data:`DEFAULT_TIMEOUT`) instead of waiting forever, and a failed collective is reported as a
  :class:`DistributedError` naming the process.

The loader must give every process the same sequence of global batches (shuffle with its own seeded generator or
torch's global RNG: :func:`mpqc.train.epoch_batches` re-seeds both every epoch); :meth:`World.check_same_batches`
refuses a loader that does not, at the end of every epoch.
"""
from __future__ import annotations

import gc
import hashlib
import os
import pickle
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, IterableDataset, Sampler

from mpqc.errors import ConfigError, DataError, MpqcError

T = TypeVar("T")

#: How long a collective waits for the other processes before it fails (``mpqc compile --dist-timeout``).
DEFAULT_TIMEOUT = timedelta(minutes=10)

#: The environment variables torchrun sets for every process it starts.
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(MpqcError):
    """A collective operation failed, or the processes of a run disagree (model, data order)."""


class RankFailedError(DistributedError):
    """Raised on every other process when a step that runs on one process only (rank 0) failed there.

    ``rank`` is the process that failed (it reports the original error itself); ``__cause__`` is that error.
    """

    def __init__(self, message: str, rank: int) -> None:
        super().__init__(message)
        self.rank = rank

    def __reduce__(self):
        return type(self), (str(self), self.rank)


@dataclass(frozen=True)
class World:
    """This process's place among the processes of a run: ``rank`` in ``[0, size)``; one process is ``World()``."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise ConfigError(f"rank must be in [0, {self.size}), got {self.rank}")

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and shows progress."""
        return self.rank == 0

    def __str__(self) -> str:
        return f"rank {self.rank} of {self.size}"

    # ------------------------------------------------------------------------------------------ data
    def shard(self, loader: DataLoader, *, allow_empty: bool = False) -> DataLoader:
        """``loader`` itself in one process; otherwise a loader over the same data set and settings that yields
        this process's slice of each global batch of ``loader`` (see :class:`ShardedBatchSampler`)."""
        if not self.distributed:
            return loader
        if isinstance(loader.dataset, IterableDataset) or loader.batch_sampler is None:
            why = (f"its data set is an IterableDataset ({type(loader.dataset).__name__})"
                   if isinstance(loader.dataset, IterableDataset) else "it has batch_size=None and no batch_sampler")
            raise ConfigError(f"{self}: cannot split the loader's batches across {self.size} processes: {why}; "
                              "give a map-style data set and a batch size (the global batch)")
        return DataLoader(
            loader.dataset,
            batch_sampler=ShardedBatchSampler(loader.batch_sampler, self.rank, self.size, allow_empty=allow_empty),
            num_workers=loader.num_workers,
            collate_fn=loader.collate_fn,
            pin_memory=loader.pin_memory,
            timeout=loader.timeout,
            worker_init_fn=loader.worker_init_fn,
            multiprocessing_context=loader.multiprocessing_context,
            generator=loader.generator,  # the same object: re-seeding it re-seeds the sampler it feeds
            prefetch_factor=loader.prefetch_factor if loader.num_workers else None,
            persistent_workers=loader.persistent_workers,
        )

    def check_same_batches(self, loader: DataLoader, what: str) -> None:
        """Refuse a sharded ``loader`` whose processes drew different global batches so far (different orders)."""
        sampler = loader.batch_sampler
        if not self.distributed or not isinstance(sampler, ShardedBatchSampler):
            return
        digests = self.gather(sampler.digest())
        different = [rank for rank, digest in enumerate(digests) if digest != digests[0]]
        if different:
            raise DistributedError(
                f"{what}: the train loader gave rank {different[0]} other global batches than rank 0; every "
                "process must draw the same batches (shuffle with a seeded generator, no per-process randomness)"
            )

    def global_batch_means(self, count: int, means: Tensor) -> tuple[float, Tensor]:
        """``(share, global_means)`` for this process's slice of ``count`` examples and its per-example means.

        ``share = size * count / global_count`` is the factor of this slice's mean loss that makes DDP's average
        of the gradients equal the gradient of the global batch's mean; ``global_means`` are ``means`` averaged
        over the whole global batch (detached). In one process: ``(1.0, means.detach())``.
        """
        if not self.distributed:
            return 1.0, means.detach()
        totals = torch.cat([torch.tensor([float(count)], dtype=torch.float64),
                            means.detach().to("cpu", torch.float64).reshape(-1) * count])
        dist.all_reduce(totals)
        global_count = float(totals[0])
        return self.size * count / global_count, (totals[1:] / global_count).to(means.dtype)

    def sum(self, values: Sequence[float]) -> list[float]:
        """``values`` summed element-wise over the processes (itself in one process)."""
        if not self.distributed:
            return list(values)
        totals = torch.tensor(list(values), dtype=torch.float64)
        dist.all_reduce(totals)
        return totals.tolist()

    # ------------------------------------------------------------------------------------------ model
    def wrap(self, module: nn.Module) -> nn.Module:
        """``module`` itself in one process; otherwise ``DistributedDataParallel(module)``, which starts from rank
        0's parameters and averages gradients. Refuses processes that hold different models."""
        if not self.distributed:
            return module
        self.check_same_model(module)
        device = next(module.parameters()).device
        return DistributedDataParallel(
            module,
            device_ids=[device] if device.type == "cuda" else None,
            find_unused_parameters=True,
        )

    def check_same_model(self, module: nn.Module) -> None:
        """Raise :class:`DistributedError` unless every process holds a module of the same structure, parameter
        shapes and integer bit-widths (the module's ``repr``, which shows each quantizer's bits)."""
        fingerprint = hashlib.sha256(repr(module).encode()).hexdigest()
        fingerprints = self.gather(fingerprint)
        different = [rank for rank, other in enumerate(fingerprints) if other != fingerprints[0]]
        if different:
            raise DistributedError(
                f"rank {different[0]} holds a different model than rank 0 (structure or bit-widths differ); every "
                "process must build the same model"
            )

    # ------------------------------------------------------------------------------------------ control
    def gather(self, value: T) -> list[T]:
        """``value`` from every process, in rank order (``[value]`` in one process)."""
        if not self.distributed:
            return [value]
        values: list = [None] * self.size
        dist.all_gather_object(values, value)
        return values

    def call_on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only and return its result on every process (it must pickle).

        If ``fn`` raises, rank 0 raises that error and every other process raises :class:`RankFailedError`
        caused by it, so no process waits for a result that will never come.
        """
        if not self.distributed:
            return fn()
        outcome: list = [None]
        error: BaseException | None = None
        if self.is_main:
            try:
                outcome = [(True, fn())]
            except Exception as raised:  # every other process must hear about it, whatever it is
                error = raised
                outcome = [(False, _picklable(raised))]
        dist.broadcast_object_list(outcome, src=0)
        succeeded, value = outcome[0]
        if error is not None:
            raise error
        if not succeeded:
            raise RankFailedError(f"rank 0 failed: {value}", rank=0) from value
        return value

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def _picklable(error: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return DistributedError(f"{type(error).__name__}: {error}")


class ShardedBatchSampler(Sampler[list[int]]):
    """This process's contiguous slice of every batch ``batch_sampler`` yields (the global batches).

    A global batch of ``n`` indices is split as ``numpy.array_split`` would into ``world_size`` slices whose
    sizes differ by at most one; rank ``r`` gets slice ``r``. A global batch smaller than ``world_size`` would
    leave a process without data: it raises :class:`DataError`, or (``allow_empty``, for evaluation, where no
    process needs to take part in every batch) the empty slice is skipped. :meth:`digest` fingerprints the
    global batches drawn so far (the same on every process when they draw the same batches).

    >>> from torch.utils.data import BatchSampler
    >>> global_batches = BatchSampler(range(7), batch_size=5, drop_last=False)
    >>> [list(ShardedBatchSampler(global_batches, rank, 2)) for rank in (0, 1)]
    [[[0, 1, 2], [5]], [[3, 4], [6]]]
    """

    def __init__(self, batch_sampler: Sampler[list[int]] | Sequence[list[int]], rank: int, world_size: int, *,
                 allow_empty: bool = False) -> None:
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank must be in [0, {world_size}), got {rank}")
        self.batch_sampler = batch_sampler
        self.rank = rank
        self.world_size = world_size
        self.allow_empty = allow_empty
        self._digest = hashlib.sha256()

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[list[int]]:
        for number, batch in enumerate(self.batch_sampler):
            batch = list(batch)
            self._digest.update(repr(batch).encode())
            if len(batch) < self.world_size and not self.allow_empty:
                raise DataError(
                    f"global batch {number + 1} of the train loader has {len(batch)} examples, fewer than the "
                    f"{self.world_size} processes; use a larger batch size, or drop_last=True"
                )
            base, extra = divmod(len(batch), self.world_size)
            start = self.rank * base + min(self.rank, extra)
            mine = batch[start:start + base + (self.rank < extra)]
            if mine:
                yield mine

    def digest(self) -> str:
        return self._digest.hexdigest()


# ---------------------------------------------------------------------------------------------- process group
def launched_by_torchrun() -> bool:
    """Whether this process was started by torchrun (or another launcher setting the same variables)."""
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def setup(timeout: timedelta = DEFAULT_TIMEOUT) -> World:
    """Join the process group torchrun describes (once; later calls return the same :class:`World`).

    Uses an already initialised default process group as it is; otherwise initialises one from the torchrun
    environment when ``WORLD_SIZE > 1`` (gloo, and ``cpu:gloo,cuda:nccl`` with CUDA, each process on the GPU of
    its ``LOCAL_RANK``), with collectives failing after ``timeout``. Otherwise: ``World()``, one process.
    """
    if dist.is_available() and dist.is_initialized():
        return current_world()
    if not launched_by_torchrun():
        return World()
    try:
        size, rank, local_rank = (int(os.environ[name]) for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"))
    except ValueError:
        raise ConfigError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (as torchrun sets them)") from None
    if size == 1:
        return World()
    if not dist.is_available():
        raise ConfigError(f"WORLD_SIZE={size} but this torch build has no torch.distributed")
    if timeout.total_seconds() <= 0:
        raise ConfigError(f"the collective timeout must be positive, got {timeout}")
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"  # the same on every process
    if torch.cuda.is_available() and local_rank < torch.cuda.device_count():
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, timeout=timeout)
    return current_world()


def current_world() -> World:
    """The :class:`World` of the initialised default process group, or ``World()`` when there is none."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(rank=dist.get_rank(), size=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", 0)))


def teardown(synchronize: bool = True) -> None:
    """Leave the default process group, if this process is in one.

    ``synchronize``: wait for every process first (a barrier). Pass False on an error path, where a peer may be
    gone and the barrier would wait for the collective timeout.

    Garbage is collected before the group is destroyed. Without that, what DDP leaves behind in reference cycles
    is freed only at interpreter exit, and a process that used DDP aborted there now and then after a successful
    run ("terminate called without an active exception", SIGABRT; about 1 run in 10 of a two-process DDP script
    on this machine, none in 150 with the collection: tests/test_distributed.py). Which object in those cycles
    holds on to gloo was not pinned down; the measurements are what this rests on.
    """
    if dist.is_available() and dist.is_initialized():
        if synchronize and dist.get_world_size() > 1:
            dist.barrier()
        gc.collect()
        dist.destroy_process_group()


def collective_failure(world: World, where: str, error: Exception) -> DistributedError | None:
    """The :class:`DistributedError` to raise instead of ``error``, which stopped ``where`` on this process, when
    ``error`` is a failed collective operation (it names this process and the likely cause: another process
    stopped); None for any other error, which should propagate as it is."""
    if not world.distributed:
        return None
    failed_collective = isinstance(error, dist.DistError) or any(
        word in str(error) for word in ("gloo", "NCCL", "Connection closed", "Connection reset", "Timed out"))
    if not failed_collective:
        return None
    return DistributedError(
        f"{world}: {where} stopped: a collective operation failed, probably because another process stopped "
        f"first (see its error) or cannot be reached ({type(error).__name__}: {str(error).splitlines()[0]})"
    )


def error_prefix(message: str = "") -> str:
    """``" (rank R of W)"`` for an error ``message`` of a process torchrun started among several (``""`` when the
    message names the process already, or in a one-process run)."""
    world = current_world()
    if not world.distributed and launched_by_torchrun() and os.environ["WORLD_SIZE"] != "1":
        world = World(rank=int(os.environ["RANK"]), size=int(os.environ["WORLD_SIZE"]))
    return f" ({world})" if world.distributed and str(world) not in message else ""
