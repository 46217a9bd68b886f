"""PLUME's explicit-to-latent curriculum: which text a training step still writes, and how many latent steps.

With S reasoning segments and K latent steps (K/S per segment), curriculum stage s = 0..S replaces
the first s segments (left to right) by s·K/S latent steps; the last stage (optionally longer:
``final_stage_steps``) is fully latent and drops the answer text in its second half, which leaves exactly the inference layout
``<bot> [K latent] <eot></think>\\n<gen_emb>``. Without the curriculum the whole budget runs the
last stage (the "no curriculum" ablation). ``first_stage`` > 0 starts the curriculum later, for a model
that already writes the explicit reasoning (a CoT embedder such as UME-R1, or a finished stage 0).
Pure functions: the driver and the learners both use them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: config validation imports this module and must stay torch-free
    from .prompts import PromptTemplate
    from .tokens import SpecialTokens


@dataclass(frozen=True)
class Phase:
    """What one training step runs."""

    stage: int  # curriculum stage, 0 (all text) .. segments (fully latent)
    latent_steps: int  # latent steps before the text continuation
    replaced: int  # reasoning segments replaced by latent steps
    keep_answer: bool  # the answer is still written (teacher-forced) after </think>

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class CurriculumSchedule:
    """Step -> ``Phase``; ``total_steps`` is the same with and without the curriculum (a fair ablation)."""

    steps_per_stage: int
    segments: int = 4
    latent_steps: int = 8
    curriculum: bool = True
    final_stage_steps: int = 0  # the fully latent last stage's length; 0 = steps_per_stage (Coconut-style longer last stage)
    first_stage: int = 0  # the stage the curriculum starts at; earlier stages are skipped (and not in the budget)
    last_stage: int = -1  # the stage it ends with; -1 = the fully latent last stage. 0 = an explicit-reasoning (CoT) run

    def __post_init__(self) -> None:
        if self.steps_per_stage < 2:
            raise ValueError(f"plume.steps_per_stage: must be >= 2 (the last stage has two halves), got {self.steps_per_stage}")
        if self.final_stage_steps == 1 or self.final_stage_steps < 0:
            raise ValueError(f"plume.final_stage_steps: must be 0 (= steps_per_stage) or >= 2, got {self.final_stage_steps}")
        if self.segments < 1:
            raise ValueError(f"plume.segments: must be >= 1, got {self.segments}")
        if not 0 <= self.first_stage <= self.segments:
            raise ValueError(f"plume.first_stage: must be in 0..plume.segments ({self.segments}), got {self.first_stage}")
        if not (self.last_stage == -1 or self.first_stage <= self.last_stage <= self.segments):
            raise ValueError(
                f"plume.last_stage: must be -1 (to the end) or in plume.first_stage..plume.segments "
                f"({self.first_stage}..{self.segments}), got {self.last_stage}"
            )
        if not self.curriculum and self.end_stage < self.segments:
            raise ValueError(
                f"plume.last_stage: {self.last_stage} ends before the fully latent stage, which is all the "
                "no-curriculum ablation (plume.curriculum: false) runs; set it to -1"
            )
        if self.latent_steps < self.segments or self.latent_steps % self.segments:
            raise ValueError(
                f"plume.latent_steps: {self.latent_steps} must be a positive multiple of plume.segments "
                f"({self.segments}): each replaced segment becomes latent_steps/segments latent steps"
            )

    @property
    def per_segment(self) -> int:
        return self.latent_steps // self.segments

    @property
    def final_steps(self) -> int:
        return self.final_stage_steps or self.steps_per_stage

    @property
    def end_stage(self) -> int:
        """The last curriculum stage this schedule runs."""
        return self.segments if self.last_stage == -1 else self.last_stage

    @property
    def total_steps(self) -> int:
        if self.end_stage < self.segments:  # stops before the fully latent stage: no final stage in the budget
            return (self.end_stage - self.first_stage + 1) * self.steps_per_stage
        return (self.segments - self.first_stage) * self.steps_per_stage + self.final_steps

    def at(self, step: int) -> Phase:
        """The phase of 0-based stage step ``step``."""
        if not 0 <= step < self.total_steps:
            raise ValueError(f"step {step} outside the schedule's 0..{self.total_steps - 1}")
        if self.curriculum:
            stage = min(self.first_stage + step // self.steps_per_stage, self.end_stage)
            within = step - (stage - self.first_stage) * self.steps_per_stage
            length = self.final_steps if stage == self.segments else self.steps_per_stage
        else:
            stage, within, length = self.segments, step, self.total_steps
        keep_answer = not (stage == self.segments and within >= length // 2)
        return Phase(stage=stage, latent_steps=stage * self.per_segment, replaced=stage, keep_answer=keep_answer)

    def stage_changes_at(self, step: int) -> bool:
        """True when ``step`` opens a new curriculum stage (the optimiser state is reset there)."""
        return step > 0 and self.at(step).stage != self.at(step - 1).stage


def split_segments(reasoning: Sequence[str] | None, n: int) -> tuple[list[str], bool]:
    """Exactly ``n`` segments: more are merged into ``n`` contiguous groups, fewer are padded with
    empty ones at the end. Returns (segments, complete) where ``complete`` is False when the record
    had fewer than ``n`` (counted by the learner, never silently)."""
    segs = [str(s).strip() for s in (reasoning or []) if str(s).strip()]
    if len(segs) >= n:
        bounds = [i * len(segs) // n for i in range(n + 1)]
        return [" ".join(segs[bounds[i] : bounds[i + 1]]) for i in range(n)], True
    return segs + [""] * (n - len(segs)), False


def continuation_text(template: PromptTemplate, tok: SpecialTokens, segments: Sequence[str], phase: Phase, answer: str) -> str:
    """Teacher-forced text after the latent block: ``<eot>`` + remaining segments + ``</think>\\n``
    + answer (if kept) + ``<gen_emb>``."""
    reasoning = " ".join(s for s in segments[phase.replaced :] if s)
    return template.latent_continuation(reasoning, answer.strip() if phase.keep_answer else "", tok)


@dataclass(frozen=True)
class ReasoningScore:
    """How a greedy explicit reasoning (curriculum stage 0's layout) compares with the record's own."""

    answer_correct: bool  # the text after ``</think>`` equals the record's answer
    segments_exact: tuple[bool, ...]  # each reference segment appears verbatim in the generated reasoning


def score_explicit_reasoning(reasoning: str, answer: str, ref_segments: Sequence[str], ref_answer: str) -> ReasoningScore:
    """Score one generated (reasoning, answer) pair against the record's segments and answer. Why: the
    curriculum can only carry into latent steps a reasoning the model can write; this measures it."""
    norm = " ".join(reasoning.split())
    return ReasoningScore(
        answer_correct=" ".join(answer.split()) == " ".join(ref_answer.split()),
        segments_exact=tuple(bool(s.strip()) and " ".join(s.split()) in norm for s in ref_segments),
    )
