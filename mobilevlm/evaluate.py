"""Evaluation on held-out generated scenes: closed-ended accuracy, POPE, CHAIR.

- Closed-ended: every instruction question of each scene (colour, shape, count, existence, position,
  relation, reading), exact match after `normalize_answer`; accuracy overall and per question type.
- POPE (Li et al., 2023): balanced yes/no existence probes with random, popular and adversarial
  negatives; accuracy, precision, recall, F1 (positive = "yes") and the share of "yes" answers. An
  answer counts as "yes" when its first word is "yes", otherwise as "no" (POPE's own rule).
- CHAIR (Rohrbach et al., 2018): captions are parsed for "<colour> <shape>" mentions; CHAIR_i is the
  share of mentioned objects that are not in the scene, CHAIR_s the share of captions with at least
  one such object. Coverage (share of scene objects mentioned) is reported beside them, since a model
  that says nothing hallucinates nothing.

Anything with an `answer(image, prompt, max_new_tokens) -> str` method can be evaluated: the PyTorch
reference here, exported artifacts through their runtimes in `mobilevlm.export`.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Protocol

from PIL import Image
from tqdm import tqdm

from .data import CAPTION_PROMPTS, POPE_SETTINGS, instruction_qas, make_scene, normalize_answer, parse_objects, pope_probes, render_scene, scene_objects
from .data.splits import SPLITS, text_rng
from .errors import MobileVLMError

# Test scenes are rendered at this size and go through the model's processor like any user image.
EVAL_IMAGE_SIZE = 256


class Answerer(Protocol):
    def answer(self, image: Image.Image, prompt: str, max_new_tokens: int) -> str: ...


@dataclass
class ReferenceAnswerer:
    """The PyTorch model, greedy."""

    model: object
    processor: object

    def answer(self, image: Image.Image, prompt: str, max_new_tokens: int) -> str:
        from .generate import generate

        return generate(self.model, self.processor, image, prompt, max_new_tokens=max_new_tokens)


def eval_seeds(seed: int | None, num: int) -> range:
    """`num` consecutive test-split seeds from `seed`. A seed below the test range is an offset into
    it, so no choice of `--seed` evaluates on training or validation scenes."""
    test = SPLITS["test"]
    first = test.start if seed is None else seed if seed in test else test.start + seed if 0 <= seed < len(test) else None
    if first is None or first + num > test.stop:
        raise MobileVLMError(f"--seed {seed}: the test split holds seeds [{test.start}, {test.stop}); offsets 0..{len(test) - 1} are accepted too")
    return range(first, first + num)


# --- metrics (pure functions, tested on hand-made predictions) ------------------------------------


def closed_ended_metrics(records: Iterable[tuple[str, str, str]]) -> dict:
    """records: (qtype, predicted, expected) -> {"accuracy", "by_type": {qtype: accuracy}, "count"}."""
    hits: dict[str, list[bool]] = defaultdict(list)
    for qtype, predicted, expected in records:
        hits[qtype].append(normalize_answer(predicted) == normalize_answer(expected))
    total = [h for v in hits.values() for h in v]
    return {
        "accuracy": sum(total) / len(total) if total else 0.0,
        "count": len(total),
        "by_type": {k: sum(v) / len(v) for k, v in sorted(hits.items())},
    }


def is_yes(answer: str) -> bool:
    words = normalize_answer(answer).replace(",", " ").split()
    return bool(words) and words[0] == "yes"


def pope_metrics(pairs: Iterable[tuple[str, str]]) -> dict:
    """pairs: (predicted answer, expected "yes"/"no") -> accuracy, precision, recall, f1, yes_ratio."""
    tp = fp = tn = fn = 0
    for predicted, expected in pairs:
        said_yes, truth = is_yes(predicted), normalize_answer(expected) == "yes"
        tp += said_yes and truth
        fp += said_yes and not truth
        tn += not said_yes and not truth
        fn += not said_yes and truth
    n = tp + fp + tn + fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / n if n else 0.0, "precision": precision, "recall": recall, "f1": f1, "yes_ratio": (tp + fp) / n if n else 0.0, "count": n}


def chair_metrics(captions: Iterable[tuple[list[tuple[str, str]], set[tuple[str, str]]]]) -> dict:
    """captions: (objects mentioned, objects in the scene) -> chair_i, chair_s, coverage."""
    mentioned = hallucinated = with_hallucination = total = covered = present = 0
    for mentions, truth in captions:
        total += 1
        unique = set(mentions)
        wrong = [m for m in unique if m not in truth]
        mentioned += len(unique)
        hallucinated += len(wrong)
        with_hallucination += bool(wrong)
        covered += len(unique & truth)
        present += len(truth)
    return {
        "chair_i": hallucinated / mentioned if mentioned else 0.0,
        "chair_s": with_hallucination / total if total else 0.0,
        "coverage": covered / present if present else 0.0,
        "count": total,
    }


# --- the evaluation loop --------------------------------------------------------------------------


def evaluate(answerer: Answerer, seed: int | None = None, num: int = 100, progress: bool = True, caption_tokens: int = 64) -> dict:
    """Evaluate on `num` test scenes from `seed` (see `eval_seeds`)."""
    seeds = eval_seeds(seed, num)
    closed, chairs = [], []
    pope: dict[str, list] = {s: [] for s in POPE_SETTINGS}
    samples: list[dict] = []
    for scene_seed in tqdm(seeds, desc="evaluate", disable=not progress, dynamic_ncols=True):
        scene = make_scene(scene_seed)
        image = render_scene(scene, EVAL_IMAGE_SIZE)
        for qa in instruction_qas(scene, text_rng(scene_seed, "instruction")):
            predicted = answerer.answer(image, qa.question, 8)
            closed.append((qa.qtype, predicted, qa.answer))
            if len(samples) < 20:
                samples.append({"seed": scene_seed, "question": qa.question, "expected": qa.answer, "predicted": predicted})
        for setting in POPE_SETTINGS:
            for qa in pope_probes(scene, setting, text_rng(scene_seed, f"pope_{setting}")):
                pope[setting].append((answerer.answer(image, qa.question, 4), qa.answer))
        prompt = random.Random(scene_seed).choice(CAPTION_PROMPTS)
        text = answerer.answer(image, prompt, caption_tokens)
        chairs.append((parse_objects(text), scene_objects(scene)))
        if len(samples) < 24:
            samples.append({"seed": scene_seed, "question": prompt, "expected": "", "predicted": text})
    return {
        "test_seeds": [seeds.start, seeds.stop],
        "num_scenes": num,
        "closed_ended": closed_ended_metrics(closed),
        "pope": {s: pope_metrics(v) for s, v in pope.items()},
        "chair": chair_metrics(chairs),
        "examples": samples,
    }


def summary_lines(result: dict) -> list[str]:
    closed, chair = result["closed_ended"], result["chair"]
    lines = [f"closed-ended accuracy {closed['accuracy']:.3f} over {closed['count']} questions"]
    lines += [f"  {k:<10} {v:.3f}" for k, v in closed["by_type"].items()]
    for setting, m in result["pope"].items():
        lines.append(f"POPE {setting:<11} acc {m['accuracy']:.3f}  P {m['precision']:.3f}  R {m['recall']:.3f}  F1 {m['f1']:.3f}  yes {m['yes_ratio']:.3f}")
    lines.append(f"CHAIR_i {chair['chair_i']:.3f}  CHAIR_s {chair['chair_s']:.3f}  coverage {chair['coverage']:.3f} over {chair['count']} captions")
    return lines
