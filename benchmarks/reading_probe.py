"""Reading probe: can a trained model learn to name the printed word, at a given text size?

The ablation's models do not name the printed word even at full size, so a resolution strategy cannot
show a reading gain on them: the recipe gives reading too little signal. This probe separates "cannot
see the letters" from "was never taught to read": it fine-tunes each model the same way on the word
question alone, then asks it on held-out test scenes (`ablate.word_read`), before and after.

Same for every model: train-split scenes with a word, rendered at 2x / 4x the 96 px input (the small-text
variants' `render_scales`), batches of 16, AdamW at 1e-4 (`--lr`) on all weights, greedy answers. A
model that sees the letters learns the words; one whose input blurs them stays near chance (1 in 28
words). A tiny model learns a word at one place long before it learns to find it anywhere in its row, so
`--word-offset X,Y` fixes the plate's place (`SceneConfig.word_offset`): inside one tile, or across a seam.

    python -m mobilevlm.benchmarks.reading_probe MODEL_DIR [MODEL_DIR ...] --word-scale 0.2 --steps 400
    python -m mobilevlm.benchmarks.reading_probe MODEL_DIR --word-scale 0.2 --word-offset=-0.8,-0.8 --steps 600 --lr 2e-4
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

BATCH = 16


def probe(model_dir: Path, word_scale: float, steps: int, eval_scenes: int = 40, lr: float = 1e-4, seed: int = 0, log=print,
          word_offset: tuple[float, float] | None = None) -> dict:
    """word_read before and after `steps` of word-question fine-tuning, inside the scene scope
    (`word_offset`: the plate at one fixed place of its row, as `SceneConfig.word_offset`)."""
    import torch

    from mobilevlm.checkpoint import load_model, load_processor
    from mobilevlm.data import make_scene, render_scene
    from mobilevlm.data.scene import SceneConfig, scene_config_scope
    from mobilevlm.data.splits import scene_seeds
    from mobilevlm.evaluate import ReferenceAnswerer
    from mobilevlm.train.batches import collate, encode_conversation

    from .ablate import QUESTION, SMALL_TEXT_RENDER_SCALES, word_read

    torch.manual_seed(seed)
    model, processor = load_model(model_dir), load_processor(model_dir)
    image = processor.image
    render_sizes = [image.size * scale for scale in SMALL_TEXT_RENDER_SCALES]
    with scene_config_scope(SceneConfig(word_scale=word_scale, word_offset=word_offset)):
        before = word_read(ReferenceAnswerer(model.eval(), processor), eval_scenes)
        seeds = [s for s in scene_seeds("train", 0, 6000) if make_scene(s).word is not None]
        rng = random.Random(seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
        model.train()
        started, losses = time.time(), []
        for step in range(steps):
            rows, pixels = [], []
            for s in rng.sample(seeds, BATCH):
                scene = make_scene(s)
                rows.append(encode_conversation(processor, [(QUESTION, scene.word)], model.config.text.max_seq_len))
                views = image.preprocess(render_scene(scene, rng.choice(render_sizes)))  # [views, 3, S, S]
                pixels.append(views if image.grids else views[0])  # as ScenePool.pixels
            batch = collate(rows, processor.tokenizer.pad_id or 0, pixels)
            loss = model(batch.token_ids, batch.pixel_values, batch.labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if step % 50 == 0:
                log(f"{model_dir}: step {step} loss {losses[-1]:.3f} ({time.time() - started:.0f} s)")
        after = word_read(ReferenceAnswerer(model.eval(), processor), eval_scenes)
    return {"model": str(model_dir), "word_scale": word_scale, "word_offset": word_offset, "steps": steps, "batch": BATCH, "lr": lr, "render_sizes": render_sizes,
            "word_read_before": before, "word_read_after": after, "first_loss": losses[0] if losses else None,
            "last_loss": sum(losses[-20:]) / len(losses[-20:]) if losses else None, "minutes": round((time.time() - started) / 60, 1)}


def _offset(text: str) -> tuple[float, float]:
    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError:
        x = y = float("nan")
    if not (-1.0 <= x <= 1.0 and -1.0 <= y <= 1.0):
        raise argparse.ArgumentTypeError(f"expected X,Y (two numbers, each -1..1), got {text!r}")
    return x, y


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(prog="python -m mobilevlm.benchmarks.reading_probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", type=Path, help="trained model folders (config.json + weights)")
    parser.add_argument("--word-scale", type=float, default=1.0, help="SceneConfig.word_scale of the fine-tune and test scenes")
    parser.add_argument("--word-offset", type=_offset, default=None, metavar="X,Y",
                        help="print the word at this fixed place of its row (each -1..1, as SceneConfig.word_offset); default: anywhere")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate of the fine-tune")
    parser.add_argument("--eval-scenes", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for model_dir in args.models:
        print(json.dumps(probe(model_dir, args.word_scale, args.steps, args.eval_scenes, args.lr, log=lambda s: print(s, file=sys.stderr, flush=True),
                               word_offset=args.word_offset)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
