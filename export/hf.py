"""`--backend hf`: our weights as Hugging Face folders, so the HF ecosystem takes them unchanged
(optimum's exporters, ONNX Runtime GenAI's model builder, llama.cpp's converter, `transformers`).

    model-<recipe>/config.json              LlamaForCausalLM config + MobileVLM's published mm_* fields
    model-<recipe>/model.safetensors        the decoder only, Llama key names (model.layers.*, lm_head)
    model-<recipe>/mm_projector.safetensors the projector in MobileVLM's published key layout
    model-<recipe>/tokenizer.json, tokenizer_config.json, special_tokens_map.json, generation_config.json
    model-<recipe>/vision_tower/            a CLIPVisionModel folder (config, weights, preprocessor_config)

Why this shape: `LlamaForCausalLM.from_pretrained(folder)` reads config.json + model.safetensors and
sees a plain Llama (the projector lives in its own file, so no unexpected keys); MobileVLM's own code
and `mobilevlm.load_model` read the same folder as a published MobileVLM checkpoint (`mm_projector_type`,
`mm_vision_tower` naming the CLIP folder beside it, every *.safetensors of the folder). What the
published layout cannot say (LDPv2 pool sizes other than 12, our prompt template, a non-CLIP mean / std)
is kept verbatim under config.json's `mobilevlm` key.

Recipes: `fp32` | `fp16` | `bf16`, the dtype the weights are written in (no quantization: downstream
tools quantize with their own recipes).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mobilevlm.checkpoint import _LDP_BLOCK  # the published LDP block names, inverted here
from mobilevlm.errors import ExportError
from mobilevlm.fileio import disk_bytes
from mobilevlm.model import MobileVLM
from mobilevlm.processing import Processor

from .pipeline import ExportReport

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
PUBLISHED_TYPE = {"mlp2x_gelu": "mlp2x_gelu", "ldp": "ldpnet", "ldpv2": "ldpnetv2"}
VISION_FOLDER = "vision_tower"


@dataclass(frozen=True)
class HFRecipe:
    name: str
    dtype: torch.dtype

    def describe(self) -> dict:
        return {"recipe": self.name, "weights": self.name, "format": "Hugging Face folders (LlamaForCausalLM + CLIPVisionModel + published mm_projector)"}


def parse_recipe(name: str) -> HFRecipe:
    if name not in DTYPES:
        raise ExportError(f"unknown recipe {name!r} for the hf backend; expected one of {', '.join(DTYPES)} (the dtype of the written weights)")
    return HFRecipe(name, DTYPES[name])


def llama_weights(model: MobileVLM) -> dict[str, torch.Tensor]:
    """text.* -> Llama names; a tied output head is not written (transformers re-ties it)."""
    out = {}
    for key, tensor in model.text.state_dict().items():
        if key == "lm_head.weight":
            if not model.config.text.tie_word_embeddings:
                out["lm_head.weight"] = tensor
        else:
            out["model." + key] = tensor
    return out


def projector_weights(model: MobileVLM) -> dict[str, torch.Tensor]:
    """projector.* -> MobileVLM's published `model.mm_projector.*` names for its projector type."""
    names = published_projector_names(model.projector, model.config.projector.type)
    return {names[k]: v for k, v in model.projector.state_dict().items()}


def published_projector_names(projector: torch.nn.Module, kind: str) -> dict[str, str]:
    """Our projector's state-dict keys -> the published names (the inverse of the importer's map)."""
    prefix = "model.mm_projector."
    block_names = {ours: theirs for theirs, ours in _LDP_BLOCK.items()}
    out = {}
    for key in projector.state_dict():
        parts = key.split(".")
        if parts[0] == "mlp":  # mlp.{0,2}.{weight,bias}
            index, leaf = int(parts[1]), parts[2]
            name = {"mlp2x_gelu": f"{index}.{leaf}", "ldp": f"model.mlp.{index + 1}.{leaf}", "ldpv2": f"mlp.mlp.{index}.{leaf}"}[kind]
        elif kind == "ldp":  # blocks.{k}.{dw_conv|dw_norm|se.fc1|se.fc2|pw_conv|pw_norm}.{weight,bias}
            name = f"model.mb_block.{int(parts[1]) + 1}.{block_names['.'.join(parts[2:-1])]}.{parts[-1]}"
        elif kind == "ldpv2" and parts[0] == "peg":
            name = f"peg.peg.0.{parts[1]}"
        else:
            raise ExportError(f"projector tensor {key!r} of type {kind!r} has no published name")
        out[key] = prefix + name
    return out


def clip_weights(model: MobileVLM) -> dict[str, torch.Tensor]:
    """vision.* -> CLIPVisionModel names (`vision_model.`, `encoder.layers.`, its `pre_layrnorm` spelling)."""
    out = {}
    for key, tensor in model.vision.state_dict().items():
        key = key.replace("pre_layernorm", "pre_layrnorm")
        out["vision_model." + (("encoder." + key) if key.startswith("layers.") else key)] = tensor
    return out


def llama_config(model: MobileVLM, processor: Processor, dtype: str) -> dict:
    from transformers import LlamaConfig

    t, v = model.config.text, model.config.vision
    tok = processor.tokenizer
    config = LlamaConfig(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size, num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads, head_dim=t.head_dim, max_position_embeddings=t.max_seq_len,
        rms_norm_eps=t.rms_norm_eps, rope_theta=t.rope_theta, tie_word_embeddings=t.tie_word_embeddings, hidden_act="silu",
        bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, architectures=["LlamaForCausalLM"],
    ).to_dict()
    config.update({
        "dtype": dtype, "torch_dtype": dtype,
        "rope_theta": t.rope_theta,  # transformers 4 / llama.cpp read this key; 5 reads rope_parameters
        # MobileVLM's published fields (read by MobileVLM's code and mobilevlm.load_model)
        "mm_projector_type": PUBLISHED_TYPE[model.config.projector.type],
        "mm_hidden_size": v.hidden_size,
        "mm_vision_tower": VISION_FOLDER,
        "mm_vision_select_layer": v.select_layer,
        "mm_vision_select_feature": v.select_feature,
        "image_aspect_ratio": model.config.image_aspect_ratio,
        "mobilevlm": {"format": "mobilevlm", "format_version": 1, "model": model.config.to_dict()},
    })
    return config


def clip_config(model: MobileVLM, dtype: str) -> tuple[dict, dict]:
    from transformers import CLIPVisionConfig

    v = model.config.vision
    config = CLIPVisionConfig(
        hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads,
        image_size=v.image_size, patch_size=v.patch_size, hidden_act=v.hidden_act, layer_norm_eps=v.layer_norm_eps, architectures=["CLIPVisionModel"],
    ).to_dict()
    config.update(dtype=dtype, torch_dtype=dtype)
    preprocessor = {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": v.image_size},
                    "do_center_crop": True, "crop_size": {"height": v.image_size, "width": v.image_size}, "do_rescale": True,
                    "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(v.image_mean), "image_std": list(v.image_std),
                    "do_convert_rgb": True, "resample": 3}
    return config, preprocessor


def write_tokenizer_files(folder: Path, processor: Processor, context: int) -> None:
    tok = processor.tokenizer
    shutil.copyfile(tok.path, folder / "tokenizer.json")
    special = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    config = {**special, "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": context, "add_bos_token": processor.template.add_bos,
              "add_eos_token": False, "clean_up_tokenization_spaces": False}
    _write_json(folder / "tokenizer_config.json", config)
    _write_json(folder / "special_tokens_map.json", special)
    _write_json(folder / "generation_config.json", {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id, "do_sample": False})


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _save(weights: dict[str, torch.Tensor], path: Path, dtype: torch.dtype) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().to(dtype).contiguous() for k, v in weights.items()}, str(path), metadata={"format": "pt"})


def export_hf(model: MobileVLM, processor: Processor, recipe: HFRecipe, path: Path, context_length: int | None = None) -> ExportReport:
    try:
        import transformers
    except ImportError:
        raise ExportError("the hf backend needs transformers (pip install 'transformers>=4.45')") from None
    started = time.time()
    path = Path(path)
    context = context_length or model.config.text.max_seq_len
    if not model.config.num_image_tokens + 2 <= context <= model.config.text.max_seq_len:
        raise ExportError(f"context length {context} must hold the {model.config.num_image_tokens} image tokens plus text, and be at most the model's {model.config.text.max_seq_len}")
    (path / VISION_FOLDER).mkdir(parents=True)
    _write_json(path / "config.json", llama_config(model, processor, DTYPE_NAMES[recipe.name]))
    _save(llama_weights(model), path / "model.safetensors", recipe.dtype)
    _save(projector_weights(model), path / "mm_projector.safetensors", recipe.dtype)
    write_tokenizer_files(path, processor, context)
    vision_config, preprocessor = clip_config(model, DTYPE_NAMES[recipe.name])
    _write_json(path / VISION_FOLDER / "config.json", vision_config)
    _write_json(path / VISION_FOLDER / "preprocessor_config.json", preprocessor)
    _save(clip_weights(model), path / VISION_FOLDER / "model.safetensors", recipe.dtype)
    size = disk_bytes(path)
    metadata = {"context_length": context, "transformers": transformers.__version__, "language_model": ".", "vision_tower": VISION_FOLDER,
                "projector": "mm_projector.safetensors", "loads_with": ["transformers.LlamaForCausalLM", "transformers.CLIPVisionModel", "mobilevlm.load_model"]}
    methods = {
        "language_model": {"class": "LlamaForCausalLM", "files": ["config.json", "model.safetensors"]},
        "vision_tower": {"class": "CLIPVisionModel", "files": [f"{VISION_FOLDER}/config.json", f"{VISION_FOLDER}/model.safetensors"],
                         "feature": f"hidden_states[{model.config.vision.select_layer}], {model.config.vision.select_feature} tokens"},
        "projector": {"type": PUBLISHED_TYPE[model.config.projector.type], "files": ["mm_projector.safetensors"], "layout": "MobileVLM published (model.mm_projector.*)"},
    }
    return ExportReport(path, time.time() - started, size, methods, metadata)


class HFSession:
    """The folder run by `transformers`, driven from the manifest as an app would: CLIPVisionModel for
    the vision tower (its `hidden_states[select_layer]`), LlamaForCausalLM with its own KV cache for the
    decoder. transformers has no class for MobileVLM's projectors, so the projector is `mobilevlm.projector`
    loaded from mm_projector.safetensors through the published names - the one part of the parity path
    that is ours."""

    runtime = "transformers"

    def __init__(self, root: Path, artifact: dict, manifest: dict):
        from safetensors.torch import load_file
        from transformers import CLIPVisionModel, LlamaForCausalLM
        from transformers.utils import logging as hf_logging

        from mobilevlm.config import MobileVLMConfig
        from mobilevlm.projector import build_projector

        from .onnx_session import PromptedSession

        self.prompted = PromptedSession(root, artifact, manifest)
        folder = self.prompted.folder
        self.config = MobileVLMConfig.from_dict(manifest["model"]["config"], "manifest.json: model.config")
        hf_logging.disable_progress_bar()  # one bar per from_pretrained would bury the export's own lines
        self.llm = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        self.clip = CLIPVisionModel.from_pretrained(folder / VISION_FOLDER, dtype=torch.float32).eval()
        self.projector = build_projector(self.config)
        names = published_projector_names(self.projector, self.config.projector.type)
        published = load_file(str(folder / "mm_projector.safetensors"))
        self.projector.load_state_dict({ours: published[theirs].float() for ours, theirs in names.items()})
        self.projector.eval()

    @torch.inference_mode()
    def _prefill(self, image, prompt: str):
        p = self.prompted
        before, after = p.prompt_parts(prompt)
        pixels = p.image_processor.preprocess(image)
        states = self.clip(pixel_values=pixels, output_hidden_states=True).hidden_states[self.config.vision.select_layer]
        features = self.projector(states[:, 1:] if self.config.vision.select_feature == "patch" else states)
        embed = self.llm.get_input_embeddings()
        embeds = torch.cat([embed(torch.tensor([before])), features, embed(torch.tensor([after]))], dim=1)
        out = self.llm(inputs_embeds=embeds, use_cache=True)
        return out.logits[0, -1], out.past_key_values, embeds.shape[1]

    @torch.inference_mode()
    def _step(self, token: int, cache):
        out = self.llm(input_ids=torch.tensor([[token]]), past_key_values=cache, use_cache=True)
        return out.logits[0, -1], out.past_key_values

    def answer(self, image, prompt: str, max_new_tokens: int) -> str:
        logits, cache, prompt_len = self._prefill(image, prompt)
        budget, tokens = self.prompted.budget(prompt_len, max_new_tokens), []
        for step in range(budget):
            token = int(logits.argmax())
            if token in self.prompted.eos_ids:
                break
            tokens.append(token)
            if step + 1 < budget:
                logits, cache = self._step(token, cache)
        return self.prompted.finish(tokens)

    def forced_logits(self, image, prompt: str, tokens: list[int]) -> list[torch.Tensor]:
        logits, cache, _ = self._prefill(image, prompt)
        out = [logits.clone()]
        for token in tokens:
            logits, cache = self._step(token, cache)
            out.append(logits.clone())
        return out


def backend():
    from .pipeline import Backend

    return Backend("hf", "", parse_recipe, export_hf, HFSession, "transformers: LlamaForCausalLM (decoder) + CLIPVisionModel (vision); projector from mm_projector.safetensors", unsupported=("vision", "projector", "resolution", "interface", "decoder"))
