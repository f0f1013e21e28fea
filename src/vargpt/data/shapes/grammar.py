"""The text grammars of the Shapes world (SHAPES.md): generation prompts, questions, edit instructions, captions.

Every template has a parser (``parse_*``) so that texts round-trip to their parameters, and a judge
(``check_*``) implementing the contract's pass rules on objects read back by ``scorer.read_image``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

from vargpt.data.shapes.scorer import ReadObj, relation_holds
from vargpt.data.shapes.world import CELLS, COLORS, SHAPES, SIZES, Obj, Scene, cell_center, random_obj

__all__ = [
    "GEN_CATEGORIES", "MULTI_OBJECT_CATEGORIES", "RELATIONS", "LAYOUTS", "GenPrompt", "sample_gen_prompt",
    "parse_gen_prompt", "scene_for_prompt", "check_gen", "QUESTION_KINDS", "DESCRIBE_QUESTION", "check_question_kinds",
    "sample_question", "parse_question", "answer_question", "check_answer",
    "caption", "object_phrase", "parse_caption", "cell_plan", "parse_cell_plan", "key_caption", "EDIT_KINDS", "Edit",
    "sample_edit", "parse_edit", "apply_edit",
]

GEN_CATEGORIES = ("single_object", "two_objects", "counting", "colors", "position", "color_attribution", "size",
                  "cell")
#: The generation categories whose prompts ask for two or more objects.
MULTI_OBJECT_CATEGORIES = ("two_objects", "counting", "position", "color_attribution")
RELATIONS = ("to the left of", "to the right of", "above", "below")
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
_COLOR = "|".join(COLORS)
_SHAPE = "|".join(SHAPES)
_SIZE = "|".join(SIZES)
_CELL = "|".join(sorted(CELLS, key=len, reverse=True))
_REL = "|".join(RELATIONS)


# ------------------------------------------------------------------------------------------ generation prompts
@dataclass(frozen=True)
class GenPrompt:
    """A generation prompt: its category and parameters (a sorted tuple of (name, value))."""

    category: str
    params: tuple[tuple[str, object], ...]

    @property
    def p(self) -> dict:
        return dict(self.params)

    @property
    def text(self) -> str:
        p = self.p
        c = self.category
        if c == "single_object":
            return f"a {p['shape']}"
        if c == "two_objects":
            return f"a {p['shape1']} and a {p['shape2']}"
        if c == "counting":
            return f"{NUMBER_WORDS[p['count']]} {p['shape']}s"
        if c == "colors":
            return f"a {p['color']} {p['shape']}"
        if c == "position":
            return f"a {p['color1']} {p['shape1']} {p['relation']} a {p['color2']} {p['shape2']}"
        if c == "color_attribution":
            return f"a {p['color1']} {p['shape1']} and a {p['color2']} {p['shape2']}"
        if c == "size":
            return f"a {p['size']} {p['color']} {p['shape']}"
        if c == "cell":
            return f"a {p['color']} {p['shape']} in the {p['cell']}"
        raise ValueError(f"unknown category {c!r}")


def _gp(category: str, **params) -> GenPrompt:
    return GenPrompt(category, tuple(sorted(params.items())))


def sample_gen_prompt(rng: random.Random, category: str, relations: Sequence[str] = RELATIONS) -> GenPrompt:
    """A uniformly random prompt of ``category``; a position prompt's relation is drawn from ``relations`` (default:
    all of ``RELATIONS``, the suite's distribution)."""
    colors = list(COLORS)
    if category == "single_object":
        return _gp(category, shape=rng.choice(SHAPES))
    if category == "two_objects":
        s1, s2 = rng.sample(SHAPES, 2)
        return _gp(category, shape1=s1, shape2=s2)
    if category == "counting":
        return _gp(category, shape=rng.choice(SHAPES), count=rng.choice((2, 3)))
    if category == "colors":
        return _gp(category, color=rng.choice(colors), shape=rng.choice(SHAPES))
    if category == "position":
        bad = [r for r in relations if r not in RELATIONS]
        if bad or not relations:
            raise ValueError(f"sample_gen_prompt(relations={tuple(relations)!r}): expected some of {RELATIONS}")
        while True:
            c1, c2, s1, s2 = rng.choice(colors), rng.choice(colors), rng.choice(SHAPES), rng.choice(SHAPES)
            if (c1, s1) != (c2, s2):
                return _gp(category, color1=c1, shape1=s1, color2=c2, shape2=s2, relation=rng.choice(relations))
    if category == "color_attribution":
        s1, s2 = rng.sample(SHAPES, 2)
        c1, c2 = rng.sample(colors, 2)
        return _gp(category, color1=c1, shape1=s1, color2=c2, shape2=s2)
    if category == "size":
        return _gp(category, size=rng.choice(list(SIZES)), color=rng.choice(colors), shape=rng.choice(SHAPES))
    if category == "cell":
        return _gp(category, color=rng.choice(colors), shape=rng.choice(SHAPES), cell=rng.choice(CELLS))
    raise ValueError(f"unknown category {category!r}; expected one of {GEN_CATEGORIES}")


_GEN_PATTERNS = [
    ("position", rf"a (?P<color1>{_COLOR}) (?P<shape1>{_SHAPE}) (?P<relation>{_REL}) a (?P<color2>{_COLOR}) "
                 rf"(?P<shape2>{_SHAPE})"),
    ("color_attribution", rf"a (?P<color1>{_COLOR}) (?P<shape1>{_SHAPE}) and a (?P<color2>{_COLOR}) "
                          rf"(?P<shape2>{_SHAPE})"),
    ("two_objects", rf"a (?P<shape1>{_SHAPE}) and a (?P<shape2>{_SHAPE})"),
    ("cell", rf"a (?P<color>{_COLOR}) (?P<shape>{_SHAPE}) in the (?P<cell>{_CELL})"),
    ("size", rf"a (?P<size>{_SIZE}) (?P<color>{_COLOR}) (?P<shape>{_SHAPE})"),
    ("colors", rf"a (?P<color>{_COLOR}) (?P<shape>{_SHAPE})"),
    ("counting", rf"(?P<count>two|three) (?P<shape>{_SHAPE})s"),
    ("single_object", rf"a (?P<shape>{_SHAPE})"),
]


def parse_gen_prompt(text: str) -> GenPrompt:
    """Inverse of ``GenPrompt.text``; raises ValueError for text outside the grammar."""
    for category, pat in _GEN_PATTERNS:
        m = re.fullmatch(pat, text.strip())
        if m:
            params = m.groupdict()
            if "count" in params:
                params["count"] = {"two": 2, "three": 3}[params["count"]]
            return _gp(category, **params)
    raise ValueError(f"not a Shapes generation prompt: {text!r}")


def _cells_for_relation(rng: random.Random, relation: str) -> tuple[str, str]:
    while True:
        a, b = rng.sample(CELLS, 2)
        # cell centres in different columns (rows) are 21.3 px apart; 1 px of jitter per object keeps >= 8 px
        if relation_holds(cell_center(a), cell_center(b), relation):
            return a, b


#: ``scene_for_prompt(layout="canonical")``: the cells of n objects whose cells the prompt leaves open, and of the
#: two objects of each relation (A, B).
CANONICAL_CELLS = {1: ("center",), 2: ("left", "right"), 3: ("left", "center", "right")}
CANONICAL_RELATION_CELLS = {"to the left of": ("left", "right"), "to the right of": ("right", "left"),
                            "above": ("top", "bottom"), "below": ("bottom", "top")}
#: ``scene_for_prompt(layout="fixed")``: the colour of an object whose colour the prompt leaves open, by its shape.
CANONICAL_COLORS = {"circle": "red", "square": "blue", "triangle": "green"}
LAYOUTS = ("random", "canonical", "fixed")


def scene_for_prompt(rng: random.Random, prompt: GenPrompt, layout: str = "random") -> Scene:
    """A scene that passes ``check_gen`` for ``prompt`` (training targets).

    ``layout="random"``: what the prompt leaves open (cells, colours, sizes, the 1 px jitter) is drawn uniformly.
    ``"canonical"``: the cells the prompt leaves open are fixed (``CANONICAL_CELLS``, ``CANONICAL_RELATION_CELLS``)
    and so is the size ("large"); colours left open and the jitter are still drawn. ``"fixed"``: as canonical, and
    a colour left open is the shape's (``CANONICAL_COLORS``) and there is no jitter, so that the scene is a function
    of the prompt. A next-scale decoder samples the bits of a scale independently, so a prompt with many equally
    likely scenes asks it for a many-mode distribution that per-bit sampling cannot draw from (EVAL.md run 8: the
    layouts; run 18: the colours of "two circles", whose mixtures read back as extra objects)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}: expected one of {LAYOUTS}")
    p, c = prompt.p, prompt.category
    canonical = layout != "random"
    fixed = layout == "fixed"
    size = {} if not canonical or c == "size" else {"size": "large"}

    def obj(cell: str, shape: str, color: str | None = None, **kw) -> Obj:
        if fixed:
            return Obj(shape=shape, color=color or CANONICAL_COLORS[shape], cell=cell, **kw)  # kw: the size
        return random_obj(rng, cell, shape=shape, color=color, **kw)

    if c == "position":
        a, b = (CANONICAL_RELATION_CELLS[p["relation"]] if canonical else _cells_for_relation(rng, p["relation"]))
        return Scene((obj(a, p["shape1"], p["color1"], **size), obj(b, p["shape2"], p["color2"], **size)))
    n = {"two_objects": 2, "color_attribution": 2, "counting": p.get("count", 1)}.get(c, 1)
    cells = [p["cell"]] if c == "cell" else list(CANONICAL_CELLS[n]) if canonical else rng.sample(CELLS, n)
    if c == "single_object":
        objs = [obj(cells[0], p["shape"], **size)]
    elif c == "two_objects":
        objs = [obj(cells[0], p["shape1"], **size), obj(cells[1], p["shape2"], **size)]
    elif c == "counting":
        objs = [obj(cell, p["shape"], **size) for cell in cells]
    elif c == "colors" or c == "cell":
        objs = [obj(cells[0], p["shape"], p["color"], **size)]
    elif c == "color_attribution":
        objs = [obj(cells[0], p["shape1"], p["color1"], **size), obj(cells[1], p["shape2"], p["color2"], **size)]
    elif c == "size":
        objs = [obj(cells[0], p["shape"], p["color"], size=p["size"])]
    else:
        raise ValueError(f"unknown category {c!r}")
    return Scene(tuple(objs))


def check_gen(prompt: GenPrompt, objs: list[ReadObj]) -> bool:
    """SHAPES.md pass rule of a generation prompt on the objects read back from the image."""
    p, c = prompt.p, prompt.category
    shapes = sorted(o.shape for o in objs)
    if c == "single_object":
        return shapes == [p["shape"]]
    if c == "two_objects":
        return shapes == sorted([p["shape1"], p["shape2"]])
    if c == "counting":
        return shapes == [p["shape"]] * p["count"]
    if c == "colors":
        return [(o.color, o.shape) for o in objs] == [(p["color"], p["shape"])]
    if c == "size":
        return [(o.color, o.shape, o.size) for o in objs] == [(p["color"], p["shape"], p["size"])]
    if c == "cell":
        return [(o.color, o.shape, o.cell) for o in objs] == [(p["color"], p["shape"], p["cell"])]
    if c in ("position", "color_attribution"):
        if len(objs) != 2:
            return False
        a = [o for o in objs if (o.color, o.shape) == (p["color1"], p["shape1"])]
        b = [o for o in objs if (o.color, o.shape) == (p["color2"], p["shape2"])]
        if len(a) != 1 or len(b) != 1 or a[0] is b[0]:
            return False
        return c == "color_attribution" or relation_holds(a[0].center, b[0].center, p["relation"])
    raise ValueError(f"unknown category {c!r}")


# -------------------------------------------------------------------------------------------------- questions
QUESTION_KINDS = ("color", "shape", "count", "exists", "where", "describe")
DESCRIBE_QUESTION = "Describe the image."  # the question of kind "describe" (answered with ``caption``)


def check_question_kinds(kinds, where: str) -> tuple[str, ...]:
    """``kinds`` as a tuple; a ValueError naming ``where`` when any is not one of ``QUESTION_KINDS``."""
    kinds = tuple(kinds)
    bad = [k for k in kinds if k not in QUESTION_KINDS]
    if bad:
        raise ValueError(f"{where}: unknown question kind(s) {bad}; expected some of {QUESTION_KINDS}")
    return kinds


def object_phrase(obj) -> str:
    """One object of a caption: "a {size} {color} {shape} in the {cell}" (an ``Obj`` or a scorer's ``ReadObj``)."""
    return f"a {obj.size} {obj.color} {obj.shape} in the {obj.cell}"


def caption(scene: Scene) -> str:
    """Canonical caption: objects in reading order, ``object_phrase`` each, joined by ", "."""
    return ", ".join(map(object_phrase, scene.reading_order()))


def cell_plan(scene: Scene) -> str:
    """The scene as a plan with each cell named first: objects in reading order, each as
    "in the {cell} a {size} {color} {shape}", joined by ", " (``build_split(edit_reply="cells")``: the reply of an
    edit names the cell of each object before its attributes, so that the LLM, writing left to right, picks the
    object by where it is and then reads that object's attributes). Not a SHAPES.md grammar: describe answers stay
    ``caption``."""
    return ", ".join(f"in the {o.cell} a {o.size} {o.color} {o.shape}" for o in scene.reading_order())


def parse_cell_plan(text: str) -> frozenset | None:
    """Scene key (set of (shape, color, size, cell)) of a ``cell_plan``, or None when it does not parse."""
    return _parse_objects(text, _PLAN_OBJECT)


def key_caption(key: frozenset) -> str:
    """The canonical caption of a scene key (``parse_caption`` / ``parse_cell_plan``)."""
    return caption(Scene(tuple(Obj(*k) for k in key)))


def parse_caption(text: str) -> frozenset | None:
    """Scene key (set of (shape, color, size, cell)) of a caption, or None when it does not parse."""
    return _parse_objects(text, _CAPTION_OBJECT)


_CAPTION_OBJECT = re.compile(rf"a (?P<size>{_SIZE}) (?P<color>{_COLOR}) (?P<shape>{_SHAPE}) in the (?P<cell>{_CELL})")
_PLAN_OBJECT = re.compile(rf"in the (?P<cell>{_CELL}) a (?P<size>{_SIZE}) (?P<color>{_COLOR}) (?P<shape>{_SHAPE})")


def _parse_objects(text: str, pattern: re.Pattern) -> frozenset | None:
    """Scene key of ", "-joined object phrases, each matching ``pattern``; None when one does not match or two
    objects share a cell (or repeat)."""
    keys = []
    for part in (t.strip() for t in text.strip().split(",")):
        m = pattern.fullmatch(part)
        if not m:
            return None
        keys.append((m["shape"], m["color"], m["size"], m["cell"]))
    if len(set(keys)) != len(keys) or len({k[3] for k in keys}) != len(keys):
        return None
    return frozenset(keys)


def _unique(scene: Scene, **attrs) -> Obj | None:
    hits = [o for o in scene.objects if all(getattr(o, k) == v for k, v in attrs.items())]
    return hits[0] if len(hits) == 1 else None


def sample_question(rng: random.Random, scene: Scene, kind: str | None = None) -> tuple[str, str] | None:
    """(question, answer) of ``kind`` (default random) about ``scene``; None when the kind is not askable."""
    kind = kind or rng.choice(QUESTION_KINDS)
    objs = list(scene.objects)
    if kind == "color":
        cands = [o for o in objs if _unique(scene, shape=o.shape)]
        if not cands:
            return None
        o = rng.choice(cands)
        return f"What color is the {o.shape}?", o.color
    if kind == "shape":
        cands = [o for o in objs if _unique(scene, color=o.color)]
        if not cands:
            return None
        o = rng.choice(cands)
        return f"What shape is the {o.color} object?", o.shape
    if kind == "count":
        return "How many shapes are there?", NUMBER_WORDS[len(objs)]
    if kind == "exists":
        present = {(o.color, o.shape) for o in objs}
        if rng.random() < 0.5:
            color, shape = rng.choice(sorted(present))
            return f"Is there a {color} {shape}?", "yes"
        absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
        color, shape = rng.choice(absent)
        return f"Is there a {color} {shape}?", "no"
    if kind == "where":
        cands = [o for o in objs if _unique(scene, color=o.color, shape=o.shape)]
        if not cands:
            return None
        o = rng.choice(cands)
        return f"Where is the {o.color} {o.shape}?", o.cell
    if kind == "describe":
        return DESCRIBE_QUESTION, caption(scene)
    raise ValueError(f"unknown question kind {kind!r}; expected one of {QUESTION_KINDS}")


_Q_PATTERNS = [
    ("color", rf"What color is the (?P<shape>{_SHAPE})\?"),
    ("shape", rf"What shape is the (?P<color>{_COLOR}) object\?"),
    ("count", r"How many shapes are there\?"),
    ("exists", rf"Is there a (?P<color>{_COLOR}) (?P<shape>{_SHAPE})\?"),
    ("where", rf"Where is the (?P<color>{_COLOR}) (?P<shape>{_SHAPE})\?"),
    ("describe", r"Describe the image\."),
]


def parse_question(text: str) -> tuple[str, dict]:
    for kind, pat in _Q_PATTERNS:
        m = re.fullmatch(pat, text.strip())
        if m:
            return kind, m.groupdict()
    raise ValueError(f"not a Shapes question: {text!r}")


def answer_question(question: str, scene: Scene) -> str:
    """The correct answer to a (askable) question about ``scene``."""
    kind, p = parse_question(question)
    if kind == "color":
        o = _unique(scene, shape=p["shape"])
        if o is None:
            raise ValueError(f"{question!r} is not askable: no unique {p['shape']}")
        return o.color
    if kind == "shape":
        o = _unique(scene, color=p["color"])
        if o is None:
            raise ValueError(f"{question!r} is not askable: no unique {p['color']} object")
        return o.shape
    if kind == "count":
        return NUMBER_WORDS[len(scene.objects)]
    if kind == "exists":
        return "yes" if any((o.color, o.shape) == (p["color"], p["shape"]) for o in scene.objects) else "no"
    if kind == "where":
        o = _unique(scene, color=p["color"], shape=p["shape"])
        if o is None:
            raise ValueError(f"{question!r} is not askable: no unique {p['color']} {p['shape']}")
        return o.cell
    return caption(scene)


def check_answer(question: str, predicted: str, scene: Scene) -> bool:
    """Exact match (lower case, no punctuation); a description passes when it parses back to the scene."""
    kind, _ = parse_question(question)
    pred = predicted.strip()
    if kind == "describe":
        return parse_caption(pred) == scene.key()
    return pred == answer_question(question, scene)


# ---------------------------------------------------------------------------------------------------- edits
EDIT_KINDS = ("recolor", "remove", "add", "move")


@dataclass(frozen=True)
class Edit:
    kind: str
    params: tuple[tuple[str, str], ...]

    @property
    def p(self) -> dict:
        return dict(self.params)

    @property
    def text(self) -> str:
        p = self.p
        if self.kind == "recolor":
            return f"Make the {p['color']} {p['shape']} {p['new_color']}."
        if self.kind == "remove":
            return f"Remove the {p['color']} {p['shape']}."
        if self.kind == "add":
            return f"Add a {p['size']} {p['color']} {p['shape']} in the {p['cell']}."
        if self.kind == "move":
            return f"Move the {p['color']} {p['shape']} to the {p['cell']}."
        raise ValueError(f"unknown edit kind {self.kind!r}")


def _edit(kind: str, **params) -> Edit:
    return Edit(kind, tuple(sorted(params.items())))


def sample_edit(rng: random.Random, scene: Scene, kind: str | None = None) -> tuple[Edit, Scene] | None:
    """(edit, expected scene) of ``kind`` (default random) for ``scene``; None when not applicable."""
    kind = kind or rng.choice(EDIT_KINDS)
    refs = [o for o in scene.objects if _unique(scene, color=o.color, shape=o.shape)]
    empty = [c for c in CELLS if c not in {o.cell for o in scene.objects}]
    if kind == "recolor" and refs:
        o = rng.choice(refs)
        new = rng.choice([c for c in COLORS if c != o.color])
        e = _edit(kind, color=o.color, shape=o.shape, new_color=new)
    elif kind == "remove" and refs and len(scene.objects) > 1:
        o = rng.choice(refs)
        e = _edit(kind, color=o.color, shape=o.shape)
    elif kind == "add" and empty and len(scene.objects) < 3:
        e = _edit(kind, size=rng.choice(list(SIZES)), color=rng.choice(list(COLORS)), shape=rng.choice(SHAPES),
                  cell=rng.choice(empty))
    elif kind == "move" and refs and empty:
        o = rng.choice(refs)
        e = _edit(kind, color=o.color, shape=o.shape, cell=rng.choice(empty))
    else:
        return None
    return e, apply_edit(scene, e, rng)


_E_PATTERNS = [
    ("recolor", rf"Make the (?P<color>{_COLOR}) (?P<shape>{_SHAPE}) (?P<new_color>{_COLOR})\."),
    ("remove", rf"Remove the (?P<color>{_COLOR}) (?P<shape>{_SHAPE})\."),
    ("add", rf"Add a (?P<size>{_SIZE}) (?P<color>{_COLOR}) (?P<shape>{_SHAPE}) in the (?P<cell>{_CELL})\."),
    ("move", rf"Move the (?P<color>{_COLOR}) (?P<shape>{_SHAPE}) to the (?P<cell>{_CELL})\."),
]


def parse_edit(text: str) -> Edit:
    for kind, pat in _E_PATTERNS:
        m = re.fullmatch(pat, text.strip())
        if m:
            return _edit(kind, **m.groupdict())
    raise ValueError(f"not a Shapes edit instruction: {text!r}")


def apply_edit(scene: Scene, edit: Edit, rng: random.Random | None = None) -> Scene:
    """The scene after ``edit`` (new objects get jitter from ``rng``, default none)."""
    p = edit.p
    jitter = (rng.randint(-1, 1), rng.randint(-1, 1)) if rng else (0, 0)
    if edit.kind == "add":
        if any(o.cell == p["cell"] for o in scene.objects):
            raise ValueError(f"{edit.text!r}: the {p['cell']} cell is not empty")
        return replace(scene, objects=scene.objects + (Obj(p["shape"], p["color"], p["size"], p["cell"], jitter),))
    o = _unique(scene, color=p["color"], shape=p["shape"])
    if o is None:
        raise ValueError(f"{edit.text!r}: no unique {p['color']} {p['shape']} in the scene")
    if edit.kind == "recolor":
        return scene.replace_obj(o, replace(o, color=p["new_color"]))
    if edit.kind == "remove":
        return scene.replace_obj(o, None)
    if any(x.cell == p["cell"] for x in scene.objects):
        raise ValueError(f"{edit.text!r}: the {p['cell']} cell is not empty")
    return scene.replace_obj(o, replace(o, cell=p["cell"], jitter=jitter))
