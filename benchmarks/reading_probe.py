"""Reading probe: can a trained model learn to name the printed word, at a given text size?

The ablation's models do not name the printed word even at full size, so a resolution strategy cannot
show a reading gain on them: the recipe gives reading too little signal. This probe separates "cannot
see the letters" from "was never taught to read": it fine-tunes each model the same way on the word
question alone, then asks it on held-out test scenes (`ablate.word_read`), before and after.

Same for every model: train-split scenes with a word, rendered at 2x / 4x the 96 px input (the small-text
variants' `render_scales`), batches of 16, AdamW at 1e-4 on all weights, greedy answers. A model that
sees the letters learns the words; one whose input blurs them stays near chance (1 in 28 words).

    python -m mobilevlm.benchmarks.reading_probe MODEL_DIR [MODEL_DIR ...] --word-scale 0.2 --steps 400
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

QUESTION = "What word is written in the image?"
RENDER_SIZES = (192, 384)
BATCH = 16


def probe(model_dir: Path, word_scale: float, steps: int, eval_scenes: int = 40, lr: float = 1e-4, seed: int = 0, log=print) -> dict:
    """word_read before and after `steps` of word-question fine-tuning, inside the scene scope."""
    import torch

    from mobilevlm.checkpoint import load_model, load_processor
    from mobilevlm.data import make_scene, render_scene
    from mobilevlm.data.scene import SceneConfig, scene_config_scope
    from mobilevlm.data.splits import scene_seeds
    from mobilevlm.evaluate import ReferenceAnswerer
    from mobilevlm.model import IGNORE_INDEX, IMAGE_TOKEN_INDEX

    from .ablate import word_read

    torch.manual_seed(seed)
    model, processor = load_model(model_dir), load_processor(model_dir)
    tok = processor.tokenizer
    with scene_config_scope(SceneConfig(word_scale=word_scale)):
        before = word_read(ReferenceAnswerer(model.eval(), processor), eval_scenes)
        seeds = [s for s in scene_seeds("train", 0, 6000) if make_scene(s).word is not None]
        rng = random.Random(seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
        model.train()
        started, losses = time.time(), []
        prefix, suffix = processor.prompt_ids(QUESTION)
        for step in range(steps):
            rows = []
            for s in rng.sample(seeds, BATCH):
                scene = make_scene(s)
                target = tok.encode(" " + scene.word) + [tok.eos_id]
                ids = prefix + [IMAGE_TOKEN_INDEX] + suffix + target
                labels = [IGNORE_INDEX] * (len(ids) - len(target)) + target
                rows.append((ids, processor.image.preprocess(render_scene(scene, rng.choice(RENDER_SIZES))), labels))
            width = max(len(r[0]) for r in rows)  # right padding, ignored by the loss
            ids = torch.tensor([r[0] + [tok.eos_id] * (width - len(r[0])) for r in rows])
            labels = torch.tensor([r[2] + [IGNORE_INDEX] * (width - len(r[2])) for r in rows])
            views = [r[1] for r in rows]  # [1, 3, S, S] each, or [K, 3, S, S] views of a tiled model
            pixels = torch.stack(views) if views[0].shape[0] > 1 else torch.cat(views)
            loss = model(ids, pixels, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if step % 50 == 0:
                log(f"{model_dir}: step {step} loss {losses[-1]:.3f} ({time.time() - started:.0f} s)")
        after = word_read(ReferenceAnswerer(model.eval(), processor), eval_scenes)
    return {"model": str(model_dir), "word_scale": word_scale, "steps": steps, "batch": BATCH, "lr": lr, "render_sizes": list(RENDER_SIZES),
            "word_read_before": before, "word_read_after": after, "first_loss": losses[0] if losses else None,
            "last_loss": sum(losses[-20:]) / len(losses[-20:]) if losses else None, "minutes": round((time.time() - started) / 60, 1)}


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(prog="python -m mobilevlm.benchmarks.reading_probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", type=Path, help="trained model folders (config.json + weights)")
    parser.add_argument("--word-scale", type=float, default=1.0, help="SceneConfig.word_scale of the fine-tune and test scenes")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--eval-scenes", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for model_dir in args.models:
        print(json.dumps(probe(model_dir, args.word_scale, args.steps, args.eval_scenes, log=lambda s: print(s, file=sys.stderr, flush=True))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
