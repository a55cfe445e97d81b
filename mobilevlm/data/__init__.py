"""Synthetic data: scene graphs, their rendering, and every text derived from them.

Only numpy, Pillow and the standard library are used here, so data generation runs anywhere.
"""

from .render import render_scene
from .scene import (CELL_NAMES, COLORS, POPULAR_RANKING, SHAPES, SIZES, WORDS, Background, Scene,
                    SceneConfig, SceneObject, make_scene, object_frequencies)
from .splits import (SPLITS, PreferenceSample, Sample, iter_captions, iter_instructions, iter_pope,
                     iter_preferences, iter_probes, scene_seeds, text_corpus)
from .text import (CAPTION_PROMPTS, POPE_SETTINGS, QA, PreferencePair, attribute_probes, caption,
                   instruction_qas, normalize_answer, parse_objects, pope_probes, preference_pairs,
                   relation_probes, scene_objects)

__all__ = [
    "CAPTION_PROMPTS", "CELL_NAMES", "COLORS", "POPE_SETTINGS", "POPULAR_RANKING", "QA", "SHAPES",
    "SIZES", "SPLITS", "WORDS", "Background", "PreferencePair", "PreferenceSample", "Sample",
    "Scene", "SceneConfig", "SceneObject", "attribute_probes", "caption", "instruction_qas",
    "iter_captions", "iter_instructions", "iter_pope", "iter_preferences", "iter_probes",
    "make_scene", "normalize_answer", "object_frequencies", "parse_objects", "pope_probes",
    "preference_pairs", "relation_probes", "render_scene", "scene_objects", "scene_seeds",
    "text_corpus",
]
