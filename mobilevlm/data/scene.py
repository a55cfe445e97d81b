"""Vocabularies and the scene graph of the synthetic data.

A scene is a 3x3 grid of cells holding at most one object each, plus an optional printed word that
fills one whole grid row (so that it stays legible when the image is shrunk to 64 px: a single cell
would be about 21 px wide there, too narrow for four letters; `SceneConfig.word_scale` < 1 prints it
smaller, somewhere in that row, to study small text). Everything the toolkit says about an
image -- captions, questions, hallucination probes -- is derived from this graph, never from pixels,
so every answer is exact by construction.

Rows and columns count from the top left: row 0 is the top row, column 0 the left column.

The object distribution is deliberately *not* uniform (see `COLOR_WEIGHTS`, `SHAPE_WEIGHTS` and
`FAVOURED_PAIRS`): some colour+shape combinations are much more frequent than others, as "red apple"
is more frequent than "blue apple" in real data. That is what gives POPE's "popular" negatives (the
most frequent absent objects) their meaning: a model that has learned the prior rather than looking
at the image answers "yes" to them.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from typing import Iterator, Mapping

RGB = tuple[int, int, int]

# Saturated, mid-luminance colours whose hues are far apart, so they survive a downscale to 64 px
# and never blend with the pale, low-saturation backgrounds (every background channel is >= 228);
# each object also gets a darker rim of its own colour, which keeps yellow crisp on ivory.
COLORS: Mapping[str, RGB] = {
    "red": (220, 30, 35),
    "green": (30, 160, 60),
    "blue": (35, 80, 225),
    "yellow": (245, 205, 0),
    "purple": (145, 50, 190),
    "orange": (250, 125, 10),
    "black": (25, 25, 25),
}

# Shapes with different silhouettes even at ~9 px: round, axis-aligned square, pointed triangle,
# thin-armed cross, and a square rotated by 45 degrees.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "diamond")

SIZES: tuple[str, ...] = ("small", "large")

GRID = 3

# Answers to "Where is ...?" questions; indexed [row][col].
CELL_NAMES: tuple[tuple[str, ...], ...] = (
    ("top left", "top", "top right"),
    ("left", "center", "right"),
    ("bottom left", "bottom", "bottom right"),
)

# Preposition that reads naturally before each cell name in a caption ("on the left",
# "in the center").
CELL_PHRASES: tuple[tuple[str, ...], ...] = (
    ("at the top left", "at the top", "at the top right"),
    ("on the left", "in the center", "on the right"),
    ("at the bottom left", "at the bottom", "at the bottom right"),
)

ROW_NAMES: tuple[str, ...] = ("top", "middle", "bottom")

# Short common words that are neither colour nor shape names (so a caption parser never mistakes the
# printed word for an object) and that use letters which stay distinct when small.
WORDS: tuple[str, ...] = (
    "cat", "dog", "sun", "car", "hat", "cup", "bus", "fish", "tree", "book", "moon", "bird",
    "cake", "door", "kite", "milk", "ship", "lamp", "frog", "bell", "rain", "key", "pen", "egg",
    "map", "owl", "bed", "toy",
)

# The prior over objects: weight(color, shape) = COLOR_WEIGHTS[c] * SHAPE_WEIGHTS[s] * boost, with
# boost FAVOURED_BOOST for the favoured pairs and 1 otherwise. The most frequent pair (red circle)
# is about 19 times as likely as the rarest ones (e.g. black cross).
COLOR_WEIGHTS: Mapping[str, float] = {
    "red": 5, "green": 4, "blue": 4, "yellow": 3, "purple": 2, "orange": 2, "black": 2,
}
SHAPE_WEIGHTS: Mapping[str, float] = {
    "circle": 5, "square": 4, "triangle": 3, "cross": 2, "diamond": 2,
}
FAVOURED_PAIRS: frozenset[tuple[str, str]] = frozenset({
    ("red", "circle"), ("blue", "square"), ("green", "triangle"),
    ("yellow", "circle"), ("orange", "diamond"), ("purple", "cross"),
})
FAVOURED_BOOST = 3.0

# Pale, low-saturation tints for backgrounds: every channel >= 228, so no object colour is
# ambiguous against them.
BACKGROUND_TINTS: tuple[RGB, ...] = (
    (246, 242, 232),  # cream
    (232, 238, 246),  # pale blue
    (236, 245, 236),  # pale green
    (246, 236, 240),  # pale pink
    (240, 240, 240),  # light grey
    (250, 248, 228),  # ivory
    (238, 234, 246),  # pale lavender
)
BACKGROUND_KINDS: tuple[str, ...] = ("solid", "gradient", "stripes", "noise")


@dataclass(frozen=True)
class SceneObject:
    """One object in one grid cell. `dx`, `dy` are a small offset of its centre in cell units, so
    objects do not always sit at the exact same pixels (the offset lives in the graph, so rendering
    stays a pure function of it)."""

    shape: str
    color: str
    size: str
    row: int
    col: int
    dx: float = 0.0
    dy: float = 0.0

    @property
    def name(self) -> str:
        """"<color> <shape>", the way captions and answers name an object."""
        return f"{self.color} {self.shape}"

    @property
    def cell(self) -> str:
        return CELL_NAMES[self.row][self.col]


@dataclass(frozen=True)
class Background:
    """How the empty canvas looks. `kind` is one of BACKGROUND_KINDS; `colors` holds one or two
    tints; `angle` (degrees) orients gradients and stripes; `period` is the stripe period in image
    units; `noise_seed` seeds the smooth value noise of the "noise" kind."""

    kind: str
    colors: tuple[RGB, ...]
    angle: float = 0.0
    period: float = 0.1
    noise_seed: int = 0


@dataclass(frozen=True)
class Scene:
    """A whole image as a graph. `word_row` is the grid row the word belongs to (None without a
    word); no object shares that row. `word_scale` is the size of the word's plate relative to the
    whole row (1.0: the plate fills the row; smaller: a plate that much smaller in both directions)
    and `word_offset` (x, y in -1..1) places a smaller plate within its row, -1 at the row's left /
    top edge, 0 centred, 1 at the right / bottom edge; both live in the graph, so rendering stays a
    pure function of it."""

    seed: int
    objects: tuple[SceneObject, ...]
    word: str | None
    word_row: int | None
    background: Background
    word_scale: float = 1.0
    word_offset: tuple[float, float] = (0.0, 0.0)


# A word plate keeps at least this share of its row: smaller would be a few canvas pixels, text no
# renderer draws legibly at any output size.
MIN_WORD_SCALE = 0.1


@dataclass(frozen=True)
class SceneConfig:
    """Knobs of the generator. The defaults suit a tiny model at 64-96 px."""

    min_objects: int = 1
    max_objects: int = 4
    word_probability: float = 0.5
    words: tuple[str, ...] = WORDS
    jitter: float = 0.05  # max |dx|, |dy| in cell units; kept below a small object's inradius
    background_kinds: tuple[str, ...] = BACKGROUND_KINDS
    # Size of the printed word relative to the default (a plate filling its grid row). Below 1 the
    # text is small relative to the image: at 0.2 its capitals are about 4 px tall in a 96 px view
    # (unreadable) and 8 px in a 192 px one (readable), the regime where tiling should pay off.
    # Unless `word_offset` fixes its place, a smaller plate lands anywhere in its row (uniformly), as
    # text in a photo does, so no layout (e.g. a tile boundary through the image centre) is
    # systematically favoured or cut.
    word_scale: float = 1.0
    # Where a smaller plate sits in its row, fixed for every scene: (x, y), each -1..1 of the free
    # travel (see `Scene.word_offset`); None places it uniformly at random. A fixed place separates
    # "too small to read" from "read anywhere": a tiny model learns to read a word at one place long
    # before it learns to find it anywhere (`benchmarks/reading_probe.py`), and a fixed place lets a
    # study put the word inside one tile or across a tile seam on purpose.
    word_offset: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.min_objects <= self.max_objects <= GRID * GRID:
            raise ValueError(
                f"SceneConfig: need 1 <= min_objects <= max_objects <= {GRID * GRID}, "
                f"got min_objects={self.min_objects}, max_objects={self.max_objects}")
        if self.word_probability > 0 and self.max_objects > GRID * (GRID - 1):
            raise ValueError(
                f"SceneConfig.max_objects: a word fills a whole row, so with word_probability > 0 "
                f"at most {GRID * (GRID - 1)} objects fit, got {self.max_objects}")
        if not 0.0 <= self.word_probability <= 1.0:
            raise ValueError(f"SceneConfig.word_probability: expected 0..1, "
                             f"got {self.word_probability}")
        if self.word_probability > 0 and not self.words:
            raise ValueError("SceneConfig.words: empty, but word_probability > 0")
        for w in self.words:
            if w in COLORS or w in SHAPES or not w.isalpha() or w != w.lower():
                raise ValueError(f"SceneConfig.words: {w!r} must be a lowercase word that is not a "
                                 f"colour or shape name")
        if not 0.0 <= self.jitter <= 0.08:
            raise ValueError(f"SceneConfig.jitter: expected 0..0.08 cell units, got {self.jitter}")
        if not MIN_WORD_SCALE <= self.word_scale <= 1.0:
            raise ValueError(f"SceneConfig.word_scale: expected {MIN_WORD_SCALE}..1.0, "
                             f"got {self.word_scale}")
        if self.word_offset is not None and (len(self.word_offset) != 2 or not all(-1.0 <= v <= 1.0 for v in self.word_offset)):
            raise ValueError(f"SceneConfig.word_offset: expected None or (x, y), each -1..1, got {self.word_offset}")
        unknown = set(self.background_kinds) - set(BACKGROUND_KINDS)
        if not self.background_kinds or unknown:
            raise ValueError(f"SceneConfig.background_kinds: expected a non-empty subset of "
                             f"{BACKGROUND_KINDS}, got {self.background_kinds}")


DEFAULT_CONFIG = SceneConfig()
# What `make_scene` uses when no config is passed; see `scene_config_scope`.
_ACTIVE: list[SceneConfig] = [DEFAULT_CONFIG]


@contextlib.contextmanager
def scene_config_scope(config: SceneConfig) -> Iterator[SceneConfig]:
    """Within the block, `make_scene(seed)` without a config draws from `config`.

    Why a scope and not an argument: training pools, evaluation and export parity cases all call
    `make_scene(seed)`, and a benchmark that studies another scene distribution (e.g. small printed
    text) must change it for every one of them at once, in one process, without threading a config
    through each API. Calls that pass a config explicitly are not affected."""
    _ACTIVE.append(config)
    try:
        yield config
    finally:
        _ACTIVE.pop()


def active_scene_config() -> SceneConfig:
    """The config `make_scene(seed)` uses right now (DEFAULT_CONFIG outside any scope)."""
    return _ACTIVE[-1]


def object_weight(color: str, shape: str) -> float:
    """Unnormalised prior weight of one colour+shape pair."""
    boost = FAVOURED_BOOST if (color, shape) in FAVOURED_PAIRS else 1.0
    return COLOR_WEIGHTS[color] * SHAPE_WEIGHTS[shape] * boost


ALL_OBJECTS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLORS for s in SHAPES)


def object_frequencies() -> dict[tuple[str, str], float]:
    """Probability of each (color, shape) pair for any one object of a scene."""
    total = sum(object_weight(c, s) for c, s in ALL_OBJECTS)
    return {(c, s): object_weight(c, s) / total for c, s in ALL_OBJECTS}


# Every pair, most frequent first; ties broken by vocabulary order, so the ranking is fixed.
POPULAR_RANKING: tuple[tuple[str, str], ...] = tuple(
    sorted(ALL_OBJECTS, key=lambda p: (-object_weight(*p), list(COLORS).index(p[0]),
                                       SHAPES.index(p[1]))))


def _background(rng: random.Random, config: SceneConfig) -> Background:
    kind = rng.choice(config.background_kinds)
    first = rng.choice(BACKGROUND_TINTS)
    second = rng.choice([t for t in BACKGROUND_TINTS if t != first])
    return Background(
        kind=kind,
        colors=(first,) if kind == "solid" else (first, second),
        angle=float(rng.choice((0, 45, 90, 135))) if kind == "stripes" else rng.uniform(0, 360),
        period=round(rng.uniform(0.07, 0.14), 4),
        noise_seed=rng.randrange(2**31),
    )


def make_scene(seed: int, config: SceneConfig | None = None) -> Scene:
    """The scene of `seed`: the same seed and config always give the same scene. Without `config`,
    the active one (DEFAULT_CONFIG unless inside `scene_config_scope`)."""
    config = active_scene_config() if config is None else config
    rng = random.Random(seed * 1_000_003 + 17)
    word: str | None = None
    word_row: int | None = None
    if rng.random() < config.word_probability:
        word = rng.choice(config.words)
        word_row = rng.randrange(GRID)
    free = [(r, c) for r in range(GRID) for c in range(GRID) if r != word_row]
    count = rng.randint(config.min_objects, min(config.max_objects, len(free)))
    cells = sorted(rng.sample(free, count))
    weights = [object_weight(c, s) for c, s in ALL_OBJECTS]
    objects = []
    for row, col in cells:
        color, shape = rng.choices(ALL_OBJECTS, weights=weights)[0]
        objects.append(SceneObject(
            shape=shape, color=color, size=rng.choice(SIZES), row=row, col=col,
            dx=round(rng.uniform(-config.jitter, config.jitter), 4),
            dy=round(rng.uniform(-config.jitter, config.jitter), 4)))
    offset = (0.0, 0.0)
    if word is not None and config.word_scale < 1.0:
        if config.word_offset is not None:
            offset = (float(config.word_offset[0]), float(config.word_offset[1]))
        else:
            # Its own stream, so that the rest of the scene is the same at every word_scale.
            place = random.Random(f"{seed}:word-place")
            offset = (round(place.uniform(-1, 1), 4), round(place.uniform(-1, 1), 4))
    return Scene(seed=seed, objects=tuple(objects), word=word, word_row=word_row,
                 background=_background(rng, config), word_scale=config.word_scale,
                 word_offset=offset)
