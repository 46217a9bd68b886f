"""Zoo models build offline, carry the real Qwen2 tokenizer and round-trip through save/load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rime_model import Embedder, load_embedder
from rime_model.families import Qwen2VLImageTextProcessor
from rime_model.zoo import build_tiny, qwen2_tokenizer


def test_qwen2_tokenizer_matches_published_ids():
    tok = qwen2_tokenizer()
    assert tok("Hello world", add_special_tokens=False).input_ids == [9707, 1879]
    ids = tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>"])
    assert ids == [151643, 151644, 151645, 151652, 151655]


def test_special_tokens_added_and_seeded(zoo_cache):
    emb = build_tiny(seed=1)
    tok, w = emb.tokenizer, emb.model.get_input_embeddings().weight
    ids = [tok.convert_tokens_to_ids(t) for t in emb.tokens.all()]
    assert len(set(ids)) == 8 and min(ids) >= 151657  # appended after the Qwen2 specials
    assert tok.tokenize("x<disc_emb>y") == ["x", "<disc_emb>", "y"]  # never split
    src = tok.convert_tokens_to_ids("<|object_ref_start|>")
    torch.testing.assert_close(w[emb.token_id["disc_emb"]], w[src])
    torch.testing.assert_close(w[emb.token_id["gen_emb"]], w[tok.convert_tokens_to_ids("<|object_ref_end|>")])


def test_tiny_is_deterministic_and_cached(zoo_cache, tiny):
    again = load_embedder("tiny")
    a = tiny.embed(["a red circle"]).vectors
    np.testing.assert_array_equal(a, again.embed(["a red circle"]).vectors)
    assert tiny.model.config.text_config.hidden_size // tiny.model.config.text_config.num_attention_heads >= 32


def test_save_load_round_trip(tiny, tmp_path):
    from PIL import Image

    items = [{"text": "a red circle"}, {"image": Image.new("RGB", (70, 50), (0, 0, 255)), "text": "blue"}]
    path = tiny.save(tmp_path / "saved")
    meta = json.loads((path / "rime_embedder.json").read_text())
    assert meta["family"] == "qwen2_vl" and meta["tokens"]["gen_emb"] == "<gen_emb>"
    loaded = Embedder.load(path)
    assert isinstance(loaded.processor, Qwen2VLImageTextProcessor)
    assert loaded.token_id == tiny.token_id
    for mode in ("disc", "gen"):
        np.testing.assert_allclose(loaded.embed(items, mode=mode).vectors, tiny.embed(items, mode=mode).vectors, atol=1e-6)
    np.testing.assert_allclose(load_embedder(str(path)).embed(items).vectors, tiny.embed(items).vectors, atol=1e-6)


def test_hf_checkpoint_without_rime_tokens_loads(tmp_path):
    """A stock HF folder (as Qwen2-VL-2B-Instruct ships) loads via hf:<path>; rime adds its tokens."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil

    from rime_model.zoo import TINY_PIXELS, TINY_TEXT, TINY_VISION

    config = Qwen2VLConfig(
        text_config=TINY_TEXT,
        vision_config=TINY_VISION,
        image_token_id=151655,
        video_token_id=151656,
        vision_start_token_id=151652,
        vision_end_token_id=151653,
    )
    Qwen2VLForConditionalGeneration(config).save_pretrained(tmp_path)
    qwen2_tokenizer().save_pretrained(tmp_path)
    Qwen2VLImageProcessorPil(**TINY_PIXELS).save_pretrained(tmp_path)
    emb = load_embedder(f"hf:{tmp_path}")
    assert "<gen_emb>" in emb.tokenizer.get_vocab()
    assert emb.embed(["hello"], mode="gen").vectors.shape == (1, 128)


def test_unknown_model_spec_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="neither a zoo name"):
        load_embedder(str(tmp_path / "nothing-here"))
    with pytest.raises(ValueError, match="unknown zoo name"):
        from rime_model.zoo import ensure_zoo_model

        ensure_zoo_model("huge")


def test_small_zoo_model_writes_fluent_rewrites(zoo_cache):
    """`small` = real SmolLM2-135M weights on a random CLIP tower, through the same Embedder API."""
    from PIL import Image

    from rime_model import GenerationConfig

    emb = load_embedder("small")
    assert emb.family.name == "llava"
    items = [
        {"text": "pictures containing the object left of the yellow square"},
        {"image": Image.new("RGB", (64, 64), (255, 0, 0)), "text": "describe the picture"},
    ]
    res = emb.embed(items, mode="gen", generation=GenerationConfig(max_new_tokens=12, extra={"repetition_penalty": 1.2}))
    assert res.vectors.shape == (2, 576)
    words = [w for w in res.rewrite_texts[0].split() if w.isalpha() and w.isascii()]
    assert len(words) >= 4, res.rewrite_texts  # a real LM writes English words, a random one does not
    disc = emb.embed(items, mode="disc").vectors
    singles = np.concatenate([emb.embed([it], mode="disc").vectors for it in items])
    np.testing.assert_allclose(disc, singles, atol=1e-4)
