"""The collective weight-sync transport on its own: bucket plans, and a real 2-process gloo broadcast of
a mixed-dtype state dict through a group built beside an already-initialised default group."""

from __future__ import annotations

import multiprocessing as mp
import socket

import pytest
import torch

from actors.weight_sync import BroadcastGroup, SyncGroupError, check_member, plan_buckets, tensor_meta


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a": torch.randn(3, 4, generator=g),
        "b": torch.randn(100, generator=g),
        "c": torch.arange(6).view(2, 3),
        "d": torch.randn(2, 2, generator=g).to(torch.bfloat16),
        "e": torch.randn(5, generator=g),
    }


def test_bucket_plan_groups_consecutive_same_dtype_tensors_under_the_cap():
    meta = tensor_meta(_state())
    assert plan_buckets(meta, 1 << 20) == [[0, 1], [2], [3], [4]]  # dtype changes split buckets
    assert plan_buckets(meta, 100) == [[0], [1], [2], [3], [4]]  # 48 + 400 bytes > 100: split (b alone, oversize)
    assert plan_buckets(meta, 448) == [[0, 1], [2], [3], [4]]


def _member(rank: int, port: int, q) -> None:
    import torch.distributed as dist

    try:
        # A default group first, as in a DeepSpeed learner: the sync group must not disturb it.
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port + 1}", rank=rank, world_size=2)
        store = dist.TCPStore("127.0.0.1", port, 2, is_master=rank == 0, wait_for_workers=False)
        group = BroadcastGroup(store, rank, 2, epoch=3, backend="gloo", timeout_s=30)
        sd = _state()
        if rank == 0:
            q.put(("sent", group.send(sd, bucket_bytes=64)))
        else:  # bucket by bucket, as a rollout worker loads them: each arrives when asked for, in plan order
            meta = tensor_meta(sd)
            buckets = group.receive_buckets(meta, bucket_bytes=64)
            got, names = {}, []
            for bucket in buckets:
                names.append([k for k, _ in bucket])
                got.update({k: v.clone() for k, v in bucket})
            q.put(("buckets", names == [[meta[i][0] for i in idx] for idx in plan_buckets(meta, 64)] and group.recv_s > 0))
            q.put(("equal", all(torch.equal(got[k], sd[k]) and got[k].dtype == sd[k].dtype for k in sd)))
        t = torch.tensor([rank + 1.0])
        dist.all_reduce(t)  # the default group still works
        q.put(("default", float(t)))
        dist.destroy_process_group()
    except Exception as e:  # pragma: no cover - reported to the test
        q.put(("error", repr(e)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_broadcast_beside_the_default_group():
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_member, args=(r, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    results = [q.get(timeout=120) for _ in range(5)]
    for p in procs:
        p.join(timeout=60)
    assert not [r for r in results if r[0] == "error"], results
    sent = [v for k, v in results if k == "sent"][0]
    assert sent == sum(v.numel() * v.element_size() for v in _state().values())
    assert ("equal", True) in results and ("buckets", True) in results and [v for k, v in results if k == "default"] == [3.0, 3.0]


def test_membership_is_checked_by_epoch():
    with pytest.raises(SyncGroupError, match="epoch 2"):
        check_member(None, 2)
    with pytest.raises(ValueError, match="gloo or nccl"):
        BroadcastGroup(None, 0, 1, 0, "mpi", 1.0)


def _send_file(port: int, path: str, bucket_bytes: int, q, stop_after: int | None = None) -> None:
    """Learner rank 0's side: broadcast the state dict saved at ``path``; with ``stop_after``, exit after
    that many buckets (a source that dies mid-broadcast)."""
    try:
        store = torch.distributed.TCPStore("127.0.0.1", port, 2, is_master=True, wait_for_workers=False)
        group = BroadcastGroup(store, 0, 2, epoch=1, backend="gloo", timeout_s=20)
        sd = torch.load(path)
        if stop_after is None:
            q.put(("sent", group.send(sd, bucket_bytes)))
            return
        tensors = list(sd.values())
        for idx in plan_buckets(tensor_meta(sd), bucket_bytes)[:stop_after]:
            group._bcast(torch.cat([tensors[i].reshape(-1) for i in idx]))
        q.put(("died", stop_after))
    except Exception as e:  # pragma: no cover - reported to the test
        q.put(("error", repr(e)))


def _worker_and_export(tiny, tmp_path):
    """A real HF rollout worker and a perturbed export of its model (so a landed tensor is visible)."""
    from actors.rollout import RolloutWorker

    threads = torch.get_num_threads()
    worker = RolloutWorker(str(tiny.save(tmp_path / "m")), "hf")
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    export = {
        k: v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
        for k, v in worker.emb.model.state_dict().items()
    }
    return worker, export


def _receive_from(worker, export: dict, tmp_path, bucket: int, stop_after: int | None = None):
    """Run ``worker.receive_weights`` (version 1) against a sender process; returns (error or None, what
    the sender reported)."""
    torch.save(export, tmp_path / "export.pt")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    sender = ctx.Process(target=_send_file, args=(port, str(tmp_path / "export.pt"), bucket, q, stop_after))
    sender.start()
    error = None
    try:
        worker.join_weight_sync("127.0.0.1", port, 1, 2, 1, "gloo", 20)
        try:
            worker.receive_weights(1, 1, tensor_meta(export), bucket)
        except Exception as e:  # noqa: BLE001 - the caller asserts which
            error = e
        return error, q.get(timeout=60)
    finally:
        sender.join(timeout=60)


GREEDY = {"max_new_tokens": 4, "temperature": 0.0, "top_p": 1.0, "seed": 0}


def test_an_export_of_another_shape_is_refused_before_any_weight_moves_and_the_broadcast_is_drained(tiny, tmp_path):
    """An export whose names match but one tensor has another shape (learners and rollout workers started
    from different models) is refused from its metadata: nothing lands, the worker keeps its version, and
    it takes the whole broadcast anyway, so the source finishes instead of waiting out the timeout."""
    from actors.weight_sync import StaleWeightsError, WeightMismatchError

    worker, export = _worker_and_export(tiny, tmp_path)
    before = {k: v.clone() for k, v in worker.emb.model.state_dict().items()}
    bad = list(export)[1]
    export[bad] = torch.zeros(export[bad].shape[0] + 1, *export[bad].shape[1:])
    error, sender = _receive_from(worker, export, tmp_path, 1 << 20)
    assert isinstance(error, WeightMismatchError) and f"{bad}: sent {tuple(export[bad].shape)}" in str(error), error
    assert sender == ("sent", sum(v.numel() * v.element_size() for v in export.values()))
    assert all(torch.equal(v, before[k]) for k, v in worker.emb.model.state_dict().items())
    assert worker.version == 0 and worker.load_log == []
    worker.generate([{"text": "a red circle"}], 1, GREEDY, weights={"version": 0, "ref": None})
    with pytest.raises(StaleWeightsError, match="needs v1"):
        worker.generate([{"text": "a red circle"}], 1, GREEDY, weights={"version": 1, "ref": None})


def test_a_receive_that_fails_part_way_marks_the_worker_stale(tiny, tmp_path):
    """The source dies after the first bucket of a broadcast: that bucket is already in the worker's model
    when the receive fails. The worker then holds no version, so the next rollout call is refused as stale
    (the driver re-broadcasts) rather than sampling from a model that is half old, half new."""
    from actors.rollout import MIXED_WEIGHTS
    from actors.weight_sync import StaleWeightsError

    worker, export = _worker_and_export(tiny, tmp_path)
    bucket = 1 << 20
    plan = plan_buckets(tensor_meta(export), bucket)
    assert len(plan) > 3
    error, sender = _receive_from(worker, export, tmp_path, bucket, stop_after=1)
    assert sender == ("died", 1) and isinstance(error, RuntimeError), (sender, error)
    landed, missed = list(export)[plan[0][0]], list(export)[plan[1][0]]
    state = worker.emb.model.state_dict()
    assert torch.equal(state[landed], export[landed]) and not torch.equal(state[missed], export[missed])
    assert worker.version == MIXED_WEIGHTS
    with pytest.raises(StaleWeightsError, match="needs v1"):
        worker.generate([{"text": "a red circle"}], 1, GREEDY, weights={"version": 1, "ref": None})


def test_a_worker_whose_engine_became_unusable_exits_and_ray_restarts_it_at_the_version(ray_local, tiny, tmp_path):
    """A load that leaves the engine unable to generate (vLLM: a reload that failed part-way and whose undo
    failed too, EngineUnusableError) ends the actor's process. Ray restarts it from the original model and
    re-issues the update on the fresh engine, so the caller gets the version it asked for, loaded exactly,
    instead of a worker that fails every later call."""
    import os

    from actors.rollout import RolloutWorker, load_exported
    from actors.weight_sync import EngineUnusableError, ObjectStoreWeights
    from rime_model import Embedder

    ray = ray_local
    path = str(tiny.save(tmp_path / "m"))
    marker = str(tmp_path / "engine_broke")

    class EngineBreaksOnce(RolloutWorker):
        """The first incarnation's engine breaks on its first load; the restarted one is healthy."""

        def __init__(self, model_path: str, marker: str):
            super().__init__(model_path, "hf")
            if not os.path.exists(marker):
                open(marker, "w").close()

                def broken(state_dict):
                    raise EngineUnusableError("the rollback failed too")

                self.backend.load_weights = broken

    ref_model = Embedder.load(path).model
    g = torch.Generator().manual_seed(0)
    export = {
        k: v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
        for k, v in ref_model.state_dict().items()
    }
    load_exported(ref_model, export)
    expected = float(sum(p.detach().double().sum() for p in ref_model.parameters()))

    actor = ray.remote(EngineBreaksOnce).options(num_cpus=0.25, max_restarts=1, max_task_retries=1).remote(path, marker)
    first = ray.get(actor.info.remote(), timeout=300)
    info = ray.get(actor.update_weights.remote(1, [ray.put(ObjectStoreWeights(export))]), timeout=300)
    after = ray.get(actor.info.remote(), timeout=60)
    assert os.path.exists(marker) and info["version"] == 1
    assert after["pid"] != first["pid"] and after["reconstructed"] and not first["reconstructed"]
    assert after["version"] == 1 and after["loads"] == 1
    assert ray.get(actor.weights_checksum.remote(), timeout=60) == pytest.approx(expected, rel=1e-12)
    ray.kill(actor)


def test_object_store_weights_reach_a_reader_exact_and_zero_copy(ray_local):
    """Every dtype the sync carries comes back bit-identical in another process, as read-only views of the
    shared object (a copied array would be writable), and a dtype it cannot carry is refused at packing."""
    from actors.weight_sync import ObjectStoreWeights, fetch_weights

    ray = ray_local
    sd = {**_state(), "f": torch.tensor(True), "g": torch.arange(4, dtype=torch.int32).view(2, 2).t()}  # 0-dim, non-contiguous

    @ray.remote(num_cpus=0)
    def read(weights):
        shared = [a.flags.writeable for a in ray.get(weights[0]).arrays]
        return {k: v.clone() for k, v in fetch_weights(weights).items()}, shared

    packed = ObjectStoreWeights(sd)
    assert packed.nbytes == sum(v.numel() * v.element_size() for v in sd.values())
    got, writeable = ray.get(read.remote([ray.put(packed)]), timeout=120)
    assert list(got) == list(sd)
    for k, v in sd.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    assert writeable == [False] * len(sd), "an array was copied out of the object store"
    assert all(torch.equal(fetch_weights(packed)[k], v) for k, v in sd.items())  # in-process, no Ray
    with pytest.raises(TypeError, match="complex64"):
        ObjectStoreWeights({"z": torch.zeros(2, dtype=torch.complex64)})
