"""`mobilevlm ablate`: the MLLM survey's design choices side by side, on one task and one export path.

Each variant is the `tiny` preset with one choice changed (vision encoder family, resolution strategy,
modality interface, sparse decoder). Every variant goes through exactly the same steps:

1. train with the same recipe and budget (`ablation_recipe`: the tiny recipe's stages, shortened);
2. evaluate on the same held-out test scenes: closed-ended accuracy by question type (reading and
   counting matter most for resolution), POPE F1, CHAIR;
3. export to ExecuTorch 8da4w (parity measured in the runtime) and to ONNX int4 where that backend
   carries the family;
4. time image encoding and time to first token of the 8da4w program on this host (ExecuTorch
   runtime, fixed thread count), and project time to first token on a Snapdragon 8 Gen 3 with the
   roofline model of `projection.py` (image-encoder MACs counted on the real module graph);
5. write `OUT/VARIANT/result.json`; the table (`OUT/ablation.md`) and `OUT/results.jsonl` are built
   from those records only.

The "resolution (small text)" pair runs the baseline and the tiled model on scenes whose printed word is
small (`SMALL_TEXT`), from the same source renders, so tiling is tested where it should matter.

Variants run as separate processes (`--jobs` at a time, one torch thread each) and resume: a variant
whose result.json exists is not run again, and an interrupted training resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from mobilevlm.config import VisionConfig
from mobilevlm.data.scene import scene_config_scope
from mobilevlm.errors import ConfigError, MobileVLMError

PROJECTION_DEVICE = "snapdragon-8-gen-3"
PROJECTION_RUNTIME = "executorch-xnnpack"
PROJECTION_THREADS = 4
HOST_THREADS = 1
QUESTION = "What word is written in the image?"


@dataclass(frozen=True)
class Variant:
    name: str
    choice: str  # which survey axis this variant changes
    description: str
    overrides: dict = field(default_factory=dict)  # Recipe.model_overrides on top of the tiny preset
    # SceneConfig fields for every scene the variant trains, is evaluated and exported on (empty: the
    # default scenes), and the ScenePool's render scales (None: batches.RENDER_SCALES).
    scene: dict = field(default_factory=dict)
    render_scales: tuple[int, ...] | None = None

    def scene_config(self):
        from mobilevlm.data.scene import SceneConfig

        return SceneConfig(**self.scene)


# The small-text comparison: the printed word on a plate a fifth of its row's size, placed anywhere in
# the row (capitals about 4 px tall in a 96 px view, 8 px in a 192 px one: unreadable when the
# image is resized to the encoder, readable in the tiles of a 2x2 layout). Both variants train on the
# same renders (2x or 4x the 96 px input, never 1x) and are evaluated on the same 256 px test renders;
# the direct model resizes them down, the tiled one cuts tiles.
SMALL_TEXT = {"word_scale": 0.2}
SMALL_TEXT_RENDER_SCALES = (2, 4)
ANYRES = {"resolution": "anyres", "anyres_grids": [1, 2, 2, 1, 2, 2]}


def _high_res_convnext() -> dict:
    """The "dual" variant's small high-resolution encoder: a 3-stage ConvNeXt on 192 px (12x12 grid)."""
    return dataclasses.asdict(VisionConfig(type="convnext", image_size=192, patch_size=16, hidden_size=128, num_layers=1, num_heads=4,
                                           intermediate_size=512, stage_depths=(1, 1, 1), stage_dims=(32, 64, 128)))


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("clip-ldpv2", "baseline", "CLIP ViT 96 px, LDPv2 to 36 tokens (MobileVLM V2's design, the shipped model's shape)"),
    Variant("eva-ldpv2", "encoder", "EVA-02-style ViT (SwiGLU, 2-D RoPE, sub-LN) of about the same size",
            {"vision": {"type": "eva_vit", "intermediate_size": 344}}),
    Variant("convnext-ldpv2", "encoder", "ConvNeXt, 3 stages (48/96/192 wide), its 6x6 last stage as the grid",
            {"vision": {"type": "convnext", "patch_size": 16, "hidden_size": 192, "stage_depths": [2, 2, 2], "stage_dims": [48, 96, 192]}}),
    Variant("patch-linear", "encoder", "encoder-free (Fuyu): 16 px patches projected straight to tokens, a separator per row",
            {"vision": {"type": "patch", "patch_size": 16, "hidden_size": 256}, "projector": {"type": "linear"}}),
    Variant("clip-anyres", "resolution", "tiling (LLaVA-NeXT anyres): global view + 1x2 / 2x1 / 2x2 tiles of 96 px, each LDPv2 + separator",
            ANYRES),
    Variant("clip-ldpv2-smalltext", "resolution (small text)", "the baseline (direct resize to 96 px) on small-text scenes: word plate 0.2 of its row, "
            "trained on 2x / 4x renders", scene=SMALL_TEXT, render_scales=SMALL_TEXT_RENDER_SCALES),
    Variant("clip-anyres-smalltext", "resolution (small text)", "clip-anyres on the same small-text scenes and renders: the 2x2 tiles see the word "
            "at twice the direct model's scale", ANYRES, scene=SMALL_TEXT, render_scales=SMALL_TEXT_RENDER_SCALES),
    Variant("clip-dual", "resolution", "dual resolution (CogAgent-style): 96 px CLIP tokens cross-attend to a 192 px ConvNeXt",
            {"resolution": "dual", "high_res_vision": _high_res_convnext()}),
    Variant("clip-qformer", "interface", "Q-Former (BLIP-2): 36 learned queries, 2 layers",
            {"projector": {"type": "qformer", "num_queries": 36, "depth": 2, "num_heads": 4}}),
    Variant("clip-resampler", "interface", "Perceiver resampler (Flamingo): 36 latents, 2 layers",
            {"projector": {"type": "resampler", "num_queries": 36, "depth": 2, "num_heads": 4}}),
    Variant("clip-xattn", "interface", "gated cross-attention (Flamingo) before every second decoder layer; no image tokens in the sequence",
            {"interface": "cross_attention", "cross_attention_every": 2}),
    Variant("clip-visual-expert", "interface", "visual expert (CogVLM): image positions use their own QKV and MLP in every layer",
            {"interface": "visual_expert"}),
    Variant("clip-ldpv2-moe", "decoder", "sparse decoder (MoE-LLaVA): 4 SwiGLU experts, top-2, in every second layer",
            {"text": {"num_experts": 4, "experts_per_token": 2, "moe_every": 2}}),
    Variant("fusion", "interface", "expert-model fusion: a scene-expert CNN (300x64 steps) describes the image; the baseline's decoder, "
            "fine-tuned text-only on descriptions with the instruct budget, answers from the description"),
)}


# Steps per stage: the tiny recipe's stages, shortened to what nine variants can afford on two cores.
# DPO is left out (it is an alignment step on top, the same for every variant).
BUDGETS: dict[str, dict[str, tuple[int, int]]] = {
    "ablation": {"vision": (100, 64), "text": (40, 32), "align": (30, 32), "instruct": (240, 16)},
    "smoke": {"vision": (2, 8), "text": (2, 4), "align": (2, 4), "instruct": (2, 4)},
}


def ablation_recipe(variant: str, budget: str = "ablation"):
    from mobilevlm.train.recipe import Recipe, get_recipe

    if variant not in VARIANTS:
        raise ConfigError(f"unknown ablation variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    if budget not in BUDGETS:
        raise ConfigError(f"unknown ablation budget {budget!r}; expected one of {', '.join(BUDGETS)}")
    tiny = get_recipe("tiny")
    stages = tuple(dataclasses.replace(s, steps=BUDGETS[budget][s.name][0], batch_size=BUDGETS[budget][s.name][1], warmup=min(s.warmup, BUDGETS[budget][s.name][0] // 4 + 1))
                   for s in tiny.stages if s.name in BUDGETS[budget])
    return Recipe(name=f"ablation-{budget}-{variant}", preset="tiny", stages=stages, seed=tiny.seed, bf16=tiny.bf16,
                  scene_pool=4000 if budget == "ablation" else 32, tokenizer_vocab=tiny.tokenizer_vocab, model_overrides=VARIANTS[variant].overrides)


# --- one variant ---------------------------------------------------------------------------------


def _median_ms(fn, repeats: int = 15) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - started))
    return statistics.median(times)


def host_timings(bundle_dir: Path, artifact: str) -> dict:
    """Image encoding and time to first token of an ExecuTorch artifact on this host, in its runtime."""
    from PIL import Image

    from mobilevlm.export.bundle import load_bundle
    from mobilevlm.export.executorch import ExecuTorchSession

    bundle = load_bundle(bundle_dir)
    session = ExecuTorchSession(bundle.root, bundle.artifact(artifact), bundle.manifest)
    case = bundle.manifest["parity"]["cases"][0]
    image = Image.open(bundle.path(case["image"])).convert("RGB")
    pixels = session.image_tensor(image)
    after = session.check_length(QUESTION)
    encode = _median_ms(lambda: session.vision.execute([pixels]))
    ttft = _median_ms(lambda: session._prefill(image, after))
    prompt_tokens = session._prefill(image, after)[1]  # positions taken (cross-attention's image takes none)
    return {"image_encode_ms": round(encode, 2), "ttft_ms": round(ttft, 2), "prompt_tokens": prompt_tokens, "threads": HOST_THREADS}


def run_variant(name: str, out: Path, budget: str, eval_scenes: int) -> dict:
    import torch

    torch.set_num_threads(HOST_THREADS)  # also ExecuTorch's pool in this process
    folder = out / name
    if name == "fusion":
        return run_fusion_variant(out, budget, eval_scenes)
    variant = VARIANTS[name]
    with scene_config_scope(variant.scene_config()):  # training pool, test scenes and parity cases alike
        return _run_model_variant(variant, folder, budget, eval_scenes)


def _run_model_variant(variant: Variant, folder: Path, budget: str, eval_scenes: int) -> dict:
    from mobilevlm.checkpoint import load_model, load_processor
    from mobilevlm.evaluate import ReferenceAnswerer, evaluate
    from mobilevlm.export import pipeline
    from mobilevlm.export.bundle import load_bundle
    from mobilevlm.moe import active_parameters
    from mobilevlm.train import Trainer
    from mobilevlm.train.batches import RENDER_SCALES, ScenePool

    from .projection import project

    name = variant.name
    recipe = ablation_recipe(name, budget)
    run = folder / "run"
    trainer = Trainer(run, recipe, resume=(run / "recipe.json").exists(), progress=False)
    if variant.render_scales is not None:
        trainer.pool = ScenePool(trainer.processor, recipe.scene_pool, render_scales=variant.render_scales)
    model_dir = trainer.run()
    model, processor = load_model(model_dir), load_processor(model_dir)
    config = model.config
    answerer = ReferenceAnswerer(model, processor)
    metrics = evaluate(answerer, None, eval_scenes, progress=False)
    active, total = active_parameters(model)
    record = {
        "variant": name, "choice": variant.choice, "description": variant.description, "budget": budget,
        "recipe": recipe.to_dict(), "model_config": config.to_dict(),
        "scenes": {"scene_config": dataclasses.asdict(variant.scene_config()), "render_scales": list(variant.render_scales or RENDER_SCALES)},
        "parameters": total, "active_parameters": active, "image_tokens": config.num_image_tokens, "train_minutes": train_minutes(run),
        "eval": {"num_scenes": eval_scenes, "closed_ended": metrics["closed_ended"], "pope": metrics["pope"], "chair": metrics["chair"],
                 "word_read": word_read(answerer, eval_scenes)},
    }
    et = pipeline.export_bundle(folder / "bundle-executorch", "executorch", ("8da4w",), model_dir, force=True, num_parity_cases=4, eval_scenes=0, log=lambda s: None)
    artifact = load_bundle(et).artifact("executorch-8da4w")
    record["executorch"] = {"recipe": "8da4w", "size_bytes": artifact["size_bytes"], "token_agreement": artifact["parity"]["token_agreement"],
                            "answers_identical": artifact["parity"]["answers_identical"], "num_cases": artifact["parity"]["num_cases"]}
    record["host"] = host_timings(et, "executorch-8da4w")
    record["onnx"] = onnx_record(folder, model_dir)
    text_tokens = record["host"]["prompt_tokens"] - config.num_image_tokens
    p = project(config, "8da4w", PROJECTION_DEVICE, PROJECTION_THREADS, PROJECTION_RUNTIME, context=256, prompt_lengths=(16,),
                text_prompt_tokens=text_tokens, model_name=name)
    record["projected"] = {"device": PROJECTION_DEVICE, "runtime": PROJECTION_RUNTIME, "threads": PROJECTION_THREADS,
                           "image_encode_ms": round(1e3 * p.encode_s, 2), "ttft_ms": round(1e3 * p.ttft_s, 2), "decode_tokens_per_s": round(p.decode_tok_s, 1)}
    record["machine"] = {"cpu": _cpu_model(), "torch_threads": HOST_THREADS}
    (folder / "result.json").write_text(json.dumps(record, indent=1))
    return record


def onnx_record(folder: Path, model_dir: Path) -> dict:
    """The variant's ONNX int4 export (size, parity), or why the exporter refused it."""
    from mobilevlm.export import pipeline
    from mobilevlm.export.bundle import load_bundle

    try:
        onnx = pipeline.export_bundle(folder / "bundle-onnx", "onnx", ("int4",), model_dir, force=True, num_parity_cases=4, eval_scenes=0, log=lambda s: None)
    except MobileVLMError as exc:
        return {"recipe": "int4", "unsupported": str(exc)}
    entry = load_bundle(onnx).artifact("onnx-int4")
    return {"recipe": "int4", "size_bytes": entry["size_bytes"], "token_agreement": entry["parity"]["token_agreement"]}


def word_read(answerer, eval_scenes: int) -> dict:
    """The harder half of "reading": on the evaluated test scenes that hold a word, is the answer to
    "What word is written in the image?" the word? (The other half, "Is there any text?", can be
    answered from the plate alone, or by a yes-bias, without reading a letter.)"""
    from mobilevlm.data import make_scene, normalize_answer, render_scene
    from mobilevlm.evaluate import EVAL_IMAGE_SIZE, eval_seeds

    hits = []
    for seed in eval_seeds(None, eval_scenes):
        scene = make_scene(seed)
        if scene.word is not None:
            predicted = answerer.answer(render_scene(scene, EVAL_IMAGE_SIZE), QUESTION, 8)
            hits.append(normalize_answer(predicted) == scene.word)
    return {"accuracy": sum(hits) / len(hits) if hits else 0.0, "count": len(hits), "question": QUESTION}


def run_fusion_variant(out: Path, budget: str, eval_scenes: int) -> dict:
    """The expert-fusion pipeline at the same budget: the baseline's trained model (its decoder, from the
    same vision / text / align / instruct stages) fine-tuned text-only on scene-expert descriptions for
    the instruct stage's steps and batch, evaluated the same way, exported as its two-program bundle."""
    from mobilevlm.evaluate import evaluate
    from mobilevlm.export.fusion import export_fusion
    from mobilevlm.fusion.pipeline import load_fusion, train_fusion
    from mobilevlm.train import Trainer

    folder, baseline = out / "fusion", out / "clip-ldpv2" / "run"
    base_dir = Trainer(baseline, ablation_recipe("clip-ldpv2", budget), resume=(baseline / "recipe.json").exists(), progress=False).run()
    run = folder / "run"
    steps, batch = BUDGETS[budget]["instruct"]
    if not (run / "fusion.json").is_file():
        started = time.time()
        train_fusion(run, 300 if budget == "ablation" else 2, steps, decoder_batch_size=batch, model_dir=base_dir, overwrite=True,
                     eval_scenes=40 if budget == "ablation" else 2, log=lambda s: None)
        (folder / "fusion_minutes.json").write_text(json.dumps({"minutes": round((time.time() - started) / 60, 1)}))
    answerer = load_fusion(run)
    metrics = evaluate(answerer, None, eval_scenes, progress=False)
    expert_params = sum(p.numel() for p in answerer.expert.parameters())
    decoder_params = sum(p.numel() for p in answerer.model.text.parameters())
    bundle = export_fusion(folder / "bundle-executorch", run, "8da4w", 4, force=True, log=lambda s: None)
    manifest = json.loads((bundle / "manifest.json").read_text())
    record = {
        "variant": "fusion", "choice": VARIANTS["fusion"].choice, "description": VARIANTS["fusion"].description, "budget": budget,
        "model_config": manifest["model"]["config"], "parameters": expert_params + decoder_params, "active_parameters": expert_params + decoder_params,
        "train_minutes": round(train_minutes(baseline) + json.loads((folder / "fusion_minutes.json").read_text())["minutes"], 1),
        "eval": {"num_scenes": eval_scenes, "closed_ended": metrics["closed_ended"], "pope": metrics["pope"], "chair": metrics["chair"]},
        "executorch": {"recipe": "8da4w (decoder; expert fp32)", "size_bytes": sum(a["size_bytes"] for a in manifest["artifacts"]),
                       "answers_identical": manifest["parity"]["answers_identical"], "num_cases": manifest["parity"]["num_cases"]},
        "onnx": {"recipe": "int4", "unsupported": "fusion bundles are ExecuTorch programs only"},
        "projected": {"device": PROJECTION_DEVICE, "ttft_ms": None, "note": "the roofline's image-encoder count does not model the scene expert"},
        "machine": {"cpu": _cpu_model(), "torch_threads": HOST_THREADS},
    }
    record["host"] = fusion_host_timings(bundle)
    record["image_tokens"] = record["host"].pop("description_tokens")
    (folder / "result.json").write_text(json.dumps(record, indent=1))
    return record


def fusion_host_timings(bundle_dir: Path) -> dict:
    """The expert's run (the "image encode") and the time to the first answer token, in ExecuTorch."""
    from PIL import Image

    from mobilevlm.export.fusion import FusionSession

    session = FusionSession(bundle_dir)
    case = session.manifest["parity"]["cases"][0]
    image = Image.open(bundle_dir / case["image"]).convert("RGB")
    encode = _median_ms(lambda: session.expert_outputs(image))
    ttft = _median_ms(lambda: session.generate(image, QUESTION, 1))
    description = session.describe_image(image)
    return {"image_encode_ms": round(encode, 2), "ttft_ms": round(ttft, 2), "threads": HOST_THREADS,
            "prompt_tokens": len(session.prompt_ids(description, QUESTION)), "description_tokens": len(session.tokenizer.encode(description))}


def train_minutes(run: Path) -> float:
    """Minutes the stages took, summed from their stage.json (a resumed run counts each stage once)."""
    seconds = sum(json.loads(p.read_text())["seconds"] for p in sorted((run / "stages").glob("*/stage.json")))
    return round(seconds / 60, 1)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


# --- the table -----------------------------------------------------------------------------------


def table(records: list[dict]) -> str:
    """Markdown table of the variants' records (what `OUT/ablation.md` holds)."""
    head = ("| variant | axis | params (active) | image tokens | accuracy | reading | counting | POPE F1 | CHAIR_i | "
            ".pte 8da4w MB | ONNX int4 MB | encode ms (host) | TTFT ms (host) | TTFT ms (8 Gen 3, projected) | train min |")
    rows = [head, "|" + "---|" * 15]
    for r in records:
        closed, pope = r["eval"]["closed_ended"], r["eval"]["pope"]
        f1 = statistics.mean(m["f1"] for m in pope.values())
        by_type = closed["by_type"]
        params = f"{r['parameters'] / 1e6:.2f}M" + (f" ({r['active_parameters'] / 1e6:.2f}M)" if r["active_parameters"] != r["parameters"] else "")
        onnx = f"{r['onnx']['size_bytes'] / 1e6:.1f}" if "size_bytes" in r["onnx"] else "n/a"
        tokens = str(r["image_tokens"]) + (" (description)" if r["variant"] == "fusion" else "")
        if r.get("model_config", {}).get("interface") == "cross_attention":
            from mobilevlm.config import MobileVLMConfig

            tokens += f" (+{MobileVLMConfig.from_dict(r['model_config']).num_image_features} beside)"
        rows.append(
            f"| {r['variant']} | {r['choice']} | {params} | {tokens} | {closed['accuracy']:.3f} | {by_type.get('reading', float('nan')):.3f} | "
            f"{by_type.get('count', float('nan')):.3f} | {f1:.3f} | {r['eval']['chair']['chair_i']:.3f} | "
            f"{r['executorch']['size_bytes'] / 1e6:.1f} | {onnx} | {r['host']['image_encode_ms']:.1f} | {r['host']['ttft_ms']:.1f} | "
            f"{_number(r['projected']['ttft_ms'])} | {r['train_minutes']:.1f} |"
        )
    notes = [
        "",
        f"Budget `{records[0]['budget']}` for every variant; evaluation on {records[0]['eval']['num_scenes']} held-out test scenes. "
        f"Host timings: ExecuTorch 8da4w in its runtime, {HOST_THREADS} thread, median of 15 after a warm-up, on {records[0]['machine']['cpu']}, "
        + ("measured one variant at a time (`--retime`). " if all(r["host"].get("retimed") for r in records)
           else "measured while other jobs shared the machine (re-measure alone with `--retime`). ")
        + "Training minutes: the stages' wall time summed from their stage.json, with other variants and jobs sharing the 2-core host "
        "(they rank the variants' cost only loosely). "
        f"Projected: roofline model of benchmarks/projection.py for {PROJECTION_DEVICE}, {PROJECTION_RUNTIME}, {PROJECTION_THREADS} threads "
        "(a projection, not a phone measurement). ONNX n/a: the record has no ONNX export (its result.json says why).",
    ]
    for r in records:
        word = r["eval"].get("word_read")
        notes.append(f"- **{r['variant']}**: {r['description']}"
                     + (f" (word read, \"{word['question']}\": {word['accuracy']:.3f} over the {word['count']} test scenes with a word)" if word else ""))
    return "\n".join(rows + notes) + "\n"


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def collect(out: Path, names: list[str]) -> list[dict]:
    records = []
    for name in names:
        path = out / name / "result.json"
        if path.is_file():
            records.append(json.loads(path.read_text()))
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mobilevlm ablate", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="folder for each variant's run, bundles and result.json, and the table")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    parser.add_argument("--budget", default="ablation", choices=sorted(BUDGETS))
    parser.add_argument("--eval-scenes", type=int, default=40, help="held-out test scenes per variant")
    parser.add_argument("--jobs", type=int, default=2, help="variants run at once (one process and one thread each)")
    parser.add_argument("--retime", action="store_true",
                        help="re-measure the host timings of finished variants one after another (run it with nothing else on the machine) and rebuild the table")
    parser.add_argument("--onnx-again", action="store_true",
                        help="export ONNX int4 again for finished variants whose record has none (e.g. after the exporter learned their family) and rebuild the table")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run a single variant in this process


def run(args: argparse.Namespace) -> int:
    names = [n for n in args.variants.split(",") if n]
    for name in names:
        if name not in VARIANTS:
            raise ConfigError(f"unknown ablation variant {name!r}; expected one of {', '.join(VARIANTS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.one:
        run_variant(args.one, args.out, args.budget, args.eval_scenes)
        return 0
    if args.retime:
        import torch

        torch.set_num_threads(HOST_THREADS)
        for record in collect(args.out, names):
            if record["variant"] == "fusion":
                record["host"] = fusion_host_timings(args.out / "fusion" / "bundle-executorch")
                record["host"].pop("description_tokens")
            else:
                record["host"] = host_timings(args.out / record["variant"] / "bundle-executorch", "executorch-8da4w")
            record["host"]["retimed"] = "sequentially, one variant at a time (mobilevlm ablate --retime)"
            if record["variant"] != "fusion":
                record["train_minutes"] = train_minutes(args.out / record["variant"] / "run")
            (args.out / record["variant"] / "result.json").write_text(json.dumps(record, indent=1))
            print(f"{record['variant']}: encode {record['host']['image_encode_ms']} ms, TTFT {record['host']['ttft_ms']} ms", flush=True)
    if args.onnx_again:
        for record in collect(args.out, names):
            if record["variant"] == "fusion" or "size_bytes" in record["onnx"]:
                continue
            with scene_config_scope(VARIANTS[record["variant"]].scene_config()):  # the parity cases' scenes
                record["onnx"] = onnx_record(args.out / record["variant"], args.out / record["variant"] / "run" / "model")
            (args.out / record["variant"] / "result.json").write_text(json.dumps(record, indent=1))
            print(f"{record['variant']}: onnx {record['onnx']}", flush=True)
    pending = [] if args.retime or args.onnx_again else [n for n in names if not (args.out / n / "result.json").is_file()]
    running: list[tuple[str, subprocess.Popen]] = []
    failed = []
    env = dict(os.environ, OMP_NUM_THREADS=str(HOST_THREADS))
    while pending or running:
        while pending and len(running) < max(1, args.jobs):
            name = pending.pop(0)
            (args.out / name).mkdir(exist_ok=True)
            log = open(args.out / name / "log.txt", "a")
            command = [sys.executable, "-m", "mobilevlm.benchmarks.ablate", "--one", name, "--out", str(args.out), "--budget", args.budget,
                       "--eval-scenes", str(args.eval_scenes)]
            print(f"{name}: started (log {args.out / name / 'log.txt'})", flush=True)
            running.append((name, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)))
        time.sleep(2)
        for name, proc in list(running):
            if proc.poll() is not None:
                running.remove((name, proc))
                (failed.append(name) if proc.returncode else None)
                print(f"{name}: {'failed, see its log.txt' if proc.returncode else 'done'}", flush=True)
    records = collect(args.out, names)
    if records:
        (args.out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        (args.out / "ablation.md").write_text(table(records))
        print(table(records))
    if failed:
        raise MobileVLMError(f"ablation variant(s) failed: {', '.join(failed)} (see OUT/VARIANT/log.txt)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
