"""Fuzz the image loader: any bytes a user could pass as --image.

    python fuzz/fuzz_image.py -max_total_time=3600      (see SECURITY.md)
"""

from __future__ import annotations

import io

from _driver import instrumented, main

with instrumented("mobilevlm.processing", "PIL"):
    from PIL import Image

    from mobilevlm.processing import ImageProcessor, load_image

PROCESSOR = ImageProcessor(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "pad")


def target(data: bytes) -> None:
    image = load_image(data)
    assert image.mode == "RGB" and image.width >= 1 and image.height >= 1
    PROCESSOR.prepare_image(image)


def seeds() -> list[bytes]:
    """Small valid files in every format and mode the loader converts."""
    import numpy as np

    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 16, 3), dtype=np.uint8))
    images = [
        (rgb, "PNG", {}), (rgb, "JPEG", {}), (rgb, "GIF", {}), (rgb, "BMP", {}), (rgb, "TIFF", {}), (rgb, "WEBP", {}),
        (rgb.convert("RGBA"), "PNG", {}), (rgb.convert("LA"), "PNG", {}), (rgb.convert("CMYK"), "JPEG", {}),
        (rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=8), "PNG", {"transparency": 0}),
        (Image.fromarray(np.arange(192, dtype=np.uint16).reshape(12, 16) * 300), "PNG", {}),
    ]
    out = []
    for image, fmt, options in images:
        buffer = io.BytesIO()
        try:
            image.save(buffer, format=fmt, **options)
        except (OSError, KeyError):  # a codec this Pillow build lacks
            continue
        out.append(buffer.getvalue())
    return out


if __name__ == "__main__":
    main(target, seeds)
