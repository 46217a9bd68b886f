"""The embedder's contract: normalised vectors, read AT the special token, padding-invariant."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rime_data.scenes import png_bytes, random_scene, render
from rime_model import GenerationConfig


def _items(n: int = 4):
    import random

    rng = random.Random(3)
    scenes = [random_scene(rng) for _ in range(n)]
    out = []
    for i, s in enumerate(scenes):
        if i % 3 == 0:
            out.append({"text": s.caption()})
        elif i % 3 == 1:
            out.append({"image": render(s), "instruction": "Represent the picture."})
        else:
            out.append({"image": png_bytes(render(s)), "text": "what is in the picture? " * (i + 1)})
    return out


@pytest.mark.parametrize("mode", ["disc", "gen"])
def test_shapes_and_normalisation(tiny, mode):
    res = tiny.embed(_items(3), mode=mode, generation=GenerationConfig(max_new_tokens=6))
    assert res.vectors.shape == (3, tiny.dim) == (3, 128)
    assert res.vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(res.vectors, axis=1), 1.0, atol=1e-5)
    if mode == "gen":
        assert len(res.rewrites) == 3
        assert all(1 <= n <= 6 for n in res.rewrite_token_counts)
    else:
        assert res.rewrites is None


def test_disc_reads_hidden_state_at_the_special_token(tiny):
    """Fails on UME-R1's off-by-one: the vector must be h[<disc_emb>], not h[<disc_emb> + 1]."""
    items = tiny.prepare([{"text": "a red circle"}])
    batch = tiny.enc.disc_batch(items)
    ids = batch.inputs["input_ids"][0]
    pos = int((ids == tiny.token_id["disc_emb"]).nonzero()[-1])
    assert int(batch.read_pos[0]) == pos
    assert pos < ids.shape[0] - 1, "template must put tokens after <disc_emb> for this test to bite"
    with torch.no_grad():
        h = tiny.hidden_states(batch)[0]
    vec = tiny.embed([{"text": "a red circle"}], mode="disc").vectors[0]
    at = torch.nn.functional.normalize(h[pos], dim=-1).numpy()
    after = torch.nn.functional.normalize(h[pos + 1], dim=-1).numpy()
    np.testing.assert_allclose(vec, at, atol=1e-6)
    assert np.abs(vec - after).max() > 1e-2
    # Causality check: dropping every token after <disc_emb> leaves the embedding unchanged.
    cut = {k: v[:, : pos + 1] for k, v in batch.inputs.items() if v.dim() == 2 and v.shape[1] == ids.shape[0]}
    with torch.no_grad():
        h_cut = tiny.model.model(**cut, use_cache=False).last_hidden_state[0, -1]
    np.testing.assert_allclose(vec, torch.nn.functional.normalize(h_cut, dim=-1).numpy(), atol=1e-5)


def test_gen_reads_at_gen_emb_and_labels_cover_completion(tiny):
    items = tiny.prepare(["a blue square"])
    batch = tiny.enc.gen_batch(items, ["blue square"])
    ids = batch.inputs["input_ids"][0]
    assert int(ids[batch.read_pos[0]]) == tiny.token_id["gen_emb"]
    labelled = ids[batch.labels[0] != -100].tolist()
    text = tiny.tokenizer.decode(labelled)
    assert text == "blue square</rewrite><gen_emb><|im_end|>"


def test_gen_mode_matches_teacher_forced_rewrite(tiny):
    items = _items(3)
    res = tiny.embed(items, mode="gen", generation=GenerationConfig(max_new_tokens=5))
    tf = tiny.embed_with_rewrite(items, res.rewrite_texts)
    np.testing.assert_allclose(res.vectors, tf.vectors, atol=1e-5)


@pytest.mark.parametrize("mode", ["disc", "gen"])
def test_batched_equals_single(tiny, mode):
    items = _items(5)
    gen = GenerationConfig(max_new_tokens=5)
    batched = tiny.embed(items, mode=mode, batch_size=5, generation=gen)
    singles = [tiny.embed([it], mode=mode, generation=gen) for it in items]
    np.testing.assert_allclose(batched.vectors, np.concatenate([s.vectors for s in singles]), atol=1e-4)
    if mode == "gen":
        assert [r.token_ids for r in batched.rewrites] == [s.rewrites[0].token_ids for s in singles]


def test_teacher_forced_batch_equals_single(tiny):
    items = _items(4)
    rewrites = ["a red circle", "two shapes", "blue", "a green cross left of a yellow square"]
    batched = tiny.embed_with_rewrite(items, rewrites, batch_size=4).vectors
    singles = np.concatenate([tiny.embed_with_rewrite([it], [r]).vectors for it, r in zip(items, rewrites)])
    np.testing.assert_allclose(batched, singles, atol=1e-4)


def test_sampling_is_seeded(tiny):
    items = _items(2)
    cfg = GenerationConfig(max_new_tokens=6, do_sample=True, temperature=1.0, seed=7)
    a = tiny.generate_rewrites(tiny.prepare(items), generation=cfg, num_samples=3)
    b = tiny.generate_rewrites(tiny.prepare(items), generation=cfg, num_samples=3)
    assert len(a) == 6
    assert [r.token_ids for r in a] == [r.token_ids for r in b]


def test_parse_rewrite_format_flag(tiny):
    t = tiny.token_id
    words = tiny.tokenizer("a red circle", add_special_tokens=False).input_ids
    good = tiny.enc.parse_rewrite(words + [t["rewrite_end"], t["gen_emb"], 11, 12])
    assert good.well_formed and good.text == "a red circle" and good.num_tokens == len(words) + 2
    no_end = tiny.enc.parse_rewrite(words + [t["gen_emb"]])
    assert not no_end.well_formed and no_end.text == "a red circle"
    truncated = tiny.enc.parse_rewrite(words)
    assert not truncated.well_formed and truncated.num_tokens == len(words)


def test_generate_reasoning_writes_what_stage_0_taught(zoo_cache):
    """Stage-0 layout end to end: after fitting one record's explicit reasoning (teacher-forced, as
    curriculum stage 0 does), greedy ``reasoning.generate_reasoning`` returns that reasoning and answer, split at
    ``</think>``, and the probe's score is perfect; the untrained model's is not."""
    import torch

    from rime_model import load_embedder
    from rime_model.curriculum import Phase, continuation_text, score_explicit_reasoning
    from rime_model.reasoning import generate_reasoning

    emb = load_embedder("tiny")
    segs = ["The anchor is the red circle.", "Left of it is the blue square.", "Nothing else.", "So the answer is a blue square."]
    answer, item = "a blue square", {"text": "the object left of the red circle"}
    before = generate_reasoning(emb, [item], max_new_tokens=40)[0]
    assert not score_explicit_reasoning(*before, segs, answer).answer_correct
    ((txt, _, ins),) = emb.prepare([item])
    prompt = emb.template.latent_prompt("", ins, txt, emb.tokens) + emb.tokens.latent_end
    cont = continuation_text(emb.template, emb.tokens, segs, Phase(0, 0, 0, True), answer)[len(emb.tokens.latent_end) :]
    p_ids = emb.tokenizer(prompt, add_special_tokens=False).input_ids
    c_ids = emb.tokenizer(cont, add_special_tokens=False).input_ids
    ids = torch.tensor([p_ids + c_ids])
    labels = torch.tensor([[-100] * len(p_ids) + c_ids])
    torch.manual_seed(0)
    opt = torch.optim.Adam(emb.model.parameters(), lr=3e-3)
    emb.model.train()
    for _ in range(80):
        opt.zero_grad()
        emb.model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
    emb.model.eval()
    reasoning, got = generate_reasoning(emb, [item, item], max_new_tokens=60, batch_size=2)[1]
    assert reasoning == " ".join(segs) and got == answer
    s = score_explicit_reasoning(reasoning, got, segs, answer)
    assert s.answer_correct and all(s.segments_exact)


def test_generation_ignores_the_checkpoints_generation_defaults(tiny, tmp_path):
    """A checkpoint's generation_config.json (Qwen2-VL-Instruct ships a repetition penalty) must not reach
    rollouts or gen mode: PPO's behaviour log-probs come from the raw logits, and vLLM ignores it too."""
    import json

    from rime_model import Embedder
    from rime_model.rollout_ops import sample_rollouts

    folder = tiny.save(tmp_path / "emb")
    cfg = json.loads((folder / "generation_config.json").read_text())
    cfg.update(repetition_penalty=50.0, no_repeat_ngram_size=1, bad_words_ids=[[5], [6]])
    (folder / "generation_config.json").write_text(json.dumps(cfg))
    loaded = Embedder.load(folder)
    items = ["a red circle left of a blue square", "two green crosses"]
    gen = GenerationConfig(max_new_tokens=12)
    assert loaded.embed(items, mode="gen", generation=gen).rewrites == tiny.embed(items, mode="gen", generation=gen).rewrites
    sample = GenerationConfig(max_new_tokens=12, do_sample=True, seed=3)
    want, got = sample_rollouts(tiny, tiny.prepare(items), 2, sample), sample_rollouts(loaded, loaded.prepare(items), 2, sample)
    assert [ids for ids, _ in got] == [ids for ids, _ in want]
    for (_, lp), (_, lp2) in zip(want, got):
        assert np.allclose(lp, lp2, atol=1e-5)


def test_a_text_only_training_forward_runs_the_vision_tower_with_zero_effect(tiny):
    """Data-parallel ranks must touch the same parameters: a text-only training forward runs the vision
    tower on a blank image and adds 0 x its output, so every vision weight gets a gradient (of zeros) and the
    hidden states are those of the plain forward; inference (no grad) skips it."""
    import torch

    batch = tiny.enc.disc_batch(tiny.prepare([{"text": "a red cube left of a blue ball"}]))
    assert not any(k.startswith("pixel_values") for k in batch.inputs)
    with torch.no_grad():
        ref = tiny.hidden_states(batch)
    vision = [p for n, p in tiny.model.named_parameters() if "visual" in n]
    try:
        tiny.model.zero_grad(set_to_none=True)
        h = tiny.hidden_states(batch)
        assert torch.equal(h.detach(), ref)
        h.float().pow(2).sum().backward()
        assert vision and all(p.grad is not None and not p.grad.any() for p in vision)
        assert tiny.model.get_input_embeddings().weight.grad.any()  # the text path trained as before
    finally:
        tiny.model.zero_grad(set_to_none=True)


def test_embed_dims_is_the_renormalised_prefix(tiny):
    """Matryoshka scoring: the first ``dims`` components of the full embedding, back at unit length."""
    items = _items(3)
    full = tiny.embed(items).vectors
    short = tiny.embed(items, dims=32).vectors
    assert short.shape == (3, 32) and short.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(short, axis=1), 1.0, atol=1e-5)
    want = full[:, :32] / np.linalg.norm(full[:, :32], axis=1, keepdims=True)
    np.testing.assert_allclose(short, want, atol=1e-5)
    np.testing.assert_allclose(tiny.embed(items, dims=tiny.dim).vectors, full, atol=1e-6)
    for bad in (0, -1, tiny.dim + 1):
        with pytest.raises(ValueError, match=rf"dims: must be an integer in 1\.\.{tiny.dim}"):
            tiny.embed(items, dims=bad)


def test_save_load_round_trips_matryoshka_dims(tiny, tmp_path):
    """The sizes a model was trained for travel with it; folders saved before the key load with none."""
    import json

    from rime_model import Embedder

    assert tiny.matryoshka_dims == ()
    tiny.matryoshka_dims = (16, 64)
    try:
        folder = tiny.save(tmp_path / "emb")
    finally:
        tiny.matryoshka_dims = ()
    meta_file = folder / "rime_embedder.json"
    assert json.loads(meta_file.read_text())["matryoshka_dims"] == [16, 64]
    assert Embedder.load(folder).matryoshka_dims == (16, 64) and Embedder.saved_dim(folder) == tiny.dim
    meta = json.loads(meta_file.read_text())
    del meta["matryoshka_dims"]
    meta_file.write_text(json.dumps(meta))
    assert Embedder.load(folder).matryoshka_dims == ()
