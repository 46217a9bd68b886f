"""Gen mode in one pass: the ``<gen_emb>`` hidden state read from the generation's own KV cache.

Two-pass gen mode generates a rewrite, then teacher-forces the whole gen sequence (prompt, image tokens,
rewrite, ``</rewrite><gen_emb>``) a second time to read the hidden state at ``<gen_emb>``: the prompt and
its images are encoded twice. The generation's KV cache already holds the prompt and every generated
token, so feeding only what the teacher-forced sequence has beyond the cached tokens, with the same
positions and attention, gives the same hidden state (causal attention: a token's state depends on the
tokens before it alone). A well-formed rewrite costs the generation plus ONE token (``<gen_emb>``, the
stop token ``generate`` sampled but never fed); a rewrite cut by ``max_new_tokens`` costs three (its
last token, ``</rewrite>``, ``<gen_emb>``).

The sequence is exactly the one ``PromptEncoder.gen_batch`` teacher-forces for the decoded rewrite text
(so ``embed(mode="gen")`` still equals ``embed_with_rewrite`` of its own rewrites). That text is
``decode(ids).strip()`` re-tokenised, which is not always the generated ids (a leading space dropped, a
non-canonical split): the cache is reused up to the longest common prefix of the two and the rest of the
teacher-forced completion is fed after it. In a batch, each row keeps its own cached prefix: cached
columns past it (the divergent tail, the padding ``generate`` appends once a row has stopped) are masked
out, each row's new tokens are right-aligned in one extra chunk, and their positions continue the row's
own (multimodal RoPE included, from the model's ``get_rope_index`` as ``generate`` computes them).

Kept two-pass (``one_pass_blocker`` says why): beam search, assisted or prompt-lookup decoding and
non-default cache implementations (the final cache is not the returned sequences' own, or cannot take
extra columns), and ``GenerationConfig(one_pass=False)``. The reward service teacher-forces the sampled
ids itself (``PromptEncoder.rollout_batch``), and latent mode is already a single pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache

from .encoding import Item, PromptEncoder, Rewrite

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel


class GenSettings(Protocol):
    """What this module reads of ``rime_model.embedder.GenerationConfig`` (not imported: the embedder
    imports this module)."""

    max_new_tokens: int
    extra: dict[str, Any]
    one_pass: bool

    def sampling(self) -> dict[str, Any]: ...


# ``generate`` options under which the returned cache is not the one of the returned sequences (beams are
# reordered, assistants or lookups verify several tokens per step) or cannot grow past its set length.
ONE_PASS_BLOCKERS = (
    "num_beams",
    "num_beam_groups",
    "assistant_model",
    "assistant_early_exit",
    "prompt_lookup_num_tokens",
    "cache_implementation",
    "past_key_values",
    "use_cache",
    "return_dict_in_generate",
)


def one_pass_blocker(generation: GenSettings) -> str | None:
    """Why ``generation`` must embed two-pass (teacher-forced), or None when one pass applies."""
    if not generation.one_pass:
        return "one_pass=False"
    for key in ONE_PASS_BLOCKERS:
        val = generation.extra.get(key)
        if val is None or (key in ("num_beams", "num_beam_groups") and val == 1) or (key == "use_cache" and val):
            continue
        return f"generation.extra[{key!r}]={val!r}"
    return None


@dataclass
class GenEmbedding:
    """One chunk's rewrites, their normalised float32 gen embeddings [B, D] and, per row, how many
    tokens were fed after the generation (1 for a well-formed rewrite the text re-tokenises to; None
    when the chunk fell back to the teacher-forced pass)."""

    rewrites: list[Rewrite]
    vectors: torch.Tensor
    fed_tokens: list[int] | None


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def last_prompt_positions(model: Any, prompts: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each row's position of its last prompt token, as ``generate`` numbers it: [3, B] for multimodal
    RoPE (Qwen2-VL: the model's ``get_rope_index``, vision tokens included), else [1, B] (the attention
    mask's count, HF's position for left-padded rows). Prompts are left-padded: the last column is
    every row's last token."""
    mask = prompts["attention_mask"]
    text_last = (mask.long().sum(-1) - 1).unsqueeze(0)
    base = model.model
    rope_index = getattr(base, "get_rope_index", None)
    if rope_index is None:
        return text_last
    grids = {k: prompts[k] for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts") if k in prompts}
    if "mm_token_type_ids" in prompts and any(k in grids for k in ("image_grid_thw", "video_grid_thw")):
        pos, _ = rope_index(prompts["input_ids"], mm_token_type_ids=prompts["mm_token_type_ids"], attention_mask=mask, **grids)
        return pos[:, :, -1]
    return text_last.expand(3, -1)  # text only: every mrope section counts tokens, as generate does


def generate(
    model: PreTrainedModel, enc: PromptEncoder, prompts: dict[str, torch.Tensor], generation: GenSettings, **more: Any
) -> Any:
    """``model.generate`` on gen prompts with ``generation``'s settings and rime's stop tokens: the one
    place rewrites are generated, so the one- and two-pass gen paths write the same ones."""
    return model.generate(
        **prompts,
        max_new_tokens=generation.max_new_tokens,
        eos_token_id=enc.stop_ids,
        pad_token_id=enc.tokenizer.pad_token_id,
        **generation.sampling(),
        **generation.extra,
        **more,
    )


@torch.no_grad()
def continue_to_gen_emb(
    model: PreTrainedModel,
    enc: PromptEncoder,
    prompts: dict[str, torch.Tensor],
    generated: torch.Tensor,
    cache: DynamicCache,
    targets: Sequence[Sequence[int]],
) -> tuple[torch.Tensor, list[int]]:
    """Hidden states at ``<gen_emb>`` after ``generate``'s cache: row b's sequence is its prompt +
    ``targets[b]`` (a completion ending AT ``<gen_emb>``). ``generated`` [B, L] are the new ids
    ``generate`` returned; the cache holds the prompt and the first L-1 of them. Returns the normalised
    float32 vectors [B, D] and, per row, the number of tokens fed."""
    B, P = prompts["input_ids"].shape
    L = generated.shape[1]
    gen_id = enc.token_id["gen_emb"]
    device = prompts["input_ids"].device
    gen_rows = generated.tolist()
    keep, tails = [], []
    for b, target in enumerate(targets):
        target = list(target)
        if not target or target[-1] != gen_id:
            raise ValueError(f"targets[{b}]: must end with <gen_emb> ({gen_id}), got {target[-3:]}")
        k = _common_prefix(target[:-1], gen_rows[b][: L - 1])  # the read token is always fed: its state is needed
        keep.append(k)
        tails.append(target[k:])
    W = max(len(t) for t in tails)
    pad = enc.tokenizer.pad_token_id
    cols = torch.arange(L - 1, device=device)
    kept = (cols.unsqueeze(0) < torch.tensor(keep, device=device).unsqueeze(1)).to(prompts["attention_mask"].dtype)
    new_ids = torch.full((B, W), pad, dtype=torch.long, device=device)
    new_mask = torch.zeros((B, W), dtype=prompts["attention_mask"].dtype, device=device)
    last = last_prompt_positions(model, prompts)  # [R, B]
    offsets = torch.zeros((B, W), dtype=torch.long, device=device)
    for b, tail in enumerate(tails):
        n = len(tail)
        new_ids[b, W - n :] = torch.tensor(tail, dtype=torch.long, device=device)
        new_mask[b, W - n :] = 1
        # cached completion token j sits at last + 1 + j; the tail continues at j = keep[b]
        offsets[b] = torch.arange(W, device=device) - (W - n) + 1 + keep[b]
    position_ids = last.unsqueeze(-1) + offsets.unsqueeze(0)  # [R, B, W]
    if position_ids.shape[0] == 1:
        position_ids = position_ids[0]
    attention_mask = torch.cat([prompts["attention_mask"], kept, new_mask], dim=1)
    out = model.model(
        input_ids=new_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=cache,
        use_cache=True,
    )
    h = out.last_hidden_state[:, -1]
    return F.normalize(h.float(), dim=-1), [len(t) for t in tails]


def teacher_forced(model: PreTrainedModel, enc: PromptEncoder, items: Sequence[Item], texts: Sequence[str]) -> torch.Tensor:
    """Two-pass gen embeddings of given rewrite texts (``Embedder.encode`` of ``gen_batch``, inference only)."""
    batch = enc.gen_batch(items, texts)
    h = model.model(**batch.inputs, use_cache=False).last_hidden_state
    return F.normalize(h[torch.arange(h.shape[0], device=h.device), batch.read_pos].float(), dim=-1)


@torch.no_grad()
def generate_and_embed(
    model: PreTrainedModel, enc: PromptEncoder, items: Sequence[Item], generation: GenSettings
) -> GenEmbedding:
    """Generate one rewrite per item (greedy or sampled, exactly as ``Embedder.generate_rewrites``) and
    read its gen embedding from the generation's cache; one left-padded batch, the caller seeds."""
    blocked = one_pass_blocker(generation)
    if blocked:
        raise ValueError(f"one-pass gen embedding does not apply here ({blocked}); use the teacher-forced pass")
    prompts = enc.gen_prompt_batch(items)
    out = generate(model, enc, prompts, generation, return_dict_in_generate=True)
    P = prompts["input_ids"].shape[1]
    generated = out.sequences[:, P:]
    rewrites = [enc.parse_rewrite(ids) for ids in generated.tolist()]
    texts = [r.text for r in rewrites]
    cache = getattr(out, "past_key_values", None)
    if (
        not isinstance(cache, DynamicCache)
        or cache.get_seq_length() != P + generated.shape[1] - 1
        or out.sequences.shape[0] != len(items)
    ):  # not the plain cache of these sequences: teacher-force the rewrites instead
        return GenEmbedding(rewrites, teacher_forced(model, enc, items, texts), None)
    targets = [enc.gen_completion_ids(t, i) for i, t in enumerate(texts)]
    vectors, fed = continue_to_gen_emb(model, enc, prompts, generated, cache, targets)
    return GenEmbedding(rewrites, vectors, fed)
