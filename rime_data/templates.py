"""Sentence templates of the procedural benchmark, several per form, so a model learns what is said
rather than one fixed wording.

Each form (a query text, a caption, an instruction, a relation phrase) has a *train* pool and a
*transfer* pool of templates; no template is in both, so transfer data phrases everything in ways
training never showed. The first train template of every form is the canonical sentence: the
``classic`` style uses only it, which keeps its data exactly what it was before templates existed.
Ideal rewrites and reasoning segments are never templated: they stay canonical in every style.
Template ids (``"<form>.<k>"``) are stable names for provenance and the no-overlap check.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

POOLS = ("train", "transfer")


@dataclass(frozen=True)
class Template:
    id: str
    text: str
    pool: str


# form -> (train templates, transfer templates); the first train template is the canonical one.
_FORMS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # a scene's objects: fields objects ("a red circle and a blue square", left to right),
    # objects_then ("a red circle, then a blue square"), objects_rev (right to left), objects_bare (no articles)
    "caption": (
        (
            "{objects}",
            "{objects}, from left to right",
            "a picture of {objects}",
            "an image with {objects}",
            "a scene showing {objects}",
            "from right to left: {objects_rev}",
            "left to right: {objects_then}",
            "{objects_bare}, left to right",
        ),
        ("this photo contains {objects}", "reading from left to right, {objects_then}", "seen from the right: {objects_rev}"),
    ),
    # where the referred object is: field side ("left" | "right")
    "rel": (
        ("{side} of", "to the {side} of", "on the {side} of"),
        ("on the {side}-hand side of", "directly {side} of"),
    ),
    "referring.text": (  # fields rel (a "rel" phrase), anchor (a name without article)
        (
            "Pictures containing the object {rel} the {anchor}.",
            "Images of the shape {rel} the {anchor}.",
            "The object {rel} the {anchor}, shown on its own.",
            "Next to the {anchor}: pictures of the object {rel} it.",
        ),
        ("Photos of whatever sits {rel} the {anchor}.", "Which thing is {rel} the {anchor}? Show that thing alone."),
    ),
    "referring_compose.text": (  # fields rel1, a1 (the shape's object), rel2, a2 (the colour's object)
        (
            "A picture of the shape of the object {rel1} the {a1} in the colour of the object {rel2} the {a2}.",
            "An image with the shape of the object {rel1} the {a1} and the colour of the object {rel2} the {a2}.",
            "Take the colour of the object {rel2} the {a2} and the shape of the object {rel1} the {a1}: a picture of that.",
        ),
        ("Shape from the thing {rel1} the {a1}, colour from the thing {rel2} the {a2}: find that photo.",),
    ),
    "vqa.colour": (  # field obj ("the circle", "the leftmost circle")
        (
            "What colour is {obj}?",
            "What color is {obj}?",
            "Which colour does {obj} have in the picture?",
            "Name the colour of {obj} in the image.",
        ),
        ("In this photo, {obj} has which hue?", "Tell me the shade of {obj}."),
    ),
    "vqa.count": (
        (
            "How many objects are in the picture?",
            "How many shapes are in the image?",
            "Count the objects in the scene.",
            "What is the number of objects in this picture?",
        ),
        ("Number of things shown in this photo?", "How many items does the photo hold?"),
    ),
    "composed.edit": (  # fields old (a name without article), new (a name with its article)
        (
            "Replace the {old} with {new}.",
            "Swap the {old} for {new}.",
            "Change the {old} into {new}.",
            "Put {new} where the {old} is.",
        ),
        ("Remove the {old} and draw {new} in its place.", "Where the {old} stands, there should be {new} instead."),
    ),
    # instructions (no fields)
    "t2i.inst": (
        (
            "Find an image that matches the given caption.",
            "Retrieve the picture this caption describes.",
            "Find the scene described by the text.",
        ),
        ("Which photo fits this description?", "Look up the photo for the following words."),
    ),
    "i2t.inst": (
        (
            "Find a caption describing the given image.",
            "Retrieve the text that describes this picture.",
            "Find the caption of the scene.",
        ),
        ("Which description fits this photo?", "Pick the words that go with this photo."),
    ),
    "cls.inst": (
        (
            "Classify the shape of the leftmost object in the image.",
            "What shape is the leftmost object in the picture?",
            "Name the shape of the object furthest to the left in the scene.",
        ),
        ("First thing from the left in this photo: which form is it?", "Identify the form of the leftmost item."),
    ),
    "vqa.inst": (
        ("Answer the question about the image.", "Answer the question about the picture.", "Look at the scene and answer."),
        ("Reply to the question using the photo.", "Use the photo to respond."),
    ),
    "composed.inst": (
        (
            "Find the image that results from the edit.",
            "Find the picture after the change.",
            "Apply the edit to the scene and find the result.",
        ),
        ("Which photo shows this one once modified as described?", "Look up the photo after the modification."),
    ),
    "referring.inst": (
        (
            "Find pictures of the object the text refers to in the image.",
            "Find pictures of the object the text points to.",
            "Use the image to resolve the text and find pictures of that object.",
        ),
        ("Work out which thing in the photo is meant, then look up photos of it.", "Resolve the reference with the photo."),
    ),
    "referring_compose.inst": (
        (
            "Find the picture the text describes, using the objects in the image.",
            "Find the picture described by the text, reading the objects off the image.",
            "Use the image's objects to find the picture the text asks for.",
        ),
        ("Combine what the photo shows as the words ask, then look up that photo.",),
    ),
    "image.cand_inst": (
        ("Represent the given image.", "Represent this picture.", "Represent the scene."),
        ("Encode the photo.", "Summarise the visual content."),
    ),
    "caption.cand_inst": (
        ("Represent the given caption.", "Represent this description.", "Represent the caption text."),
        ("Encode the words below.", "Summarise what these words say."),
    ),
    "cls.cand_inst": (
        ("Represent the given class label.", "Represent this shape name.", "Represent the label."),
        ("Encode the form named here.",),
    ),
    "vqa.cand_inst": (
        ("Represent the given answer.", "Represent this answer.", "Represent the reply."),
        ("Encode the response.",),
    ),
}

TEMPLATES: dict[str, tuple[Template, ...]] = {
    form: tuple(
        Template(f"{form}.{k}", text, pool)
        for k, (text, pool) in enumerate([(t, "train") for t in train] + [(t, "transfer") for t in transfer])
    )
    for form, (train, transfer) in _FORMS.items()
}


def pool(form: str, name: str) -> tuple[Template, ...]:
    """The templates of ``form`` that style pool ``name`` may use."""
    if name not in POOLS:
        raise ValueError(f"template pool: {name!r} is not one of {POOLS}")
    return tuple(t for t in TEMPLATES[form] if t.pool == name)


def canonical(form: str, **fields: str) -> str:
    """The canonical sentence (the classic style's, and the one rewrites are written in)."""
    return TEMPLATES[form][0].text.format(**fields)


def phrase(rng: random.Random, form: str, pool_name: str, **fields: str) -> tuple[str, str]:
    """A sentence of ``form`` from a uniformly drawn template of the pool: (text, template id)."""
    t = rng.choice(pool(form, pool_name))
    return t.text.format(**fields), t.id
