"""What every synth task builder shares: the split data container, split assignment by content hash, scene
drawing through the style, captions, and the four-segment reasoning records (``rime_data.synth``)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

from .scenes import Scene, with_article
from .styler import Styler

TASKS = ("t2i", "i2t", "cls", "vqa", "composed", "referring")  # the default benchmark
EXTRA_TASKS = ("referring_compose", "referring_chain")  # opt-in: ``tasks=("referring_compose",)``
# referring_chain: ring size (at most len(SHAPES): one shape each; the text says "Five") and look-ups
# per query (the three reasoning segments before the answer)
CHAIN_OBJECTS, CHAIN_HOPS = 5, 3
SPLIT_BUCKETS = {"train": range(0, 8), "val": range(8, 9), "test": range(9, 10)}  # of 10 hash buckets
NUMBERS = {1: "one", 2: "two", 3: "three"}
COUNT_WORDS = {**NUMBERS, 4: "four", 5: "five"}  # styled scenes hold up to five objects


@dataclass
class SplitData:
    queries: list[dict]
    candidates: list[dict]
    provenance: list[dict] = field(default_factory=list)  # styled data: every look and template drawn


def split_of(key: str) -> str:
    """Stable split of a content key: 80/10/10 by a hash bucket (independent of sizes and seed)."""
    bucket = int(hashlib.sha1(key.encode()).hexdigest(), 16) % 10
    return next(s for s, r in SPLIT_BUCKETS.items() if bucket in r)


def _scene_key(s: Scene) -> str:
    return "|".join(f"{o.color}-{o.shape}@{o.col}{o.row}" for o in sorted(s.objects, key=lambda o: o.col))


def _listing(items: list[str], sep: str = ", ", last: str = " and ") -> str:
    return items[0] if len(items) == 1 else sep.join(items[:-1]) + last + items[-1]


def _caption(s: Scene, sty: Styler) -> str:
    """The scene's caption in the style's phrasing (classic: ``s.caption()``, the canonical form)."""
    names = [o.name for o in sorted(s.objects, key=lambda o: (o.col, o.row))]
    a = [with_article(n) for n in names]
    return sty.say(
        "caption",
        objects=s.caption(),
        objects_then=_listing(a, ", then ", ", then "),
        objects_rev=_listing(a[::-1]),
        objects_bare=_listing(names),
    )


def _draw(sty: Styler, split: str, key_fn: Callable[[Scene], str], **kw) -> Scene:
    """Draw scenes until one whose content key hashes into ``split``."""
    while True:
        s = sty.scene(**kw)
        if split_of(key_fn(s)) == split:
            return s


def _reasoning(first: str, second: str, third: str, answer: str) -> list[str]:
    return [first, second, third, f"So the answer is {answer}."]


# ----------------------------------------------------------------------------- tasks


def _label_candidates(task: str, split: str, labels: list[str], data: SplitData, inst: Callable[[], str]) -> dict[str, str]:
    """One text candidate per label (the labels stay canonical: they are the answers)."""
    ids = {}
    for lab in labels:
        ids[lab] = f"{task}/{split}/label/{lab.replace(' ', '_')}"
        data.candidates.append(dict(cand_id=ids[lab], task=task, cand_inst=inst(), cand_text=lab, rewrite=lab))
    return ids
