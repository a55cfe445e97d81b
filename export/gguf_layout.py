"""Where every tensor and hyper-parameter of a MobileVLM lives in the GGUF pair llama.cpp reads.

Two files, as llama.cpp's multimodal (`mtmd`) tools take them:
- the text model, architecture `llama` (names from llama.cpp's `src/llama-arch.cpp` /
  gguf-py `constants.py`: `token_embd`, `blk.N.attn_q`, ..., `output`);
- the `mmproj`, architecture `clip` (names and keys from llama.cpp's `tools/mtmd/clip-impl.h` and the
  MobileVLM conversion script `tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py`):
  `v.*` for the CLIP tower, `mm.*` for the projector.

Read from llama.cpp at the commit llama-cpp-python 0.3.36 vendors (ggml-org/llama.cpp@0c1e57098):
- `models/llava.cpp` hard-codes a 24x24 patch grid for `ldp` / `ldpv2` and a 2x2 average pool for
  `ldpv2`, so only the published grid (336 px / 14 px patches) is representable for those projectors;
- it always drops the first row of the tower's output (the class token in Hugging Face order), so
  `select_feature = "cls_patch"` is not representable;
- the vision FFN up / down tensors are swapped back by a shape test (`ffn_down` whose input width is
  the model width counts as a legacy file), which misfires when `intermediate_size == hidden_size`;
- without `clip.vision.feature_layer` the graph runs `block_count - 1` layers, so the selected layer
  is always written explicitly (the published converter's files run one layer short, llama.cpp
  issue 25817).

This module is shared by the exporter and by `mobilevlm.gguf_import` (the way back).
"""

from __future__ import annotations

import numpy as np

from mobilevlm.config import MobileVLMConfig
from mobilevlm.errors import ExportError

# Our projector names -> llama.cpp's `clip.projector_type`.
PROJECTOR_TYPES = {"mlp2x_gelu": "mlp", "ldp": "ldp", "ldpv2": "ldpv2"}
# llama.cpp's LDP / LDPv2 graphs (tools/mtmd/models/llava.cpp: `int n_patch = 24;`).
LDP_GRID = 24
LDPV2_POOL = 12

# Keys of our own: llama.cpp ignores them; the importer reads them when present.
KEY_PROMPT_TEMPLATE = "mobilevlm.prompt_template"
KEY_ASPECT = "mobilevlm.image_aspect_ratio"
KEY_TEMPLATE_ADD_BOS = "mobilevlm.add_bos"
KEY_POOL = "mobilevlm.projector_pool_size"  # llama.cpp fixes it (12 for ldpv2); other projectors ignore it
# The CLIP post-LayerNorm is used only by contrastive pretraining; under llama.cpp's own name
# (`v.post_ln`) the graph would apply it to the features, so it travels under a name llama.cpp never
# asks for, which keeps the round trip lossless.
POST_LN_PREFIX = "mobilevlm.v.post_ln"

# ggml's CPU depthwise convolution (`ggml_conv_2d_dw`) builds an f16 im2col, which its matmul only
# accepts against an f16 kernel: these kernels are f16 in every mmproj (as llama.cpp's converter
# writes them). An f32 mmproj also carries their f32 originals under this prefix, which llama.cpp
# never reads and the importer prefers, so the f32 round trip stays exact.
F16_ONLY = ("mm.model.mb_block.1.block.0.0.weight", "mm.model.mb_block.2.block.0.0.weight", "mm.model.peg.0.weight")
F32_COPY_PREFIX = "mobilevlm.f32."

# Token types (llama.cpp `llama_token_type` / gguf-py `TokenType`).
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5


def check_representable(config: MobileVLMConfig) -> None:
    """Refuse, before any work, a model llama.cpp's clip / mtmd code cannot run as it is."""
    v, p = config.vision, config.projector
    if p.type not in PROJECTOR_TYPES:
        raise ExportError(f"projector type {p.type!r} cannot be represented in llama.cpp's mmproj; supported: {', '.join(PROJECTOR_TYPES)}")
    if v.select_feature != "patch":
        raise ExportError(f"vision.select_feature {v.select_feature!r} cannot be represented in llama.cpp (its LLaVA graph always drops the class token); expected 'patch'")
    if p.type in ("ldp", "ldpv2") and v.grid_size != LDP_GRID:
        raise ExportError(
            f"projector {p.type!r} on a {v.grid_size}x{v.grid_size} patch grid cannot be represented in llama.cpp: its {p.type} graph "
            f"hard-codes a {LDP_GRID}x{LDP_GRID} grid (vision.image_size / vision.patch_size must be {LDP_GRID}, e.g. 336 / 14)"
        )
    if p.type == "ldpv2" and p.pool_size != LDPV2_POOL:
        raise ExportError(f"projector 'ldpv2' with pool_size {p.pool_size} cannot be represented in llama.cpp: its graph pools 2x2 to {LDPV2_POOL}x{LDPV2_POOL}")
    if v.intermediate_size == v.hidden_size:
        raise ExportError(
            f"vision.intermediate_size equal to vision.hidden_size ({v.hidden_size}) cannot be represented in llama.cpp: its loader "
            "would take the FFN for a legacy file and swap up / down"
        )
    if v.hidden_act not in ("quick_gelu", "gelu"):
        raise ExportError(f"vision.hidden_act {v.hidden_act!r} has no llama.cpp clip equivalent; expected quick_gelu or gelu")


# --- rotary layout -----------------------------------------------------------------------------


def permute_rope(weight: np.ndarray, heads: int) -> np.ndarray:
    """Rows of a Q / K projection from the half-split rotary layout (ours, Hugging Face's) to the
    interleaved pairs llama.cpp's `llama` architecture rotates (as llama.cpp's converter permutes)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def unpermute_rope(weight: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of `permute_rope`."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


# --- tensor names ------------------------------------------------------------------------------


def text_tensor_names(config: MobileVLMConfig) -> dict[str, str]:
    """Our state-dict key -> tensor name in the text GGUF."""
    t = config.text
    names = {"text.embed_tokens.weight": "token_embd.weight", "text.norm.weight": "output_norm.weight"}
    if not t.tie_word_embeddings:
        names["text.lm_head.weight"] = "output.weight"  # absent: llama.cpp reuses token_embd
    layer = {
        "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    }
    for i in range(t.num_layers):
        for ours, theirs in layer.items():
            names[f"text.layers.{i}.{ours}.weight"] = f"blk.{i}.{theirs}.weight"
    return names


_LDP_BLOCK = {"dw_conv": "block.0.0", "dw_norm": "block.0.1", "se.fc1": "block.1.fc1", "se.fc2": "block.1.fc2", "pw_conv": "block.2.0", "pw_norm": "block.2.1"}


def mmproj_tensor_names(config: MobileVLMConfig) -> dict[str, str]:
    """Our state-dict key -> tensor name in the mmproj GGUF (every vision layer is kept: the layers
    after the selected one are loaded by llama.cpp but never run, and make the import lossless)."""
    names = {
        "vision.embeddings.patch_embedding.weight": "v.patch_embd.weight",
        "vision.embeddings.class_embedding": "v.class_embd",
        "vision.embeddings.position_embedding.weight": "v.position_embd.weight",
        "vision.pre_layernorm.weight": "v.pre_ln.weight",
        "vision.pre_layernorm.bias": "v.pre_ln.bias",
        "vision.post_layernorm.weight": f"{POST_LN_PREFIX}.weight",
        "vision.post_layernorm.bias": f"{POST_LN_PREFIX}.bias",
    }
    layer = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.out_proj": "attn_out",
             "layer_norm1": "ln1", "layer_norm2": "ln2", "mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down"}
    for i in range(config.vision.num_layers):
        for ours, theirs in layer.items():
            for kind in ("weight", "bias"):
                names[f"vision.layers.{i}.{ours}.{kind}"] = f"v.blk.{i}.{theirs}.{kind}"
    kind = config.projector.type
    if kind == "mlp2x_gelu":
        pairs = {"mlp.0": "mm.0", "mlp.2": "mm.2"}
    elif kind == "ldp":
        pairs = {"mlp.0": "mm.model.mlp.1", "mlp.2": "mm.model.mlp.3"}
        for b in range(2):
            pairs.update({f"blocks.{b}.{ours}": f"mm.model.mb_block.{b + 1}.{theirs}" for ours, theirs in _LDP_BLOCK.items()})
    else:
        pairs = {"mlp.0": "mm.model.mlp.0", "mlp.2": "mm.model.mlp.2", "peg": "mm.model.peg.0"}
    no_bias = ("dw_conv", "pw_conv")  # MobileNetV3's convs before a norm have no bias
    for ours, theirs in pairs.items():
        names[f"projector.{ours}.weight"] = f"{theirs}.weight"
        if not ours.endswith(no_bias):
            names[f"projector.{ours}.bias"] = f"{theirs}.bias"
    return names


def to_gguf_layout(name: str, array: np.ndarray) -> np.ndarray:
    """Projector convolutions are stored with their singleton dimensions squeezed, as llama.cpp's
    MobileVLM converter writes them (depthwise [C, 3, 3], 1x1 convs as matrices)."""
    return array.reshape([d for d in array.shape if d != 1] or [1]) if name.startswith("mm.model.") and array.ndim == 4 else array
