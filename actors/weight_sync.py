"""Collective weight sync: learner rank 0 broadcasts its weights to the rollout workers in a process
group of their own (NCCL on GPU, as OpenRLHF and verl do; gloo on CPU, so the same code path runs
and is tested here).

The group is built from its own TCPStore and ``ProcessGroupGloo`` / ``ProcessGroupNCCL`` objects,
never through ``init_process_group``, so it lives beside the learners' DeepSpeed group without
touching it. Weights travel as a few flat buffers (consecutive tensors of one dtype, up to
``bucket_bytes`` each) whose layout both sides derive from the same metadata, so a broadcast is a
handful of collective calls, not one per tensor. A receiver takes them one bucket at a time
(``receive_buckets``) and loads each into its model before the next arrives, as OpenRLHF loads each
broadcast tensor: beside its model it holds one bucket, never a second copy of the model. Every group
has an epoch: a restarted rollout worker is not a member of the current one, and the driver rebuilds
the group under a new epoch.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from datetime import timedelta
from typing import Any

import torch

WeightMeta = list[tuple[str, tuple[int, ...], str]]  # (name, shape, dtype) in broadcast order

DTYPES = {
    str(d): d
    for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.uint8, torch.bool)
}


class SyncGroupError(RuntimeError):
    """This member is not in the sync group the caller asked for (it was restarted, or never joined)."""


class StaleWeightsError(RuntimeError):
    """A rollout call reached a worker holding older weights than it needs (a restart under collective sync)."""


class WeightMismatchError(ValueError):
    """A learner export that cannot load into a rollout model (names or shapes differ). Found from the
    metadata before any weight moves, and never retried: every later sync would fail the same way."""


class EngineUnusableError(RuntimeError):
    """A failed weight load left the inference engine unable to generate (vLLM: the rollback of a reload that
    stopped part-way failed too). No retry in this process can help: the rollout worker exits so that Ray
    restarts it (``max_restarts``) with a fresh engine."""


def tensor_meta(state_dict: Mapping[str, torch.Tensor]) -> WeightMeta:
    return [(k, tuple(v.shape), str(v.dtype)) for k, v in state_dict.items()]


def shape_mismatches(
    meta: WeightMeta, shapes: Mapping[str, tuple[int, ...]], key: Callable[[str], str] = lambda k: k
) -> list[str]:
    """``name: sent (..) but the model has (..)`` for each tensor of ``meta`` whose shape differs from
    ``shapes[key(name)]`` (names ``shapes`` lacks are the key check's business)."""
    return [
        f"{name}: sent {tuple(shape)} but the model has {tuple(shapes[key(name)])}"
        for name, shape, _ in meta
        if key(name) in shapes and tuple(shape) != tuple(shapes[key(name)])
    ]


class ObjectStoreWeights:
    """A learner export as it travels through Ray's object store (``rollout.weight_sync: object_store``).

    Ray gives readers on a node numpy arrays zero-copy, as views of the shared object, but unpickles
    torch tensors into fresh heap copies (three times the export at the peak of a rollout worker's
    update, bench/weight_sync.py). Each tensor therefore travels as a flat byte array, and a reader's
    ``state_dict()`` is built over the shared memory: an update costs it no copy beyond the one it
    loads into its model. Those tensors are read-only: load them, never write to them.
    """

    def __init__(self, state_dict: dict[str, torch.Tensor]):
        self.meta = tensor_meta(state_dict)
        for name, _, dt in self.meta:
            if dt not in DTYPES:
                raise TypeError(f"weights: {name} has dtype {dt}, which the weight sync does not carry ({sorted(DTYPES)})")
        self.arrays = [v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy() for v in state_dict.values()]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays)

    def state_dict(self) -> dict[str, torch.Tensor]:
        with warnings.catch_warnings():  # read-only views of the shared object, by design
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return {
                name: torch.from_numpy(a).view(DTYPES[dt]).reshape(shape) for (name, shape, dt), a in zip(self.meta, self.arrays)
            }


def fetch_weights(weights: Any) -> dict[str, torch.Tensor]:
    """The state dict an ``update_weights`` call names: a dict, an ``ObjectStoreWeights``, or a one-element
    list holding the object ref of either (a ref inside a list is not resolved by Ray before the call)."""
    import ray

    obj = ray.get(weights[0]) if isinstance(weights, list) else weights
    return obj.state_dict() if isinstance(obj, ObjectStoreWeights) else obj


def plan_buckets(meta: WeightMeta, bucket_bytes: int) -> list[list[int]]:
    """Indices of ``meta`` grouped into buckets: consecutive tensors of one dtype, at most
    ``bucket_bytes`` each (a larger tensor gets a bucket of its own)."""
    buckets: list[list[int]] = []
    size, dtype = 0, None
    for i, (_, shape, dt) in enumerate(meta):
        n = torch.Size(shape).numel() * DTYPES[dt].itemsize
        if not buckets or dt != dtype or size + n > bucket_bytes:
            buckets.append([])
            size, dtype = 0, dt
        buckets[-1].append(i)
        size += n
    return buckets


class BroadcastGroup:
    """One member of a weight-broadcast group; rank 0 is the source (learner rank 0)."""

    def __init__(self, store: torch.distributed.Store, rank: int, world: int, epoch: int, backend: str, timeout_s: float):
        import torch.distributed as dist

        if backend not in ("gloo", "nccl"):
            raise ValueError(f"weight sync backend: {backend!r} is not gloo or nccl")
        if backend == "nccl" and not torch.cuda.is_available():
            raise RuntimeError(
                "weight sync backend nccl needs a GPU in every member; this one has none "
                "(give rollout workers GPUs, or use rollout.weight_sync: object_store)"
            )
        prefixed = dist.PrefixStore(f"rime-weight-sync/{epoch}", store)
        timeout = timedelta(seconds=timeout_s)
        if backend == "gloo":
            self.pg = dist.ProcessGroupGloo(prefixed, rank, world, timeout)
        else:
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            self.pg = dist.ProcessGroupNCCL(prefixed, rank, world, opts)
        self.rank, self.world, self.epoch, self.backend = rank, world, epoch, backend
        self.recv_s = 0.0  # time the last receive spent in broadcasts (the rest is the caller's loading)
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")

    @staticmethod
    def open_store(world: int, timeout_s: float) -> tuple[torch.distributed.TCPStore, str, int]:
        """The rendezvous store, hosted by the source: (store, host, port), on a free port."""
        import ray

        host = ray.util.get_node_ip_address()
        store = torch.distributed.TCPStore(
            host, 0, world, is_master=True, timeout=timedelta(seconds=timeout_s), wait_for_workers=False
        )
        return store, host, store.port

    @staticmethod
    def client_store(host: str, port: int, world: int, timeout_s: float) -> torch.distributed.TCPStore:
        return torch.distributed.TCPStore(host, port, world, is_master=False, timeout=timedelta(seconds=timeout_s))

    def _bcast(self, buf: torch.Tensor) -> None:
        opts = torch.distributed.BroadcastOptions()
        opts.rootRank = 0
        self.pg.broadcast([buf], opts).wait()
        if self.backend == "nccl":
            # NCCL's wait() only orders the current CUDA stream; block the host too, so the time measured
            # is the transfer's and a received bucket is complete before the caller reads it
            torch.cuda.synchronize(self.device)

    def send(self, state_dict: dict[str, torch.Tensor], bucket_bytes: int) -> int:
        """Broadcast ``state_dict`` (rank 0); returns the bytes sent."""
        tensors = list(state_dict.values())
        sent = 0
        for idx in plan_buckets(tensor_meta(state_dict), bucket_bytes):
            buf = torch.cat([tensors[i].detach().reshape(-1).to(self.device) for i in idx])
            self._bcast(buf)
            sent += buf.numel() * buf.element_size()
        return sent

    def receive_buckets(self, meta: WeightMeta, bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """Each bucket rank 0 broadcasts, as (name, view into the received buffer) pairs, received only
        when the caller asks for it. Consume it to the end: the source sends every bucket, and stops
        (after the group's timeout) at the first one nobody receives."""
        self.recv_s = 0.0
        for idx in plan_buckets(meta, bucket_bytes):
            sizes = [torch.Size(meta[i][1]).numel() for i in idx]
            t = time.perf_counter()
            buf = torch.empty(sum(sizes), dtype=DTYPES[meta[idx[0]][2]], device=self.device)
            self._bcast(buf)
            self.recv_s += time.perf_counter() - t
            yield [(meta[i][0], part.view(meta[i][1])) for i, part in zip(idx, buf.split(sizes))]
            del buf  # the caller has loaded it: at most this bucket and the next are alive


def check_member(group: BroadcastGroup | None, epoch: int) -> BroadcastGroup:
    if group is None or group.epoch != epoch:
        have = None if group is None else group.epoch
        raise SyncGroupError(f"not a member of weight-sync group epoch {epoch} (this process has {have})")
    return group
