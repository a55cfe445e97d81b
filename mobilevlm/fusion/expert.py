"""The scene expert: a small CNN that reads a rendered scene back into its scene graph.

This is the "expert" half of the expert-model fusion interface (MLLM survey, Yin et al. 2023, sec. 2.3):
instead of handing the decoder image tokens, a separate perception model turns the image into text that
is put into the prompt of a text-only decoder. Here the text is `describe(scene)`, in the generator's own
caption language, so the decoder reads exactly the facts every question is derived from.

Heads follow what `data/scene.py` really draws:
- per grid cell (3 x 3, row-major): "shape" over ("empty",) + SHAPES, "color" over COLORS, "size" over
  SIZES (colour and size are trained and read only where there is an object);
- per grid row: "word" over ("none",) + the generator's word list. The word fills a whole row and no
  object shares that row, so reading it is a row-level classification, and a row head also says where.

Cell and row features come from one feature map pooled by fixed area weights (a constant matrix, so the
pooling is a matmul that every exporter handles, for any input size): each cell averages the feature
positions it covers, each row keeps `word_columns` columns so the letters' left-to-right order survives.
Pixels are normalised exactly as the VLM's processor does (`ExpertConfig.image_processor`).
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import CLIP_MEAN, CLIP_STD
from ..data import COLORS, SHAPES, SIZES, WORDS, Background, Scene, SceneObject, make_scene, render_scene
from ..data.scene import CELL_PHRASES, GRID, ROW_NAMES
from ..data.text import article
from ..data.splits import SPLITS
from ..errors import CheckpointError, ConfigError
from ..fileio import atomic_folder, read_json
from ..processing import ImageProcessor

EMPTY = "empty"
NO_WORD = "none"
SHAPE_CLASSES: tuple[str, ...] = (EMPTY, *SHAPES)
COLOR_CLASSES: tuple[str, ...] = tuple(COLORS)
SIZE_CLASSES: tuple[str, ...] = tuple(SIZES)
# The order of the expert's outputs (and of the exported method's outputs).
HEADS: tuple[str, ...] = ("shape", "color", "size", "word")
IGNORE = -100
WEIGHTS_FILE = "expert.safetensors"
CONFIG_FILE = "config.json"
FORMAT = "mobilevlm-scene-expert"
# A predicted scene has no seed and no background (captions never mention it).
PREDICTED_SEED = -1
PLAIN_BACKGROUND = Background("solid", ((255, 255, 255),))
RENDER_SCALES = (1, 2, 4)  # train.batches' scales (not imported: that module pulls in the training loop)


@dataclass(frozen=True)
class ExpertConfig:
    """The expert's shape. `channels[0]` is the stride-2 stem; every further entry is a stage that halves
    the resolution (so the feature map is image_size / 2 ** len(channels)). The image fields are the
    VLM processor's, so the expert sees the same pixels as the vision encoder it replaces."""

    image_size: int = 96
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    aspect_mode: str = "pad"
    channels: tuple[int, ...] = (24, 48, 96, 128)
    hidden_size: int = 128
    word_columns: int = 6
    words: tuple[str, ...] = WORDS

    def __post_init__(self) -> None:
        if self.image_size < 8 or not self.channels or any(c < 1 for c in self.channels) or self.hidden_size < 1 or self.word_columns < 1:
            raise ConfigError(f"ExpertConfig: image_size >= 8, non-empty positive channels, hidden_size and word_columns >= 1 expected, got {self}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ConfigError("ExpertConfig.image_mean / image_std: expected three values (RGB)")
        if not self.words or len(set(self.words)) != len(self.words) or NO_WORD in self.words:
            raise ConfigError(f"ExpertConfig.words: expected distinct words other than {NO_WORD!r}, got {self.words}")

    @classmethod
    def for_processor(cls, image: ImageProcessor, **overrides) -> ExpertConfig:
        """The expert for a VLM whose processor is `image` (same size, normalisation and aspect mode)."""
        return cls(image_size=image.size, image_mean=tuple(image.mean), image_std=tuple(image.std), aspect_mode=image.aspect_mode, **overrides)

    @property
    def word_classes(self) -> tuple[str, ...]:
        return (NO_WORD, *self.words)

    @property
    def feature_size(self) -> int:
        n = self.image_size
        for _ in self.channels:
            n = (n - 1) // 2 + 1  # 3x3 conv, stride 2, padding 1
        return n

    def image_processor(self) -> ImageProcessor:
        return ImageProcessor(self.image_size, tuple(self.image_mean), tuple(self.image_std), self.aspect_mode)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict, source: str = "expert config") -> ExpertConfig:
        unknown = set(data) - set(cls.__dataclass_fields__) if isinstance(data, dict) else None
        if unknown is None or unknown:
            raise ConfigError(f"{source}: expected an object with the fields of ExpertConfig" + (f", got unknown {sorted(unknown)}" if unknown else ""))
        try:
            return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
        except TypeError as exc:
            raise ConfigError(f"{source}: {exc}") from None


def area_pooling(size: int, rows: int, cols: int) -> torch.Tensor:
    """[rows * cols, size * size]: weight of each feature position in each region of a rows x cols
    split of the unit square (the overlap of their areas, normalised per region)."""

    def overlap(parts: int) -> torch.Tensor:  # [parts, size]
        weights = torch.zeros(parts, size, dtype=torch.float64)
        for p in range(parts):
            lo, hi = p / parts, (p + 1) / parts
            for i in range(size):
                weights[p, i] = max(0.0, min(hi, (i + 1) / size) - max(lo, i / size))
        return weights

    grid = torch.einsum("ry,cx->rcyx", overlap(rows), overlap(cols)).reshape(rows * cols, size * size)
    return (grid / grid.sum(dim=1, keepdim=True)).float()


def conv_block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class SceneExpert(nn.Module):
    """Normalised pixels [B, 3, S, S] -> logits (shape [B, 9, 6], color [B, 9, 7], size [B, 9, 2],
    word [B, 3, 1 + len(words)]), in the order of `HEADS`."""

    def __init__(self, config: ExpertConfig):
        super().__init__()
        self.config = config
        c = config.channels
        layers = [conv_block(3, c[0], 2)]
        for cin, cout in zip(c[:-1], c[1:]):
            layers += [conv_block(cin, cout, 2), conv_block(cout, cout, 1)]
        self.features = nn.Sequential(*layers)
        width, hidden = c[-1], config.hidden_size
        self.cell_head = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, len(SHAPE_CLASSES) + len(COLOR_CLASSES) + len(SIZE_CLASSES)))
        self.word_head = nn.Sequential(nn.Linear(width * config.word_columns, hidden), nn.GELU(), nn.Linear(hidden, len(config.word_classes)))
        n = config.feature_size
        # derived from the config, so not saved
        self.register_buffer("cell_pool", area_pooling(n, GRID, GRID), persistent=False)
        self.register_buffer("row_pool", area_pooling(n, GRID, config.word_columns), persistent=False)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.features(pixel_values).flatten(2)  # [B, C, n * n]
        cells = torch.matmul(self.cell_pool, x.transpose(1, 2))  # [B, 9, C]
        rows = torch.matmul(self.row_pool, x.transpose(1, 2))  # [B, 3 * cols, C], row-major
        rows = rows.reshape(x.shape[0], GRID, -1)  # [B, 3, cols * C]: a row's columns left to right
        cell_logits = self.cell_head(cells)
        a, b = len(SHAPE_CLASSES), len(SHAPE_CLASSES) + len(COLOR_CLASSES)
        return cell_logits[..., :a], cell_logits[..., a:b], cell_logits[..., b:], self.word_head(rows)

    @torch.no_grad()
    def predict_scene(self, pixel_values: torch.Tensor) -> list[Scene]:
        """The scene graph of each image (see `decode_scene`)."""
        logits = self(pixel_values)
        return [decode_scene(logits, self.config.words, i) for i in range(pixel_values.shape[0])]


# --- labels, decoding, description ------------------------------------------------------------------


def scene_labels(scene: Scene, words: tuple[str, ...] = WORDS) -> dict[str, torch.Tensor]:
    """Class targets of one scene: shape / color / size [9] (IGNORE for colour and size of empty cells),
    word [3] (0 = no word in that row)."""
    shape = torch.zeros(GRID * GRID, dtype=torch.long)
    color = torch.full((GRID * GRID,), IGNORE, dtype=torch.long)
    size = torch.full((GRID * GRID,), IGNORE, dtype=torch.long)
    for o in scene.objects:
        i = o.row * GRID + o.col
        shape[i], color[i], size[i] = SHAPE_CLASSES.index(o.shape), COLOR_CLASSES.index(o.color), SIZE_CLASSES.index(o.size)
    word = torch.zeros(GRID, dtype=torch.long)
    if scene.word is not None and scene.word_row is not None:
        if scene.word not in words:
            raise ValueError(f"scene {scene.seed}: word {scene.word!r} is not in the expert's word list")
        word[scene.word_row] = 1 + words.index(scene.word)
    return {"shape": shape, "color": color, "size": size, "word": word}


def decode_scene(logits: tuple[torch.Tensor, ...], words: tuple[str, ...] = WORDS, index: int = 0) -> Scene:
    """Image `index` of a batch of head logits (in `HEADS` order) as a scene graph.

    The rule (written into the fusion bundle's manifest, for apps): per row, margin = best word logit
    minus the "none" logit; the row with the largest margin holds the word if that margin is > 0. A cell
    holds an object when its shape argmax is not "empty" and it is not in the word row (the generator
    never puts one there); its colour and size are their heads' argmax. Ties go to the first index."""
    shape, color, size, word = (t[index].detach().float() for t in logits)
    margins = word[:, 1:].max(dim=1).values - word[:, 0]
    word_row = int(margins.argmax())
    found = float(margins[word_row]) > 0
    text = words[int(word[word_row, 1:].argmax())] if found else None
    objects = []
    for i in range(GRID * GRID):
        row, col = divmod(i, GRID)
        kind = int(shape[i].argmax())
        if kind == 0 or (found and row == word_row):
            continue
        objects.append(SceneObject(shape=SHAPE_CLASSES[kind], color=COLOR_CLASSES[int(color[i].argmax())], size=SIZE_CLASSES[int(size[i].argmax())], row=row, col=col))
    return Scene(PREDICTED_SEED, tuple(objects), text, word_row if found else None, PLAIN_BACKGROUND)


def describe(scene: Scene) -> str:
    """The text the decoder reads instead of image tokens: the generator's caption in its first (fixed)
    phrasing -- every object as "<size> <color> <shape>" with its cell, in reading order, then the word
    -- except that the word stands without quotes. Why: answers are space-prefixed ("... ASSISTANT:
    door"), and byte-level BPE gives ' door' one id but '"door"' the id of 'door' without the space, so
    a quoted word would make the decoder learn a separate mapping per word instead of copying the id."""
    parts = [f"{article(f'{o.size} {o.name}')} {CELL_PHRASES[o.row][o.col]}" for o in sorted(scene.objects, key=lambda o: (o.row, o.col))]
    if scene.word is not None and scene.word_row is not None:
        parts.append(f"the word {scene.word} across the {ROW_NAMES[scene.word_row]}")
    if not parts:
        body = "nothing but the background"
    elif len(parts) <= 2:
        body = " and ".join(parts)
    else:
        body = ", ".join(parts[:-1]) + ", and " + parts[-1]
    return body[0].upper() + body[1:] + "."


# --- saving -----------------------------------------------------------------------------------------


def save_expert(expert: SceneExpert, folder: str | Path, extra: dict | None = None, overwrite: bool = False) -> Path:
    """config.json (+ `extra`, e.g. training facts) and expert.safetensors, atomically."""
    from safetensors.torch import save_file

    folder = Path(folder)
    with atomic_folder(folder, overwrite=overwrite) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps({"format": FORMAT, "expert": expert.config.to_dict(), **(extra or {})}, indent=2) + "\n")
        save_file({k: v.detach().contiguous() for k, v in expert.state_dict().items()}, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
    return folder


def load_expert(folder: str | Path) -> SceneExpert:
    """The expert saved in `folder`, in eval mode (keys and shapes checked)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    path = folder / CONFIG_FILE
    if not path.is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise CheckpointError(f"{folder}: not a scene expert folder (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    data = read_json(path, ConfigError)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ConfigError(f"{path}: field 'format' must be {FORMAT!r}")
    expert = SceneExpert(ExpertConfig.from_dict(data.get("expert"), f"{path}: expert"))
    weights = load_file(str(folder / WEIGHTS_FILE))
    expected = expert.state_dict()
    problems = [k for k in expected if k not in weights or weights[k].shape != expected[k].shape] + [k for k in weights if k not in expected]
    if problems:
        raise CheckpointError(f"{folder / WEIGHTS_FILE}: missing, unexpected or mis-shaped tensors: {', '.join(problems[:6])}")
    expert.load_state_dict(weights)
    return expert.eval()


# --- training ---------------------------------------------------------------------------------------


@dataclass
class ScenePixels:
    """Rendered scenes of a split, kept as uint8 [3, S, S] with their labels (rendered once). Scenes are
    rendered at a multiple of the input size (the VLM's RENDER_SCALES) and resized by the processor, as
    the VLM's batches and evaluation's 256-px renders are, so the expert does not learn one size."""

    config: ExpertConfig
    split: str = "train"
    offset: int = 0
    render_size: int | None = None  # None: the input size times a per-seed scale from RENDER_SCALES
    _cache: dict = field(default_factory=dict)

    def item(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if index not in self._cache:
            seed = SPLITS[self.split][self.offset + index]
            scene = make_scene(seed)
            side = self.render_size or self.config.image_size * RENDER_SCALES[seed % len(RENDER_SCALES)]
            pixels = self.config.image_processor().prepare_image(render_scene(scene, side))
            self._cache[index] = (pixels, scene_labels(scene, self.config.words))
        return self._cache[index]

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        items = [self.item(i) for i in indices]
        pixels = self.config.image_processor().normalize(torch.stack([p for p, _ in items]))
        return pixels, {h: torch.stack([lab[h] for _, lab in items]) for h in HEADS}


def expert_loss(logits: tuple[torch.Tensor, ...], labels: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """Sum over heads of the mean cross-entropy (colour and size only where there is an object)."""
    parts = {}
    for name, out in zip(HEADS, logits):
        target = labels[name].flatten()
        parts[name] = F.cross_entropy(out.flatten(0, 1), target, ignore_index=IGNORE) if bool((target != IGNORE).any()) else out.sum() * 0.0
    return sum(parts.values()), {k: float(v.detach()) for k, v in parts.items()}


@torch.no_grad()
def expert_accuracy(expert: SceneExpert, num: int = 200, offset: int = 0, split: str = "test", render_size: int = 256) -> dict:
    """Per-head accuracy on `num` scenes of `split` (rendered at `render_size`, as evaluation renders):
    shape over all cells (empty included), colour and size over cells that hold an object, word over
    rows ("none" included), word_read over scenes with a word, scene_exact = the predicted graph's
    description equals the true one."""
    was_training = expert.training
    expert.eval()
    data = ScenePixels(expert.config, split, offset, render_size)
    hits = {h: [0, 0] for h in (*HEADS, "word_read", "scene_exact")}
    for start in range(0, num, 32):
        indices = list(range(start, min(num, start + 32)))
        pixels, labels = data.batch(indices)
        logits = expert(pixels)
        for name, out in zip(HEADS, logits):
            target = labels[name]
            mask = target != IGNORE
            hits[name][0] += int(((out.argmax(-1) == target) & mask).sum())
            hits[name][1] += int(mask.sum())
        for j, index in enumerate(indices):
            truth = make_scene(SPLITS[split][offset + index])
            predicted = decode_scene(logits, expert.config.words, j)
            hits["scene_exact"] = [hits["scene_exact"][0] + (describe(predicted) == describe(truth)), hits["scene_exact"][1] + 1]
            if truth.word is not None:
                hits["word_read"] = [hits["word_read"][0] + (predicted.word == truth.word), hits["word_read"][1] + 1]
    expert.train(was_training)
    return {k: (h / n if n else 0.0) for k, (h, n) in hits.items()} | {"num_scenes": num, "split": split, "offset": offset}


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to a tenth."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_expert_model(
    expert: SceneExpert, steps: int, batch_size: int, seed: int = 0, lr: float = 2e-3, pool_size: int = 4096, offset: int = 0, log: Callable[[str], None] = print
) -> list[float]:
    """Train `expert` in place on train-split scenes offset..offset+pool_size (each rendered once, then
    revisited in a seeded shuffle); returns the loss of every step."""
    torch.manual_seed(seed)
    data = ScenePixels(expert.config, "train", offset)
    order = random.Random(seed)
    optimizer = torch.optim.AdamW(expert.parameters(), lr=lr, weight_decay=1e-4)
    expert.train()
    losses, queue = [], []
    started = time.time()
    for step in range(steps):
        while len(queue) < batch_size:
            epoch = list(range(pool_size))
            order.shuffle(epoch)
            queue += epoch
        indices, queue = queue[:batch_size], queue[batch_size:]
        pixels, labels = data.batch(indices)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr, max(1, steps // 20))
        loss, parts = expert_loss(expert(pixels), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(expert.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        if step % 25 == 0 or step == steps - 1:
            log(f"expert step {step + 1}/{steps}: loss {losses[-1]:.3f} ({', '.join(f'{k} {v:.3f}' for k, v in parts.items())}), {time.time() - started:.0f} s")
    expert.eval()
    return losses


def train_expert(out: str | Path, steps: int, batch_size: int = 64, seed: int = 0, config: ExpertConfig | None = None, lr: float = 2e-3,
                 pool_size: int = 4096, eval_scenes: int = 200, overwrite: bool = False, log: Callable[[str], None] = print) -> dict:
    """Train a scene expert on generated train-split scenes and save it to `out` with its per-head
    accuracy on `eval_scenes` test-split scenes; returns that training record."""
    config = config or ExpertConfig()
    torch.manual_seed(seed)
    expert = SceneExpert(config)
    started, cpu = time.time(), time.process_time()
    losses = train_expert_model(expert, steps, batch_size, seed, lr, pool_size, log=log)
    record = {"steps": steps, "batch_size": batch_size, "seed": seed, "lr": lr, "train_split_seeds": [SPLITS["train"].start, SPLITS["train"].start + pool_size],
              "first_loss": losses[0] if losses else None, "final_loss": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
              "seconds": round(time.time() - started, 1), "cpu_seconds": round(time.process_time() - cpu, 1), "parameters": sum(p.numel() for p in expert.parameters())}
    if eval_scenes:
        record["test_accuracy"] = expert_accuracy(expert, eval_scenes)
        log("expert test accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in record["test_accuracy"].items() if isinstance(v, float)))
    save_expert(expert, out, {"training": record}, overwrite=overwrite)
    return record
