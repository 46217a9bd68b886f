"""The referring family of synth tasks (``referring``, and the opt-in ``referring_compose`` and
``referring_chain``): a query names an object by its relation to another, so the raw text names the wrong
object and the ideal rewrite names the right one (see ``rime_data.synth``'s docstring)."""

from __future__ import annotations

from .scenes import COLORS, SHAPES, Scene, SceneObject, with_article
from .styler import Styler
from .synth_common import CHAIN_HOPS, CHAIN_OBJECTS, NUMBERS, SplitData, _label_candidates, _reasoning, _scene_key, split_of
from .templates import canonical


def _single_object_candidates(task: str, split: str, sty: Styler, data: SplitData) -> dict[tuple[str, str], str]:
    """One picture per (shape, colour): the corpus of the referring tasks."""
    ids = {}
    for sh in SHAPES:
        for c in COLORS:
            one = sty.single(sh, c)
            ids[(sh, c)] = f"{task}/{split}/img/{c}-{sh}"
            data.candidates.append(
                dict(
                    cand_id=ids[(sh, c)],
                    task=task,
                    cand_inst=sty.say("image.cand_inst"),
                    cand_image=sty.image(one),
                    rewrite=with_article(f"{c} {sh}"),
                )
            )
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
        data.queries.append(
            dict(
                query_id=f"referring/{split}/q{i}",
                task="referring",
                qry_inst=sty.say("referring.inst"),
                qry_text=sty.say("referring.text", rel=sty.say("rel", side=side), anchor=anchor.name),
                qry_image=sty.image(s),
                positive_ids=[ids[(target.shape, target.color)]],
                rewrite=answer,
                reasoning=_reasoning(
                    f"The image shows {s.caption()}.",
                    f"The anchor is the {anchor.name}.",
                    f"The nearest object to its {side} is the {target.name}.",
                    answer,
                ),
            )
        )


def _referring_compose(sty: Styler, split, n, data: SplitData) -> None:
    rng = sty.rng
    ids = _single_object_candidates("referring_compose", split, sty, data)
    for i in range(n):
        while True:
            s = sty.scene(n_objects=3 if sty.classic else rng.choice([k for k in sty.counts() if k >= 3]))
            (a1, side1, o1), (a2, side2, o2) = rng.sample(_relations(s), 2)
            if o1 == o2:  # the answer must combine two different objects
                continue
            text = canonical(
                "referring_compose.text",
                rel1=canonical("rel", side=side1),
                a1=a1.name,
                rel2=canonical("rel", side=side2),
                a2=a2.name,
            )
            if split_of("referring_compose:" + _scene_key(s) + text) == split:
                break
        answer = with_article(f"{o2.color} {o1.shape}")
        data.queries.append(
            dict(
                query_id=f"referring_compose/{split}/q{i}",
                task="referring_compose",
                qry_inst=sty.say("referring_compose.inst"),
                qry_text=sty.say(
                    "referring_compose.text",
                    rel1=sty.say("rel", side=side1),
                    a1=a1.name,
                    rel2=sty.say("rel", side=side2),
                    a2=a2.name,
                ),
                qry_image=sty.image(s),
                positive_ids=[ids[(o1.shape, o2.color)]],
                rewrite=answer,
                reasoning=_reasoning(
                    f"The image shows {s.caption()}.",
                    f"The object {side1} of the {a1.name} is the {o1.name}.",
                    f"The object {side2} of the {a2.name} is the {o2.name}.",
                    answer,
                ),
            )
        )


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
    ids = _label_candidates(
        "referring_chain",
        split,
        [with_article(f"{c} {sh}") for sh in SHAPES for c in COLORS],
        data,
        lambda: "Represent the given object name.",
    )
    for i in range(n):
        while True:
            ring = [
                SceneObject(sh, c, col, 0)
                for col, (sh, c) in enumerate(zip(rng.sample(SHAPES, CHAIN_OBJECTS), rng.sample(list(COLORS), CHAIN_OBJECTS)))
            ]
            facts = [_after(a, b) for a, b in zip(ring, ring[1:] + ring[:1])]
            rng.shuffle(facts)
            start = rng.randrange(CHAIN_OBJECTS)
            text = (
                f"Five objects stand in a ring. {' '.join(facts)} "
                f"The object {NUMBERS[CHAIN_HOPS]} places after the {ring[start].name}."
            )
            if split_of("referring_chain:" + text) == split:
                break
        path = [ring[(start + k) % CHAIN_OBJECTS] for k in range(CHAIN_HOPS + 1)]
        answer = path[-1].a_name
        data.queries.append(
            dict(
                query_id=f"referring_chain/{split}/q{i}",
                task="referring_chain",
                qry_inst="Find the name of the object the text refers to.",
                qry_text=text,
                positive_ids=[ids[answer]],
                rewrite=answer,
                reasoning=_reasoning(*[_after(a, b) for a, b in zip(path, path[1:])], answer),
            )
        )
