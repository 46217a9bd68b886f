"""Bytes one weight sync sends per version under LoRA: the merged full weights (the ``object_store`` /
``collective`` strategies) against the adapter alone (``lora_adapter``), for the tiny zoo model and for Qwen2-VL-2B's architecture built on the meta device (no memory, no
weights: only the shapes count). Sizes are state-dict bytes; the ratio is merged / adapter.
Usage: python bench/lora_sync_bytes.py [--rank 8]
"""

from __future__ import annotations

import argparse

import torch


def _bytes(tensors) -> int:
    """Total bytes, tied tensors (lm_head = embed_tokens) once, as a sync sends them."""
    unique = {t.data_ptr(): t for t in tensors}
    return sum(t.numel() * t.element_size() for t in unique.values())


def main() -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from rime_model.lora import LoraSettings, attach_lora, target_linears
    from rime_model.zoo import QWEN2_VL_2B_TEXT, QWEN2_VL_2B_VISION, load_embedder

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (model.lora.rank), default target modules")
    args = p.parse_args()
    settings = LoraSettings(rank=args.rank)

    emb = load_embedder("tiny")
    merged = _bytes(emb.model.state_dict().values())
    adapter = _bytes(attach_lora(emb, settings).adapter_state_dict().values())
    print(
        f"tiny fp32: merged {merged / 1e6:.1f} MB, adapter (+ rime's token rows) {adapter / 1e6:.2f} MB, {merged / adapter:.0f}x"
    )

    with torch.device("meta"):
        model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=QWEN2_VL_2B_TEXT, vision_config=QWEN2_VL_2B_VISION))
    full = sum(p.numel() for p in model.parameters())  # tied parameters once
    peft_model = get_peft_model(
        model, LoraConfig(r=args.rank, lora_alpha=settings.alpha, target_modules=target_linears(model, settings))
    )
    lora = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    print(
        f"Qwen2-VL-2B architecture, bf16: merged {full * 2 / 1e9:.2f} GB ({full / 1e9:.2f}B params), "
        f"adapter {lora * 2 / 1e6:.1f} MB ({lora / 1e6:.2f}M params), {full / lora:.0f}x"
    )


if __name__ == "__main__":
    main()
