"""Gen mode in one pass (``<gen_emb>`` read from the generation's KV cache) equals the two-pass embedding.

The two-pass path teacher-forces prompt + decoded rewrite + ``</rewrite><gen_emb>``; the one-pass path
continues the generation's cache. Both must give the same vectors (fp32, tight tolerance) and the same
rewrites, batched with left padding, with images, for rows that stop early, late, or are cut by
``max_new_tokens``. Scripted generations (a logits processor forcing each row's tokens) pin the cases a
random tiny model never produces on its own: well-formed stops, ``<|im_end|>`` stops, early stops."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from rime_data.scenes import random_scene, render
from rime_model import GenerationConfig
from rime_model.gen_embed import generate_and_embed, one_pass_blocker

TOL = 1e-4


def _items(n: int) -> list[dict]:
    """Text-only and image items of different lengths (so rows are left-padded differently)."""
    rng = random.Random(5)
    out = []
    for i in range(n):
        s = random_scene(rng)
        if i % 3 == 0:
            out.append({"text": s.caption() + " and more words" * i})
        elif i % 3 == 1:
            out.append({"image": render(s), "instruction": "Represent the picture."})
        else:
            out.append({"image": render(s), "text": "what is in the picture? " * i})
    return out


def _both(emb, items, batch_size, **gen):
    one = emb.embed(items, mode="gen", batch_size=batch_size, generation=GenerationConfig(**gen))
    two = emb.embed(items, mode="gen", batch_size=batch_size, generation=GenerationConfig(one_pass=False, **gen))
    return one, two


def _same_rewrites(a, b) -> None:
    assert [(r.text, r.token_ids, r.well_formed) for r in a.rewrites] == [
        (r.text, r.token_ids, r.well_formed) for r in b.rewrites
    ]


@pytest.mark.parametrize("batch_size", [1, 5])
@pytest.mark.parametrize("max_new_tokens", [1, 7])
def test_one_pass_equals_two_pass_greedy(tiny, batch_size, max_new_tokens):
    """The tiny model never stops on its own: every row is cut by max_new_tokens (1 = the cut right away)."""
    items = _items(5)
    one, two = _both(tiny, items, batch_size, max_new_tokens=max_new_tokens)
    _same_rewrites(one, two)
    assert all(r.num_tokens == max_new_tokens for r in one.rewrites)
    assert one.vectors.shape == two.vectors.shape == (5, tiny.dim) and one.vectors.dtype == np.float32
    np.testing.assert_allclose(one.vectors, two.vectors, atol=TOL)
    # and the documented contract still holds: gen mode == teacher-forcing its own rewrites
    np.testing.assert_allclose(one.vectors, tiny.embed_with_rewrite(items, one.rewrite_texts).vectors, atol=TOL)


def test_one_pass_equals_two_pass_sampled(tiny):
    items = _items(4)
    one, two = _both(tiny, items, 4, max_new_tokens=6, do_sample=True, seed=11)
    _same_rewrites(one, two)
    np.testing.assert_allclose(one.vectors, two.vectors, atol=TOL)


class _Script(LogitsProcessor):
    """Force row b to emit ``scripts[b]`` (greedy then follows it); ``generate`` pads rows that stopped."""

    def __init__(self, scripts: list[list[int]]):
        self.scripts = scripts
        self.start: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.start is None:
            self.start = input_ids.shape[1]
        step = input_ids.shape[1] - self.start
        for b, script in enumerate(self.scripts):
            if step < len(script):
                scores[b] = float("-inf")
                scores[b, script[step]] = 0.0
        return scores


def _scripts(emb) -> tuple[list[list[int]], list[int]]:
    """Per row: a generation script and the tokens one pass must feed after it (max_new_tokens=9)."""
    t = emb.token_id
    end, gen, im_end = t["rewrite_end"], t["gen_emb"], emb.tokenizer.convert_tokens_to_ids("<|im_end|>")
    w = emb.enc.token_ids
    long = w("two blue squares left of a green cross above the red circle")
    assert len(long) > 9
    scripts = [
        w("a red circle") + [end, gen],  # well-formed, stops early: the generation + ONE token (<gen_emb>)
        w("two blue squares left of a cross") + [end, gen],  # well-formed, stops on the last step
        w("blue") + [im_end],  # stopped on <|im_end|>: </rewrite><gen_emb> are fed
        long,  # cut by max_new_tokens: its last token (never fed), </rewrite>, <gen_emb>
        w("a green cross") + [gen],  # <gen_emb> without </rewrite>: </rewrite><gen_emb> are fed
        w(" a square") + [end, gen],  # re-tokenised text drops the leading space: the whole rewrite is fed again
    ]
    fed = [1, 1, 2, 3, 2, len(w("a square")) + 2]
    assert len(scripts[1]) == 9
    return scripts, fed


def test_scripted_rows_cost_the_generation_plus_one_token(tiny):
    """Rows stopping at different steps in one left-padded batch with images: the cached columns past a
    row's end are masked, each row's new tokens continue its own positions."""
    items = _items(6)
    scripts, fed = _scripts(tiny)
    gen = GenerationConfig(max_new_tokens=9, extra={"logits_processor": LogitsProcessorList([_Script(scripts)])})
    torch.manual_seed(0)
    res = generate_and_embed(tiny.model, tiny.enc, tiny.prepare(items), gen)
    assert res.fed_tokens == fed
    assert [r.token_ids for r in res.rewrites] == [s[:9] for s in scripts]
    assert [r.well_formed for r in res.rewrites] == [True, True, False, False, False, True]
    two = tiny.embed_with_rewrite(items, [r.text for r in res.rewrites], batch_size=6).vectors
    np.testing.assert_allclose(res.vectors.numpy(), two, atol=TOL)


@pytest.mark.parametrize("batch_size", [1, 4])
def test_scripted_one_pass_equals_two_pass_through_embed(tiny, batch_size):
    """Through ``Embedder.embed`` (chunks of ``batch_size``): same rewrites, same vectors as two passes."""
    items = _items(6)
    scripts, _ = _scripts(tiny)
    results = {}
    for one_pass in (True, False):
        rewrites, vecs = [], []
        for i in range(0, len(items), batch_size):
            proc = LogitsProcessorList([_Script(scripts[i : i + batch_size])])
            g = GenerationConfig(max_new_tokens=9, one_pass=one_pass, extra={"logits_processor": proc})
            r = tiny.embed(items[i : i + batch_size], mode="gen", batch_size=batch_size, generation=g)
            rewrites += r.rewrites
            vecs.append(r.vectors)
        results[one_pass] = (rewrites, np.concatenate(vecs))
    assert results[True][0] == results[False][0]
    np.testing.assert_allclose(results[True][1], results[False][1], atol=TOL)


def test_one_pass_blockers():
    assert one_pass_blocker(GenerationConfig()) is None
    assert one_pass_blocker(GenerationConfig(extra={"num_beams": 1, "repetition_penalty": 1.2})) is None
    assert one_pass_blocker(GenerationConfig(one_pass=False)) == "one_pass=False"
    assert "num_beams" in one_pass_blocker(GenerationConfig(extra={"num_beams": 2}))
    assert "cache_implementation" in one_pass_blocker(GenerationConfig(extra={"cache_implementation": "static"}))


def test_beam_search_falls_back_to_two_passes(tiny):
    items = _items(3)
    g = dict(max_new_tokens=3, extra={"num_beams": 2})
    one, two = _both(tiny, items, 3, **g)
    _same_rewrites(one, two)
    np.testing.assert_allclose(one.vectors, two.vectors, atol=1e-6)
    with pytest.raises(ValueError, match="num_beams"):
        generate_and_embed(tiny.model, tiny.enc, tiny.prepare(items), GenerationConfig(**g))
