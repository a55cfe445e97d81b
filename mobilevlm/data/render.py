"""Rendering of a scene graph to an RGB image at any size.

The layout lives in unit coordinates (the image is the square [0, 1]^2), so one scene renders at
32, 64, 96 or 224 px with the same composition. Drawing happens on a canvas a few times larger than
the output and is then box-filtered down: this anti-aliases edges and text without depending on how
Pillow rasterises at tiny sizes, and keeps the output a pure function of (scene, size).

Legibility at 64 px drives the proportions: a small object is about 10 px across there and a large
one about 18 px; the word fills a whole grid row (about 21 px tall, 60 px wide) in capitals on a
white plate, stroked for weight, because a tiny model looking at 64 px could not read anything
smaller. A scene with `word_scale` < 1 prints it on a plate that much smaller, placed within the
row by `word_offset`: small text, for studying higher-resolution strategies (tiling) that should
read what a direct resize blurs.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .scene import COLORS, GRID, Background, Scene, SceneObject

# Object radius in cell units (half the width of the bounding box).
RADIUS = {"small": 0.24, "large": 0.42}
# Outline width in image units: a darker rim keeps the silhouette crisp against any background.
OUTLINE = 0.008
# The word plate inside its row, in image units.
PLATE_MARGIN_X = 0.03
PLATE_MARGIN_Y = 0.022
PLATE_COLOR = (252, 252, 252)
PLATE_BORDER = (90, 90, 90)
TEXT_COLOR = (15, 15, 15)
# The canvas is at least this many pixels wide before downscaling.
MIN_CANVAS = 384


def _darker(rgb: tuple[int, int, int], factor: float = 0.55) -> tuple[int, int, int]:
    return tuple(int(round(v * factor)) for v in rgb)  # type: ignore[return-value]


def _background(bg: Background, n: int) -> Image.Image:
    """The empty canvas of `bg` at n x n pixels: a blend of its two tints by a mask t in [0, 1]."""
    first = Image.new("RGB", (n, n), bg.colors[0])
    if bg.kind == "solid":
        return first
    coords = (np.arange(n, dtype=np.float32) + 0.5) / n
    x, y = coords[None, :], coords[:, None]
    if bg.kind == "gradient":
        a = math.radians(bg.angle)
        proj = (x - 0.5) * math.cos(a) + (y - 0.5) * math.sin(a)
        t = np.clip(proj / math.sqrt(0.5) + 0.5, 0.0, 1.0)
    elif bg.kind == "stripes":
        a = math.radians(bg.angle)
        proj = x * math.cos(a) + y * math.sin(a)
        t = np.floor(proj / bg.period) % 2
    elif bg.kind == "noise":
        rng = np.random.default_rng(bg.noise_seed)
        coarse = Image.fromarray(rng.random((6, 6)).astype(np.float32), mode="F")
        t = np.clip(np.asarray(coarse.resize((n, n), Image.Resampling.BICUBIC)), 0.0, 1.0)
    else:
        raise ValueError(f"Background.kind: expected solid, gradient, stripes or noise, "
                         f"got {bg.kind!r}")
    mask = Image.fromarray(np.rint(np.broadcast_to(t, (n, n)) * 255).astype(np.uint8), mode="L")
    return Image.composite(Image.new("RGB", (n, n), bg.colors[-1]), first, mask)


def object_center(obj: SceneObject) -> tuple[float, float]:
    """Centre of `obj` in unit coordinates (x, y), offset included."""
    return ((obj.col + 0.5 + obj.dx) / GRID, (obj.row + 0.5 + obj.dy) / GRID)


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape with bounding half-width r around (cx, cy)."""
    if shape == "square":
        h = 0.82 * r  # a square looks bigger than a circle of the same width
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        # Apex up; shifted so the centroid sits on the centre.
        top, base, half = -r, 0.72 * r, 0.98 * r
        shift = (top + 2 * base) / 3
        return [(cx, cy + top - shift), (cx + half, cy + base - shift),
                (cx - half, cy + base - shift)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.8 * r, cy), (cx, cy + r), (cx - 0.8 * r, cy)]
    if shape == "cross":
        w, h = 0.34 * r, 0.95 * r
        return [(cx - w, cy - h), (cx + w, cy - h), (cx + w, cy - w), (cx + h, cy - w),
                (cx + h, cy + w), (cx + w, cy + w), (cx + w, cy + h), (cx - w, cy + h),
                (cx - w, cy + w), (cx - h, cy + w), (cx - h, cy - w), (cx - w, cy - w)]
    raise ValueError(f"SceneObject.shape: unknown shape {shape!r}")


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, n: int) -> None:
    if obj.color not in COLORS:
        raise ValueError(f"SceneObject.color: unknown colour {obj.color!r}")
    fill = COLORS[obj.color]
    rim = _darker(fill)
    width = max(1, round(OUTLINE * n))
    ux, uy = object_center(obj)
    cx, cy, r = ux * n, uy * n, RADIUS[obj.size] / GRID * n
    if obj.shape == "circle":
        rc = 0.95 * r
        draw.ellipse((cx - rc, cy - rc, cx + rc, cy + rc), fill=fill, outline=rim, width=width)
    else:
        points = _shape_polygon(obj.shape, cx, cy, r)
        draw.polygon(points, fill=fill, outline=rim, width=width)


@functools.lru_cache(maxsize=64)
def _font(px: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=px)


def word_plate(row: int, scale: float = 1.0, offset: tuple[float, float] = (0.0, 0.0)) -> tuple[float, float, float, float]:
    """The word plate (x0, y0, x1, y1) in unit coordinates: the whole grid row `row` less margins,
    or (scale < 1) that box shrunk by `scale` in both directions and moved within the row by
    `offset` (-1..1 of the free travel each way; see `Scene.word_offset`)."""
    x0, x1 = PLATE_MARGIN_X, 1 - PLATE_MARGIN_X
    y0, y1 = row / GRID + PLATE_MARGIN_Y, (row + 1) / GRID - PLATE_MARGIN_Y
    if scale != 1.0:
        hw, hh = scale * (x1 - x0) / 2, scale * (y1 - y0) / 2
        cx = (x0 + x1) / 2 + offset[0] * ((x1 - x0) / 2 - hw)
        cy = (y0 + y1) / 2 + offset[1] * ((y1 - y0) / 2 - hh)
        x0, x1, y0, y1 = cx - hw, cx + hw, cy - hh, cy + hh
    return x0, y0, x1, y1


def _draw_word(image: Image.Image, word: str, row: int, scale: float = 1.0,
               offset: tuple[float, float] = (0.0, 0.0)) -> None:
    """Print `word` in capitals, as large as fits, on a white plate filling grid row `row` (or a
    plate `scale` that size, placed by `offset`)."""
    n = image.width
    draw = ImageDraw.Draw(image)
    if scale == 1.0:  # the default layout, computed exactly as it always was (same bytes)
        x0, x1 = PLATE_MARGIN_X * n, (1 - PLATE_MARGIN_X) * n
        y0, y1 = (row / GRID + PLATE_MARGIN_Y) * n, ((row + 1) / GRID - PLATE_MARGIN_Y) * n
    else:
        x0, y0, x1, y1 = (v * n for v in word_plate(row, scale, offset))
    draw.rounded_rectangle((x0, y0, x1, y1), radius=0.2 * (y1 - y0), fill=PLATE_COLOR,
                           outline=PLATE_BORDER, width=max(1, round(0.006 * n * scale)))
    text = word.upper()
    box_w, box_h = 0.88 * (x1 - x0), 0.74 * (y1 - y0)
    px = max(4, int(box_h * 1.3))
    while True:  # shrink until the stroked, letter-spaced text fits the plate
        font = _font(px)
        stroke = max(1, round(px * 0.055))
        gap = 0.1 * px  # extra space between letters, so strokes never merge when downscaled
        advances = [font.getlength(ch) for ch in text]
        width = sum(advances) + gap * (len(text) - 1) + 2 * stroke
        _, top, _, bottom = font.getbbox(text, stroke_width=stroke)
        if (width <= box_w and bottom - top <= box_h) or px <= 4:
            break
        px = max(4, int(px * 0.94))
    x = (x0 + x1) / 2 - width / 2 + stroke
    ty = (y0 + y1) / 2 - (top + bottom) / 2
    for ch, advance in zip(text, advances):
        draw.text((x, ty), ch, font=font, fill=TEXT_COLOR, stroke_width=stroke,
                  stroke_fill=TEXT_COLOR)
        x += advance + gap


def render_scene(scene: Scene, size: int) -> Image.Image:
    """The scene as a size x size RGB image; the same scene and size always give the same bytes."""
    if not isinstance(size, int) or size < 8:
        raise ValueError(f"render_scene: size must be an int >= 8 pixels, got {size!r}")
    factor = max(2, -(-MIN_CANVAS // size))
    n = size * factor
    canvas = _background(scene.background, n)
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        _draw_object(draw, obj, n)
    if scene.word is not None:
        if scene.word_row is None:
            raise ValueError(f"Scene {scene.seed}: word {scene.word!r} has no word_row")
        _draw_word(canvas, scene.word, scene.word_row, scene.word_scale, scene.word_offset)
    return canvas.resize((size, size), Image.Resampling.BOX)
