"""Every prompt the embedder builds, in one place.

The layout follows METHOD.md: disc = ``media + instruction + "\\n<disc_emb>"`` in one forward pass;
gen = the assistant writes ``<rewrite>…</rewrite><gen_emb>``; latent (PLUME) = the prompt ends with
``<think><bot>``. The chat markup is ChatML, shared by the Qwen2-VL family and SmolLM2. Each piece
is a field so a config can change it without touching code ([inf] choices in METHOD.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .tokens import SpecialTokens


@dataclass(frozen=True)
class PromptTemplate:
    """Chat layout and default texts used to build model inputs."""

    user_start: str = "<|im_start|>user\n"
    turn_end: str = "<|im_end|>\n"
    assistant_start: str = "<|im_start|>assistant\n"
    default_instruction: str = "Represent the given input for retrieval."
    rewrite_prompt: str = "Rewrite it as a short, retrieval-friendly description, then embed it."

    def user_content(self, media: str, instruction: str, text: str) -> str:
        """``media + instruction + "\\n" + text``; empty parts are left out."""
        body = "\n".join(p for p in (instruction, text) if p)
        return f"{media}{body}"

    def disc(self, media: str, instruction: str, text: str, tok: SpecialTokens) -> str:
        """Full discriminative sequence; the embedding is read AT ``<disc_emb>``."""
        return f"{self.user_start}{self.user_content(media, instruction, text)}\n{tok.disc_emb}{self.turn_end}"

    def gen_prompt(self, media: str, instruction: str, text: str, tok: SpecialTokens) -> str:
        """Generation prompt; the model continues after ``<rewrite>`` with the rewrite text."""
        content = self.user_content(media, instruction, text)
        return f"{self.user_start}{content}\n{self.rewrite_prompt}{self.turn_end}{self.assistant_start}{tok.rewrite_start}"

    def gen_completion(self, rewrite: str, tok: SpecialTokens) -> str:
        """Teacher-forced completion; the embedding is read AT ``<gen_emb>``."""
        return f"{rewrite}{tok.rewrite_end}{tok.gen_emb}{self.turn_end.rstrip()}"

    def latent_prompt(self, media: str, instruction: str, text: str, tok: SpecialTokens) -> str:
        """PLUME prefix: the disc anchor, then the latent block opens at ``<bot>``."""
        content = self.user_content(media, instruction, text)
        return (
            f"{self.user_start}{content}\n{tok.disc_emb}{self.turn_end}{self.assistant_start}{tok.think_start}{tok.latent_start}"
        )

    def latent_suffix(self, tok: SpecialTokens) -> str:
        """Forced suffix after the latent steps; the embedding is read AT ``<gen_emb>``."""
        return self.latent_continuation("", "", tok)

    def latent_continuation(self, reasoning: str, answer: str, tok: SpecialTokens) -> str:
        """Teacher-forced text after the latent block in PLUME's curriculum: the reasoning segments not
        yet replaced by latent steps, then the answer; both empty = the inference suffix."""
        return f"{tok.latent_end}{reasoning}{tok.think_end}\n{answer}{tok.gen_emb}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PromptTemplate:
        return cls(**d)
