"""Losses against hand-computed values, and the cross-learner gather (2 gloo processes)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rime_model.losses import cma_loss, completion_ce, info_nce, plume_loss


def _unit(*rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def test_info_nce_hand_computed():
    q = _unit([1.0, 0.0], [0.0, 1.0])
    t = _unit([1.0, 0.0], [1.0, 1.0])
    tau = 0.5
    s = 1 / math.sqrt(2)
    # q->t: row0 logits [1, s]/tau target 0; row1 logits [0, s]/tau target 1
    l_qt = (
        -(1 / tau) + math.log(math.exp(1 / tau) + math.exp(s / tau)) - (s / tau) + math.log(math.exp(0) + math.exp(s / tau))
    ) / 2
    # t->q: t0 vs q: [1, 0] target 0; t1 vs q: [s, s] target 1
    l_tq = (-(1 / tau) + math.log(math.exp(1 / tau) + 1) + math.log(2)) / 2
    assert info_nce(q, t, tau).item() == pytest.approx(0.5 * (l_qt + l_tq), rel=1e-5)


def test_plume_loss_hand_computed():
    eye, swap = _unit([1.0, 0.0], [0.0, 1.0]), _unit([0.0, 1.0], [1.0, 0.0])
    ce, bal = torch.tensor(1.5), torch.tensor(0.0625)
    terms = plume_loss(eye, eye, eye, swap, ce, bal, temperature=0.5, ce_weight=2.0, disc_weight=0.5, lambda_bal=0.1)
    nce_gen = math.log(1 + math.exp(-2))  # logits diag 2, off-diagonal 0, in both directions
    nce_disc = math.log(1 + math.exp(2))  # the positives score 0, the negatives 2
    assert terms["nce_gen"].item() == pytest.approx(nce_gen, rel=1e-5)
    assert terms["nce_disc"].item() == pytest.approx(nce_disc, rel=1e-5)
    assert terms["loss"].item() == pytest.approx(2.0 * 1.5 + nce_gen + 0.5 * nce_disc + 0.1 * 0.0625, rel=1e-5)
    no_experts = plume_loss(eye, eye, eye, swap, ce, None, temperature=0.5)
    assert no_experts["balance"].item() == 0.0


def test_duplicate_targets_are_not_negatives():
    q = _unit([1.0, 0.0], [0.9, 0.1])
    t = _unit([1.0, 0.0], [1.0, 0.0])  # two queries of the same class label
    masked = info_nce(q, t, 0.1, target_ids=[7, 7])
    # with the duplicate masked, each row has one logit left: loss 0
    assert masked.item() == pytest.approx(0.0, abs=1e-6)
    assert info_nce(q, t, 0.1).item() > 0.5


def test_completion_ce_only_on_labelled_positions():
    torch.manual_seed(0)
    head = torch.nn.Linear(4, 10, bias=False)
    h = torch.randn(1, 5, 4)
    labels = torch.tensor([[-100, -100, 3, 9, -100]])
    logits = head(h[0])
    want = (F.cross_entropy(logits[1:2], torch.tensor([3])) + F.cross_entropy(logits[2:3], torch.tensor([9]))) / 2
    assert completion_ce(h, labels, head).item() == pytest.approx(want.item(), rel=1e-6)
    assert completion_ce(h, torch.full_like(labels, -100), head).item() == 0.0


def test_cma_loss_is_the_weighted_sum():
    torch.manual_seed(1)
    d_q, d_t, g_q, g_t = (F.normalize(torch.randn(4, 8), dim=-1) for _ in range(4))
    ce = torch.tensor(2.0)
    out = cma_loss(d_q, d_t, g_q, g_t, ce, lambda_cma=0.5, temperature=0.05, ce_weight=0.3)
    want = 0.3 * 2.0 + out["nce_disc"] + out["nce_gen"] + 0.5 * (out["nce_gen_disc"] + out["nce_disc_gen"])
    assert out["loss"].item() == pytest.approx(want.item(), rel=1e-6)
    assert out["nce_gen_disc"].item() == pytest.approx(info_nce(g_q, d_t, 0.05).item(), rel=1e-6)


def test_matryoshka_off_is_the_plain_loss():
    torch.manual_seed(3)
    q, t = (F.normalize(torch.randn(5, 16), dim=-1) for _ in range(2))
    assert torch.equal(info_nce(q, t, 0.1, dims=()), info_nce(q, t, 0.1))


def test_matryoshka_loss_is_the_mean_over_the_full_and_prefix_sizes():
    """The mean (not the sum) of plain InfoNCE on the full vectors and on each hand-truncated,
    re-normalised prefix, duplicate targets masked in every one."""
    torch.manual_seed(4)
    q, t = (F.normalize(torch.randn(6, 16), dim=-1) for _ in range(2))
    ids = [0, 1, 1, 2, 3, 4]
    got = info_nce(q, t, 0.1, target_ids=ids, dims=(4, 8))
    parts = [info_nce(q, t, 0.1, target_ids=ids)] + [
        info_nce(F.normalize(q[:, :d], dim=-1), F.normalize(t[:, :d], dim=-1), 0.1, target_ids=ids) for d in (4, 8)
    ]
    assert got.item() == pytest.approx(sum(x.item() for x in parts) / 3, rel=1e-6)
    terms = cma_loss(q, t, q, t, torch.tensor(0.0), temperature=0.1, target_ids=ids, dims=(4, 8))
    assert terms["nce_disc"].item() == pytest.approx(got.item(), rel=1e-6)


def test_matryoshka_gradient_differs_from_the_plain_one_and_is_finite():
    torch.manual_seed(5)
    x = torch.randn(2, 6, 16)

    def grad(dims):
        w = x.clone().requires_grad_(True)
        info_nce(F.normalize(w[0], dim=-1), F.normalize(w[1], dim=-1), 0.1, dims=dims).backward()
        return w.grad

    plain, nested = grad(()), grad((2, 8))
    assert torch.isfinite(nested).all() and not torch.allclose(plain, nested)


@pytest.mark.parametrize("dims, words", [((0,), "out of range: \\[0\\]"), ((16,), "out of range"), ((4, 4), "listed twice")])
def test_matryoshka_bad_prefix_sizes_are_refused(dims, words):
    q = F.normalize(torch.randn(3, 16), dim=-1)
    with pytest.raises(ValueError, match=f"dims: .*{words}.*1\\.\\.15"):
        info_nce(q, q, 0.1, dims=dims)


def test_cma_learner_checks_and_records_matryoshka_dims(tiny, tmp_path):
    """At stage start the CMA loss refuses sizes the loaded model cannot truncate to (naming the config
    key) and the learner's embedder takes the stage's sizes, which its saves record; a later stage (also one
    resumed into, whose learners were built from the run's first model) takes its start model's. Stubs for
    the DeepSpeed side: no Ray, no engine."""
    from types import SimpleNamespace

    from actors.learner import Learner
    from rime_model import Embedder

    emb = SimpleNamespace(dim=16, matryoshka_dims=())
    learner = SimpleNamespace(emb=emb, lora=None, reset_optimizer=lambda *a, **k: None)
    with pytest.raises(ValueError, match=r"cma\.matryoshka_dims: \[4, 16\]: out of range: \[16\]"):
        Learner.begin_stage(learner, "cma", {"matryoshka_dims": [4, 16]}, 1e-3, 1)
    Learner.begin_stage(learner, "cma", {"matryoshka_dims": [4, 8]}, 1e-3, 1)
    assert emb.matryoshka_dims == (4, 8)

    tiny.matryoshka_dims = (32,)
    start = tiny.save(tmp_path / "cma-model")
    tiny.matryoshka_dims = ()
    Learner.begin_stage(learner, "plume", {}, 1e-3, 1, ref_path=str(start))
    assert emb.matryoshka_dims == (32,) and Embedder.saved_settings(start)["matryoshka_dims"] == [32]


def _worker(rank: int, world: int, port: int, x_all, p0, out, dims=(), negs=None):
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    n = x_all.shape[1] // world
    proj = p0.clone().requires_grad_(True)  # one parameter replicated on every rank, as in data parallelism
    q, t = (F.normalize(x[rank * n : (rank + 1) * n] @ proj, dim=-1) for x in x_all)
    extra = {}
    if negs is not None:  # (rows, ids) per rank: uneven counts, none at all on a rank too
        rows, ids = negs[rank]
        extra = {"neg": F.normalize(rows @ proj, dim=-1), "neg_ids": ids}
    loss = info_nce(q, t, 0.1, target_ids=[0, 1, 2] if rank == 0 else [3, 3, 5], dims=dims, **extra)
    loss.backward()
    out[rank] = (loss.item(), proj.grad.clone())
    dist.destroy_process_group()


@pytest.mark.parametrize("dims, hard", [((), False), ((3,), True)])
def test_gathered_negatives_across_two_ranks_give_the_full_batch_gradient(dims, hard):
    """Each rank's loss is the whole-batch loss, and the data-parallel AVERAGE of the ranks' parameter
    gradients is exactly the whole-batch gradient (not 1/W of it), so the NCE:CE balance does not
    depend on the number of learners; with Matryoshka prefix sizes too (gathered whole, then truncated).
    ``hard``: also hard negatives, gathered unevenly (rank 0 holds three, rank 1 none; one of them is
    rank 1's positive 5, masked for that row only)."""
    import torch.multiprocessing as mp

    from orchestrator.learner_group import free_port

    torch.manual_seed(2)
    x_all, p0, x_neg = torch.randn(2, 6, 8), torch.randn(8, 8), torch.randn(3, 8)
    negs = [(x_neg, [7, 5, 8]), (x_neg[:0], [])] if hard else None
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(2, free_port(), x_all, p0, out, dims, negs), nprocs=2, join=True)
    proj = p0.clone().requires_grad_(True)
    q, t = (F.normalize(x @ proj, dim=-1) for x in x_all)
    extra = {"neg": F.normalize(x_neg @ proj, dim=-1), "neg_ids": [7, 5, 8]} if hard else {}
    full = info_nce(q, t, 0.1, target_ids=[0, 1, 2, 3, 3, 5], gather=False, dims=dims, **extra)
    full.backward()
    assert out[0][0] == pytest.approx(full.item(), rel=1e-5) and out[1][0] == pytest.approx(full.item(), rel=1e-5)
    torch.testing.assert_close((out[0][1] + out[1][1]) / 2, proj.grad, rtol=1e-4, atol=1e-6)


def test_hard_negative_adds_one_query_side_column_hand_computed():
    """A hard negative is one more logit in each query's row (query->target only); its gradient reaches it."""
    q = _unit([1.0, 0.0], [0.0, 1.0])
    t = _unit([1.0, 0.0], [1.0, 1.0])
    raw = torch.tensor([[0.6, 0.8]], requires_grad=True)  # unit length already: q0.n = 0.6, q1.n = 0.8
    tau, s = 0.5, 1 / math.sqrt(2)
    with_neg = info_nce(q, t, tau, target_ids=[0, 1], neg=F.normalize(raw, dim=-1), neg_ids=[2])
    # q->t gains exp(0.6/tau) in row 0's and exp(0.8/tau) in row 1's denominator; t->q is unchanged
    before = math.log(math.exp(1 / tau) + math.exp(s / tau)) + math.log(1 + math.exp(s / tau))
    after = math.log(math.exp(1 / tau) + math.exp(s / tau) + math.exp(0.6 / tau)) + math.log(
        1 + math.exp(s / tau) + math.exp(0.8 / tau)
    )
    want_delta = 0.5 * (after - before) / 2  # half of the bidirectional mean, averaged over 2 rows
    assert with_neg.item() - info_nce(q, t, tau).item() == pytest.approx(want_delta, rel=1e-5)
    with_neg.backward()
    assert raw.grad is not None and raw.grad.abs().sum() > 0


def test_hard_negative_that_is_another_rows_positive_is_masked_for_that_row_only():
    """Row 0 lists candidate 11 as a hard negative; 11 is row 1's positive. For row 1 that column is its own
    target again (masked: no false negative); rows 0 and 2 keep it as a negative."""
    torch.manual_seed(6)
    q, t = (F.normalize(torch.randn(3, 4), dim=-1) for _ in range(2))
    neg = t[1:2].clone()  # the same item as row 1's target
    tau = 0.2
    got = info_nce(q, t, tau, target_ids=[10, 11, 12], neg=neg, neg_ids=[11])
    logits = torch.cat([q @ t.T, q @ neg.T], dim=1) / tau  # [3, 4]: three targets, one negative
    allowed = torch.ones(3, 4, dtype=torch.bool)
    allowed[1, 3] = False
    l_qt = sum(-logits[i, i] + torch.logsumexp(logits[i][allowed[i]], 0) for i in range(3)) / 3
    tl = (q @ t.T / tau).T
    l_tq = sum(-tl[i, i] + torch.logsumexp(tl[i], 0) for i in range(3)) / 3
    assert got.item() == pytest.approx((0.5 * (l_qt + l_tq)).item(), rel=1e-5)
    unmasked = info_nce(q, t, tau, target_ids=[10, 11, 12], neg=neg, neg_ids=[99])
    assert unmasked.item() > got.item()  # row 1 would then be pushed away from its own positive


def test_no_hard_negatives_is_the_plain_loss_and_bad_neg_ids_are_refused():
    torch.manual_seed(7)
    q, t = (F.normalize(torch.randn(4, 8), dim=-1) for _ in range(2))
    plain = info_nce(q, t, 0.1, target_ids=[0, 1, 2, 3])
    assert torch.equal(info_nce(q, t, 0.1, target_ids=[0, 1, 2, 3], neg=q[:0], neg_ids=[]), plain)
    with pytest.raises(ValueError, match="neg_ids: give one candidate id per hard-negative row"):
        info_nce(q, t, 0.1, target_ids=[0, 1, 2, 3], neg=q[:2])


def test_cma_terms_embed_hard_negatives_like_targets(tiny):
    """The CMA learner loss puts each pair's hard negatives through the targets' disc and gen passes: the NCE
    terms change, CE (the pairs' own rewrites) does not, and the term count is logged. No DeepSpeed."""
    from types import SimpleNamespace

    from actors.stage_losses import CMALoss
    from orchestrator.pairs import make_pairs
    from rime_data.synth import synth_split

    d = synth_split("train", 2, seed=0, tasks=("t2i",))
    cands = [c["cand_id"] for c in d.candidates]
    for q in d.queries:
        q["hard_negatives"] = [c for c in cands if c not in q["positive_ids"]]
    cfg = {"lambda_cma": 1.0, "temperature": 0.05, "ce_weight": 1.0}
    pairs = make_pairs(d.queries, d.candidates, hard_negatives=1)
    assert [len(p.negs) for p in pairs] == [1, 1]
    with torch.no_grad():
        off = CMALoss().terms(SimpleNamespace(emb=tiny, stage_cfg={**cfg, "hard_negatives": 0}), pairs)
        on = CMALoss().terms(SimpleNamespace(emb=tiny, stage_cfg={**cfg, "hard_negatives": 1}), pairs)
    assert "hard_negatives" not in off and on["hard_negatives"] == 2.0
    assert on["ce"].item() == pytest.approx(off["ce"].item(), rel=1e-4)
    for k in ("nce_disc", "nce_gen", "nce_gen_disc", "nce_disc_gen"):
        assert on[k].item() > off[k].item()  # one more negative in every query's row
