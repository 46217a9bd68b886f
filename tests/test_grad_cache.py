"""GradCache (``cma.grad_cache_chunk``, ``plume.grad_cache_chunk``): the gradient of a micro-batch embedded a
chunk at a time equals the full pass's, for CMA with hard negatives and Matryoshka prefixes and for PLUME's
latent passes with the router balance; dropout is replayed. Two learners with gathered negatives:
tests/test_learners.py."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from rime_model.grad_cache import ChunkOutput, chunks, grad_cache_backward

CMA = {"lambda_cma": 1.0, "temperature": 0.05, "ce_weight": 0.7, "matryoshka_dims": [16], "hard_negatives": 1}


@pytest.mark.parametrize("section", ["cma", "plume"])
def test_grad_cache_with_zero3_is_refused_at_load_naming_the_key(section):
    from orchestrator.config import ConfigError, parse_config

    stages = {"run": {"stages": [section]}}
    with pytest.raises(
        ConfigError, match=rf"{section}\.grad_cache_chunk: GradCache with learners\.zero_stage 3 is not supported"
    ):
        parse_config({**stages, section: {"grad_cache_chunk": 4}, "learners": {"zero_stage": 3}})
    cfg = parse_config({**stages, section: {"grad_cache_chunk": 4}, "learners": {"zero_stage": 2}})
    assert getattr(cfg, section).grad_cache_chunk == 4


def test_chunks_cover_the_rows_in_order():
    assert chunks(7, 3) == [slice(0, 3), slice(3, 6), slice(6, 7)]
    assert chunks(4, 0) == [slice(0, 4)] and chunks(4, 9) == [slice(0, 4)]


def test_a_dropout_model_gets_the_full_batch_gradient():
    """Pass 3 re-runs each chunk under the random state pass 1 saw, so dropout masks match the scored ones."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 4)).train()
    x = torch.randn(10, 6)

    def coupled(e: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        z = torch.nn.functional.normalize(e["z"], dim=-1)
        logits = z[:5] @ z[5:].T / 0.1
        return {"loss": torch.nn.functional.cross_entropy(logits, torch.arange(5))}

    torch.manual_seed(1)
    coupled({"z": net(x)})["loss"].backward()
    plain = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    torch.manual_seed(1)  # the same masks only if each chunk draws the same numbers the full pass drew for its rows
    rows_seen = []

    def embed(rows: slice) -> ChunkOutput:
        rows_seen.append((rows.start, rows.stop, torch.is_grad_enabled()))
        return ChunkOutput({"z": net(x[rows])})

    grad_cache_backward(embed, 10, 10, coupled, lambda loss: loss.backward())  # one chunk: same draws as the full pass
    for p, g in zip(net.parameters(), plain):
        torch.testing.assert_close(p.grad, g)
    assert rows_seen == [(0, 10, False), (0, 10, True)]
    # several chunks: each chunk's masks are drawn in pass 1 and replayed in pass 3, so the gradient is that
    # of a plain pass drawing the chunks' masks in the same order
    net.zero_grad()
    torch.manual_seed(1)
    coupled({"z": torch.cat([net(x[r]) for r in chunks(10, 4)])})["loss"].backward()
    plain = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    torch.manual_seed(1)
    grad_cache_backward(embed, 10, 4, coupled, lambda loss: loss.backward())
    assert [r[:2] for r in rows_seen[2:]] == [(0, 4), (4, 8), (8, 10)] * 2
    for p, g in zip(net.parameters(), plain):
        torch.testing.assert_close(p.grad, g)


def _pairs(n: int):
    from orchestrator.pairs import make_pairs
    from rime_data.synth import synth_split

    d = synth_split("train", 4, seed=0, tasks=("t2i", "i2t", "cls"))
    cands = [c["cand_id"] for c in d.candidates]
    for i, q in enumerate(d.queries):
        q["hard_negatives"] = [c for c in cands if c not in q["positive_ids"]][i % 3 :]
    return make_pairs(d.queries, d.candidates, hard_negatives=1)[:n]


@pytest.mark.parametrize("chunk", [3, 5])
def test_cma_grad_cache_gives_the_full_batch_gradient(tiny, chunk):
    """4 pairs + 4 hard negatives = 12 rows in chunks of 3 or 5 (a chunk then spans queries and targets, or
    targets and negatives): the same loss terms and parameter gradients (language model and vision tower)."""
    from actors.stage_losses import CMALoss

    emb = copy.copy(tiny)
    emb.model = copy.deepcopy(tiny.model).train()
    pairs = _pairs(4)
    assert sum(len(p.negs) for p in pairs) == 4

    def run(cfg: dict) -> tuple[dict, dict[str, torch.Tensor]]:
        emb.model.zero_grad(set_to_none=True)
        calls = []
        terms = CMALoss().backward(SimpleNamespace(emb=emb, stage_cfg=cfg), pairs, lambda loss: calls.append(loss.backward()))
        grads = {k: p.grad.clone() for k, p in emb.model.named_parameters() if p.grad is not None}
        return {k: float(torch.as_tensor(v).detach()) for k, v in terms.items()} | {"backward_calls": len(calls)}, grads

    plain_terms, plain = run({**CMA, "grad_cache_chunk": 0})
    cached_terms, cached = run({**CMA, "grad_cache_chunk": chunk})
    assert plain_terms.pop("backward_calls") == 1 and cached_terms.pop("backward_calls") == -(-12 // chunk)
    assert cached_terms.keys() == plain_terms.keys()
    for k, v in plain_terms.items():
        assert cached_terms[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
    assert cached.keys() == plain.keys() and any("visual" in k for k in plain)
    for k in plain:  # float rounding only: chunks pad differently and sum in another order
        assert (cached[k] - plain[k]).abs().max() <= 1e-5 * plain[k].abs().max(), k


PLUME = {"segments": 4, "temperature": 0.05, "ce_weight": 0.7, "disc_weight": 0.5, "lambda_bal": 0.3, "latent_steps": 3}


def plume_gradients(emb, pairs, cfg: dict, phase: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """PlumeLoss.backward's terms (plus how many backward calls) and parameter gradients on ``emb``'s model."""
    from actors.stage_losses import PlumeLoss

    emb.model.zero_grad(set_to_none=True)
    calls = []
    view = SimpleNamespace(emb=emb, stage_cfg=cfg)
    terms = PlumeLoss().backward(view, pairs, lambda loss: calls.append(loss.backward()), phase=phase)
    grads = {k: p.grad.clone() for k, p in emb.model.named_parameters() if p.grad is not None}
    emb.model.zero_grad(set_to_none=True)
    return {k: float(torch.as_tensor(v).detach()) for k, v in terms.items()} | {"backward_calls": len(calls)}, grads


@pytest.mark.parametrize(("layout", "latent_steps", "chunk"), [("latent", 2, 2), ("phase", 2, 3), ("latent", 0, 2)])
def test_plume_grad_cache_gives_the_full_batch_gradient(tiny_latent, layout, latent_steps, chunk):
    """5 pairs in chunks of 2 or 3, the query's latent steps then its remaining reasoning and answer under CE,
    targets as at inference (``latent``) or in the query's phase: the same terms, router usage included, and
    the same gradients of the language model and of the transition adapter (router and experts). With 0
    query latent steps only the targets' steps feed the balance loss."""
    from rime_model.curriculum import Phase
    from rime_model.latent import ADAPTER_ATTR

    emb = copy.copy(tiny_latent)
    emb.model = copy.deepcopy(tiny_latent.model).train()
    pairs = _pairs(5)
    assert all(p.q_reasoning for p in pairs)
    phase = Phase(stage=1, latent_steps=latent_steps, replaced=1, keep_answer=True).to_dict()
    cfg = {**PLUME, "target_layout": layout}
    plain_terms, plain = plume_gradients(emb, pairs, {**cfg, "grad_cache_chunk": 0}, phase)
    cached_terms, cached = plume_gradients(emb, pairs, {**cfg, "grad_cache_chunk": chunk}, phase)
    assert plain_terms.pop("backward_calls") == 1 and cached_terms.pop("backward_calls") == -(-5 // chunk)
    assert cached_terms.keys() == plain_terms.keys() and "router_p3" in plain_terms
    assert plain_terms["balance"] > 0 and plain_terms["text_tokens"] > 0
    for k, v in plain_terms.items():
        assert cached_terms[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
    assert cached.keys() == plain.keys()
    assert any(f"{ADAPTER_ATTR}.router" in k for k in plain) and any("visual" in k for k in plain)
    for k in plain:  # float rounding only: chunks pad differently and sum in another order
        assert (cached[k] - plain[k]).abs().max() <= 1e-5 * plain[k].abs().max(), k
