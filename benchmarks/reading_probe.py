"""Reading probe: can a trained model learn to name the printed word, at a given text size?

The ablation's models do not name the printed word even at full size, so a resolution strategy cannot
show a reading gain on them: the recipe gives reading too little signal. This probe separates "cannot
see the letters" from "was never taught to read": it fine-tunes each model the same way on the word
question alone, then asks it on held-out test scenes (`ablate.word_read`), before, after, and (with
`--eval-every`) along the way.

Same for every model: train-split scenes with a word, rendered at 2x / 4x the 96 px input (the small-text
variants' `render_scales`), AdamW on all weights, greedy answers. A model that sees the letters learns
the words; one whose input blurs them stays near chance (1 in 28 words). A tiny model learns a word at
one place long before it learns to find it anywhere in its row, so `--word-offset X,Y` fixes the plate's
place (`SceneConfig.word_offset`): inside one tile, or across a seam.

Learning to read a word anywhere takes tens of thousands of examples, more than a 2-core CPU trains in
an hour; `--pool N --workers W` renders N train scenes once, in W processes, and samples batches from
them, and `--device cuda` trains on a GPU (answers are still computed on the CPU, by `generate`).

    python -m mobilevlm.benchmarks.reading_probe MODEL_DIR [MODEL_DIR ...] --word-scale 0.2 --steps 400
    python -m mobilevlm.benchmarks.reading_probe MODEL_DIR --word-scale 0.2 --word-offset=-0.8,-0.8 --steps 600 --lr 2e-4
    python -m mobilevlm.benchmarks.reading_probe MODEL_DIR --word-scale 0.2 --device cuda --batch 64 --steps 4000 \\
        --pool 20000 --workers 7 --eval-every 500 --eval-scenes 400
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import random
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

BATCH = 16


@dataclass(frozen=True)
class ProbeConfig:
    """One probe run; every model of a comparison gets the same one."""

    word_scale: float = 1.0  # SceneConfig.word_scale of the fine-tune and the test scenes
    word_offset: tuple[float, float] | None = None  # SceneConfig.word_offset; None: anywhere in its row
    steps: int = 400
    batch: int = BATCH
    lr: float = 1e-4
    eval_scenes: int = 40  # consecutive test scenes; those with a word are asked
    eval_every: int = 0  # also measure word_read every this many steps (0: before and after only)
    pool: int = 0  # 0: render every batch's scenes afresh; N: render N word scenes once and sample from them
    workers: int = 1  # processes that render the pool
    device: str = "cpu"
    max_minutes: float | None = None  # stop after the step that passes this wall time, pool rendering included (steps_done says where)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch < 1 or self.lr <= 0 or self.eval_scenes < 1 or self.eval_every < 0 or self.pool < 0 or self.workers < 1:
            raise ValueError(f"ProbeConfig: steps >= 0, batch >= 1, lr > 0, eval_scenes >= 1, eval_every >= 0, pool >= 0, workers >= 1; got {self}")
        if 0 < self.pool < self.batch:
            raise ValueError(f"ProbeConfig.pool: {self.pool} scenes cannot fill a batch of {self.batch}")


def _render_sizes(processor) -> list[int]:
    from .ablate import SMALL_TEXT_RENDER_SCALES

    return [processor.image.size * scale for scale in SMALL_TEXT_RENDER_SCALES]


_WORKER: dict = {}


def _init_worker(model_dir: str, scene_config) -> None:
    from mobilevlm.checkpoint import load_processor

    processor = load_processor(model_dir)
    _WORKER.update(processor=processor, scene=scene_config, sizes=_render_sizes(processor))


def _render_seed(seed: int):
    """(word, uint8 views) of train scene `seed` at its render size (by seed, as ScenePool), or None
    when the scene has no word. Runs in a pool worker: the scene config is passed, not scoped."""
    from mobilevlm.data import make_scene, render_scene

    scene = make_scene(seed, _WORKER["scene"])
    if scene.word is None:
        return None
    processor, sizes = _WORKER["processor"], _WORKER["sizes"]
    # numpy, not a tensor: torch pickles tensors between processes as shared-memory file handles,
    # one per tensor, and tens of thousands of them exhaust the open-file limit
    return scene.word, processor.image.prepare_views(render_scene(scene, sizes[seed % len(sizes)])).numpy()


def render_pool(model_dir: Path, scene_config, size: int, workers: int) -> tuple[list[str], "torch.Tensor"]:
    """The first `size` train scenes with a word: their words and uint8 views [size, views, 3, S, S]."""
    import torch

    from mobilevlm.data.splits import SPLITS

    words, views = [], []
    kwargs = dict(initializer=_init_worker, initargs=(str(model_dir), scene_config))
    chunk = 4 * size  # about half of all scenes hold a word
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), **kwargs) as pool:
        start = SPLITS["train"].start
        while len(words) < size:
            for item in pool.map(_render_seed, range(start, start + chunk), chunksize=64):
                if item is not None and len(words) < size:
                    words.append(item[0])
                    views.append(torch.from_numpy(item[1]))
            start += chunk
    return words, torch.stack(views)


def probe(model_dir: Path, word_scale: float | None = None, steps: int | None = None, eval_scenes: int | None = None, lr: float | None = None,
          seed: int | None = None, log=print, word_offset: tuple[float, float] | None = None, config: ProbeConfig | None = None) -> dict:
    """word_read before and after the word-question fine-tune (and every `eval_every` steps), inside
    the scene scope. Keyword arguments override `config` (default ProbeConfig())."""
    import torch

    from mobilevlm.checkpoint import load_model, load_processor
    from mobilevlm.data import make_scene, render_scene
    from mobilevlm.data.scene import SceneConfig, scene_config_scope
    from mobilevlm.data.splits import scene_seeds
    from mobilevlm.evaluate import ReferenceAnswerer
    from mobilevlm.train.batches import collate, encode_conversation

    from .ablate import QUESTION, word_read

    overrides = dict(word_scale=word_scale, steps=steps, eval_scenes=eval_scenes, lr=lr, seed=seed, word_offset=word_offset)
    config = dataclasses.replace(config or ProbeConfig(), **{k: v for k, v in overrides.items() if v is not None})
    torch.manual_seed(config.seed)
    device = torch.device(config.device)
    model, processor = load_model(model_dir), load_processor(model_dir)
    image, max_len = processor.image, model.config.text.max_seq_len
    scene_config = SceneConfig(word_scale=config.word_scale, word_offset=config.word_offset)
    rng = random.Random(config.seed)

    def measure() -> dict:  # answers on the CPU, from a copy when the model trains elsewhere
        answerer = model if device.type == "cpu" else copy.deepcopy(model).cpu()
        result = word_read(ReferenceAnswerer(answerer.eval(), processor), config.eval_scenes)
        model.train()
        return result

    with scene_config_scope(scene_config):
        started = time.time()
        if config.pool:
            words, pool_views = render_pool(model_dir, scene_config, config.pool, config.workers)
            log(f"{model_dir}: rendered {config.pool} word scenes in {time.time() - started:.0f} s")
            pool_views = pool_views.to(device)  # uint8; normalised per batch where the model runs
        else:
            seeds = [s for s in scene_seeds("train", 0, 6000) if make_scene(s).word is not None]
            render_sizes = _render_sizes(processor)

        def next_batch():
            if config.pool:
                picks = rng.sample(range(config.pool), config.batch)
                answers = [words[i] for i in picks]
                pixels = image.normalize(pool_views[torch.tensor(picks, device=device)])  # [B, views, 3, S, S]
                pixels = pixels if image.grids else pixels[:, 0]  # as ScenePool.pixels
            else:
                answers, views = [], []
                for s in rng.sample(seeds, config.batch):
                    scene = make_scene(s)
                    answers.append(scene.word)
                    views.append(image.preprocess(render_scene(scene, rng.choice(render_sizes))))  # [views, 3, S, S]
                pixels = torch.stack([v if image.grids else v[0] for v in views]).to(device)
            rows = [encode_conversation(processor, [(QUESTION, word)], max_len) for word in answers]
            batch = collate(rows, processor.tokenizer.pad_id or 0)
            return batch.token_ids.to(device), pixels, batch.labels.to(device)

        curve = [{"step": 0, "word_read": measure()}]
        model.to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
        trained, losses = time.time(), []
        step = 0
        while step < config.steps:
            token_ids, pixels, labels = next_batch()
            loss = model(token_ids, pixels, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            step += 1
            if step % 50 == 1:
                log(f"{model_dir}: step {step - 1} loss {losses[-1]:.3f} ({time.time() - trained:.0f} s)")
            out_of_time = config.max_minutes is not None and time.time() - started > 60 * config.max_minutes
            if (config.eval_every and step % config.eval_every == 0) or step == config.steps or out_of_time:
                curve.append({"step": step, "word_read": measure()})
                log(f"{model_dir}: step {step} word_read {curve[-1]['word_read']['accuracy']:.3f}")
            if out_of_time:
                break
    model.cpu()
    return {"model": str(model_dir), "word_scale": config.word_scale, "word_offset": config.word_offset, "steps": config.steps, "steps_done": step,
            "batch": config.batch, "lr": config.lr, "render_sizes": _render_sizes(processor), "pool": config.pool or None, "device": config.device,
            "word_read_before": curve[0]["word_read"], "word_read_after": curve[-1]["word_read"],
            "curve": [{"step": c["step"], "accuracy": c["word_read"]["accuracy"]} for c in curve] if config.eval_every else None,
            "first_loss": losses[0] if losses else None, "last_loss": sum(losses[-20:]) / len(losses[-20:]) if losses else None,
            "minutes": round((time.time() - started) / 60, 1)}


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
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate of the fine-tune")
    parser.add_argument("--eval-scenes", type=int, default=40)
    parser.add_argument("--eval-every", type=int, default=0, help="also measure word_read every this many steps")
    parser.add_argument("--pool", type=int, default=0, help="render this many word scenes once and sample batches from them (0: fresh scenes per batch)")
    parser.add_argument("--workers", type=int, default=1, help="processes that render the pool")
    parser.add_argument("--device", default="cpu", help="where the fine-tune runs (cpu, cuda)")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="stop training after the step that passes this many minutes since the probe began (pool rendering included)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    try:
        config = ProbeConfig(args.word_scale, args.word_offset, args.steps, args.batch, args.lr, args.eval_scenes, args.eval_every,
                             args.pool, args.workers, args.device, args.max_minutes)
    except ValueError as error:
        parser.error(str(error))
    torch.set_num_threads(args.threads)
    if config.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True  # a tiny fp32 model; TF32 matmuls change no conclusion here
    for model_dir in args.models:
        print(json.dumps(probe(model_dir, config=config, log=lambda s: print(s, file=sys.stderr, flush=True))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
