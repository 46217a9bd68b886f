"""The learners' loss per stage, keyed by stage name (as verl's ``register_policy_loss``).

``Learner.train_step`` looks the stage up in ``LEARNER_LOSSES`` and calls ``terms(learner, micro_batch,
**step_args)``; ``begin(learner, start_model)`` runs when a stage starts (Refine-RL loads its frozen KL
reference there). A new stage's loss is one class with ``@register_loss("name")``. Each ``terms`` returns
a dict with a differentiable ``loss`` plus scalar terms for MLflow (``train/<term>``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from rime_model.curriculum import Phase, continuation_text, split_segments
from rime_model.grad_cache import ChunkOutput, grad_cache_backward
from rime_model.latent import balance_from_usage, latent_pass
from rime_model.losses import check_prefix_dims, cma_loss, completion_ce, info_nce, labelled_tokens, plume_loss
from rime_model.policy_loss import PolicyLossConfig, policy_loss
from rime_model.rollout_ops import action_logprobs

from .batches import Pair, ScoredBatch

if TYPE_CHECKING:
    from rime_model import Embedder
    from rime_model.lora import LoraAdapter


class Learner(Protocol):
    """What a stage loss uses of ``actors.learner.Learner``. A protocol, not an import: the learner imports
    this registry, and a type-only import back would still tie the two modules into one."""

    emb: Embedder
    ref: Embedder | None  # the frozen KL reference a stage's ``begin`` may load
    lora: LoraAdapter | None  # model.lora: the reference is the model with its adapter disabled
    stage_cfg: dict[str, Any]
    engine: Any  # the DeepSpeed engine (its ``device``)


class StageLoss:
    """One stage's learner loss."""

    def begin(self, learner: Learner, start_model: str | None) -> None:
        """Called by ``Learner.begin_stage`` after the optimizer reset."""

    def terms(self, learner: Learner, batch: Any, **step_args: Any) -> dict[str, Any]:
        raise NotImplementedError

    def backward(self, learner: Learner, batch: Any, backward: Callable[[torch.Tensor], Any], **step_args: Any) -> dict[str, Any]:
        """Back-propagate one micro-batch's loss through ``backward`` (the engine's: it accumulates until the
        step); returns the terms. One ``backward`` of ``terms``' loss, unless the stage splits its passes."""
        terms = self.terms(learner, batch, **step_args)
        backward(terms["loss"])
        return terms


LEARNER_LOSSES: dict[str, StageLoss] = {}


def register_loss(name: str) -> Callable[[type[StageLoss]], type[StageLoss]]:
    def add(cls: type[StageLoss]) -> type[StageLoss]:
        LEARNER_LOSSES[name] = cls()
        return cls

    return add


@register_loss("cma")
class CMALoss(StageLoss):
    """Cross-Mode Alignment: CE on the rewrites + NCE within and across the disc and gen spaces, each NCE
    also over the Matryoshka prefix sizes ``matryoshka_dims`` when the stage config lists any."""

    def begin(self, learner: Learner, start_model: str | None) -> None:
        """The prefix sizes against the loaded model's embedding size (the driver checked the saved
        config already; this also covers learners started from elsewhere, before any step runs)."""
        check_prefix_dims(learner.stage_cfg.get("matryoshka_dims", ()), learner.emb.dim, key="cma.matryoshka_dims")

    def terms(self, learner: Learner, pairs: list[Pair]) -> dict[str, Any]:
        emb, cfg = learner.emb, learner.stage_cfg
        rows = _CMARows(emb, pairs, int(cfg.get("hard_negatives", 0)))
        d, g, h, labels = rows.embed(slice(0, rows.size))
        n = len(pairs)
        # CE stays on the pair's own rewrites: turning hard negatives on adds negatives, not CE text
        ce = completion_ce(h[: 2 * n], labels[: 2 * n], emb.model.get_output_embeddings())
        return rows.loss(cfg, d, g, ce)

    def backward(self, learner: Learner, pairs: list[Pair], backward: Callable[[torch.Tensor], Any]) -> dict[str, Any]:
        """With ``grad_cache_chunk`` > 0: GradCache (``rime_model.grad_cache``), the rows (queries, targets,
        hard negatives) embedded ``grad_cache_chunk`` at a time, the NCE terms on the cached embeddings, CE
        per chunk; the same gradient as ``terms``' full pass at one chunk's activation memory."""
        cfg = learner.stage_cfg
        size = int(cfg.get("grad_cache_chunk", 0))
        if size <= 0:
            return super().backward(learner, pairs, backward)
        emb, n = learner.emb, len(pairs)
        rows = _CMARows(emb, pairs, int(cfg.get("hard_negatives", 0)))
        lm_head = emb.model.get_output_embeddings()
        tokens = [0]  # CE's denominator: the labelled tokens of all rows, counted in the no-grad pass

        def embed_chunk(part: slice) -> ChunkOutput:
            d, g, h, labels = rows.embed(part)
            ce_rows = max(0, min(part.stop, 2 * n) - part.start)  # this chunk's query and target rows
            n_tok = labelled_tokens(labels[:ce_rows])
            if not torch.is_grad_enabled():
                tokens[0] += n_tok
                return ChunkOutput({"d": d, "g": g})
            if not ce_rows:  # hard negatives only: no CE text
                return ChunkOutput({"d": d, "g": g})
            # the chunk's share of the micro-batch's mean CE: its mean x its share of the labelled tokens
            share = completion_ce(h[:ce_rows], labels[:ce_rows], lm_head) * (n_tok / max(1, tokens[0]))
            return ChunkOutput({"d": d, "g": g}, cfg["ce_weight"] * share, {"ce": float(share.detach())})

        def coupled(e: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return rows.loss(cfg, e["d"], e["g"], e["d"].new_zeros(()))

        return grad_cache_backward(embed_chunk, rows.size, size, coupled, backward)


class _CMARows:
    """One CMA micro-batch's rows: queries, targets, then up to ``cap`` hard negatives per pair, each embedded
    in both modes (hard negatives ride in the targets' passes: the same disc and teacher-forced gen embedding
    as a target). ``embed`` takes any row range, so GradCache can embed the rows a chunk at a time."""

    def __init__(self, emb: Embedder, pairs: list[Pair], cap: int):
        self.emb, self.pairs, self.cap = emb, pairs, cap  # cap: the same on every rank (all join the gather, or none)
        self.negs = [x for p in pairs for x in p.negs[:cap]]
        self.items = emb.prepare([p.q for p in pairs] + [p.t for p in pairs] + [x.item for x in self.negs])
        self.rewrites = [p.q_rewrite for p in pairs] + [p.t_rewrite for p in pairs] + [x.rewrite for x in self.negs]
        self.size = len(self.items)

    def embed(self, rows: slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(disc embeddings, gen embeddings, gen hidden states, gen labels) of ``rows``."""
        emb = self.emb
        d = emb.encode(emb.enc.disc_batch(self.items[rows]))
        gen = emb.enc.gen_batch(self.items[rows], self.rewrites[rows])
        h = emb.hidden_states(gen)
        return d, emb.encode(gen, hidden=h), h, gen.labels

    def loss(self, cfg: dict[str, Any], d: torch.Tensor, g: torch.Tensor, ce: torch.Tensor) -> dict[str, Any]:
        """``cma_loss`` over all rows' embeddings, hard negatives as extra targets."""
        n, cap = len(self.pairs), self.cap
        terms = cma_loss(
            d[:n],
            d[n : 2 * n],
            g[:n],
            g[n : 2 * n],
            ce,
            lambda_cma=cfg["lambda_cma"],
            temperature=cfg["temperature"],
            ce_weight=cfg["ce_weight"],
            target_ids=[p.target_id for p in self.pairs],
            dims=cfg.get("matryoshka_dims", ()),
            d_neg=d[2 * n :] if cap else None,
            g_neg=g[2 * n :] if cap else None,
            neg_ids=[x.target_id for x in self.negs] if cap else None,
        )
        if cap:
            terms["hard_negatives"] = float(len(self.negs))  # per micro-batch on this rank
        return terms


@register_loss("plume")
class PlumeLoss(StageLoss):
    """PLUME: queries run ``phase.latent_steps`` latent steps, then the curriculum's remaining text
    (reasoning segments not yet replaced + the answer) under CE. Targets either follow the same phase with
    their own answer (``target_layout: phase``) or are embedded as at inference, K latent steps and no text
    (``latent``). Gen embeddings at ``<gen_emb>``, disc anchors at ``<disc_emb>`` of the same prefix passes."""

    def terms(self, learner: Learner, pairs: list[Pair], phase: dict | None = None) -> dict[str, Any]:
        rows = _PlumeRows(learner.emb, pairs, learner.stage_cfg, phase)
        out = rows.embed(slice(0, rows.size))
        lm_head = learner.emb.model.get_output_embeddings()
        terms = rows.loss(out.embeddings, completion_ce(out.hidden, out.labels, lm_head))
        terms["text_tokens"] = float(labelled_tokens(out.labels))
        return terms

    def backward(
        self, learner: Learner, pairs: list[Pair], backward: Callable[[torch.Tensor], Any], phase: dict | None = None
    ) -> dict[str, Any]:
        """With ``grad_cache_chunk`` > 0: GradCache over the pairs, ``grad_cache_chunk`` pairs (query and
        target passes) at a time; the NCE terms and the router balance, which couple every row, on the cached
        embeddings and per-pair router sums, CE per chunk. The same gradient as ``terms``' full pass."""
        cfg = learner.stage_cfg
        size = int(cfg.get("grad_cache_chunk", 0))
        if size <= 0:
            return super().backward(learner, pairs, backward, phase=phase)
        rows = _PlumeRows(learner.emb, pairs, cfg, phase)
        lm_head = learner.emb.model.get_output_embeddings()
        tokens = [0]  # CE's denominator: the labelled tokens of all rows, counted in the no-grad pass

        def embed_chunk(part: slice) -> ChunkOutput:
            out = rows.embed(part)
            n_tok = labelled_tokens(out.labels)
            if not torch.is_grad_enabled():
                tokens[0] += n_tok
                return ChunkOutput(out.embeddings)
            share = completion_ce(out.hidden, out.labels, lm_head) * (n_tok / max(1, tokens[0]))
            logs = {"ce": float(share.detach()), "text_tokens": float(n_tok)}
            return ChunkOutput(out.embeddings, cfg["ce_weight"] * share, logs)

        def coupled(e: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return rows.loss(e, e["g_q"].new_zeros(()))

        return grad_cache_backward(embed_chunk, rows.size, size, coupled, backward)


@dataclass
class _PlumeChunk:
    """One range of pairs after its latent passes: the embeddings the coupled loss reads (``g_q``, ``g_t``,
    ``c_q``, ``c_t``, and ``router``: each pair's router probabilities summed over its query's and target's
    latent steps, when the adapter has experts), and the CE rows' hidden states and labels."""

    embeddings: dict[str, torch.Tensor]
    hidden: torch.Tensor
    labels: torch.Tensor


class _PlumeRows:
    """One PLUME micro-batch under one curriculum phase. ``embed`` takes any range of pairs (a pair's query
    and target stay in one chunk), so GradCache can run the latent passes a chunk at a time."""

    def __init__(self, emb: Embedder, pairs: list[Pair], cfg: dict[str, Any], phase: dict | None):
        if phase is None:
            raise ValueError("train_step: the plume stage needs phase= (the curriculum phase of this step)")
        self.emb, self.pairs, self.cfg, self.ph = emb, pairs, cfg, Phase(**phase)
        self.size = len(pairs)
        self.q_items = emb.prepare([p.q for p in pairs])
        self.t_items = emb.prepare([p.t for p in pairs])
        tok = emb.enc.token_ids

        def text(segments: list[str], answer: str) -> list[int]:
            return tok(continuation_text(emb.template, emb.tokens, segments, self.ph, answer))

        self.q_conts = [text(split_segments(p.q_reasoning, cfg["segments"])[0], p.q_rewrite) for p in pairs]
        self.phase_targets = cfg["target_layout"] == "phase"  # else "latent": targets as at inference
        self.t_conts = [text([], p.t_rewrite) for p in pairs] if self.phase_targets else []
        # router probability vectors per pair, over which the balance loss averages (query + target steps)
        self.steps_per_pair = 2 * self.ph.latent_steps if self.phase_targets else self.ph.latent_steps + cfg["latent_steps"]

    def embed(self, rows: slice) -> _PlumeChunk:
        emb, m = self.emb, len(self.q_items[rows])
        if self.phase_targets:  # targets follow the query's phase: one pass for both sides, CE on both
            outs = [
                latent_pass(
                    emb.model,
                    emb.enc,
                    self.q_items[rows] + self.t_items[rows],
                    self.ph.latent_steps,
                    self.q_conts[rows] + self.t_conts[rows],
                )
            ]
            g, c = outs[0].gen_embedding(), outs[0].disc_embedding()
        else:
            outs = [
                latent_pass(emb.model, emb.enc, self.q_items[rows], self.ph.latent_steps, self.q_conts[rows]),
                latent_pass(emb.model, emb.enc, self.t_items[rows], self.cfg["latent_steps"]),
            ]
            g = torch.cat([o.gen_embedding() for o in outs])
            c = torch.cat([o.disc_embedding() for o in outs])
        e = {"g_q": g[:m], "g_t": g[m:], "c_q": c[:m], "c_t": c[m:]}
        # each pass's router probabilities summed over its steps, folded onto the pairs: a pass holds the
        # chunk's queries, its targets, or both one after the other ([q; t], the phase layout)
        sums = [torch.stack(o.router_probs).sum(0) for o in outs if o.router_probs]
        if sums:
            e["router"] = sum(s.reshape(-1, m, s.shape[-1]).sum(0) for s in sums)
        return _PlumeChunk(e, outs[0].hidden, outs[0].labels)

    def loss(self, e: dict[str, torch.Tensor], ce: torch.Tensor) -> dict[str, Any]:
        """``plume_loss`` over all pairs' embeddings, the balance loss from the per-pair router sums."""
        cfg = self.cfg
        usage = e["router"].sum(0) / (self.size * self.steps_per_pair) if "router" in e else None
        terms: dict[str, Any] = plume_loss(
            e["g_q"],
            e["g_t"],
            e["c_q"],
            e["c_t"],
            ce,
            balance_from_usage(usage) if usage is not None else None,
            temperature=cfg["temperature"],
            ce_weight=cfg["ce_weight"],
            disc_weight=cfg["disc_weight"],
            lambda_bal=cfg["lambda_bal"],
            target_ids=[p.target_id for p in self.pairs],
        )
        if usage is not None:
            terms.update({f"router_p{m}": float(v) for m, v in enumerate(usage.detach())})
        return terms


@register_loss("refine-rl")
class GRPOLoss(StageLoss):
    """Clipped surrogate + KL to the reference (verl's registry) + λ·InfoNCE(g, frozen anchors).

    One forward pass gives both the rewrite tokens' log-probs and the gen embedding ``g`` at ``<gen_emb>``,
    so generation and embedding are optimised jointly (METHOD.md, Stage 2)."""

    def begin(self, learner: Learner, start_model: str | None) -> None:
        """A frozen copy of the stage's starting model for the KL term (none when ``kl_coef`` is 0). With LoRA
        no copy: ``begin_stage`` merged the adapter and started a fresh one, so the model with its adapter
        disabled is the starting model (as TRL and verl take the reference of a LoRA policy)."""
        from rime_model import Embedder

        if learner.stage_cfg["policy"]["kl_coef"] <= 0 or learner.lora is not None:
            return
        if start_model is None:
            raise ValueError("begin_stage('refine-rl'): kl_coef > 0 needs ref_path (the stage's starting model)")
        dtype = next(learner.emb.model.parameters()).dtype  # the policy's precision: a bf16 run keeps no fp32 copy
        learner.ref = Embedder.load(start_model, dtype=dtype, device=str(learner.engine.device))
        learner.ref.model.requires_grad_(False)

    def terms(self, learner: Learner, batch: ScoredBatch) -> dict[str, Any]:
        emb, cfg, ref_model = learner.emb, learner.stage_cfg, learner.ref
        items = emb.prepare(batch.query)
        rb = emb.enc.rollout_batch(items, batch.token_ids)
        span = max(1, max(len(ids) + len(emb.enc.forced_suffix(ids)) for ids in batch.token_ids))
        h = emb.hidden_states(rb)
        logp, entropy, mask = action_logprobs(emb, h, rb.labels, span)
        old = torch.zeros_like(logp)
        for b, lps in enumerate(batch.logprobs):
            old[b, mask[b].bool()] = torch.tensor(lps, dtype=old.dtype, device=old.device)
        ref = None
        if ref_model is not None:
            with torch.no_grad():
                ref, _, _ = action_logprobs(ref_model, ref_model.hidden_states(rb), rb.labels, span)
        elif learner.lora is not None and cfg["policy"]["kl_coef"] > 0:
            with torch.no_grad(), learner.lora.disabled():
                ref, _, _ = action_logprobs(emb, emb.hidden_states(rb), rb.labels, span)
        adv = torch.tensor(batch.advantage, dtype=logp.dtype, device=logp.device)
        pg_loss, pm = policy_loss(logp, old, ref, adv, mask, PolicyLossConfig(**cfg["policy"]))
        g = emb.encode(rb, hidden=h)
        anchors = torch.tensor(batch.anchor, dtype=g.dtype, device=g.device)
        nce = info_nce(g, anchors, cfg["nce_temperature"], batch.target_id)
        n_tok = mask.sum().clamp(min=1)
        out: dict[str, Any] = {
            "loss": pg_loss + cfg["lambda_nce"] * nce,
            "nce": nce,
            "entropy": (entropy.detach() * mask).sum() / n_tok,
            "logprob_mismatch": ((logp.detach() - old).abs() * mask).sum() / n_tok,
            "response_tokens": float(mask.sum()),
        }
        out.update({k.replace("actor/", ""): v for k, v in pm.items()})
        return out
