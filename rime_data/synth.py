"""Procedural benchmark modelled on MMEB task kinds, where a good rewrite measurably helps.

Tasks (all "image" group):
  t2i        caption -> image                    (task corpus; positives = images with that caption)
  i2t        image -> caption                    (task corpus of caption texts)
  cls        image -> shape of the leftmost object (local list: the shape labels)
  vqa        image + question -> answer          (local list: colours or counts)
  composed   reference image + edit text -> edited image (task corpus)
  referring  reference image + "pictures containing the object left of the yellow square"
             -> single-object pictures of the referred object (task corpus). The raw text names
             the *anchor*, so matching it literally retrieves the wrong picture; the ideal rewrite
             ("a blue triangle") names the target. This is the gap Refine-RL must learn to close.
  referring_compose  (opt-in, not in the default set) reference image + "a picture of the shape of
             the object left of the red circle in the colour of the object right of the green cross"
             -> the single-object picture that combines the two. Two relational look-ups and a
             recombination: a multi-step problem whose explicit reasoning resolves one relation per
             segment, made to test whether PLUME's curriculum carries that reasoning into latent steps.
  referring_chain  (opt-in) text only, both sides: five objects on a ring given as shuffled facts
             ("After the red circle comes the blue square.") + "the object three places after the
             green cross" -> the object's name among the 30 names. Three chained look-ups, each a copy
             from the text that the reasoning writes out one per segment: written reasoning a small
             model can learn while one pass has to chain three look-ups, i.e. a positive control for
             PLUME's curriculum that does not depend on the tiny vision tower (a picture corpus did:
             the written chain was right 0.99 of the time while its embedding found the picture at
             0.15, the random tower having learned colour and not shape).

Styles (rime_data/styles.py): ``classic`` (the default) is the data above exactly as it always was;
``randomised`` draws sizes, counts, layouts, looks and sentence templates from the training ranges;
``transfer`` draws them from ranges training never uses, for val/test only. The content (objects,
relations, answers), the ideal rewrites and the reasoning are the same in every style: only how a
record is shown and phrased varies. referring_chain has no pictures and its exact sentences are its
point as a control, so every style writes it as classic.

Every query carries its ideal rewrite and four explicit reasoning segments (PLUME curriculum).
Splits are assigned by a stable hash of the query's content key, so no caption, edit or
reference scene appears in two splits whatever the sizes asked for, and a seed fixes everything.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

from .scenes import COLORS, SHAPES, Scene, SceneObject, with_article
from .schema import CANDIDATE_SCHEMA, QUERY_SCHEMA, SPLITS, write_table
from .styler import Styler
from .styles import check_style
from .templates import canonical

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
    return sty.say("caption", objects=s.caption(), objects_then=_listing(a, ", then ", ", then "),
                   objects_rev=_listing(a[::-1]), objects_bare=_listing(names))


def _draw(sty: Styler, split: str, key_fn: Callable[[Scene], str], **kw) -> Scene:
    """Draw scenes until one whose content key hashes into ``split``."""
    while True:
        s = sty.scene(**kw)
        if split_of(key_fn(s)) == split:
            return s


def _reasoning(first: str, second: str, third: str, answer: str) -> list[str]:
    return [first, second, third, f"So the answer is {answer}."]


# ----------------------------------------------------------------------------- tasks
def _t2i(sty: Styler, split, n, data: SplitData) -> None:
    by_caption: dict[str, list[str]] = defaultdict(list)
    rows = []
    for i in range(n):
        s = _draw(sty, split, lambda x: "t2i:" + x.caption())
        cid = f"t2i/{split}/img{i}"
        data.candidates.append(dict(cand_id=cid, task="t2i", cand_inst=sty.say("image.cand_inst"), cand_image=sty.image(s),
                                    rewrite=s.caption()))
        by_caption[s.caption()].append(cid)
        rows.append((i, s))
    for i, s in rows:
        cap = s.caption()
        data.queries.append(dict(
            query_id=f"t2i/{split}/q{i}", task="t2i", qry_inst=sty.say("t2i.inst"),
            qry_text=_caption(s, sty), positive_ids=by_caption[cap], rewrite=cap,
            reasoning=_reasoning(f"The caption lists {COUNT_WORDS[len(s.objects)]} object(s).", "Their order is left to right.",
                                 f"The picture must show exactly {cap}.", cap),
        ))


def _i2t(sty: Styler, split, n, data: SplitData) -> None:
    caption_ids: dict[str, str] = {}
    for i in range(n):
        s = _draw(sty, split, lambda x: "i2t:" + x.caption())
        cap = s.caption()
        if cap not in caption_ids:
            caption_ids[cap] = f"i2t/{split}/cap{len(caption_ids)}"
            data.candidates.append(dict(cand_id=caption_ids[cap], task="i2t", cand_inst=sty.say("caption.cand_inst"),
                                        cand_text=_caption(s, sty), rewrite=cap))
        data.queries.append(dict(
            query_id=f"i2t/{split}/q{i}", task="i2t", qry_inst=sty.say("i2t.inst"),
            qry_image=sty.image(s), positive_ids=[caption_ids[cap]], rewrite=cap,
            reasoning=_reasoning(f"I see {COUNT_WORDS[len(s.objects)]} object(s).", "I read them from left to right.",
                                 f"They are {cap}.", cap),
        ))


def _label_candidates(task: str, split: str, labels: list[str], data: SplitData, inst: Callable[[], str]) -> dict[str, str]:
    """One text candidate per label (the labels stay canonical: they are the answers)."""
    ids = {}
    for lab in labels:
        ids[lab] = f"{task}/{split}/label/{lab.replace(' ', '_')}"
        data.candidates.append(dict(cand_id=ids[lab], task=task, cand_inst=inst(), cand_text=lab, rewrite=lab))
    return ids


def _cls(sty: Styler, split, n, data: SplitData) -> None:
    labels = {sh: with_article(sh) for sh in SHAPES}
    ids = _label_candidates("cls", split, list(labels.values()), data, partial(sty.say, "cls.cand_inst"))
    for i in range(n):
        s = _draw(sty, split, lambda x: "cls:" + _scene_key(x))
        left = min(s.objects, key=lambda o: o.col)
        lab = labels[left.shape]
        data.queries.append(dict(
            query_id=f"cls/{split}/q{i}", task="cls", qry_inst=sty.say("cls.inst"),
            qry_image=sty.image(s), positive_ids=[ids[lab]], cand_ids=list(ids.values()), rewrite=lab,
            reasoning=_reasoning(f"The image shows {s.caption()}.", "The leftmost object comes first.",
                                 f"It is {left.a_name}.", lab),
        ))


def _vqa(sty: Styler, split, n, data: SplitData) -> None:
    rng = sty.rng
    inst = partial(sty.say, "vqa.cand_inst")
    colours = _label_candidates("vqa", split, list(COLORS), data, inst)
    counts = _label_candidates("vqa", split, [COUNT_WORDS[k] for k in sty.counts()], data, inst)
    for i in range(n):
        s = _draw(sty, split, lambda x: "vqa:" + _scene_key(x))
        if rng.random() < 0.5:
            obj = rng.choice(s.objects)
            others = [o for o in s.objects if o.shape == obj.shape and o is not obj]
            where = " leftmost" if others else ""
            if others:
                obj = min([obj, *others], key=lambda o: o.col)
            question, answer, cands = sty.say("vqa.colour", obj=f"the{where} {obj.shape}"), obj.color, colours
            third = f"The{where} {obj.shape} is {obj.color}."
        else:
            k = len(s.objects)
            question, answer, cands = sty.say("vqa.count"), COUNT_WORDS[k], counts
            third = f"Counting them gives {COUNT_WORDS[k]}."
        data.queries.append(dict(
            query_id=f"vqa/{split}/q{i}", task="vqa", qry_inst=sty.say("vqa.inst"),
            qry_text=question, qry_image=sty.image(s), positive_ids=[cands[answer]], cand_ids=list(cands.values()),
            rewrite=answer, reasoning=_reasoning(f"The image shows {s.caption()}.", f"The question: {question}", third, answer),
        ))


def _composed(sty: Styler, split, n, data: SplitData) -> None:
    rng = sty.rng
    kinds = [(sh, c) for sh in SHAPES for c in COLORS]
    by_key: dict[str, list[str]] = defaultdict(list)
    pending = []
    for i in range(n):
        while True:
            s = sty.scene()
            obj = rng.choice(s.objects)
            free = [k for k in kinds if k not in {(o.shape, o.color) for o in s.objects}]
            shape, color = rng.choice(free)
            new = SceneObject(shape, color, obj.col, obj.row)
            target = replace(s, objects=tuple(new if o is obj else o for o in s.objects))
            edit = canonical("composed.edit", old=obj.name, new=new.a_name)
            if split_of("composed:" + _scene_key(s) + edit) == split:
                break
        cid = f"composed/{split}/img{i}"
        data.candidates.append(dict(cand_id=cid, task="composed", cand_inst=sty.say("image.cand_inst"),
                                    cand_image=sty.image(target), rewrite=target.caption()))
        by_key[target.caption()].append(cid)
        pending.append((i, s, target, obj, new))
    for i, s, target, obj, new in pending:
        data.queries.append(dict(
            query_id=f"composed/{split}/q{i}", task="composed", qry_inst=sty.say("composed.inst"),
            qry_text=sty.say("composed.edit", old=obj.name, new=new.a_name), qry_image=sty.image(s),
            positive_ids=by_key[target.caption()], rewrite=target.caption(),
            reasoning=_reasoning(f"The reference shows {s.caption()}.", f"The edit removes the {obj.name}.",
                                 f"{new.a_name.capitalize()} takes its place.", target.caption()),
        ))


def _single_object_candidates(task: str, split: str, sty: Styler, data: SplitData) -> dict[tuple[str, str], str]:
    """One picture per (shape, colour): the corpus of the referring tasks."""
    ids = {}
    for sh in SHAPES:
        for c in COLORS:
            one = sty.single(sh, c)
            ids[(sh, c)] = f"{task}/{split}/img/{c}-{sh}"
            data.candidates.append(dict(cand_id=ids[(sh, c)], task=task, cand_inst=sty.say("image.cand_inst"),
                                        cand_image=sty.image(one), rewrite=with_article(f"{c} {sh}")))
    return ids


def _neighbour(s: Scene, anchor: SceneObject, side: str) -> SceneObject | None:
    """The nearest object on ``side`` of ``anchor`` (columns are distinct), or None."""
    near = [o for o in s.objects if (o.col < anchor.col if side == "left" else o.col > anchor.col)]
    if not near:
        return None
    return max(near, key=lambda o: o.col) if side == "left" else min(near, key=lambda o: o.col)


def _relations(s: Scene) -> list[tuple[SceneObject, str, SceneObject]]:
    """Every (anchor, side, neighbour) that the scene defines."""
    out = []
    for a in s.objects:
        for side in ("left", "right"):
            t = _neighbour(s, a, side)
            if t is not None:
                out.append((a, side, t))
    return out


def _referring(sty: Styler, split, n, data: SplitData) -> None:
    rng = sty.rng
    ids = _single_object_candidates("referring", split, sty, data)
    for i in range(n):
        while True:
            s = sty.scene(n_objects=rng.choice([k for k in sty.counts() if k >= 2]))
            anchor = rng.choice(s.objects)
            side = rng.choice(("left", "right"))
            target = _neighbour(s, anchor, side)
            if target is None:
                continue
            text = canonical("referring.text", rel=canonical("rel", side=side), anchor=anchor.name)
            if split_of("referring:" + _scene_key(s) + text) == split:
                break
        answer = target.a_name
        data.queries.append(dict(
            query_id=f"referring/{split}/q{i}", task="referring", qry_inst=sty.say("referring.inst"),
            qry_text=sty.say("referring.text", rel=sty.say("rel", side=side), anchor=anchor.name),
            qry_image=sty.image(s), positive_ids=[ids[(target.shape, target.color)]], rewrite=answer,
            reasoning=_reasoning(f"The image shows {s.caption()}.", f"The anchor is the {anchor.name}.",
                                 f"The nearest object to its {side} is the {target.name}.", answer),
        ))


def _referring_compose(sty: Styler, split, n, data: SplitData) -> None:
    rng = sty.rng
    ids = _single_object_candidates("referring_compose", split, sty, data)
    for i in range(n):
        while True:
            s = sty.scene(n_objects=3 if sty.classic else rng.choice([k for k in sty.counts() if k >= 3]))
            (a1, side1, o1), (a2, side2, o2) = rng.sample(_relations(s), 2)
            if o1 == o2:  # the answer must combine two different objects
                continue
            text = canonical("referring_compose.text", rel1=canonical("rel", side=side1), a1=a1.name,
                             rel2=canonical("rel", side=side2), a2=a2.name)
            if split_of("referring_compose:" + _scene_key(s) + text) == split:
                break
        answer = with_article(f"{o2.color} {o1.shape}")
        data.queries.append(dict(
            query_id=f"referring_compose/{split}/q{i}", task="referring_compose", qry_inst=sty.say("referring_compose.inst"),
            qry_text=sty.say("referring_compose.text", rel1=sty.say("rel", side=side1), a1=a1.name,
                             rel2=sty.say("rel", side=side2), a2=a2.name),
            qry_image=sty.image(s), positive_ids=[ids[(o1.shape, o2.color)]], rewrite=answer,
            reasoning=_reasoning(f"The image shows {s.caption()}.", f"The object {side1} of the {a1.name} is the {o1.name}.",
                                 f"The object {side2} of the {a2.name} is the {o2.name}.", answer),
        ))


def _after(a: SceneObject, b: SceneObject) -> str:
    """One ring fact. The query's facts and the reasoning's hops are this same sentence, which is what
    makes each written hop a verbatim copy from the text."""
    return f"After the {a.name} comes the {b.name}."


def _referring_chain(sty: Styler, split, n, data: SplitData) -> None:
    """Five objects on a ring, told as shuffled facts. Every object has its own shape AND its own
    colour, so either word names it and each written hop is a plain copy from the text; on a ring
    there is no first or last object, so no answer can be read off without following the chain."""
    # a text corpus, one name per (shape, colour) ("a green cross"): nothing leans on the vision tower
    rng = sty.rng
    ids = _label_candidates("referring_chain", split, [with_article(f"{c} {sh}") for sh in SHAPES for c in COLORS], data,
                            lambda: "Represent the given object name.")
    for i in range(n):
        while True:
            ring = [SceneObject(sh, c, col, 0) for col, (sh, c) in
                    enumerate(zip(rng.sample(SHAPES, CHAIN_OBJECTS), rng.sample(list(COLORS), CHAIN_OBJECTS)))]
            facts = [_after(a, b) for a, b in zip(ring, ring[1:] + ring[:1])]
            rng.shuffle(facts)
            start = rng.randrange(CHAIN_OBJECTS)
            text = (f"Five objects stand in a ring. {' '.join(facts)} "
                    f"The object {NUMBERS[CHAIN_HOPS]} places after the {ring[start].name}.")
            if split_of("referring_chain:" + text) == split:
                break
        path = [ring[(start + k) % CHAIN_OBJECTS] for k in range(CHAIN_HOPS + 1)]
        answer = path[-1].a_name
        data.queries.append(dict(
            query_id=f"referring_chain/{split}/q{i}", task="referring_chain",
            qry_inst="Find the name of the object the text refers to.",
            qry_text=text, positive_ids=[ids[answer]], rewrite=answer,
            reasoning=_reasoning(*[_after(a, b) for a, b in zip(path, path[1:])], answer),
        ))


TASK_BUILDERS = {"t2i": _t2i, "i2t": _i2t, "cls": _cls, "vqa": _vqa, "composed": _composed, "referring": _referring,
                 "referring_compose": _referring_compose, "referring_chain": _referring_chain}


def synth_split(split: str, n_per_task: int, seed: int = 0, tasks=TASKS, image_size: int | None = None,
                style: str = "classic") -> SplitData:
    """Generate one split: ``n_per_task`` queries for each task, with their candidates.

    ``image_size`` (default 84) is the classic style's; the other styles draw sizes from their ranges.
    ``transfer`` refuses the train split: its settings are for measuring transfer, never for training."""
    if split not in SPLITS:
        raise ValueError(f"split: {split!r} is not one of {SPLITS}")
    unknown = set(tasks) - set(TASK_BUILDERS)
    if unknown:
        raise ValueError(f"tasks: unknown {sorted(unknown)}; choose from {TASKS + EXTRA_TASKS}")
    if check_style(style) == "transfer" and split == "train":
        raise ValueError("split: the transfer style writes evaluation splits only (val, test); its sizes, layouts "
                         "and templates must never reach training. Ask for train = 0")
    data = SplitData([], [])
    for task in tasks:
        # classic keeps its seed string, so classic data is what it always was; referring_chain is
        # classic in every style (text only; its exact sentences are the control)
        plain = style == "classic" or task == "referring_chain"
        sty = Styler("classic" if plain else style, random.Random(f"{seed}:{split}:{task}" + ("" if plain else f":{style}")),
                     image_size)
        TASK_BUILDERS[task](sty, split, n_per_task, data)
        data.provenance.extend(dict(task=task, **p) for p in sty.provenance)
    return data


def write_synth(out: str | Path, sizes: dict[str, int], seed: int = 0, tasks=TASKS, image_size: int | None = None,
                style: str = "classic") -> dict:
    """Write every split under ``out``; returns {split: {queries, candidates}} counts. Styled data also
    gets ``<split>/provenance.jsonl``: the look of every picture and the template of every sentence."""
    counts = {}
    for split, n in sizes.items():
        d = synth_split(split, n, seed, tasks, image_size, style)
        counts[split] = {
            "queries": write_table(d.queries, QUERY_SCHEMA, Path(out) / split / "queries.parquet"),
            "candidates": write_table(d.candidates, CANDIDATE_SCHEMA, Path(out) / split / "candidates.parquet"),
        }
        if style != "classic":
            with open(Path(out) / split / "provenance.jsonl", "w") as f:
                f.writelines(json.dumps(dict(style=style, **p)) + "\n" for p in d.provenance)
    return counts

