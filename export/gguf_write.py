"""Writing the GGUF pair: the text model (`llama`) and the mmproj (`clip`), with gguf-py's writer.

Metadata is built as plain `{key: value}` dicts first (`text_metadata`, `mmproj_metadata`), so the
published shapes can be checked without allocating a model; `write_gguf` then writes metadata and
tensors. The text model is always written in f32 here: llama.cpp's own quantizer
(`llama_model_quantize`) makes every other type from it (see `quantize_text_model`).
"""

from __future__ import annotations

import ctypes
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mobilevlm.config import MobileVLMConfig
from mobilevlm.errors import ExportError
from mobilevlm.processing import Processor, PromptTemplate

from .gguf_layout import (
    F16_ONLY, F32_COPY_PREFIX, KEY_ASPECT, KEY_POOL, KEY_PROMPT_TEMPLATE, KEY_TEMPLATE_ADD_BOS, PROJECTOR_TYPES, TOKEN_CONTROL, TOKEN_NORMAL, TOKEN_UNUSED, TOKEN_USER_DEFINED,
    mmproj_tensor_names, permute_rope, text_tensor_names, to_gguf_layout,
)

# GGUF file types (llama.cpp `llama_ftype`): what `general.file_type` says.
FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7, "q4_k_m": 15}


# --- tokenizer ---------------------------------------------------------------------------------


def read_bpe_tokenizer(path: Path) -> dict:
    """The parts of a byte-level BPE tokenizer.json that GGUF's `gpt2` tokenizer holds; any other kind
    of tokenizer is an `ExportError` naming the field that differs."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExportError(f"{path}: cannot read tokenizer ({exc})") from None
    model, pre = data.get("model") or {}, data.get("pre_tokenizer") or {}
    problems = []
    if model.get("type") != "BPE" or model.get("byte_fallback") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        problems.append(f"model {model.get('type')!r} (expected byte-level BPE without byte fallback or affixes)")
    if pre.get("type") != "ByteLevel" or pre.get("add_prefix_space") or not pre.get("use_regex", True):
        problems.append(f"pre_tokenizer {pre.get('type')!r} (expected ByteLevel with the GPT-2 regex and no prefix space)")
    if data.get("normalizer"):
        problems.append(f"normalizer {data['normalizer'].get('type')!r} (expected none)")
    if problems:
        raise ExportError(f"{path}: GGUF export supports byte-level BPE tokenizers (llama.cpp 'gpt2'); this one has " + "; ".join(problems))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if any(len(m.split(" ")) != 2 for m in merges):
        raise ExportError(f"{path}: a BPE merge contains a space or is not a pair; llama.cpp cannot hold it")
    return {"vocab": dict(model["vocab"]), "merges": merges, "added": {t["id"]: t for t in data.get("added_tokens", [])}, "ignore_merges": bool(model.get("ignore_merges"))}


def chat_template(template: PromptTemplate) -> str:
    """A Jinja chat template (what llama.cpp's server and `llama_chat_apply_template` read) that
    renders our prompt template: the first user message is `<image marker>` + the text between the
    image and the question + the question (e.g. "<__media__>\\nWhat is this?")."""
    before, rest = template.text.split("<image>")
    mid, end = rest.split("{prompt}")
    follow_before, follow_end = template.followup.split("{prompt}")
    for text in (before, mid, end, follow_before, follow_end):
        if any(tag in text for tag in ("{{", "{%", "{#")):
            raise ExportError(f"prompt template {template.name!r} contains Jinja delimiters; it cannot be written as a chat template")
    bos = "{{ bos_token }}" if template.add_bos else ""
    return (
        bos + "{% for message in messages %}{% if message['role'] == 'user' %}{% if loop.first %}" + before + "{{ message['content'] }}" + end
        + "{% else %}" + follow_before + "{{ message['content'] }}" + follow_end + "{% endif %}"
        + "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
    )


def tokenizer_metadata(processor: Processor, vocab_size: int) -> dict[str, Any]:
    """`tokenizer.ggml.*` keys: the vocabulary padded with unused `[PADn]` tokens to the model's
    embedding rows (llama.cpp requires one token per row), merges, token types, special ids."""
    tok = processor.tokenizer
    bpe = read_bpe_tokenizer(tok.path)
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [TOKEN_UNUSED] * vocab_size
    for piece, index in bpe["vocab"].items():
        if index >= vocab_size:
            raise ExportError(f"{tok.path}: token id {index} is outside the model's vocabulary of {vocab_size}")
        tokens[index], types[index] = piece, TOKEN_NORMAL
    for index, added in bpe["added"].items():
        if index >= vocab_size:
            raise ExportError(f"{tok.path}: added token id {index} is outside the model's vocabulary of {vocab_size}")
        tokens[index], types[index] = added["content"], TOKEN_CONTROL if added.get("special") else TOKEN_USER_DEFINED
    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",  # llama.cpp's GPT-2 split regex, the one ByteLevel(use_regex) uses
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": bpe["merges"],
        "tokenizer.ggml.bos_token_id": tok.bos_id,
        "tokenizer.ggml.eos_token_id": tok.eos_id,
        "tokenizer.ggml.add_bos_token": processor.template.add_bos,
        "tokenizer.ggml.add_eos_token": False,
        "tokenizer.chat_template": chat_template(processor.template),
    }
    if tok.pad_id is not None:
        meta["tokenizer.ggml.padding_token_id"] = tok.pad_id
    return meta


# --- metadata ----------------------------------------------------------------------------------


def text_metadata(config: MobileVLMConfig, name: str) -> dict[str, Any]:
    """`general.*` and `llama.*` keys of the text model (llama.cpp `src/llama-arch.cpp` names)."""
    t = config.text
    return {
        "general.architecture": "llama",
        "general.name": name,
        "llama.vocab_size": t.vocab_size,
        "llama.context_length": t.max_seq_len,
        "llama.embedding_length": t.hidden_size,
        "llama.block_count": t.num_layers,
        "llama.feed_forward_length": t.intermediate_size,
        "llama.rope.dimension_count": t.head_dim,
        "llama.rope.freq_base": float(t.rope_theta),
        "llama.attention.head_count": t.num_heads,
        "llama.attention.head_count_kv": t.num_kv_heads,
        "llama.attention.layer_norm_rms_epsilon": float(t.rms_norm_eps),
        KEY_PROMPT_TEMPLATE: config.prompt_template,
    }


def mmproj_metadata(config: MobileVLMConfig, name: str) -> dict[str, Any]:
    """`clip.*` keys (tools/mtmd/clip-impl.h) of the mmproj.

    `clip.vision.feature_layer` names the hidden state fed to the projector (index k = output of the
    k-th layer, 0 = embeddings), so llama.cpp runs exactly `num_layers_used` layers; `image_mean` /
    `image_std` are applied by llama.cpp to the RGB bitmap it is given.
    """
    v = config.vision
    return {
        "general.architecture": "clip",
        "general.name": name,
        "general.description": f"image encoder and {config.projector.type} projector of a MobileVLM-style model (mobilevlm)",
        "clip.projector_type": PROJECTOR_TYPES[config.projector.type],
        "clip.has_text_encoder": False,
        "clip.has_vision_encoder": True,
        "clip.has_llava_projector": True,
        "clip.use_gelu": v.hidden_act == "gelu",
        "clip.vision.image_size": v.image_size,
        "clip.vision.patch_size": v.patch_size,
        "clip.vision.embedding_length": v.hidden_size,
        "clip.vision.feed_forward_length": v.intermediate_size,
        "clip.vision.projection_dim": config.text.hidden_size,
        "clip.vision.block_count": v.num_layers,
        "clip.vision.feature_layer": [v.num_layers_used],
        "clip.vision.attention.head_count": v.num_heads,
        "clip.vision.attention.layer_norm_epsilon": float(v.layer_norm_eps),
        "clip.vision.image_mean": [float(x) for x in v.image_mean],
        "clip.vision.image_std": [float(x) for x in v.image_std],
        KEY_ASPECT: config.image_aspect_ratio,
        KEY_POOL: config.projector.pool_size,
    }


# --- tensors -----------------------------------------------------------------------------------


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to(torch.float32).contiguous().numpy()


def text_tensors(model) -> dict[str, np.ndarray]:
    """Text GGUF tensors in f32; Q / K rows permuted for llama.cpp's rotary layout."""
    t = model.config.text
    state = model.state_dict()
    out = {}
    for ours, theirs in text_tensor_names(model.config).items():
        array = _numpy(state[ours])
        if theirs.endswith("attn_q.weight"):
            array = permute_rope(array, t.num_heads)
        elif theirs.endswith("attn_k.weight"):
            array = permute_rope(array, t.num_kv_heads)
        out[theirs] = array
    return out


def mmproj_tensors(model, dtype: str) -> dict[str, np.ndarray]:
    """mmproj tensors: f32, or (dtype "f16") f16 for every tensor of 2 or more dimensions with the
    1-D ones (biases, norms, class embedding) kept f32, as llama.cpp's converter stores them.
    Depthwise-convolution kernels are f16 in both (see `F16_ONLY`)."""
    state = model.state_dict()
    out = {}
    for ours, theirs in mmproj_tensor_names(model.config).items():
        array = to_gguf_layout(theirs, _numpy(state[ours]))
        if theirs in F16_ONLY and dtype == "f32":
            out[F32_COPY_PREFIX + theirs] = array
        out[theirs] = array.astype(np.float16) if (dtype == "f16" and array.ndim >= 2) or theirs in F16_ONLY else array
    return out


def write_gguf(path: Path, metadata: dict[str, Any], tensors: dict[str, np.ndarray], file_type: int) -> None:
    """One GGUF file: metadata keys (typed from their Python values), then tensors in order."""
    import gguf

    writer = gguf.GGUFWriter(str(path), metadata["general.architecture"])
    writer.add_file_type(file_type)
    for key, value in metadata.items():
        if key == "general.architecture":
            continue  # written by the writer itself
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, list) and value and isinstance(value[0], str):
            writer.add_array(key, value)
        elif isinstance(value, list) and value and isinstance(value[0], float):
            writer.add_key_value(key, value, gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.FLOAT32)
        elif isinstance(value, list):
            writer.add_key_value(key, [int(x) for x in value], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.INT32)
        else:
            raise AssertionError(f"unhandled metadata type for {key}: {type(value).__name__}")
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_text_model(path: Path, model, processor: Processor, name: str) -> None:
    metadata = {**text_metadata(model.config, name), **tokenizer_metadata(processor, model.config.text.vocab_size)}
    metadata[KEY_TEMPLATE_ADD_BOS] = processor.template.add_bos
    write_gguf(path, metadata, text_tensors(model), FILE_TYPES["f32"])


def write_mmproj(path: Path, model, dtype: str, name: str) -> None:
    write_gguf(path, mmproj_metadata(model.config, name), mmproj_tensors(model, dtype), FILE_TYPES[dtype])


# --- llama.cpp's quantizer ---------------------------------------------------------------------


def quantize_text_model(source: Path, target: Path, recipe: str, threads: int) -> None:
    """Make the `recipe` type from the f32 text GGUF with llama.cpp's own `llama_model_quantize`
    (through llama-cpp-python): the same code, rules and fallbacks as the `llama-quantize` tool
    (e.g. `output.weight` in Q6_K for q4 types; rows not divisible by a k-quant's 256-wide block
    get a fallback type, which the artifact's tensor-type census records)."""
    from llama_cpp import llama_cpp as ll

    from .parity import captured_native_output, native_error

    ftype = {"f16": ll.LLAMA_FTYPE_MOSTLY_F16, "q8_0": ll.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_0": ll.LLAMA_FTYPE_MOSTLY_Q4_0, "q4_k_m": ll.LLAMA_FTYPE_MOSTLY_Q4_K_M}[recipe]
    params = ll.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    with captured_native_output() as output:
        status = ll.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if status != 0:
        raise native_error(f"{target}: llama.cpp's llama_model_quantize failed for {recipe} (status {status})", output)


def tensor_type_census(path: Path) -> dict[str, int]:
    """How many tensors of each GGML type a GGUF holds (what the quantizer actually chose)."""
    import gguf

    census: dict[str, int] = {}
    for tensor in gguf.GGUFReader(str(path)).tensors:
        census[tensor.tensor_type.name] = census.get(tensor.tensor_type.name, 0) + 1
    return dict(sorted(census.items()))
