"""GradCache: a contrastive loss over a large batch at the activation memory of one chunk.

InfoNCE couples every row of the batch, so the plain loss keeps the whole batch's graph alive until
backward. GradCache (Gao et al. 2021; VLM2Vec's ``grad_cache``, sentence-transformers'
``CachedMultipleNegativesRankingLoss``) splits the work in three passes:

1. embed the rows chunk by chunk without a graph (``torch.no_grad``);
2. take the loss on those cached embeddings as leaves, and its gradient with respect to each of them;
3. re-embed each chunk with its graph and back-propagate ``sum(embedding * cached_gradient)`` plus the
   chunk's own local terms (CE), one chunk at a time, so only one chunk's graph is ever alive.

The parameters' gradient is then exactly the plain full-batch one (up to float rounding): the loss is a
function of the embeddings only, apart from local per-row terms that add up over chunks. Across learners
nothing changes: ``rime_model.losses.info_nce`` gathers the other ranks' rows without gradient, and pass 2
runs it on the cached leaves, so the gathered negatives are the full global batch as before.

Each chunk's random state is recorded in pass 1 and replayed in pass 3, so dropout draws the same masks
in both passes (else pass 3 would differentiate a different function than pass 2 scored).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass
class ChunkOutput:
    """What embedding one chunk gives: named embeddings [rows, dim] the coupled loss reads, and a local
    loss (already weighted and normalised by the whole batch, e.g. CE's token sum / all tokens) that only
    this chunk's rows contribute to; ``logs``: that chunk's share of each logged local term."""

    embeddings: dict[str, torch.Tensor]
    local_loss: torch.Tensor | None = None
    logs: dict[str, float] | None = None


EmbedChunk = Callable[[slice], ChunkOutput]
CoupledLoss = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


class RandomState:
    """The CPU (and, where present, CUDA) generator state at one moment, to replay a chunk's dropout."""

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None

    @contextmanager
    def replay(self) -> Iterator[None]:
        """Run the block from this state, then put the generators back where they were."""
        cpu_now = torch.get_rng_state()
        cuda_now = torch.cuda.get_rng_state_all() if self.cuda is not None else None
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
        try:
            yield
        finally:
            torch.set_rng_state(cpu_now)
            if cuda_now is not None:
                torch.cuda.set_rng_state_all(cuda_now)


def chunks(n_rows: int, size: int) -> list[slice]:
    """Consecutive row ranges of at most ``size`` rows covering 0..n_rows (``size`` <= 0: one chunk)."""
    size = n_rows if size <= 0 else size
    return [slice(a, min(a + size, n_rows)) for a in range(0, n_rows, max(1, size))]


def grad_cache_backward(
    embed_chunk: EmbedChunk,
    n_rows: int,
    chunk_size: int,
    coupled_loss: CoupledLoss,
    backward: Callable[[torch.Tensor], object],
) -> dict[str, float]:
    """Back-propagate ``coupled_loss(embeddings) + sum of local losses`` over ``n_rows`` rows in chunks of
    ``chunk_size``; ``backward`` is called once per chunk (a DeepSpeed engine's ``backward`` accumulates
    until its ``step``). Returns the logged terms: ``coupled_loss``'s (detached) plus the chunks' ``logs``
    summed, and ``loss`` = the coupled loss + the local losses."""
    parts = chunks(n_rows, chunk_size)
    states: list[RandomState] = []
    cached: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        for rows in parts:
            states.append(RandomState())
            out = embed_chunk(rows)
            for name, e in out.embeddings.items():
                cached.setdefault(name, []).append(e.detach())
    leaves = {name: torch.cat(es).requires_grad_(True) for name, es in cached.items()}
    terms = coupled_loss(leaves)
    names = list(leaves)
    found = torch.autograd.grad(terms["loss"], [leaves[n] for n in names], allow_unused=True)
    grads = {n: torch.zeros_like(leaves[n]) if g is None else g for n, g in zip(names, found)}
    logs = {k: float(v.detach()) if isinstance(v, torch.Tensor) else float(v) for k, v in terms.items()}
    local_total = 0.0
    for rows, state in zip(parts, states):
        with state.replay():
            out = embed_chunk(rows)
        surrogate = sum((out.embeddings[n] * grads[n][rows]).sum() for n in names)
        if out.local_loss is not None:
            surrogate = surrogate + out.local_loss
            local_total += float(out.local_loss.detach())
        backward(surrogate)
        for k, v in (out.logs or {}).items():
            logs[k] = logs.get(k, 0.0) + v
    logs["loss"] += local_total
    return logs
