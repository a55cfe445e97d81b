"""Checkpoint folders: our own format, and imports of published MobileVLM / LLaVA folders.

Our format follows Hugging Face conventions: `config.json` (`{"format": "mobilevlm", "format_version":
1, "model": {...MobileVLMConfig...}}`), `model.safetensors`, `tokenizer.json`. It is written atomically.

Published folders (detected by `mm_projector_type` in config.json) carry LLaMA keys `model.layers.*`,
projector keys `model.mm_projector.*` in the layout of their projector type, and either the CLIP tower
under `model.vision_tower.vision_tower.vision_model.*` or, in MobileVLM V1 / LLaVA, a reference
(`mm_vision_tower`) to a separate Hugging Face CLIP folder, which must be given as a local path.

Loading never unpickles: safetensors only, unless the caller opts in to `.bin` / `.pt` files, which are
then read with `torch.load(weights_only=True)`. Every key and shape is checked; mismatches are listed.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from .config import MobileVLMConfig, ProjectorConfig, TextConfig, VisionConfig
from .errors import CheckpointError, ConfigError, TokenizerError
from .fileio import OutputError, atomic_folder, read_json
from .model import MobileVLM

FORMAT = "mobilevlm"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
TOKENIZER = "tokenizer.json"

# Published projector type names -> ours.
PUBLISHED_PROJECTORS = {"ldpnet": "ldp", "ldp": "ldp", "ldpnetv2": "ldpv2", "ldpv2": "ldpv2", "mlp2x_gelu": "mlp2x_gelu"}
# Keys in published folders that hold no weights of the model (cached buffers, unused towers).
IGNORED_KEYS = re.compile(r"(rotary_emb\.inv_freq|position_ids|^text_model\.|^visual_projection\.|^text_projection\.|^logit_scale)")


# --- our format ----------------------------------------------------------------------------------


def save_pretrained(model: MobileVLM, folder: str | Path, tokenizer: str | Path | None = None, overwrite: bool = False) -> Path:
    """Write config.json, model.safetensors and (if given) a copy of tokenizer.json, atomically."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    folder = Path(folder)
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": model.config.to_dict()}
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.text.tie_word_embeddings:
        state.pop("text.lm_head.weight", None)
    with atomic_folder(folder, overwrite=overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        try:
            save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        except SafetensorError as exc:  # its I/O errors (a full disk) are not OSError
            raise OutputError(f"{folder / WEIGHTS}: writing failed ({exc})") from exc
        if tokenizer is not None:
            shutil.copyfile(Path(getattr(tokenizer, "path", tokenizer)), tmp / TOKENIZER)
    return folder


def read_config_json(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "config.json"
    if not Path(folder).is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint folder")
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (a checkpoint folder needs config.json)")
    data = read_json(path, ConfigError)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


def _gguf_folder(folder: str | Path) -> bool:
    """A folder with a GGUF pair (text model + mmproj) and no config.json: read by gguf_import."""
    if (Path(folder) / "config.json").is_file() or not Path(folder).is_dir():
        return False
    from .gguf_import import find_gguf_pair

    return find_gguf_pair(folder) is not None


def load_config(folder: str | Path, vision_tower: str | Path | None = None) -> MobileVLMConfig:
    """The model config of any supported folder, validated, without reading weights."""
    if _gguf_folder(folder):
        from .gguf_import import load_gguf_config

        return load_gguf_config(folder)
    data = read_config_json(folder)
    source = str(Path(folder) / "config.json")
    if data.get("format") == FORMAT:
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ConfigError(f"{source}: format_version {version!r} is not supported (this toolkit reads {FORMAT_VERSION})")
        return MobileVLMConfig.from_dict(data.get("model"), f"{source}: model")
    if "mm_projector_type" in data:
        return _published_config(Path(folder), data, vision_tower, _safetensors_shapes(Path(folder)))
    raise ConfigError(f"{source}: neither a mobilevlm checkpoint (no 'format' field) nor a MobileVLM / LLaVA folder (no 'mm_projector_type')")


def load_model(folder: str | Path, vision_tower: str | Path | None = None, allow_pickle: bool = False) -> MobileVLM:
    """Load our folder, import a published MobileVLM / LLaVA folder, or read back a GGUF pair
    (dequantized); returns the model in eval mode."""
    folder = Path(folder)
    if _gguf_folder(folder):
        from .gguf_import import load_gguf_model

        return load_gguf_model(folder)
    data = read_config_json(folder)
    if data.get("format") == FORMAT or "mm_projector_type" not in data:
        config = load_config(folder)
        weights = read_weights(folder, allow_pickle)
    else:
        weights = read_weights(folder, allow_pickle)
        config = _published_config(folder, data, vision_tower, {k: list(v.shape) for k, v in weights.items()})
        weights = _map_published_weights(weights, config, folder, data, vision_tower, allow_pickle)
    return build_model(config, weights, str(folder))


def build_model(config: MobileVLMConfig, weights: dict[str, torch.Tensor], source: str) -> MobileVLM:
    """A model holding exactly `weights` (checked). It is built on the meta device and the loaded
    tensors are assigned, not copied, so a checkpoint needs its own size in memory once, not twice."""
    with torch.device("meta"):
        model = MobileVLM(config)
    load_state_dict_checked(model, weights, source, assign=True)
    if config.text.tie_word_embeddings:
        model.text.lm_head.weight = model.text.embed_tokens.weight
    model.text.init_buffers()
    return model.eval()


def load_processor(folder: str | Path, vision_tower: str | Path | None = None):
    """The image processor, prompt template and tokenizer of a checkpoint folder."""
    from .processing import Processor, Tokenizer

    path = Path(folder) / TOKENIZER
    if not path.is_file() and _gguf_folder(folder):
        from .gguf_import import load_gguf_processor

        return load_gguf_processor(folder)
    if not path.is_file():
        hint = " (found tokenizer.model: save it as tokenizer.json with transformers' AutoTokenizer first)" if (Path(folder) / "tokenizer.model").is_file() else ""
        raise TokenizerError(f"{path}: missing{hint}")
    return Processor.from_config(load_config(folder, vision_tower), Tokenizer(path))


# --- weights -------------------------------------------------------------------------------------


def read_weights(folder: str | Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of a folder's weight files (safetensors, single or sharded), as float32."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{index}: not a valid safetensors index ({exc})") from None
        files = [folder / s for s in shards]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = sorted(folder.glob("*.bin")) + sorted(folder.glob("*.pt")) + sorted(folder.glob("*.pth"))
        if pickles and not allow_pickle:
            raise CheckpointError(
                f"{folder}: weights are only in pickle files ({', '.join(p.name for p in pickles)}); pickle can run code, "
                "so they are refused unless you opt in (--allow-pickle / allow_pickle=True), and then read with weights_only"
            )
        if not pickles:
            raise CheckpointError(f"{folder}: no weight files (expected {WEIGHTS})")
        files = pickles
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        for key, tensor in _read_file(file).items():
            if key in weights:
                raise CheckpointError(f"{file}: tensor {key!r} appears in more than one weight file")
            weights[key] = tensor
    return weights


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: weight file missing")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                return {k: _check_tensor(path, k, handle.get_tensor(k)) for k in handle.keys()}
        except CheckpointError:
            raise
        except Exception as exc:  # safetensors raises its own error type for truncated / lying headers
            raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({exc})") from None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot be read as a weights-only torch file ({type(exc).__name__}: {_first_line(exc)})") from None
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"{path}: expected a flat dict of tensors")
    return {k: _check_tensor(path, k, v) for k, v in data.items()}


def _first_line(exc: BaseException) -> str:
    """An exception's first message line (torch raises some with an empty message)."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else "no message"


def _check_tensor(path: Path, key: str, tensor: torch.Tensor) -> torch.Tensor:
    if not tensor.is_floating_point():
        if IGNORED_KEYS.search(key):
            return tensor
        raise CheckpointError(f"{path}: tensor {key!r} has dtype {tensor.dtype}, expected a floating-point dtype")
    tensor = tensor.float()
    if not torch.isfinite(tensor).all():
        raise CheckpointError(f"{path}: tensor {key!r} contains NaN or Inf values, expected finite weights")
    return tensor


def load_state_dict_checked(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: str, assign: bool = False) -> None:
    """Load weights strictly; any missing, unexpected or mis-shaped tensor is listed in the error."""
    expected = model.state_dict()
    tied = getattr(getattr(model, "config", None), "text", None)
    if tied is not None and tied.tie_word_embeddings:
        expected.pop("text.lm_head.weight", None)
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    shapes = [f"{k}: file {tuple(weights[k].shape)} vs model {tuple(expected[k].shape)}" for k in sorted(set(weights) & set(expected)) if weights[k].shape != expected[k].shape]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
        if items:
            shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise CheckpointError(f"{source}: weights do not match the model config; " + "; ".join(problems))
    model.load_state_dict(weights, strict=False, assign=assign)


# --- published MobileVLM / LLaVA folders ---------------------------------------------------------


def _published_config(folder: Path, data: dict[str, Any], vision_tower: str | Path | None, shapes: dict[str, list[int]]) -> MobileVLMConfig:
    source = str(folder / "config.json")

    def field(name: str, default: Any = None, required: bool = True) -> Any:
        if name in data and data[name] is not None:
            return data[name]
        if required and default is None:
            raise ConfigError(f"{source}: missing field '{name}'")
        return default

    kind = field("mm_projector_type")
    if kind not in PUBLISHED_PROJECTORS:
        raise ConfigError(f"{source}: unknown mm_projector_type {kind!r}; expected one of {', '.join(PUBLISHED_PROJECTORS)}")
    heads = field("num_attention_heads")
    eos = field("eos_token_id", 2)
    text = TextConfig(
        vocab_size=field("vocab_size"),
        hidden_size=field("hidden_size"),
        num_layers=field("num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=field("num_key_value_heads", heads),
        intermediate_size=field("intermediate_size"),
        max_seq_len=field("max_position_embeddings"),
        rms_norm_eps=float(field("rms_norm_eps", 1e-6)),
        rope_theta=_rope_theta(data, source),
        tie_word_embeddings=bool(field("tie_word_embeddings", False, required=False)),
        bos_id=field("bos_token_id", 1),
        eos_id=eos[0] if isinstance(eos, list) else eos,
        pad_id=field("pad_token_id", 0),
    )
    select_feature = field("mm_vision_select_feature", "patch")
    if select_feature not in ("patch", "cls_patch"):
        raise ConfigError(f"{source}: unknown mm_vision_select_feature {select_feature!r}; expected patch or cls_patch")
    vision = _published_vision_config(folder, data, vision_tower, shapes)
    vision = VisionConfig(**{**vision.__dict__, "select_layer": field("mm_vision_select_layer", -2), "select_feature": select_feature})
    if vision.hidden_size != field("mm_hidden_size", vision.hidden_size):
        raise ConfigError(f"{source}: mm_hidden_size {data['mm_hidden_size']} does not match the vision tower width {vision.hidden_size}")
    projector = PUBLISHED_PROJECTORS[kind]
    # LLaVA's non-"pad" setting is CLIP's own processor: resize the short side, crop the centre.
    aspect = "pad" if field("image_aspect_ratio", "pad") == "pad" else "crop"
    # The published LDPv2 pools to a fixed 12x12 grid.
    config = MobileVLMConfig(vision, ProjectorConfig(projector, pool_size=12), text, aspect, "vicuna_v1")
    try:
        return config.validate()
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _rope_theta(data: dict[str, Any], source: str) -> float:
    """Rotary base from `rope_theta` (transformers 4) or `rope_parameters` (transformers 5); scaled
    rotary variants (linear, dynamic, llama3, ...) are refused rather than silently run unscaled."""
    params = data.get("rope_parameters") or {}
    scaling = data.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise ConfigError(f"{source}: rope type {kind!r} is not supported (only plain rotary embeddings)")
    theta = data.get("rope_theta", params.get("rope_theta", 10000.0))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
        raise ConfigError(f"{source}: rope_theta must be a positive number, got {theta!r}")
    return float(theta)


def _vision_prefix(weights: dict[str, torch.Tensor]) -> str | None:
    for prefix in ("model.vision_tower.vision_tower.vision_model.", "model.vision_tower.vision_model."):
        if any(k.startswith(prefix) for k in weights):
            return prefix
    return None


def _vision_folder(folder: Path, data: dict[str, Any], vision_tower: str | Path | None) -> Path | None:
    candidates = [Path(vision_tower)] if vision_tower else []
    named = data.get("mm_vision_tower") or data.get("vision_tower")
    if isinstance(named, str):
        candidates += [Path(named), folder / named]
    return next((c for c in candidates if (c / "config.json").is_file()), None)


def _published_vision_config(folder: Path, data: dict[str, Any], vision_tower: str | Path | None, shapes: dict[str, list[int]]) -> VisionConfig:
    """The CLIP tower's shape: from the separate CLIP folder's config if there is one, else from the
    embedded weights' shapes (heads of width 64, as in every OpenAI CLIP ViT)."""
    external = _vision_folder(folder, data, vision_tower)
    if external is not None:
        clip = json.loads((external / "config.json").read_text())
        clip = clip.get("vision_config", clip)
        try:
            return VisionConfig(
                image_size=clip["image_size"], patch_size=clip["patch_size"], hidden_size=clip["hidden_size"],
                num_layers=clip["num_hidden_layers"], num_heads=clip["num_attention_heads"],
                intermediate_size=clip["intermediate_size"], layer_norm_eps=float(clip.get("layer_norm_eps", 1e-5)),
                hidden_act=clip.get("hidden_act", "quick_gelu"),
            )
        except KeyError as exc:
            raise ConfigError(f"{external / 'config.json'}: missing field {exc.args[0]!r} of a CLIP vision config") from None
    embedded = _embedded_vision_config(shapes)
    if embedded is None:
        raise CheckpointError(
            f"{folder}: the vision tower's weights are not in this folder and mm_vision_tower "
            f"{data.get('mm_vision_tower')!r} is not a local CLIP folder; pass its path (--vision-tower / vision_tower=)"
        )
    return embedded


def _safetensors_shapes(folder: Path) -> dict[str, list[int]]:
    """Tensor shapes from the safetensors headers of a folder, without reading any data."""
    from safetensors import safe_open

    shapes: dict[str, list[int]] = {}
    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as handle:
                shapes.update({key: handle.get_slice(key).get_shape() for key in handle.keys()})
        except Exception as exc:
            raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({exc})") from None
    return shapes


def _embedded_vision_config(all_shapes: dict[str, list[int]]) -> VisionConfig | None:
    shapes = {k.split(".vision_model.", 1)[1]: v for k, v in all_shapes.items() if k.startswith("model.vision_tower.") and ".vision_model." in k}
    if "embeddings.patch_embedding.weight" not in shapes:
        return None
    width, _, patch, _ = shapes["embeddings.patch_embedding.weight"]
    positions = shapes["embeddings.position_embedding.weight"][0]
    layers = 1 + max(int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.layers\.(\d+)\.", k)))
    if width % 64:
        raise ConfigError(f"the embedded vision tower is {width} wide, not a multiple of CLIP's 64-wide heads; pass its CLIP folder (--vision-tower) for its config")
    return VisionConfig(
        image_size=int(round((positions - 1) ** 0.5)) * patch, patch_size=patch, hidden_size=width, num_layers=layers,
        num_heads=width // 64, intermediate_size=shapes["encoder.layers.0.mlp.fc1.weight"][0],
    )


def _map_published_weights(
    weights: dict[str, torch.Tensor], config: MobileVLMConfig, folder: Path, data: dict[str, Any], vision_tower: str | Path | None, allow_pickle: bool
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    prefix = _vision_prefix(weights)
    if prefix is None:
        external = _vision_folder(folder, data, vision_tower)
        if external is None:
            raise CheckpointError(f"{folder}: the vision tower's weights are not in this folder; pass its CLIP folder (--vision-tower / vision_tower=)")
        # A CLIPModel / transformers-4 CLIPVisionModel folder prefixes its keys with `vision_model.`;
        # transformers 5 saves a CLIPVisionModel without it.
        for key, tensor in read_weights(external, allow_pickle).items():
            if not IGNORED_KEYS.search(key):
                weights["vision_tower." + (key if key.startswith("vision_model.") else "vision_model." + key)] = tensor
        prefix = "vision_tower.vision_model."
    unmapped = []
    for key, tensor in weights.items():
        new = _published_key(key, prefix, config.projector.type)
        if new is None:
            if not IGNORED_KEYS.search(key) and not key.startswith("vision_tower."):
                unmapped.append(key)
        else:
            out[new] = tensor
    if unmapped:
        raise CheckpointError(f"{folder}: unexpected tensors in a {data.get('mm_projector_type')} checkpoint: {', '.join(sorted(unmapped)[:8])}")
    return out


_LDP_BLOCK = {"block.0.0": "dw_conv", "block.0.1": "dw_norm", "block.1.fc1": "se.fc1", "block.1.fc2": "se.fc2", "block.2.0": "pw_conv", "block.2.1": "pw_norm"}


def _published_key(key: str, vision_prefix: str, projector: str) -> str | None:
    """Our name for a published tensor name, or None for a tensor the model does not use."""
    if key.startswith(vision_prefix):
        rest = key[len(vision_prefix):]
        rest = rest.replace("pre_layrnorm", "pre_layernorm").replace("encoder.layers.", "layers.")
        return None if IGNORED_KEYS.search(rest) else "vision." + rest
    if key == "lm_head.weight":
        return "text.lm_head.weight"
    if key.startswith("model.mm_projector."):
        rest = key[len("model.mm_projector."):]
        if projector == "mlp2x_gelu" and (m := re.fullmatch(r"([02])\.(weight|bias)", rest)):
            return f"projector.mlp.{m.group(1)}.{m.group(2)}"
        if projector == "ldp":
            if m := re.fullmatch(r"model\.mlp\.([13])\.(weight|bias)", rest):
                return f"projector.mlp.{int(m.group(1)) - 1}.{m.group(2)}"
            if m := re.fullmatch(r"model\.mb_block\.([12])\.(block\.\d\.\w+)\.(weight|bias)", rest):
                if m.group(2) in _LDP_BLOCK:
                    return f"projector.blocks.{int(m.group(1)) - 1}.{_LDP_BLOCK[m.group(2)]}.{m.group(3)}"
        if projector == "ldpv2":
            if m := re.fullmatch(r"mlp\.mlp\.([02])\.(weight|bias)", rest):
                return f"projector.mlp.{m.group(1)}.{m.group(2)}"
            if m := re.fullmatch(r"peg\.peg\.0\.(weight|bias)", rest):
                return f"projector.peg.{m.group(1)}"
        return None
    if key.startswith("model.") and not key.startswith("model.vision_tower."):
        rest = key[len("model."):]
        return None if IGNORED_KEYS.search(rest) else "text." + rest
    return None
