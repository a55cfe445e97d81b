"""Text derived from a scene graph: captions, questions with exact answers, hallucination probes,
preference pairs, and the caption parser the CHAIR metric uses.

Every answer is computed from the graph, so it is exact; answers are short (a colour, a shape, a
digit, "yes"/"no", a cell name, "<color> <shape>", a word) so that accuracy is an exact match after
`normalize_answer`. A question only refers to an object through a description that picks out exactly
one object of the scene; when no such description exists the question is not asked.

Spatial relations are defined on the grid, not on pixels:
  A is "left of" B   iff A.col < B.col (any row);   "right of" iff A.col > B.col;
  A is "above" B     iff A.row < B.row (any column); "below"    iff A.row > B.row.
"What is left of X?" is asked only when exactly one object is left of X.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, replace

from .scene import (ALL_OBJECTS, CELL_PHRASES, COLORS, GRID, POPULAR_RANKING, ROW_NAMES, SHAPES,
                    Scene, SceneObject, object_weight)

CAPTION_PROMPTS: tuple[str, ...] = (
    "Describe the image.", "What is in this picture?", "Write a short caption for the image.",
    "Describe the scene in one sentence.",
)
POPE_SETTINGS: tuple[str, ...] = ("random", "popular", "adversarial")
POPE_TEMPLATE = "Is there {} in the image?"


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    qtype: str


@dataclass(frozen=True)
class PreferencePair:
    """One alignment example: `chosen` is faithful to the scene, `rejected` hallucinates."""

    prompt: str
    chosen: str
    rejected: str
    kind: str


def normalize_answer(text: str) -> str:
    """Canonical form for exact-match scoring: lowercase, single spaces, no surrounding quotes or
    trailing period."""
    text = " ".join(text.lower().split())
    text = text.strip().strip("\"'").strip()
    while text.endswith("."):
        text = text[:-1].rstrip()
    return text.strip("\"'").strip()


def article(noun_phrase: str) -> str:
    """`noun_phrase` with "a" or "an" in front ("an orange circle")."""
    return ("an " if noun_phrase[:1] in "aeiou" else "a ") + noun_phrase


def plural(shape: str) -> str:
    return shape + ("es" if shape.endswith(("s", "x", "ch", "sh")) else "s")


def scene_objects(scene: Scene) -> set[tuple[str, str]]:
    """The (color, shape) pairs present in `scene`."""
    return {(o.color, o.shape) for o in scene.objects}


_OBJECT_RE = re.compile(
    r"\b(?:(?:small|large)\s+)?(" + "|".join(COLORS) + r")\s+(" + "|".join(SHAPES)
    + r")(?:es|s)?\b")


def parse_objects(text: str) -> list[tuple[str, str]]:
    """(color, shape) pairs mentioned in `text`, in order, one per mention ("two red circles" is one
    mention). Size words and articles are optional; negations are not understood, which is fine for
    captions, the only text CHAIR reads."""
    return [(m.group(1), m.group(2)) for m in _OBJECT_RE.finditer(text.lower())]


def _join(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    if len(items) == 2:
        return f"{items[0]} and {items[1]}"
    return ", ".join(items[:-1]) + f", and {items[-1]}"


def caption(scene: Scene, rng: random.Random | None = None) -> str:
    """A faithful description: every object as "<size> <color> <shape>" with its cell, in reading
    order, and the word if there is one. `rng` picks one of a few phrasings (without it, the
    first)."""
    parts = [f"{article(f'{o.size} {o.name}')} {CELL_PHRASES[o.row][o.col]}"
             for o in sorted(scene.objects, key=lambda o: (o.row, o.col))]
    if scene.word is not None and scene.word_row is not None:
        parts.append(f'the word "{scene.word}" across the {ROW_NAMES[scene.word_row]}')
    body = _join(parts) if parts else "nothing but the background"
    style = 0 if rng is None else rng.randrange(3)
    if style == 0:
        return body[0].upper() + body[1:] + "."
    if style == 1:
        return f"There is {body}."
    return f"The image shows {body}."


# ---------------------------------------------------------------- referring expressions

def _count(scene: Scene, **attrs: object) -> int:
    return sum(all(getattr(o, k) == v for k, v in attrs.items()) for o in scene.objects)


def _name_ref(scene: Scene, obj: SceneObject) -> str | None:
    """ "red circle" or "large red circle" if that picks out `obj` alone, else None."""
    if _count(scene, color=obj.color, shape=obj.shape) == 1:
        return obj.name
    if _count(scene, color=obj.color, shape=obj.shape, size=obj.size) == 1:
        return f"{obj.size} {obj.name}"
    return None


def _ref_without_color(scene: Scene, obj: SceneObject) -> str:
    """A description of `obj` that does not give its colour away; always unique (cells are)."""
    if _count(scene, shape=obj.shape) == 1:
        return obj.shape
    if _count(scene, shape=obj.shape, size=obj.size) == 1:
        return f"{obj.size} {obj.shape}"
    return f"{obj.shape} {CELL_PHRASES[obj.row][obj.col]}"


def _ref_without_shape(scene: Scene, obj: SceneObject) -> str:
    """A description of `obj` that does not give its shape away; always unique."""
    if _count(scene, color=obj.color) == 1:
        return f"{obj.color} object"
    if _count(scene, color=obj.color, size=obj.size) == 1:
        return f"{obj.size} {obj.color} object"
    return f"{obj.color} object {CELL_PHRASES[obj.row][obj.col]}"


RELATIONS: dict[str, tuple[str, ...]] = {
    "left of": ("What is left of the {}?", "Which object is to the left of the {}?"),
    "right of": ("What is right of the {}?", "Which object is to the right of the {}?"),
    "above": ("What is above the {}?", "Which object is above the {}?"),
    "below": ("What is below the {}?", "Which object is below the {}?"),
}


def holds(relation: str, a: SceneObject, b: SceneObject) -> bool:
    """Whether `a` is `relation` `b` under the grid definition in the module docstring."""
    return {"left of": a.col < b.col, "right of": a.col > b.col,
            "above": a.row < b.row, "below": a.row > b.row}[relation]


def _absent(scene: Scene) -> list[tuple[str, str]]:
    present = scene_objects(scene)
    return [p for p in ALL_OBJECTS if p not in present]


def _shares_attribute(pair: tuple[str, str], present: set[tuple[str, str]]) -> bool:
    return any(pair[0] == c or pair[1] == s for c, s in present)


# ---------------------------------------------------------------- instruction data

def instruction_qas(scene: Scene, rng: random.Random) -> list[QA]:
    """Questions of every type the scene supports, one or two per type, in a fixed type order."""
    objs = sorted(scene.objects, key=lambda o: (o.row, o.col))
    qas: list[QA] = []

    obj = rng.choice(objs)
    q = rng.choice(("What color is the {}?", "What is the color of the {}?",
                    "Which color is the {}?"))
    qas.append(QA(q.format(_ref_without_color(scene, obj)), obj.color, "color"))

    obj = rng.choice(objs)
    q = rng.choice(("What shape is the {}?", "What is the shape of the {}?",
                    "Which shape is the {}?"))
    qas.append(QA(q.format(_ref_without_shape(scene, obj)), obj.shape, "shape"))

    q = rng.choice(("How many objects are there?", "How many objects are in the image?",
                    "How many shapes are in the picture?"))
    qas.append(QA(q, str(len(objs)), "count"))
    if rng.random() < 0.5:
        color = rng.choice(sorted(COLORS)) if rng.random() < 0.3 else rng.choice(objs).color
        qas.append(QA(f"How many {color} objects are there?", str(_count(scene, color=color)),
                      "count"))
    else:
        shape = rng.choice(SHAPES) if rng.random() < 0.3 else rng.choice(objs).shape
        qas.append(QA(f"How many {plural(shape)} are there?", str(_count(scene, shape=shape)),
                      "count"))

    templates = ("Is there {}?", "Is there {} in the image?", "Does the image contain {}?")
    present = rng.choice(objs)
    absent = rng.choice(_absent(scene))
    qas.append(QA(rng.choice(templates).format(article(present.name)), "yes", "existence"))
    qas.append(QA(rng.choice(templates).format(article(f"{absent[0]} {absent[1]}")), "no",
                  "existence"))

    named = [(o, ref) for o in objs if (ref := _name_ref(scene, o)) is not None]
    if named:
        obj, ref = rng.choice(named)
        q = rng.choice(("Where is the {}?", "In which part of the image is the {}?",
                        "Where is the {} located?"))
        qas.append(QA(q.format(ref), obj.cell, "position"))

    options = []
    for anchor, ref in named:
        for relation in RELATIONS:
            matches = [o for o in objs if o is not anchor and holds(relation, o, anchor)]
            if len(matches) == 1:
                options.append((relation, ref, matches[0]))
    if options:
        relation, ref, target = rng.choice(options)
        qas.append(QA(rng.choice(RELATIONS[relation]).format(ref), target.name, "relation"))

    text_q = rng.choice(("Is there any text in the image?", "Is anything written in the image?"))
    if scene.word is None:
        qas.append(QA(text_q, "no", "reading"))
    else:
        qas.append(QA(text_q, "yes", "reading"))
        q = rng.choice(("What word is written in the image?", "What does the text say?",
                        "Which word is printed in the picture?"))
        qas.append(QA(q, scene.word, "reading"))
    return qas


# ---------------------------------------------------------------- hallucination probes

def pope_negatives(scene: Scene, setting: str, rng: random.Random, k: int) -> list[tuple[str, str]]:
    """k absent (color, shape) pairs chosen the POPE way for `setting`."""
    absent = _absent(scene)
    if setting == "random":
        return rng.sample(absent, min(k, len(absent)))
    if setting == "popular":
        present = scene_objects(scene)
        return [p for p in POPULAR_RANKING if p not in present][:k]
    if setting == "adversarial":
        present = scene_objects(scene)
        near = [p for p in absent if _shares_attribute(p, present)]
        return rng.sample(near, min(k, len(near)))
    raise ValueError(f"pope setting: expected one of {POPE_SETTINGS}, got {setting!r}")


def pope_probes(scene: Scene, setting: str, rng: random.Random, num_pairs: int = 3) -> list[QA]:
    """Balanced yes/no existence probes: as many "yes" (present objects) as "no" (absent objects
    picked per `setting`), shuffled; at most `num_pairs` of each, fewer when the scene has fewer
    distinct objects."""
    present = sorted(scene_objects(scene))
    negatives = pope_negatives(scene, setting, rng, num_pairs)
    k = min(num_pairs, len(present), len(negatives))
    probes = [QA(POPE_TEMPLATE.format(article(f"{c} {s}")), "yes", f"pope_{setting}")
              for c, s in rng.sample(present, k)]
    probes += [QA(POPE_TEMPLATE.format(article(f"{c} {s}")), "no", f"pope_{setting}")
               for c, s in negatives[:k]]
    rng.shuffle(probes)
    return probes


def attribute_probes(scene: Scene, rng: random.Random) -> list[QA]:
    """One "yes" and one "no" question about the colour of one object ("Is the circle red?")."""
    obj = rng.choice(scene.objects)
    ref = _ref_without_color(scene, obj)
    wrong = rng.choice([c for c in COLORS if c != obj.color])
    probes = [QA(f"Is the {ref} {obj.color}?", "yes", "attribute"),
              QA(f"Is the {ref} {wrong}?", "no", "attribute")]
    rng.shuffle(probes)
    return probes


def relation_probes(scene: Scene, rng: random.Random) -> list[QA]:
    """One "yes" and one "no" question about the relation of two uniquely named objects; empty when
    the scene has no such pair."""
    named = [(o, r) for o in scene.objects if (r := _name_ref(scene, o)) is not None]
    pairs = [(a, b) for a in named for b in named if a[0] is not b[0]]
    if not pairs:
        return []
    (a, ra), (b, rb) = rng.choice(pairs)
    true = [r for r in RELATIONS if holds(r, a, b)]
    false = [r for r in RELATIONS if not holds(r, a, b)]
    probes = [QA(f"Is the {ra} {rel} the {rb}?", ans, "relation_probe")
              for rel, ans in ((rng.choice(true), "yes"), (rng.choice(false), "no"))]
    rng.shuffle(probes)
    return probes


# ---------------------------------------------------------------- preference pairs

def _free_cells(scene: Scene) -> list[tuple[int, int]]:
    used = {(o.row, o.col) for o in scene.objects}
    return [(r, c) for r in range(GRID) for c in range(GRID)
            if (r, c) not in used and r != scene.word_row]


def _likely_absent(scene: Scene, rng: random.Random) -> tuple[str, str]:
    """An absent pair drawn by the generator's prior: the hallucinations a biased model makes."""
    absent = _absent(scene)
    return rng.choices(absent, weights=[object_weight(*p) for p in absent])[0]


def preference_pairs(scene: Scene, rng: random.Random) -> list[PreferencePair]:
    """Faithful vs hallucinated answers: a caption with an extra absent object, a caption with one
    object recoloured into an absent pair, a wrong object count, and wrong existence answers."""
    pairs: list[PreferencePair] = []
    style = rng.randrange(1 << 30)  # chosen and rejected captions share their phrasing

    def cap(s: Scene) -> str:
        return caption(s, random.Random(style))

    free = _free_cells(scene)
    if free:
        (row, col), (color, shape) = rng.choice(free), _likely_absent(scene, rng)
        extra = SceneObject(shape=shape, color=color, size=rng.choice(("small", "large")),
                            row=row, col=col)
        fake = replace(scene, objects=scene.objects + (extra,))
        pairs.append(PreferencePair(rng.choice(CAPTION_PROMPTS), cap(scene), cap(fake),
                                    "caption_extra_object"))

    present = scene_objects(scene)
    options = [(i, c) for i, o in enumerate(scene.objects) for c in COLORS
               if (c, o.shape) not in present]
    if options:
        i, color = rng.choice(options)
        objects = list(scene.objects)
        objects[i] = replace(objects[i], color=color)
        fake = replace(scene, objects=tuple(objects))
        pairs.append(PreferencePair(rng.choice(CAPTION_PROMPTS), cap(scene), cap(fake),
                                    "caption_wrong_color"))

    n = len(scene.objects)
    wrong = n + 1 if n <= 1 or rng.random() < 0.6 else n - 1
    pairs.append(PreferencePair("How many objects are there?", str(n), str(wrong), "count"))

    color, shape = _likely_absent(scene, rng)
    pairs.append(PreferencePair(POPE_TEMPLATE.format(article(f"{color} {shape}")), "no", "yes",
                                "existence"))
    obj = rng.choice(scene.objects)
    pairs.append(PreferencePair(POPE_TEMPLATE.format(article(obj.name)), "yes", "no", "existence"))
    return pairs


# ---------------------------------------------------------------- hard negatives

def hard_negative(scene: Scene, rng: random.Random) -> Scene:
    """The scene with exactly one binding changed, for contrastive hard negatives (NegCLIP,
    Yuksekgonul et al. 2023): two objects swap colours or shapes, one object moves to a free cell or
    changes colour, or the printed word changes. A caption of it differs from the true caption in one
    place, so only an image encoder that binds attributes to objects can tell them apart."""
    from .scene import WORDS

    objects = list(scene.objects)
    options = []
    pairs = [(i, j) for i in range(len(objects)) for j in range(i + 1, len(objects))]
    if any(objects[i].color != objects[j].color for i, j in pairs):
        options.append("swap_color")
    if any(objects[i].shape != objects[j].shape for i, j in pairs):
        options.append("swap_shape")
    if _free_cells(scene):
        options.append("move")
    if scene.word is not None:
        options.append("word")
    options.append("recolor")
    kind = rng.choice(options)
    if kind in ("swap_color", "swap_shape"):
        attr = kind.split("_")[1]
        i, j = rng.choice([(i, j) for i, j in pairs if getattr(objects[i], attr) != getattr(objects[j], attr)])
        a, b = getattr(objects[i], attr), getattr(objects[j], attr)
        objects[i], objects[j] = replace(objects[i], **{attr: b}), replace(objects[j], **{attr: a})
    elif kind == "move":
        i = rng.randrange(len(objects)) if objects else None
        if i is not None:
            row, col = rng.choice(_free_cells(scene))
            objects[i] = replace(objects[i], row=row, col=col)
    elif kind == "word":
        return replace(scene, word=rng.choice([w for w in WORDS if w != scene.word]))
    if kind == "recolor" and objects:
        i = rng.randrange(len(objects))
        objects[i] = replace(objects[i], color=rng.choice([c for c in COLORS if c != objects[i].color]))
    return replace(scene, objects=tuple(objects))
