"""The training driver: stages in order, each resumable, on one process or several (torchrun, gloo).

Run folder layout (everything written atomically):

    OUT/recipe.json            the recipe this run follows (a resumed run must use the same one)
    OUT/tokenizer.json         trained once, before the first stage
    OUT/stages/NN-name/        the model after stage NN (our checkpoint format) + stage.json
    OUT/stages/NN-name.partial/  the latest mid-stage state: model, optimizer, step (resume point)
    OUT/model/                 the final model (= the last stage's)
    OUT/train_log.jsonl        one line per logged step

Batches are pure functions of (stage, step, rank), so a resumed run continues exactly where the
interrupted one stopped. Gradients of several processes are averaged with one all-reduce of a flat
buffer per step (robust to parameters that receive no gradient in a step).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from ..checkpoint import load_model, save_pretrained
from ..config import MobileVLMConfig, get_preset
from ..errors import ConfigError, MobileVLMError
from ..fileio import atomic_folder, write_json
from ..model import MobileVLM
from ..processing import Processor, Tokenizer, get_template
from . import batches as B
from .losses import ContrastiveModel, dpo_loss, sequence_logprobs
from .recipe import Recipe, StageConfig


@dataclass
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def init_distributed() -> Dist:
    """Join the process group when started by torchrun (WORLD_SIZE > 1); gloo runs on CPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    return Dist(int(os.environ.get("RANK", "0")), world)


def build_config(recipe: Recipe, vocab_size: int) -> MobileVLMConfig:
    """The preset, with the recipe's overrides and the tokenizer's vocabulary size."""
    data = get_preset(recipe.preset).to_dict()
    for part, changes in recipe.model_overrides.items():
        if part not in data:
            raise ConfigError(f"recipe {recipe.name}: model_overrides has unknown part {part!r}")
        if isinstance(data[part], dict) and isinstance(changes, dict):
            data[part].update(changes)  # a component: override some of its fields
        else:
            data[part] = changes  # a top-level field (resolution, anyres_grids, high_res_vision)
    # exactly the tokenizer's size: runtimes sample over the tokenizer's vocabulary only, so logits
    # of padding ids would make the reference and the artifacts disagree
    data["text"]["vocab_size"] = vocab_size
    return MobileVLMConfig.from_dict(data, f"recipe {recipe.name}")


def lr_at(stage: StageConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < stage.warmup:
        return stage.lr * (step + 1) / stage.warmup
    progress = (step - stage.warmup) / max(1, stage.steps - stage.warmup)
    return stage.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def set_trainable(model: MobileVLM, parts: tuple[str, ...]) -> None:
    for name, module in (("vision", model.vision), ("projector", model.projector), ("text", model.text)):
        module.requires_grad_(name in parts)
    if "projector" in parts:
        # A feature-level interface's weights live in the decoder's layers but belong to the image
        # path: Flamingo trains its cross-attention blocks, CogVLM its visual expert, with the language
        # model frozen. Without this, zero-initialised gates would leave the projector no gradient.
        for layer in model.text.layers:
            for module in (getattr(layer, "cross_attn", None), getattr(layer, "image_expert", None)):
                if module is not None:
                    module.requires_grad_(True)


def make_optimizer(params: list[torch.nn.Parameter], stage: StageConfig) -> torch.optim.Optimizer:
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": stage.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=stage.lr, betas=(0.9, 0.98), eps=1e-8)


def average_gradients(params: list[torch.nn.Parameter], world: int) -> None:
    if world == 1:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


class Trainer:
    def __init__(self, out: Path, recipe: Recipe, resume: bool = False, force: bool = False, log_every: int = 10, save_every: int = 100, progress: bool = True):
        self.out = Path(out)
        self.recipe = recipe
        self.dist = init_distributed()
        self.log_every = log_every
        self.save_every = save_every
        self.progress = progress and self.dist.main
        self._prepare_run_folder(resume, force)
        self.processor = self._tokenizer_and_processor()
        self.config = self.processor_config
        torch.manual_seed(recipe.seed)
        self.model = MobileVLM(self.config)
        self.pool = B.ScenePool(self.processor, recipe.scene_pool)

    # --- run folder -----------------------------------------------------------------------------

    def _prepare_run_folder(self, resume: bool, force: bool) -> None:
        recipe_file = self.out / "recipe.json"
        if self.dist.main:
            if self.out.exists() and any(self.out.iterdir()) and not resume:
                if not force:
                    raise MobileVLMError(f"{self.out}: run folder exists; pass --resume to continue it or --force to start over")
                shutil.rmtree(self.out)
            if recipe_file.exists():
                previous = json.loads(recipe_file.read_text())
                if previous != json.loads(json.dumps(self.recipe.to_dict())):
                    raise MobileVLMError(f"{recipe_file}: this run followed a different recipe ({previous.get('name')}); resume it with the same recipe and stages")
            self.out.mkdir(parents=True, exist_ok=True)
            write_json(recipe_file, self.recipe.to_dict())
        self.dist.barrier()

    def _tokenizer_and_processor(self) -> Processor:
        from ..data.tokenizer import build_tokenizer

        path = self.out / "tokenizer.json"
        preset = get_preset(self.recipe.preset)
        if self.dist.main and not path.exists():
            tmp = self.out / ".tokenizer.json.tmp"
            build_tokenizer(get_template(preset.prompt_template).text, self.recipe.tokenizer_vocab).save(str(tmp))
            os.replace(tmp, path)
        self.dist.barrier()
        tokenizer = Tokenizer(path)
        self.processor_config = build_config(self.recipe, tokenizer.vocab_size)
        return Processor.from_config(self.processor_config, tokenizer)

    def stage_dir(self, index: int, stage: StageConfig) -> Path:
        return self.out / "stages" / f"{index:02d}-{stage.name}"

    # --- running --------------------------------------------------------------------------------

    def run(self) -> Path:
        for index, stage in enumerate(self.recipe.stages, start=1):
            final = self.stage_dir(index, stage)
            if (final / "stage.json").exists():
                self.model = load_model(final / "model")
                if self.progress:
                    print(f"stage {index} {stage.name}: already complete, loaded {final}")
                continue
            self.run_stage(index, stage)
        final_model = self.out / "model"
        if self.dist.main:
            save_pretrained(self.model, final_model, tokenizer=self.out / "tokenizer.json", overwrite=True)
        self.dist.barrier()
        return final_model

    def run_stage(self, index: int, stage: StageConfig) -> None:
        model = self.model.train()
        aux = None
        if stage.name == "vision":
            aux = ContrastiveModel(model, self.config.text.vocab_size)
            model.requires_grad_(False)
            aux.requires_grad_(True)  # the vision encoder, the text tower and the projections
            params = list(aux.parameters())
        else:
            set_trainable(model, stage.trainable)
            params = [p for p in model.parameters() if p.requires_grad]
        optimizer = make_optimizer(params, stage)
        start = self._load_partial(index, stage, aux, optimizer)
        if stage.name == "align" and start == 0 and self.config.interface == "visual_expert":
            # CogVLM: the visual expert starts from the language model as trained so far
            model.text.copy_text_weights_to_image_experts()
        reference = self._dpo_reference(index, stage) if stage.name == "dpo" else None
        started, samples, ema = time.time(), 0, None
        bar = tqdm(total=stage.steps, initial=start, desc=f"{index}/{len(self.recipe.stages)} {stage.name}", disable=not self.progress, dynamic_ncols=True)
        for step in range(start, stage.steps):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(stage, step)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.recipe.bf16), _attention_kernel(self.recipe.bf16):
                loss, metrics = self._loss(stage, step, aux, reference)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            average_gradients(params, self.dist.world)
            torch.nn.utils.clip_grad_norm_(params, stage.grad_clip)
            optimizer.step()
            samples += stage.batch_size * self.dist.world
            value = loss.item()
            ema = value if ema is None else 0.9 * ema + 0.1 * value
            rate = samples / (time.time() - started)
            bar.set_postfix(loss=f"{ema:.3f}", samples_s=f"{rate:.1f}", **{k: f"{v:.3f}" for k, v in metrics.items()})
            bar.update(1)
            if self.dist.main and (step % self.log_every == 0 or step == stage.steps - 1):
                self._log({"stage": stage.name, "step": step, "loss": value, "loss_ema": ema, "lr": lr_at(stage, step), "samples_per_s": rate, **metrics})
            if (step + 1) % self.save_every == 0 and step + 1 < stage.steps:
                self._save_partial(index, stage, aux, optimizer, step + 1)
        bar.close()
        model.eval()
        if self.dist.main:
            with atomic_folder(self.stage_dir(index, stage), overwrite=True) as tmp:
                save_pretrained(model, tmp / "model", tokenizer=self.out / "tokenizer.json")
                # stage.json last: its presence marks the stage complete
                write_json(tmp / "stage.json", {"stage": stage.name, "steps": stage.steps, "final_loss_ema": ema, "seconds": time.time() - started, "world_size": self.dist.world})
            shutil.rmtree(self._partial_dir(index, stage), ignore_errors=True)
            shutil.rmtree(self._reference_dir(index, stage), ignore_errors=True)
        self.dist.barrier()

    def _reference_dir(self, index: int, stage: StageConfig) -> Path:
        return self.out / "stages" / f"{index:02d}-{stage.name}.reference"

    def _dpo_reference(self, index: int, stage: StageConfig) -> MobileVLM:
        """The frozen model DPO measures against: the model as the stage started, kept on disk so a
        resumed stage compares with the same reference."""
        folder = self._reference_dir(index, stage)
        if self.dist.main and not (folder / "config.json").exists():
            save_pretrained(self.model, folder, overwrite=True)
        self.dist.barrier()
        return load_model(folder).requires_grad_(False)

    def _loss(self, stage: StageConfig, step: int, aux, reference) -> tuple[torch.Tensor, dict[str, float]]:
        rng = B.step_rng(stage.name, step, self.dist.rank, self.recipe.seed)
        indices = B.sample_indices(step, self.dist.rank, self.dist.world, stage.batch_size)
        max_len = self.config.text.max_seq_len - self.config.num_image_tokens
        if stage.name == "vision":
            pixels, captions, negatives = B.vision_batch(self.pool, self.processor, indices, rng)
            generator = torch.Generator().manual_seed(hash((self.recipe.seed, step, self.dist.rank)) % (2**31))
            return aux(pixels, captions, negatives, stage.mask_ratio, generator), {}
        if stage.name == "text":
            batch = B.text_batch(self.processor, indices, stage.seq_len)
            logits = self.model.text(self.model.embed(batch.token_ids))
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch.labels[:, 1:].flatten(), ignore_index=-100)
            return loss, {}
        if stage.name in ("align", "instruct"):
            build = B.align_batch if stage.name == "align" else B.instruct_batch
            batch = build(self.pool, self.processor, indices, rng, max_len)
            return self.model(batch.token_ids, batch.pixel_values, batch.labels), {}
        chosen, rejected = B.dpo_batch(self.pool, self.processor, indices, rng, max_len)
        policy_c = sequence_logprobs(self.model, chosen.token_ids, chosen.pixel_values, chosen.labels)
        policy_r = sequence_logprobs(self.model, rejected.token_ids, rejected.pixel_values, rejected.labels)
        with torch.no_grad():
            ref_c = sequence_logprobs(reference, chosen.token_ids, chosen.pixel_values, chosen.labels)
            ref_r = sequence_logprobs(reference, rejected.token_ids, rejected.pixel_values, rejected.labels)
        loss, accuracy = dpo_loss(policy_c, policy_r, ref_c, ref_r, stage.beta)
        tokens = (chosen.labels != -100).sum().clamp(min=1)
        sft = -policy_c.sum() / tokens
        return loss + stage.sft_weight * sft, {"pref_acc": float(accuracy)}

    # --- partial checkpoints --------------------------------------------------------------------

    def _partial_dir(self, index: int, stage: StageConfig) -> Path:
        return self.out / "stages" / f"{index:02d}-{stage.name}.partial"

    def _save_partial(self, index: int, stage: StageConfig, aux, optimizer, step: int) -> None:
        if self.dist.main:
            with atomic_folder(self._partial_dir(index, stage), overwrite=True) as tmp:
                save_pretrained(self.model, tmp / "model", tokenizer=self.out / "tokenizer.json")
                state = {"step": step, "optimizer": optimizer.state_dict()}
                if aux is not None:
                    state["aux"] = {k: v for k, v in aux.state_dict().items() if not k.startswith("vision.")}
                torch.save(state, tmp / "trainer_state.pt")
        self.dist.barrier()

    def _load_partial(self, index: int, stage: StageConfig, aux, optimizer) -> int:
        partial = self._partial_dir(index, stage)
        if not (partial / "trainer_state.pt").exists():
            return 0
        state = torch.load(partial / "trainer_state.pt", weights_only=True)
        loaded = load_model(partial / "model")
        self.model.load_state_dict(loaded.state_dict())
        if aux is not None:
            aux.load_state_dict({**{f"vision.{k}": v for k, v in self.model.vision.state_dict().items()}, **state["aux"]})
        optimizer.load_state_dict(state["optimizer"])
        if self.progress:
            print(f"stage {index} {stage.name}: resuming at step {state['step']} from {partial}")
        return int(state["step"])

    def _log(self, record: dict) -> None:
        with open(self.out / "train_log.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")


def _attention_kernel(bf16: bool):
    """In bf16 the plain (math) attention trains ~15% faster on CPU than the fused flash kernel,
    whose backward dominated the profile of an instruct step (measured on the tiny preset, 1 thread)."""
    from contextlib import nullcontext

    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH]) if bf16 else nullcontext()


def evaluate_run(out: Path, num: int, seed: int | None = None, log=print) -> dict:
    """Evaluate the model after each image-conditioned stage of a run on held-out test scenes and
    write OUT/eval.json; shows what each stage (alignment tuning in particular) changed."""
    from ..evaluate import ReferenceAnswerer, evaluate, summary_lines
    from ..processing import Processor

    results = {}
    for folder in sorted((Path(out) / "stages").glob("[0-9][0-9]-*")):
        if folder.name.split("-", 1)[1] not in ("instruct", "dpo") or not (folder / "stage.json").exists():
            continue
        model = load_model(folder / "model")
        processor = Processor.from_config(model.config, Tokenizer(folder / "model" / "tokenizer.json"))
        results[folder.name] = evaluate(ReferenceAnswerer(model, processor), seed, num, progress=False)
        log(f"{folder.name}:")
        for line in summary_lines(results[folder.name]):
            log("  " + line)
    write_json(Path(out) / "eval.json", results)
    return results
