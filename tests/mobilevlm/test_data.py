"""Tests of the synthetic data: determinism, split hygiene, and that every answer, probe, caption
and pixel agrees with the scene graph. Answers are re-derived here by an independent reading of the
question text, not by calling the generator's own helpers."""

from __future__ import annotations

import io
import itertools
import random
import re

import numpy as np
import pytest

from mobilevlm.data.render import object_center, render_scene
from mobilevlm.data.scene import (ALL_OBJECTS, CELL_NAMES, CELL_PHRASES, COLORS, GRID,
                                  POPULAR_RANKING, SHAPES, WORDS, Scene, SceneConfig, SceneObject,
                                  make_scene, object_frequencies)
from mobilevlm.data.splits import (SPLITS, iter_captions, iter_instructions, iter_pope,
                                   iter_preferences, iter_probes, scene_seeds, text_corpus,
                                   text_rng)
from mobilevlm.data.text import (POPE_SETTINGS, attribute_probes, caption, instruction_qas,
                                 normalize_answer, parse_objects, pope_probes, preference_pairs,
                                 relation_probes, scene_objects)

SEEDS = range(400)
COLOR_RE = "|".join(COLORS)
SHAPE_RE = "|".join(SHAPES)
PHRASE_TO_CELL = {CELL_PHRASES[r][c]: (r, c) for r in range(GRID) for c in range(GRID)}


def resolve(scene: Scene, ref: str) -> SceneObject:
    """The one object that `ref` ("large red circle", "circle at the top left", "red object")
    describes; fails the test if none or several match."""
    cell = None
    for phrase, rc in PHRASE_TO_CELL.items():
        if ref.endswith(" " + phrase):
            ref, cell = ref[: -len(phrase) - 1], rc
            break
    m = re.fullmatch(rf"(?:(small|large) )?(?:({COLOR_RE}) )?({SHAPE_RE}|object)", ref)
    assert m, f"unparseable reference {ref!r}"
    size, color, shape = m.groups()
    hits = [o for o in scene.objects
            if (size is None or o.size == size) and (color is None or o.color == color)
            and (shape == "object" or o.shape == shape)
            and (cell is None or (o.row, o.col) == cell)]
    assert len(hits) == 1, f"seed {scene.seed}: {ref!r} matches {len(hits)} objects"
    return hits[0]


def related(relation: str, a: SceneObject, b: SceneObject) -> bool:
    return {"left of": a.col < b.col, "right of": a.col > b.col,
            "above": a.row < b.row, "below": a.row > b.row}[relation]


def expected_answer(scene: Scene, question: str) -> str:
    """The answer to `question` read off the graph, independently of mobilevlm.data.text."""
    q = question
    if m := re.fullmatch(r"(?:What color is|What is the color of|Which color is) the (.+)\?", q):
        return resolve(scene, m[1]).color
    if m := re.fullmatch(r"(?:What shape is|What is the shape of|Which shape is) the (.+)\?", q):
        return resolve(scene, m[1]).shape
    if re.fullmatch(r"How many (?:objects are there|objects are in the image|shapes are in the "
                    r"picture)\?", q):
        return str(len(scene.objects))
    if m := re.fullmatch(rf"How many ({COLOR_RE}) objects are there\?", q):
        return str(sum(o.color == m[1] for o in scene.objects))
    if m := re.fullmatch(rf"How many ({SHAPE_RE})e?s are there\?", q):
        return str(sum(o.shape == m[1] for o in scene.objects))
    if m := re.fullmatch(rf"(?:Is there|Does the image contain) an? ({COLOR_RE}) ({SHAPE_RE})"
                         rf"(?: in the image)?\?", q):
        return "yes" if (m[1], m[2]) in {(o.color, o.shape) for o in scene.objects} else "no"
    if m := re.fullmatch(r"(?:Where is the (.+?)(?: located)?|In which part of the image is the "
                         r"(.+))\?", q):
        obj = resolve(scene, m[1] or m[2])
        return CELL_NAMES[obj.row][obj.col]
    if m := re.fullmatch(r"(?:What is|Which object is)(?: to the)? (left of|right of|left|right|"
                         r"above|below)(?: of)? the (.+)\?", q):
        relation = m[1] if " " in m[1] or m[1] in ("above", "below") else m[1] + " of"
        anchor = resolve(scene, m[2])
        hits = [o for o in scene.objects if o is not anchor and related(relation, o, anchor)]
        assert len(hits) == 1, f"seed {scene.seed}: {q!r} has {len(hits)} answers"
        return f"{hits[0].color} {hits[0].shape}"
    if q in ("Is there any text in the image?", "Is anything written in the image?"):
        return "no" if scene.word is None else "yes"
    if q in ("What word is written in the image?", "What does the text say?",
             "Which word is printed in the picture?"):
        assert scene.word is not None
        return scene.word
    if m := re.fullmatch(rf"Is the (.+) ({COLOR_RE})\?", q):
        return "yes" if resolve(scene, m[1]).color == m[2] else "no"
    if m := re.fullmatch(r"Is the (.+) (left of|right of|above|below) the (.+)\?", q):
        a, b = resolve(scene, m[1]), resolve(scene, m[3])
        assert a is not b
        return "yes" if related(m[2], a, b) else "no"
    raise AssertionError(f"question not understood by the test: {q!r}")


# ---------------------------------------------------------------- determinism and splits

def test_same_seed_same_scene_image_and_text():
    for seed in (0, 7, 10**9 + 3):
        a, b = make_scene(seed), make_scene(seed)
        assert a == b
        png = []
        for _ in range(2):
            buf = io.BytesIO()
            render_scene(make_scene(seed), 96).save(buf, format="PNG")
            png.append(buf.getvalue())
        assert png[0] == png[1]
        assert caption(a, text_rng(seed, "caption")) == caption(b, text_rng(seed, "caption"))
        assert instruction_qas(a, random.Random(5)) == instruction_qas(b, random.Random(5))
    assert list(iter_instructions("val", 3, 5)) == list(iter_instructions("val", 3, 5))
    assert list(itertools.islice(text_corpus("train", 11), 50)) == \
        list(itertools.islice(text_corpus("train", 11), 50))
    assert len({make_scene(s) for s in range(50)}) == 50


def test_splits_are_disjoint_and_checked():
    ranges = sorted(SPLITS.values(), key=lambda r: r.start)
    for a, b in zip(ranges, ranges[1:]):
        assert a.stop <= b.start
    seen = {}
    for split in SPLITS:
        last = scene_seeds(split, len(SPLITS[split]) - 5)
        for seed in itertools.chain(scene_seeds(split, 0, 20), last):
            assert seed in SPLITS[split]
            assert seen.setdefault(seed, split) == split
    assert list(scene_seeds("val", 2, 3)) == [SPLITS["val"].start + i for i in (2, 3, 4)]
    with pytest.raises(ValueError, match=r"test.*\[2000000000, 3000000000\)"):
        next(scene_seeds("test", 10**9))
    with pytest.raises(ValueError, match="train"):
        scene_seeds("train", -1)
    with pytest.raises(ValueError, match="dev"):
        scene_seeds("dev")


def test_scene_invariants_and_config_validation():
    for seed in SEEDS:
        s = make_scene(seed)
        cells = [(o.row, o.col) for o in s.objects]
        assert 1 <= len(cells) <= 4 and len(set(cells)) == len(cells)
        assert (s.word is None) == (s.word_row is None)
        if s.word is not None:
            assert s.word in WORDS and all(o.row != s.word_row for o in s.objects)
    assert not set(WORDS) & (set(COLORS) | set(SHAPES))
    for bad in (dict(min_objects=0), dict(min_objects=3, max_objects=2), dict(max_objects=7),
                dict(words=("red",)), dict(word_probability=1.5), dict(background_kinds=("x",))):
        with pytest.raises(ValueError, match="SceneConfig"):
            SceneConfig(**bad)
    cfg = SceneConfig(min_objects=6, max_objects=6, word_probability=1.0)
    s = make_scene(1, cfg)
    assert len(s.objects) == 6 and s.word is not None


def test_object_distribution_is_skewed_as_documented():
    freq = object_frequencies()
    assert abs(sum(freq.values()) - 1) < 1e-9 and set(freq) == set(ALL_OBJECTS)
    assert all(freq[a] >= freq[b] for a, b in zip(POPULAR_RANKING, POPULAR_RANKING[1:]))
    assert freq[POPULAR_RANKING[0]] > 10 * freq[POPULAR_RANKING[-1]]
    counts = {p: 0 for p in ALL_OBJECTS}
    for seed in range(3000):
        for o in make_scene(seed).objects:
            counts[(o.color, o.shape)] += 1
    total = sum(counts.values())
    for p in POPULAR_RANKING[:3]:
        assert abs(counts[p] / total - freq[p]) < 0.02


# ---------------------------------------------------------------- text agrees with the graph

def test_every_instruction_answer_agrees_with_the_graph():
    types = set()
    for seed in SEEDS:
        scene = make_scene(seed)
        qas = instruction_qas(scene, text_rng(seed, "instruction"))
        for qa in qas:
            types.add(qa.qtype)
            assert qa.answer == normalize_answer(qa.answer), qa
            assert qa.answer == expected_answer(scene, qa.question), (seed, qa)
        existence = [qa.answer for qa in qas if qa.qtype == "existence"]
        assert sorted(existence) == ["no", "yes"]
    assert types == {"color", "shape", "count", "existence", "position", "relation", "reading"}


def test_yes_no_probes_are_balanced_and_correct():
    for seed in SEEDS:
        scene = make_scene(seed)
        rng = random.Random(seed)
        for probes in (attribute_probes(scene, rng), relation_probes(scene, rng)):
            assert sorted(qa.answer for qa in probes) in ([], ["no", "yes"])
            for qa in probes:
                assert qa.answer == expected_answer(scene, qa.question), (seed, qa)


@pytest.mark.parametrize("setting", POPE_SETTINGS)
def test_pope_probes(setting):
    popular_hits = 0
    for seed in SEEDS:
        scene = make_scene(seed)
        present = scene_objects(scene)
        probes = pope_probes(scene, setting, random.Random(seed), num_pairs=3)
        yes = [qa for qa in probes if qa.answer == "yes"]
        no = [qa for qa in probes if qa.answer == "no"]
        assert len(yes) == len(no) == min(3, len(present))
        negatives = []
        for qa in probes:
            assert qa.qtype == f"pope_{setting}"
            assert qa.answer == expected_answer(scene, qa.question)
            (pair,) = parse_objects(qa.question)
            if qa.answer == "no":
                assert pair not in present
                negatives.append(pair)
        assert len(set(negatives)) == len(negatives)
        if setting == "adversarial":
            assert all(any(c == pc or s == ps for pc, ps in present) for c, s in negatives)
        if setting == "popular":
            absent_ranked = [p for p in POPULAR_RANKING if p not in present]
            assert set(negatives) == set(absent_ranked[: len(negatives)])
            popular_hits += POPULAR_RANKING[0] in negatives
    if setting == "popular":
        assert popular_hits > len(SEEDS) // 2


def test_parse_objects_recovers_captions_exactly():
    assert parse_objects("Two red circles, an orange cross and a large blue diamond.") == [
        ("red", "circle"), ("orange", "cross"), ("blue", "diamond")]
    assert parse_objects("Three black crosses and the word \"cat\".") == [("black", "cross")]
    assert parse_objects("Nothing here but a dog.") == []
    for seed in SEEDS:
        scene = make_scene(seed)
        for rng in (None, random.Random(seed), random.Random(seed + 1)):
            text = caption(scene, rng)
            assert sorted(parse_objects(text)) == sorted((o.color, o.shape) for o in scene.objects)
            for o in scene.objects:
                assert f"{o.size} {o.color} {o.shape} {CELL_PHRASES[o.row][o.col]}" in text
            assert (scene.word is None) == (f'"{scene.word}"' not in text)


def test_preference_rejections_are_unfaithful():
    kinds = set()
    for seed in SEEDS:
        scene = make_scene(seed)
        present = scene_objects(scene)
        for pair in preference_pairs(scene, random.Random(seed)):
            kinds.add(pair.kind)
            assert pair.chosen != pair.rejected
            if pair.kind.startswith("caption"):
                assert sorted(parse_objects(pair.chosen)) == sorted(
                    (o.color, o.shape) for o in scene.objects)
                assert set(parse_objects(pair.rejected)) - present, pair
            else:
                truth = expected_answer(scene, pair.prompt)
                assert pair.chosen == truth and pair.rejected != truth, pair
    assert kinds == {"caption_extra_object", "caption_wrong_color", "count", "existence"}


def test_normalize_answer():
    assert normalize_answer("  Top Left. ") == "top left"
    assert normalize_answer('"Cat".') == "cat"
    assert normalize_answer("Blue  square") == "blue square"
    assert normalize_answer("3") == "3"


# ---------------------------------------------------------------- rendering agrees with the graph

def test_render_sizes_and_modes():
    scene = next(make_scene(s) for s in range(100) if make_scene(s).word is not None)
    for size in (32, 64, 96, 224):
        image = render_scene(scene, size)
        assert image.mode == "RGB" and image.size == (size, size)
    with pytest.raises(ValueError, match="size"):
        render_scene(scene, 0)


def test_rendered_pixels_match_the_graph():
    for seed in range(60):
        scene = make_scene(seed)
        px = np.asarray(render_scene(scene, 256), dtype=np.int32)
        for o in scene.objects:
            want = np.array(COLORS[o.color])
            x, y = object_center(o)
            centre = px[int(y * 256), int(x * 256)]
            cell = px[int((o.row + 0.5) / GRID * 256), int((o.col + 0.5) / GRID * 256)]
            assert np.abs(centre - want).max() <= 12, (seed, o, centre)
            assert np.abs(cell - want).max() <= 12, (seed, o, cell)
        used = {(o.row, o.col) for o in scene.objects}
        for r, c in itertools.product(range(GRID), range(GRID)):
            band = px[int(r / GRID * 256) + 8: int((r + 1) / GRID * 256) - 8]
            if r == scene.word_row:
                assert (band.max(axis=2) < 80).mean() > 0.05  # dark letters on the plate
            elif (r, c) not in used:
                assert px[int((r + 0.5) / GRID * 256), int((c + 0.5) / GRID * 256)].min() >= 200


def test_large_objects_are_clearly_larger():
    def area(size: str) -> int:
        obj = SceneObject(shape="circle", color="blue", size=size, row=1, col=1)
        scene = Scene(seed=0, objects=(obj,), word=None, word_row=None,
                      background=make_scene(0).background)
        px = np.asarray(render_scene(scene, 96), dtype=np.int32)
        return int((np.abs(px - np.array(COLORS["blue"])).max(axis=2) < 40).sum())

    assert area("large") > 2.5 * area("small") > 0


# ---------------------------------------------------------------- streams

def test_streams_are_lazy_consistent_and_endless():
    caps = list(iter_captions("train", 5, 3))
    assert [s.seed for s in caps] == [5, 6, 7]
    assert all(s.scene == make_scene(s.seed) and s.kind == "caption" and s.prompt for s in caps)
    inst = list(iter_instructions("test", 0, 2))
    assert {s.seed for s in inst} == {SPLITS["test"].start, SPLITS["test"].start + 1}
    pope = list(iter_pope("val", "adversarial", 0, 4))
    assert pope and all(s.qtype == "pope_adversarial" for s in pope)
    assert sum(s.answer == "yes" for s in pope) == sum(s.answer == "no" for s in pope)
    with pytest.raises(ValueError, match="setting"):
        next(iter_pope("val", "sideways"))
    prefs = list(iter_preferences("train", 0, 3))
    assert prefs and all(p.chosen != p.rejected for p in prefs)
    assert all(s.answer in ("yes", "no") for s in iter_probes("train", 0, 5))
    lines = list(itertools.islice(text_corpus(), 3000))
    assert all(isinstance(t, str) and t for t in lines)
    words = set(" ".join(lines).lower().replace(".", " ").replace("?", " ").split())
    assert set(COLORS) | set(SHAPES) <= words
    assert len(list(itertools.islice(text_corpus("val", len(SPLITS["val"]) - 1), 200))) == 200


def test_hard_negatives_change_exactly_one_thing():
    """Contrastive hard negatives: same scene with one binding changed, so the caption differs."""
    import random as _random

    from mobilevlm.data import caption as _caption
    from mobilevlm.data import make_scene as _make_scene
    from mobilevlm.data.text import hard_negative

    for seed in range(300):
        scene = _make_scene(seed)
        negative = hard_negative(scene, _random.Random(seed))
        assert _caption(negative) != _caption(scene), seed
        before = {(o.row, o.col, o.color, o.shape, o.size) for o in scene.objects}
        after = {(o.row, o.col, o.color, o.shape, o.size) for o in negative.objects}
        changed_objects = len(before - after)
        changed_word = scene.word != negative.word
        assert len(scene.objects) == len(negative.objects)
        # a swap changes two objects, a move / recolour one, a word change none
        assert (changed_word and changed_objects == 0) or (not changed_word and changed_objects in (1, 2)), seed
