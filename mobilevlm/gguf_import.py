"""GGUF pairs back into a MobileVLM: a text model (`llama`) + an mmproj (`clip`, projector `mlp`,
`ldp` or `ldpv2`), dequantized to fp32, so that a user with only the GGUF files can run our
evaluation on them.

Works for the pairs `mobilevlm export --backend gguf` writes (exactly: an f32 pair gives back every
tensor bit for bit) and for llama.cpp's own MobileVLM / LLaVA conversions: their vision FFN names are
swapped back the way llama.cpp does, a missing `clip.vision.feature_layer` means "every stored layer"
(those converters drop the layers after the selected one), and a missing CLIP post-LayerNorm (never
used by the VLM) is set to identity. The tokenizer is rebuilt as a tokenizer.json when the GGUF holds
a byte-level BPE (`gpt2`) vocabulary; SentencePiece (`llama`) vocabularies cannot be rebuilt and are a
`TokenizerError` (the weights still load).
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import CLIP_MEAN, CLIP_STD, MobileVLMConfig, ProjectorConfig, TextConfig, VisionConfig
from .errors import CheckpointError, ConfigError, TokenizerError
from .model import MobileVLM

PROJECTORS = {"mlp": "mlp2x_gelu", "ldp": "ldp", "ldpv2": "ldpv2"}


def _reader(path: Path):
    try:
        import gguf
    except ImportError:
        raise CheckpointError(f"{path}: reading GGUF files needs the `gguf` package (the `gguf` extra)") from None
    try:
        return gguf.GGUFReader(str(path))
    except Exception as exc:  # gguf-py raises ValueError / struct errors on foreign or truncated files
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc})") from None


def _fields(reader) -> dict[str, Any]:
    out = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        value = field.contents()
        out[name] = value
    return out


def find_gguf_pair(folder: str | Path) -> tuple[Path, Path] | None:
    """(text model, mmproj) of a folder holding exactly one of each, else None (not a GGUF folder)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    files = sorted(folder.glob("*.gguf"))
    if not files:
        return None
    kinds: dict[str, list[Path]] = {"llama": [], "clip": []}
    for path in files:
        arch = _fields_light(path).get("general.architecture")
        if arch in kinds:
            kinds[arch].append(path)
    if len(kinds["llama"]) != 1 or len(kinds["clip"]) != 1:
        raise CheckpointError(
            f"{folder}: a GGUF folder needs exactly one text model (architecture llama) and one mmproj (architecture clip); "
            f"found {len(kinds['llama'])} and {len(kinds['clip'])} among {', '.join(p.name for p in files)}"
        )
    return kinds["llama"][0], kinds["clip"][0]


def _fields_light(path: Path) -> dict[str, Any]:
    return _fields(_reader(path))


# --- config --------------------------------------------------------------------------------------


def _f32(value: Any) -> float:
    """A float32 GGUF value as the shortest decimal that rounds to it (1e-05, not 9.99999974e-06),
    which is what the config that was written held."""
    return float(str(np.float32(value)))


def _f32_triple(values: Any, usual: tuple[float, float, float]) -> tuple[float, ...]:
    """Image mean / std: CLIP's constants when the float32 values are theirs (float32 cannot tell
    0.48145466 from 0.48145467; both give the same normalisation), else the shortest decimals."""
    values = [np.float32(v) for v in values]
    return usual if values == [np.float32(u) for u in usual] else tuple(_f32(v) for v in values)


def _need(fields: dict, key: str, path: Path) -> Any:
    if key not in fields:
        raise ConfigError(f"{path}: missing GGUF key {key!r}")
    return fields[key]


def read_config(text_path: Path, mmproj_path: Path, text_fields: dict, clip_fields: dict, tensor_names: set[str]) -> MobileVLMConfig:
    t, c = text_fields, clip_fields
    tokens = _need(t, "tokenizer.ggml.tokens", text_path)
    heads = int(_need(t, "llama.attention.head_count", text_path))
    text = TextConfig(
        vocab_size=len(tokens),
        hidden_size=int(_need(t, "llama.embedding_length", text_path)),
        num_layers=int(_need(t, "llama.block_count", text_path)),
        num_heads=heads,
        num_kv_heads=int(t.get("llama.attention.head_count_kv", heads)),
        intermediate_size=int(_need(t, "llama.feed_forward_length", text_path)),
        max_seq_len=int(_need(t, "llama.context_length", text_path)),
        rms_norm_eps=_f32(_need(t, "llama.attention.layer_norm_rms_epsilon", text_path)),
        rope_theta=_f32(t.get("llama.rope.freq_base", 10000.0)),
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_id=int(t.get("tokenizer.ggml.bos_token_id", 1)),
        eos_id=int(t.get("tokenizer.ggml.eos_token_id", 2)),
        pad_id=int(t.get("tokenizer.ggml.padding_token_id", 0)),
    )
    projector = _need(c, "clip.projector_type", mmproj_path)
    if projector not in PROJECTORS:
        raise ConfigError(f"{mmproj_path}: clip.projector_type {projector!r} is not a MobileVLM / LLaVA projector; expected one of {', '.join(PROJECTORS)}")
    layers = int(_need(c, "clip.vision.block_count", mmproj_path))
    feature = c.get("clip.vision.feature_layer")
    vision = VisionConfig(
        image_size=int(_need(c, "clip.vision.image_size", mmproj_path)),
        patch_size=int(_need(c, "clip.vision.patch_size", mmproj_path)),
        hidden_size=int(_need(c, "clip.vision.embedding_length", mmproj_path)),
        num_layers=layers,
        num_heads=int(_need(c, "clip.vision.attention.head_count", mmproj_path)),
        intermediate_size=int(_need(c, "clip.vision.feed_forward_length", mmproj_path)),
        layer_norm_eps=_f32(c.get("clip.vision.attention.layer_norm_epsilon", 1e-5)),
        hidden_act="gelu" if c.get("clip.use_gelu") else "quick_gelu",
        # negative form (-2 = second-to-last), as configs write it; without the key every stored layer runs
        select_layer=(int(feature[0]) if feature else layers) - (layers + 1),
        select_feature="patch",
        image_mean=_f32_triple(c.get("clip.vision.image_mean", CLIP_MEAN), CLIP_MEAN),
        image_std=_f32_triple(c.get("clip.vision.image_std", CLIP_STD), CLIP_STD),
    )
    if feature and len(feature) != 1:
        raise ConfigError(f"{mmproj_path}: clip.vision.feature_layer {list(feature)} stacks several layers; MobileVLM feeds one")
    config = MobileVLMConfig(
        vision, ProjectorConfig(PROJECTORS[projector], pool_size=int(c.get("mobilevlm.projector_pool_size", 12))), text,
        image_aspect_ratio=str(c.get("mobilevlm.image_aspect_ratio", "pad")),
        prompt_template=str(t.get("mobilevlm.prompt_template", "vicuna_v1")),
    )
    try:
        return config.validate()
    except ConfigError as exc:
        raise ConfigError(f"{text_path} + {mmproj_path}: {exc}") from None


# --- weights -------------------------------------------------------------------------------------


def _arrays(reader, path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF, dequantized to float32, in numpy (row-major, torch) order."""
    from gguf.quants import dequantize

    out = {}
    for tensor in reader.tensors:
        try:
            array = dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError:
            raise CheckpointError(f"{path}: tensor {tensor.name!r} has type {tensor.tensor_type.name}, which gguf cannot dequantize") from None
        out[tensor.name] = np.asarray(array, dtype=np.float32).reshape([int(d) for d in reversed(tensor.shape.tolist())])
    return out


def read_state_dict(config: MobileVLMConfig, text_arrays: dict[str, np.ndarray], clip_arrays: dict[str, np.ndarray], source: str) -> dict[str, torch.Tensor]:
    from .export.gguf_layout import F32_COPY_PREFIX, mmproj_tensor_names, text_tensor_names, unpermute_rope

    state: dict[str, torch.Tensor] = {}
    t = config.text
    missing = []
    for ours, theirs in text_tensor_names(config).items():
        if theirs not in text_arrays:
            missing.append(theirs)
            continue
        array = text_arrays[theirs]
        if theirs.endswith("attn_q.weight"):
            array = unpermute_rope(array, t.num_heads)
        elif theirs.endswith("attn_k.weight"):
            array = unpermute_rope(array, t.num_kv_heads)
        state[ours] = torch.from_numpy(np.array(array, dtype=np.float32, order="C"))
    clip_arrays = _unswap_legacy_ffn(config, dict(clip_arrays))
    for name in [n for n in clip_arrays if n.startswith(F32_COPY_PREFIX)]:  # exact originals of f16-only kernels
        clip_arrays[name[len(F32_COPY_PREFIX):]] = clip_arrays.pop(name)
    for ours, theirs in mmproj_tensor_names(config).items():
        if theirs in clip_arrays:
            state[ours] = torch.from_numpy(np.array(clip_arrays[theirs], dtype=np.float32, order="C"))
        elif ours == "vision.post_layernorm.weight":
            state[ours] = torch.ones(config.vision.hidden_size)
        elif ours == "vision.post_layernorm.bias":
            state[ours] = torch.zeros(config.vision.hidden_size)
        else:
            missing.append(theirs)
    if missing:
        shown = ", ".join(missing[:8]) + (f", ... ({len(missing)} in all)" if len(missing) > 8 else "")
        raise CheckpointError(f"{source}: GGUF tensors missing for this config: {shown}")
    return state


def _unswap_legacy_ffn(config: MobileVLMConfig, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """llama.cpp's legacy converter wrote CLIP's fc1 as `ffn_down` and fc2 as `ffn_up`; like llama.cpp
    (clip.cpp, `is_ffn_swapped`), an `ffn_down` whose input width is the model width is taken as fc1."""
    d = config.vision.hidden_size
    for i in range(config.vision.num_layers):
        up, down = f"v.blk.{i}.ffn_up", f"v.blk.{i}.ffn_down"
        if f"{down}.weight" in arrays and f"{up}.weight" in arrays and arrays[f"{down}.weight"].shape[-1] == d and d != config.vision.intermediate_size:
            for kind in ("weight", "bias"):
                arrays[f"{up}.{kind}"], arrays[f"{down}.{kind}"] = arrays[f"{down}.{kind}"], arrays[f"{up}.{kind}"]
    return arrays


def _fit_shapes(model: MobileVLM, state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """GGUF stores the projector's convolutions squeezed; give every tensor its parameter's shape
    (same element count required)."""
    expected = model.state_dict()
    for key, tensor in state.items():
        if key in expected and tensor.shape != expected[key].shape:
            if tensor.numel() != expected[key].numel():
                raise CheckpointError(f"{source}: tensor for {key} has shape {tuple(tensor.shape)}, expected {tuple(expected[key].shape)}")
            state[key] = tensor.reshape(expected[key].shape)
    return state


# --- tokenizer -----------------------------------------------------------------------------------


def tokenizer_from_gguf(fields: dict, path: Path):
    """A `tokenizers.Tokenizer` rebuilt from a `gpt2` GGUF vocabulary (unused `[PADn]` rows dropped)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    from .export.gguf_layout import TOKEN_CONTROL, TOKEN_UNUSED, TOKEN_USER_DEFINED

    kind = fields.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise TokenizerError(f"{path}: tokenizer.ggml.model {kind!r} cannot be rebuilt as a byte-level BPE tokenizer.json (only 'gpt2' can)")
    tokens = list(fields["tokenizer.ggml.tokens"])
    types = [int(x) for x in fields.get("tokenizer.ggml.token_type", [1] * len(tokens))]
    vocab = {tok: i for i, (tok, kind) in enumerate(zip(tokens, types)) if kind != TOKEN_UNUSED}
    merges = [tuple(m.split(" ", 1)) for m in fields.get("tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i, k in enumerate(types) if k == TOKEN_CONTROL])
    tok.add_tokens([AddedToken(tokens[i], normalized=False) for i, k in enumerate(types) if k == TOKEN_USER_DEFINED])
    bos = fields.get("tokenizer.ggml.bos_token_id")
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{tokens[int(bos)]} $A", special_tokens=[(tokens[int(bos)], int(bos))])
    return tok


# --- entry points --------------------------------------------------------------------------------


def read_gguf_pair(text_path: str | Path, mmproj_path: str | Path) -> tuple[MobileVLM, dict]:
    """(model in eval mode with fp32 weights, the text GGUF's metadata)."""
    text_path, mmproj_path = Path(text_path), Path(mmproj_path)
    text_reader, clip_reader = _reader(text_path), _reader(mmproj_path)
    text_fields, clip_fields = _fields(text_reader), _fields(clip_reader)
    for path, fields, arch in ((text_path, text_fields, "llama"), (mmproj_path, clip_fields, "clip")):
        if fields.get("general.architecture") != arch:
            raise CheckpointError(f"{path}: general.architecture is {fields.get('general.architecture')!r}, expected {arch!r}")
    text_arrays = _arrays(text_reader, text_path)
    config = read_config(text_path, mmproj_path, text_fields, clip_fields, set(text_arrays))
    source = f"{text_path} + {mmproj_path}"
    state = read_state_dict(config, text_arrays, _arrays(clip_reader, mmproj_path), source)
    model = MobileVLM(config)
    from .checkpoint import load_state_dict_checked

    load_state_dict_checked(model, _fit_shapes(model, state, source), source)
    return model.eval(), text_fields


def load_gguf_config(folder: str | Path) -> MobileVLMConfig:
    """The model config of a GGUF folder, from metadata alone (no tensor is read)."""
    pair = find_gguf_pair(folder)
    if pair is None:
        raise CheckpointError(f"{folder}: no .gguf files")
    text_reader = _reader(pair[0])
    return read_config(pair[0], pair[1], _fields(text_reader), _fields_light(pair[1]), {t.name for t in text_reader.tensors})


def load_gguf_model(folder: str | Path) -> MobileVLM:
    pair = find_gguf_pair(folder)
    if pair is None:
        raise CheckpointError(f"{folder}: no .gguf files")
    return read_gguf_pair(*pair)[0]


_TOKENIZER_DIRS: list[str] = []


def load_gguf_processor(folder: str | Path):
    """The processor of a GGUF folder; its tokenizer.json is rebuilt into a temporary folder that
    lives as long as the process (the folder of GGUF files is not written to)."""
    from .processing import Processor, Tokenizer

    pair = find_gguf_pair(folder)
    if pair is None:
        raise CheckpointError(f"{folder}: no .gguf files")
    text_path = pair[0]
    fields = _fields(_reader(text_path))
    config = load_gguf_config(folder)
    scratch = tempfile.mkdtemp(prefix="mobilevlm-gguf-")
    if not _TOKENIZER_DIRS:
        atexit.register(lambda: [shutil.rmtree(d, ignore_errors=True) for d in _TOKENIZER_DIRS])
    _TOKENIZER_DIRS.append(scratch)
    path = Path(scratch) / "tokenizer.json"
    tokenizer_from_gguf(fields, text_path).save(str(path))
    return Processor.from_config(config, Tokenizer(path))
