"""The text-only side of expert-model fusion: a MobileVLM decoder that reads the expert's description.

The prompt is the checkpoint's own template with the image placeholder replaced by the description
("USER: {description}\\n{question} ASSISTANT:" for the `tiny` template), tokenized as one string. Only
the decoder (`model.text`) is fine-tuned, on ground-truth descriptions (`describe(make_scene(seed))`)
of train-split scenes, with the loss on answer tokens only; at inference the description comes from
the expert. The vision encoder and projector stay in the checkpoint untouched and unused, so the
fine-tuned decoder is still a normal checkpoint folder (`save_pretrained`) that every tool loads.

    OUT/expert/     the scene expert (expert.py: config.json + expert.safetensors)
    OUT/decoder/    the fine-tuned MobileVLM checkpoint (config.json, model.safetensors, tokenizer.json)
    OUT/fusion.json what was trained, how long it took, the expert's test accuracy
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from ..checkpoint import load_model, load_processor, save_pretrained
from ..data import make_scene
from ..data.splits import SPLITS
from ..fileio import atomic_folder
from ..generate import GenerationResult, SamplingConfig, iter_tokens
from ..model import IGNORE_INDEX, MobileVLM
from ..processing import ImageSource, Processor, check_prompt, load_image
from ..train.batches import Batch, collate, instruct_turns
from .expert import ExpertConfig, SceneExpert, describe, load_expert, lr_at, train_expert

FORMAT = "mobilevlm-fusion-run"
DESCRIPTION_SLOT = "{description}"


def fusion_prompt_text(processor: Processor, description: str, question: str) -> str:
    """The template's turn with the description where the image would go and the question filled in."""
    before, after = processor.template.split(check_prompt(question))
    return before + description + after


def fusion_prompt_ids(processor: Processor, description: str, question: str) -> list[int]:
    """Token ids of the whole first turn (BOS first if the template says so), tokenized as one string
    (an app does the same with the manifest's `prompt.text`)."""
    return processor.tokenizer.encode(fusion_prompt_text(processor, description, question), add_bos=processor.template.add_bos)


def encode_fusion_conversation(processor: Processor, description: str, turns: list[tuple[str, str]], max_len: int) -> tuple[list[int], list[int]]:
    """Ids and labels of a conversation about a described image: the first turn carries the description,
    later turns use the template's `followup`; only answers and their EOS carry labels. Later turns that
    would pass `max_len` are dropped; a first turn longer than `max_len` is cut there."""
    tok = processor.tokenizer
    ids: list[int] = []
    labels: list[int] = []
    for i, (question, answer) in enumerate(turns):
        prompt = fusion_prompt_ids(processor, description, question) if i == 0 else tok.encode(processor.template.followup.replace("{prompt}", question))
        reply = tok.encode(" " + answer) + [tok.eos_id]
        if i > 0 and len(ids) + len(prompt) + len(reply) > max_len:
            break
        ids += prompt + reply
        labels += [IGNORE_INDEX] * len(prompt) + reply
    return ids[:max_len], labels[:max_len]


def fusion_batch(processor: Processor, seeds: list[int], rng: random.Random, max_len: int) -> Batch:
    """One multi-turn conversation per scene (every instruction question, a POPE probe, sometimes a
    caption, shuffled: the VLM's instruction mix), with the ground-truth description as the image."""
    rows = []
    for seed in seeds:
        scene = make_scene(seed)
        rows.append(encode_fusion_conversation(processor, describe(scene), instruct_turns(scene, rng), max_len))
    return collate(rows, processor.tokenizer.pad_id or 0)


def finetune_decoder(
    model: MobileVLM,
    processor: Processor,
    steps: int,
    batch_size: int = 8,
    seed: int = 0,
    lr: float = 1.5e-3,
    max_len: int | None = None,
    offset: int = 0,
    log: Callable[[str], None] = print,
) -> list[float]:
    """Fine-tune `model.text` in place (everything else frozen) on described train-split scenes from
    `offset`, one fresh scene per row; returns each step's loss. The model is left in eval mode."""
    max_len = min(max_len or model.config.text.max_seq_len, model.config.text.max_seq_len)
    model.text.remove_cache()
    for p in model.parameters():
        p.requires_grad_(False)
    params = list(model.text.parameters())
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    torch.manual_seed(seed)
    model.train()
    losses: list[float] = []
    started = time.time()
    try:
        for step in range(steps):
            first = offset + step * batch_size
            seeds = [SPLITS["train"][first + j] for j in range(batch_size)]
            batch = fusion_batch(processor, seeds, random.Random(f"{seed}:fusion:{step}"), max_len)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, steps, lr, max(1, steps // 10))
            loss = model(batch.token_ids, labels=batch.labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            losses.append(float(loss.detach()))
            if step % 10 == 0 or step == steps - 1:
                log(f"decoder step {step + 1}/{steps}: loss {losses[-1]:.3f}, {time.time() - started:.0f} s")
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
        model.eval()
    return losses


@dataclass
class FusionAnswerer:
    """Expert -> description -> greedy decoding of the text-only prompt; an `evaluate` answerer."""

    expert: SceneExpert
    model: MobileVLM
    processor: Processor
    image_processor: object = field(init=False)

    def __post_init__(self) -> None:
        self.expert.eval()
        self.model.eval()
        self.image_processor = self.expert.config.image_processor()

    def describe_image(self, image: ImageSource | Image.Image) -> str:
        pixels = self.image_processor.preprocess(load_image(image))
        return describe(self.expert.predict_scene(pixels)[0])

    def prompt_ids(self, image: ImageSource | Image.Image, prompt: str) -> list[int]:
        return fusion_prompt_ids(self.processor, self.describe_image(image), prompt)

    def generate(self, image: ImageSource | Image.Image, prompt: str, max_new_tokens: int) -> GenerationResult:
        """Ids, text and first-token logits of the greedy answer (parity compares all three)."""
        ids = self.prompt_ids(image, prompt)
        state: dict = {}
        with torch.inference_mode():
            embeds = self.model.embed(torch.tensor([ids]))
        eos = self.processor.tokenizer.eos_id
        tokens = list(iter_tokens(self.model, embeds, SamplingConfig(max_new_tokens=max_new_tokens), {eos}, state))
        return GenerationResult(tokens, self.processor.tokenizer.decode(tokens), len(ids), state["first_logits"], state["stopped_by_eos"])

    def answer(self, image: Image.Image, prompt: str, max_new_tokens: int) -> str:
        return self.generate(image, prompt, max_new_tokens).text


def load_fusion(run_dir: str | Path) -> FusionAnswerer:
    """The answerer of a `train_fusion` folder."""
    run_dir = Path(run_dir)
    return FusionAnswerer(load_expert(run_dir / "expert"), load_model(run_dir / "decoder"), load_processor(run_dir / "decoder"))


def train_fusion(
    out: str | Path,
    expert_steps: int,
    decoder_steps: int,
    batch_size: int = 64,
    decoder_batch_size: int = 8,
    seed: int = 0,
    model_dir: str | Path | None = None,
    expert_config: ExpertConfig | None = None,
    expert_lr: float = 2e-3,
    decoder_lr: float = 1.5e-3,
    pool_size: int = 3072,
    eval_scenes: int = 200,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Train the expert (sized for the checkpoint's processor unless `expert_config` is given) and
    fine-tune the checkpoint's decoder (default: the shipped reference model); write OUT atomically."""
    if model_dir is None:
        from ..export.pipeline import default_model_dir

        model_dir = default_model_dir()
    model, processor = load_model(model_dir), load_processor(model_dir)
    config = expert_config or ExpertConfig.for_processor(processor.image)
    out = Path(out)
    with atomic_folder(out, overwrite=overwrite) as tmp:
        record = train_expert(tmp / "expert", expert_steps, batch_size, seed, config, expert_lr, pool_size, eval_scenes, log=log)
        started, cpu = time.time(), time.process_time()
        losses = finetune_decoder(model, processor, decoder_steps, decoder_batch_size, seed, decoder_lr, log=log)
        save_pretrained(model, tmp / "decoder", tokenizer=processor.tokenizer.path)
        summary = {
            "format": FORMAT,
            "source_model": str(model_dir),
            "expert": record,
            "decoder": {
                "steps": decoder_steps, "batch_size": decoder_batch_size, "lr": decoder_lr, "seed": seed, "trainable": "text",
                "first_loss": losses[0] if losses else None, "final_loss": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
                "seconds": round(time.time() - started, 1), "cpu_seconds": round(time.process_time() - cpu, 1),
            },
        }
        (tmp / "fusion.json").write_text(json.dumps(summary, indent=2) + "\n")
    return out


__all__ = [
    "FusionAnswerer", "encode_fusion_conversation", "finetune_decoder", "fusion_batch", "fusion_prompt_ids",
    "fusion_prompt_text", "load_fusion", "train_fusion",
]
