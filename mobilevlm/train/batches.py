"""From generated scenes to training tensors, one batch per (stage, step, rank), deterministically.

A batch is a pure function of (stage, step, rank): a resumed run sees exactly the batches it would
have seen, and each rank of a multi-process run sees different scenes. Scene images come from a pool
rendered once per run (`ScenePool`); text choices are re-drawn per step so repeated scenes are asked
different things.

Conversations are encoded as the model sees them at inference: the template's text before the
image, the image placeholder, the question, then the answer and EOS. Later turns of a multi-turn
conversation use the template's `followup`. Only answer tokens (and their EOS) carry labels.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from ..data import CAPTION_PROMPTS, POPE_SETTINGS, caption, instruction_qas, make_scene, pope_probes, preference_pairs, render_scene
from ..data.splits import SPLITS, text_corpus
from ..data.text import hard_negative
from ..model import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from ..processing import Processor

# Scenes are rendered at one of these multiples of the model's input size and brought to it by the
# processor (bicubic), as any user image would be: the model does not learn one renderer's pixels.
RENDER_SCALES = (1, 2, 4)


class ScenePool:
    """`size` train scenes from `offset`, rendered once (lazily) and kept as uint8 tensors.

    `render_scales` overrides RENDER_SCALES (multiples of the model's input size, one per scene by
    seed): a comparison of resolution strategies gives every variant the same source renders with
    it, so that one model downsizes exactly the pixels the other tiles."""

    def __init__(self, processor: Processor, size: int, offset: int = 0, render_scales: tuple[int, ...] | None = None):
        if render_scales is not None and (not render_scales or min(render_scales) < 1):
            raise ValueError(f"ScenePool.render_scales: expected positive multiples of the input size, got {render_scales}")
        self.processor = processor
        self.size = size
        self.offset = offset
        self.render_scales = render_scales
        self._pixels: dict[int, torch.Tensor] = {}

    def seed(self, index: int) -> int:
        return SPLITS["train"][self.offset + index % self.size]

    def scene(self, index: int):
        return make_scene(self.seed(index))

    def pixels(self, index: int) -> torch.Tensor:
        """Normalised float pixels [3, S, S] of pool scene `index` ([views, 3, S, S] for anyres)."""
        key = index % self.size
        if key not in self._pixels:
            seed = self.seed(key)
            scales = RENDER_SCALES if self.render_scales is None else self.render_scales
            if self.processor.image.grids and self.render_scales is None:
                # Tiled models: the scenes are square, so every image large enough to fill a tile
                # grid takes the same layout and a batch's view counts agree; a 1x scene would take
                # the smaller layout (fewer views) and could not share a batch with the others.
                scales = tuple(s for s in RENDER_SCALES if s > 1)
            side = self.processor.image.size * scales[seed % len(scales)]
            views = self.processor.image.prepare_views(render_scene(make_scene(seed), side))
            self._pixels[key] = views if self.processor.image.grids else views[0]
        return self.processor.image.normalize(self._pixels[key])

    def global_view(self, index: int) -> torch.Tensor:
        """[3, S, S]: the whole image (the first view when the image is tiled)."""
        pixels = self.pixels(index)
        return pixels[0] if pixels.dim() == 4 else pixels


@dataclass
class Batch:
    token_ids: torch.Tensor  # [B, T] with IMAGE_TOKEN_INDEX where the image goes
    labels: torch.Tensor  # [B, T]
    pixel_values: torch.Tensor | None = None  # [B, 3, S, S]


def step_rng(stage: str, step: int, rank: int, seed: int) -> random.Random:
    return random.Random(f"{seed}:{stage}:{step}:{rank}")


def sample_indices(step: int, rank: int, world: int, batch_size: int) -> list[int]:
    first = (step * world + rank) * batch_size
    return list(range(first, first + batch_size))


# --- encoding -------------------------------------------------------------------------------------


def encode_conversation(processor: Processor, turns: list[tuple[str, str]], max_len: int) -> tuple[list[int], list[int]]:
    """Token ids and labels of an image conversation; turns that would pass `max_len` are dropped."""
    tok, template = processor.tokenizer, processor.template
    ids: list[int] = []
    labels: list[int] = []
    for i, (question, answer) in enumerate(turns):
        if i == 0:
            before, after = processor.prompt_ids(question)
            prompt = [*before, IMAGE_TOKEN_INDEX, *after]
        else:
            prompt = tok.encode(template.followup.replace("{prompt}", question))
        reply = tok.encode(" " + answer) + [tok.eos_id]
        if i > 0 and len(ids) + len(prompt) + len(reply) > max_len:
            break
        ids += prompt + reply
        labels += [IGNORE_INDEX] * len(prompt) + reply
    return ids, labels


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int, pixels: list[torch.Tensor] | None = None) -> Batch:
    """Right-pad rows to one length (padding is never attended to by real tokens: attention is causal)."""
    length = max(len(ids) for ids, _ in rows)
    token_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        token_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
    return Batch(token_ids, labels, torch.stack(pixels) if pixels else None)


# --- one builder per stage ------------------------------------------------------------------------


def _pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(r) for r in rows])
    ids = torch.full((len(rows), int(lengths.max())), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    return ids, lengths


def vision_batch(pool: ScenePool, processor: Processor, indices: list[int], rng: random.Random) -> tuple[torch.Tensor, tuple, tuple]:
    """Pixels [B, 3, S, S], the true captions and one hard-negative caption per image (the same scene
    with one binding changed, in the same phrasing), each as (ids [B, T] padded, lengths [B])."""
    tok = processor.tokenizer
    pixels, captions, negatives = [], [], []
    for index in indices:
        scene, style = pool.scene(index), rng.randrange(1 << 30)
        pixels.append(pool.global_view(index))
        captions.append([tok.bos_id, *tok.encode(caption(scene, random.Random(style))), tok.eos_id])
        negatives.append([tok.bos_id, *tok.encode(caption(hard_negative(scene, rng), random.Random(style))), tok.eos_id])
    pad = tok.pad_id or 0
    return torch.stack(pixels), _pad(captions, pad), _pad(negatives, pad)


def text_batch(processor: Processor, indices: list[int], seq_len: int) -> Batch:
    """Packed plain-text sequences: sequence i starts at scene i's text and runs until full."""
    tok = processor.tokenizer
    rows = []
    for index in indices:
        ids = [tok.bos_id]
        for line in text_corpus("train", start=index * 2):
            ids += tok.encode(line) + [tok.eos_id]
            if len(ids) >= seq_len:
                break
        ids = ids[:seq_len]
        rows.append((ids, ids))
    return collate(rows, tok.pad_id or 0)


def align_batch(pool: ScenePool, processor: Processor, indices: list[int], rng: random.Random, max_len: int) -> Batch:
    rows, pixels = [], []
    for index in indices:
        turns = [(rng.choice(CAPTION_PROMPTS), caption(pool.scene(index), rng))]
        rows.append(encode_conversation(processor, turns, max_len))
        pixels.append(pool.pixels(index))
    return collate(rows, processor.tokenizer.pad_id or 0, pixels)


def instruct_turns(scene, rng: random.Random) -> list[tuple[str, str]]:
    """A shuffled multi-turn conversation: every instruction QA, one POPE probe, sometimes a caption."""
    turns = [(qa.question, qa.answer) for qa in instruction_qas(scene, rng)]
    probe = pope_probes(scene, rng.choice(POPE_SETTINGS), rng, num_pairs=1)
    turns.append(rng.choice([(qa.question, qa.answer) for qa in probe]))
    rng.shuffle(turns)
    if rng.random() < 0.25:
        turns.insert(0, (rng.choice(CAPTION_PROMPTS), caption(scene, rng)))
    return turns


def instruct_batch(pool: ScenePool, processor: Processor, indices: list[int], rng: random.Random, max_len: int) -> Batch:
    rows, pixels = [], []
    for index in indices:
        rows.append(encode_conversation(processor, instruct_turns(pool.scene(index), rng), max_len))
        pixels.append(pool.pixels(index))
    return collate(rows, processor.tokenizer.pad_id or 0, pixels)


def dpo_batch(pool: ScenePool, processor: Processor, indices: list[int], rng: random.Random, max_len: int) -> tuple[Batch, Batch]:
    """(chosen, rejected) batches for the same prompts and images, one preference pair per scene."""
    chosen, rejected, pixels = [], [], []
    for index in indices:
        pair = rng.choice(preference_pairs(pool.scene(index), rng))
        chosen.append(encode_conversation(processor, [(pair.prompt, pair.chosen)], max_len))
        rejected.append(encode_conversation(processor, [(pair.prompt, pair.rejected)], max_len))
        pixels.append(pool.pixels(index))
    pad = processor.tokenizer.pad_id or 0
    return collate(chosen, pad, pixels), collate(rejected, pad, pixels)
