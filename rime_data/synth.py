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

import json
import random
from collections import defaultdict
from dataclasses import replace
from functools import partial
from pathlib import Path

from .scenes import COLORS, SHAPES, SceneObject, with_article
from .schema import CANDIDATE_SCHEMA, QUERY_SCHEMA, SPLITS, write_table
from .styler import Styler
from .styles import check_style
from .synth_common import (
    COUNT_WORDS,
    EXTRA_TASKS,
    TASKS,
    SplitData,
    _caption,
    _draw,
    _label_candidates,
    _reasoning,
    _scene_key,
    split_of,
)
from .synth_referring import _referring, _referring_chain, _referring_compose
from .templates import canonical


def _t2i(sty: Styler, split, n, data: SplitData) -> None:
    by_caption: dict[str, list[str]] = defaultdict(list)
    rows = []
    for i in range(n):
        s = _draw(sty, split, lambda x: "t2i:" + x.caption())
        cid = f"t2i/{split}/img{i}"
        data.candidates.append(
            dict(cand_id=cid, task="t2i", cand_inst=sty.say("image.cand_inst"), cand_image=sty.image(s), rewrite=s.caption())
        )
        by_caption[s.caption()].append(cid)
        rows.append((i, s))
    for i, s in rows:
        cap = s.caption()
        data.queries.append(
            dict(
                query_id=f"t2i/{split}/q{i}",
                task="t2i",
                qry_inst=sty.say("t2i.inst"),
                qry_text=_caption(s, sty),
                positive_ids=by_caption[cap],
                rewrite=cap,
                reasoning=_reasoning(
                    f"The caption lists {COUNT_WORDS[len(s.objects)]} object(s).",
                    "Their order is left to right.",
                    f"The picture must show exactly {cap}.",
                    cap,
                ),
            )
        )


def _i2t(sty: Styler, split, n, data: SplitData) -> None:
    caption_ids: dict[str, str] = {}
    for i in range(n):
        s = _draw(sty, split, lambda x: "i2t:" + x.caption())
        cap = s.caption()
        if cap not in caption_ids:
            caption_ids[cap] = f"i2t/{split}/cap{len(caption_ids)}"
            data.candidates.append(
                dict(
                    cand_id=caption_ids[cap],
                    task="i2t",
                    cand_inst=sty.say("caption.cand_inst"),
                    cand_text=_caption(s, sty),
                    rewrite=cap,
                )
            )
        data.queries.append(
            dict(
                query_id=f"i2t/{split}/q{i}",
                task="i2t",
                qry_inst=sty.say("i2t.inst"),
                qry_image=sty.image(s),
                positive_ids=[caption_ids[cap]],
                rewrite=cap,
                reasoning=_reasoning(
                    f"I see {COUNT_WORDS[len(s.objects)]} object(s).", "I read them from left to right.", f"They are {cap}.", cap
                ),
            )
        )


def _cls(sty: Styler, split, n, data: SplitData) -> None:
    labels = {sh: with_article(sh) for sh in SHAPES}
    ids = _label_candidates("cls", split, list(labels.values()), data, partial(sty.say, "cls.cand_inst"))
    for i in range(n):
        s = _draw(sty, split, lambda x: "cls:" + _scene_key(x))
        left = min(s.objects, key=lambda o: o.col)
        lab = labels[left.shape]
        data.queries.append(
            dict(
                query_id=f"cls/{split}/q{i}",
                task="cls",
                qry_inst=sty.say("cls.inst"),
                qry_image=sty.image(s),
                positive_ids=[ids[lab]],
                cand_ids=list(ids.values()),
                rewrite=lab,
                reasoning=_reasoning(
                    f"The image shows {s.caption()}.", "The leftmost object comes first.", f"It is {left.a_name}.", lab
                ),
            )
        )


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
        data.queries.append(
            dict(
                query_id=f"vqa/{split}/q{i}",
                task="vqa",
                qry_inst=sty.say("vqa.inst"),
                qry_text=question,
                qry_image=sty.image(s),
                positive_ids=[cands[answer]],
                cand_ids=list(cands.values()),
                rewrite=answer,
                reasoning=_reasoning(f"The image shows {s.caption()}.", f"The question: {question}", third, answer),
            )
        )


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
        data.candidates.append(
            dict(
                cand_id=cid,
                task="composed",
                cand_inst=sty.say("image.cand_inst"),
                cand_image=sty.image(target),
                rewrite=target.caption(),
            )
        )
        by_key[target.caption()].append(cid)
        pending.append((i, s, target, obj, new))
    for i, s, target, obj, new in pending:
        data.queries.append(
            dict(
                query_id=f"composed/{split}/q{i}",
                task="composed",
                qry_inst=sty.say("composed.inst"),
                qry_text=sty.say("composed.edit", old=obj.name, new=new.a_name),
                qry_image=sty.image(s),
                positive_ids=by_key[target.caption()],
                rewrite=target.caption(),
                reasoning=_reasoning(
                    f"The reference shows {s.caption()}.",
                    f"The edit removes the {obj.name}.",
                    f"{new.a_name.capitalize()} takes its place.",
                    target.caption(),
                ),
            )
        )


TASK_BUILDERS = {
    "t2i": _t2i,
    "i2t": _i2t,
    "cls": _cls,
    "vqa": _vqa,
    "composed": _composed,
    "referring": _referring,
    "referring_compose": _referring_compose,
    "referring_chain": _referring_chain,
}


def synth_split(
    split: str, n_per_task: int, seed: int = 0, tasks=TASKS, image_size: int | None = None, style: str = "classic"
) -> SplitData:
    """Generate one split: ``n_per_task`` queries for each task, with their candidates.

    ``image_size`` (default 84) is the classic style's; the other styles draw sizes from their ranges.
    ``transfer`` refuses the train split: its settings are for measuring transfer, never for training."""
    if split not in SPLITS:
        raise ValueError(f"split: {split!r} is not one of {SPLITS}")
    unknown = set(tasks) - set(TASK_BUILDERS)
    if unknown:
        raise ValueError(f"tasks: unknown {sorted(unknown)}; choose from {TASKS + EXTRA_TASKS}")
    if check_style(style) == "transfer" and split == "train":
        raise ValueError(
            "split: the transfer style writes evaluation splits only (val, test); its sizes, layouts "
            "and templates must never reach training. Ask for train = 0"
        )
    data = SplitData([], [])
    for task in tasks:
        # classic keeps its seed string, so classic data is what it always was; referring_chain is
        # classic in every style (text only; its exact sentences are the control)
        plain = style == "classic" or task == "referring_chain"
        sty = Styler(
            "classic" if plain else style, random.Random(f"{seed}:{split}:{task}" + ("" if plain else f":{style}")), image_size
        )
        TASK_BUILDERS[task](sty, split, n_per_task, data)
        data.provenance.extend(dict(task=task, **p) for p in sty.provenance)
    return data


def write_synth(
    out: str | Path, sizes: dict[str, int], seed: int = 0, tasks=TASKS, image_size: int | None = None, style: str = "classic"
) -> dict:
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
