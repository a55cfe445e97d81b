"""Dataset splits as disjoint seed ranges, and streams of samples derived from them.

Nothing is written to disk: a sample is (seed -> scene graph -> text), recomputed on demand, and
images are rendered only by a consumer that needs them (`render_scene(sample.scene, size)`), so a
text-only stage never pays for rendering. Text choices (phrasings, which object a question asks
about) come from a `random.Random` seeded by the scene seed and a per-stream salt, so the same seed
always yields the same text, and streams are independent of each other and of iteration order.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator

from .scene import DEFAULT_CONFIG, Scene, SceneConfig, make_scene
from .text import (CAPTION_PROMPTS, POPE_SETTINGS, attribute_probes, caption, instruction_qas,
                   pope_probes, preference_pairs, relation_probes)

SPLIT_SIZE = 10**9
SPLITS: dict[str, range] = {
    "train": range(0, SPLIT_SIZE),
    "val": range(SPLIT_SIZE, 2 * SPLIT_SIZE),
    "test": range(2 * SPLIT_SIZE, 3 * SPLIT_SIZE),
}

# One salt per stream, so e.g. a scene's caption phrasing does not depend on its QA sampling.
_SALTS = {"caption": 1, "instruction": 2, "pope_random": 3, "pope_popular": 4,
          "pope_adversarial": 5, "preference": 7, "probe": 11, "corpus": 13}


@dataclass(frozen=True)
class Sample:
    """One (image, prompt, answer) example. `prompt` is None only for prompt-free text."""

    seed: int
    scene: Scene
    kind: str
    prompt: str | None
    answer: str
    qtype: str


@dataclass(frozen=True)
class PreferenceSample:
    """One preference example: answering `prompt` about the image, `chosen` beats `rejected`."""

    seed: int
    scene: Scene
    prompt: str
    chosen: str
    rejected: str
    kind: str


def text_rng(seed: int, stream: str) -> random.Random:
    """The random generator for text choices of `stream` about scene `seed`."""
    return random.Random(seed * 1_000_003 + _SALTS[stream])


def scene_seeds(split: str, start: int = 0, count: int | None = None) -> Iterator[int]:
    """Consecutive seeds of `split`, from offset `start` within it, `count` of them (None: to the
    end of the split)."""
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {sorted(SPLITS)}, got {split!r}")
    seeds = SPLITS[split]
    if not 0 <= start < len(seeds):
        raise ValueError(f"start: offset {start} is outside split {split!r}, whose seeds are "
                         f"[{seeds.start}, {seeds.stop}), i.e. offsets [0, {len(seeds)})")
    if count is not None and count < 0:
        raise ValueError(f"count: expected a non-negative number of scenes, got {count}")
    stop = len(seeds) if count is None else min(len(seeds), start + count)
    return iter(seeds[start:stop])


def _scenes(split: str, start: int, count: int | None,
            config: SceneConfig) -> Iterator[tuple[int, Scene]]:
    for seed in scene_seeds(split, start, count):
        yield seed, make_scene(seed, config)


def iter_captions(split: str, start: int = 0, count: int | None = None,
                  config: SceneConfig = DEFAULT_CONFIG) -> Iterator[Sample]:
    """One captioning sample per scene."""
    for seed, scene in _scenes(split, start, count, config):
        rng = text_rng(seed, "caption")
        prompt = rng.choice(CAPTION_PROMPTS)
        yield Sample(seed, scene, "caption", prompt, caption(scene, rng), "caption")


def iter_instructions(split: str, start: int = 0, count: int | None = None,
                      config: SceneConfig = DEFAULT_CONFIG) -> Iterator[Sample]:
    """All instruction QAs of each scene (about 7-9 per scene), scene after scene."""
    for seed, scene in _scenes(split, start, count, config):
        for qa in instruction_qas(scene, text_rng(seed, "instruction")):
            yield Sample(seed, scene, "instruction", qa.question, qa.answer, qa.qtype)


def iter_pope(split: str, setting: str, start: int = 0, count: int | None = None,
              num_pairs: int = 3, config: SceneConfig = DEFAULT_CONFIG) -> Iterator[Sample]:
    """POPE probes of `setting` ("random", "popular" or "adversarial"), balanced per scene."""
    if setting not in POPE_SETTINGS:
        raise ValueError(f"setting: expected one of {POPE_SETTINGS}, got {setting!r}")
    for seed, scene in _scenes(split, start, count, config):
        for qa in pope_probes(scene, setting, text_rng(seed, f"pope_{setting}"), num_pairs):
            yield Sample(seed, scene, "pope", qa.question, qa.answer, qa.qtype)


def iter_probes(split: str, start: int = 0, count: int | None = None,
                config: SceneConfig = DEFAULT_CONFIG) -> Iterator[Sample]:
    """Balanced yes/no attribute and relation probes."""
    for seed, scene in _scenes(split, start, count, config):
        rng = text_rng(seed, "probe")
        for qa in attribute_probes(scene, rng) + relation_probes(scene, rng):
            yield Sample(seed, scene, "probe", qa.question, qa.answer, qa.qtype)


def iter_preferences(split: str, start: int = 0, count: int | None = None,
                     config: SceneConfig = DEFAULT_CONFIG) -> Iterator[PreferenceSample]:
    """The preference pairs of each scene (4-5 per scene)."""
    for seed, scene in _scenes(split, start, count, config):
        for pair in preference_pairs(scene, text_rng(seed, "preference")):
            yield PreferenceSample(seed, scene, pair.prompt, pair.chosen, pair.rejected, pair.kind)


def _sentence(question: str, answer: str) -> str:
    return f"{question} {answer}."


def text_corpus(split: str = "train", start: int = 0,
                config: SceneConfig = DEFAULT_CONFIG) -> Iterator[str]:
    """Endless plain text for tokenizer training and text-only pretraining: per scene, a caption
    prompt and caption, each instruction question with its answer, and a few yes/no probes. After
    the split's last seed it starts over at the split's first."""
    offset = start
    while True:
        for seed, scene in _scenes(split, offset, None, config):
            rng = text_rng(seed, "corpus")
            yield f"{rng.choice(CAPTION_PROMPTS)} {caption(scene, rng)}"
            for qa in instruction_qas(scene, rng):
                yield _sentence(qa.question, qa.answer)
            setting = rng.choice(POPE_SETTINGS)
            for qa in pope_probes(scene, setting, rng, num_pairs=1):
                yield _sentence(qa.question, qa.answer)
            for qa in attribute_probes(scene, rng) + relation_probes(scene, rng):
                yield _sentence(qa.question, qa.answer)
        offset = 0
