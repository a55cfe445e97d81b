"""What a model reads and computes per token, for the roofline projection (`projection.py`): bytes
per weight of each quantization recipe (scales included), weight and KV-cache bytes per decoded token,
multiply-accumulates of prefill and image encoding, and the text models that published figures name."""

from __future__ import annotations

import re
from dataclasses import dataclass

from mobilevlm.config import PRESETS, MobileVLMConfig, TextConfig
from mobilevlm.errors import MobileVLMError

# --- bytes per weight ------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightFormat:
    """Bits per weight, scales included, for each tensor class; the arithmetic precision of the kernels."""

    name: str
    linear_bits: float  # attention and MLP linears of the decoder blocks
    head_bits: float  # output projection (read whole for every token)
    embedding_bits: float  # one embedding row is read per token
    vision_bits: float  # vision encoder and projector
    compute: str  # precision of decoder matmuls: int8 (dynamic activation quantization), fp16, fp32
    vision_compute: str
    kv_bytes: int  # bytes per cached K / V element
    i8mm: bool = True  # kernels use SMMLA where the cores have it


# llama.cpp block formats (ggml-common.h): Q4_0 = 18 bytes / 32 weights, Q8_0 = 34 / 32, Q4_K = 144 / 256,
# Q5_K = 176 / 256, Q6_K = 210 / 256. llama.cpp's quantizer writes the output head as Q6_K (except for
# Q8_0), keeps the mmproj (vision) file in f16 and the KV cache in f16.
Q4_0, Q8_0, Q4_K, Q6_K = 4.5, 8.5, 4.5, 6.5625
# Q4_K_S: Q4_K with ffn_down of the first n_layer/8 layers and attn_v of the first 4 layers in Q5_K:
# +0.04 bit/weight for the MobileLLaMA shapes. Q4_K_M: attn_v and ffn_down of about half the layers
# in Q6_K (llama.cpp's use_more_bits rule): +0.32 bit/weight. Both checked against llama.cpp's
# published LLaMA-7B sizes (Q4_K_S 3.59 GiB = 4.58 bpw, Q4_K_M 3.80 GiB = 4.84 bpw, all tensors).
Q4_K_S, Q4_K_M = 4.54, 4.82


def weight_format(recipe: str) -> WeightFormat:
    """Our recipes (export/quantize.py, export/gguf.py) and the published runtimes' ones."""
    r = recipe.strip().lower().replace("fp32 (eager)", "fp32")
    r = re.sub(r"-opset\d+|-ort$", "", r) if r.startswith(("fp32-", "fp16-")) else r
    if r in ("fp32", "f32"):
        return WeightFormat(r, 32, 32, 32, 32, "fp32", "fp32", 4, False)
    if r in ("fp16", "f16", "bf16"):
        return WeightFormat(r, 16, 16, 16, 16, "fp16", "fp16", 2, False)
    gguf = {"q4_0": (Q4_0, Q6_K), "q4_k_s": (Q4_K_S, Q6_K), "q4_k_m": (Q4_K_M, Q6_K), "q8_0": (Q8_0, Q8_0)}
    if r in gguf:
        linear, head = gguf[r]
        return WeightFormat(r, linear, head, linear, 16, "int8", "fp16", 2, False)
    if r in ("8da8w",):
        return WeightFormat(r, 8, 8, 8, 8, "int8", "int8", 4)
    if r == "palettize4-fp16head":
        # coreml-llm-cli's Llama 2 7B (a published Core ML figure): 4-bit lookup tables in the blocks
        # (304 MB per three-block chunk = 4.0 bits/weight, huggingface.co/smpanaro/Llama-2-7b-coreml),
        # fp16 output head and embeddings (assumed: makes up the "~4GB" its README states)
        return WeightFormat(r, 4, 16, 16, 16, "fp16", "fp16", 2, False)
    if r == "et-spinquant":
        # ExecuTorch's Llama 3.2 quantized recipe: 8da4w group 32 (fp32 scales) in the blocks,
        # 8-bit per-channel output head, 8-bit embeddings; its 1B .pte (1,083 MiB) matches this count.
        return WeightFormat(r, 4 + 32 / 32, 8, 8, 32, "int8", "fp32", 4)
    match = re.fullmatch(r"8da4w(?:-g(\d+))?(?:-(emb8|emb4|embfp))?(-vis8)?", r)
    if match:
        # torchao's 8da4w lowered to XNNPACK keeps one fp32 scale per group: 4 + 32 / group bits.
        group = int(match.group(1) or 128)
        bits = 4 + 32 / group
        embedding = {"emb8": 9.0, "emb4": 5.0, "embfp": 32.0}[match.group(2) or "emb8"]
        vision8 = bool(match.group(3))
        return WeightFormat(r, bits, bits, embedding, 8 if vision8 else 32, "int8", "int8" if vision8 else "fp32", 4)
    match = re.fullmatch(r"int4(?:-b(\d+))?(?:-acc\d)?(-sym)?(?:-(emb4|embfp))?(-vis8)?(?:-opset\d+)?(-ort)?", r)
    if match:
        # ONNX MatMulNBits / Core ML blockwise int4: one fp32 (ORT) scale per block, plus a 4-bit zero
        # point when asymmetric; arithmetic with int8 activations (accuracy_level 4) or fp32
        block = int(match.group(1) or 32)
        bits = 4 + (32 + (0 if match.group(2) else 4)) / block
        embedding = {"emb4": 4 + 32 / block, "embfp": 32.0}.get(match.group(3) or "", 32.0)
        return WeightFormat(r, bits, bits, embedding, 8 if match.group(4) else 32, "int8", "int8" if match.group(4) else "fp32", 4)
    match = re.fullmatch(r"int8(?:-b(\d+))?(?:-(emb4|embfp))?(?:-opset\d+)?(-ort)?", r)
    if match:  # ONNX MatMulInteger per-channel / Core ML int8 per-block
        bits = 8 + (32 / int(match.group(1)) if match.group(1) else 0)
        return WeightFormat(r, bits, bits, bits, bits, "int8", "int8", 4)
    match = re.fullmatch(r"palettize4(?:-g(\d+))?", r)
    if match:  # Core ML 4-bit lookup tables: the table is negligible, arithmetic in fp16 after the lookup
        return WeightFormat(r, 4, 4, 4, 16, "fp16", "fp16", 2, False)
    raise MobileVLMError(f"unknown quantization recipe {recipe!r} for the projection; expected fp32, fp16, bf16, q4_0, q4_k_s, "
                         "q4_k_m, q8_0, 8da8w, 8da4w[-gN][-emb8|-emb4|-embfp][-vis8], int4[-bN]..., int8[-bN]..., palettize4[-gN] or et-spinquant")


def coreml_weight_format(recipe: str) -> WeightFormat:
    """Bytes of our Core ML recipes (export/coreml_compress.py: fp16 | int8[-bN] | int4[-bN] | palettize4[-gN]).

    Core ML's weight-only compression keeps fp16 arithmetic (the weights are decompressed on the fly)
    and an fp16 KV-cache state. Per-block scales (and int4's 4-bit zero points) are stored in the
    weight's dtype, fp16 here (coremltools 9.0 optimize/_utils.py: `scale.astype(weight.dtype)`); the 4-bit lookup tables (16 fp16 entries per group of output channels) are
    negligible. Vision, projector and embedding table: int8 per-block 32 in every compressed recipe."""
    match = re.fullmatch(r"(fp16|int8|int4|palettize4)(?:-([bg])(\d+))?", recipe.strip().lower())
    if not match:
        raise MobileVLMError(f"unknown Core ML recipe {recipe!r} for the projection; expected fp16 | int8[-bN] | int4[-bN] | palettize4[-gN]")
    scheme, size = match.group(1), int(match.group(3) or 0)
    if scheme == "fp16":
        return WeightFormat(recipe, 16, 16, 16, 16, "fp16", "fp16", 2, False)
    rest = 8 + 16 / 32
    bits = {"int8": 8 + 16 / (size or 32), "int4": 4 + (16 + 4) / (size or 32), "palettize4": 4.0}[scheme]
    return WeightFormat(recipe, bits, bits, rest, rest, "fp16", "fp16", 2, False)


# --- counting --------------------------------------------------------------------------------------


def block_linear_params(t: TextConfig) -> int:
    kv = t.num_kv_heads * t.head_dim
    return 2 * t.hidden_size * t.hidden_size + 2 * t.hidden_size * kv + 3 * t.hidden_size * t.intermediate_size


def text_linear_params(t: TextConfig) -> int:
    """Linear weights of all decoder blocks. A sparse (MoE) layer counts every expert and its router:
    the exported graphs compute all experts and weight them (static shapes), so all are read and
    multiplied per token; `mobilevlm.moe.active_parameters` gives the share a token actually uses."""
    moe_layers = sum(t.is_moe_layer(i) for i in range(t.num_layers))
    extra = moe_layers * ((t.num_experts - 1) * 3 * t.hidden_size * t.intermediate_size + t.hidden_size * t.num_experts)
    return t.num_layers * block_linear_params(t) + extra


@dataclass(frozen=True)
class DecodeCount:
    weight_bytes: float
    kv_bytes: float
    macs: float

    @property
    def bytes(self) -> float:
        return self.weight_bytes + self.kv_bytes


def decode_count(t: TextConfig, fmt: WeightFormat, context: int) -> DecodeCount:
    """Bytes read and MACs for one decoded token with `context` positions in the cache."""
    linear = text_linear_params(t)
    head = t.vocab_size * t.hidden_size
    norms = (2 * t.num_layers + 1) * t.hidden_size * 4
    weights = linear * fmt.linear_bits / 8 + head * fmt.head_bits / 8 + t.hidden_size * fmt.embedding_bits / 8 + norms
    kv_dim = t.num_kv_heads * t.head_dim
    kv = 2 * t.num_layers * kv_dim * context * fmt.kv_bytes
    attention = 2 * t.num_layers * t.hidden_size * context  # q.k over every cached position, then p.v
    return DecodeCount(weights, kv, linear + head + attention)


def prefill_macs(t: TextConfig, tokens: int) -> float:
    """MACs of a causal prefill of `tokens` positions; logits for the last position only."""
    linear = tokens * text_linear_params(t)
    attention = t.num_layers * t.hidden_size * tokens * (tokens + 1)  # causal q.k and p.v
    return linear + attention + t.vocab_size * t.hidden_size


def vision_macs(config: MobileVLMConfig) -> float:
    """Image encoder (the layers that run up to select_layer) and projector: by formula for MobileVLM's
    own families (CLIP ViT + MLP / LDP / LDPv2, one view), counted by running the model on the meta
    device under torch's FLOP counter for every other family."""
    from mobilevlm.export.pipeline import model_features

    if any(not f.startswith("decoder:") for f in model_features(config)):
        return counted_vision_macs(config)
    v, d = config.vision, config.text.hidden_size
    tokens = v.num_patches + 1
    layer = tokens * (4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size) + 2 * tokens * tokens * v.hidden_size
    patch = v.num_patches * 3 * v.patch_size**2 * v.hidden_size
    mlp = v.num_patches * (v.hidden_size * d + d * d)
    grid = v.grid_size
    if config.projector.type == "ldp":  # two inverted-residual blocks: pointwise D x D at full, then half resolution
        extra = grid * grid * d * d + ((grid + 1) // 2) ** 2 * d * d + 9 * grid * grid * d
    elif config.projector.type == "ldpv2":  # pooling + depthwise 3x3 positional conv
        extra = 9 * config.projector.pool_size**2 * d
    else:
        extra = 0
    return v.num_layers_used * layer + patch + mlp + extra


def counted_vision_macs(config: MobileVLMConfig) -> float:
    """MACs of `encode_image` for one image (anyres: the largest tile layout), from torch's FLOP
    counter on a meta-device model: no weights are allocated, so published shapes cost nothing."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from mobilevlm.model import MobileVLM

    with torch.device("meta"):
        model = MobileVLM(config).to("meta")  # .to: tables some modules build on the CPU on purpose (EVA's rotary)
        model.requires_grad_(False)  # the counter's module tracker hooks tensors that need grad (learned queries)
        s = config.input_image_size
        views = 1 + config.max_tiles if config.resolution == "anyres" else 1
        pixels = torch.zeros(views, 3, s, s) if config.resolution == "anyres" else torch.zeros(1, 3, s, s)
        counter = FlopCounterMode(display=False)
        with counter:
            model.encode_image(pixels)
    return counter.get_total_flops() / 2


# --- models named by published figures ---------------------------------------------------------------

LLAMA_3_2_1B = TextConfig(vocab_size=128256, hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8, intermediate_size=8192,
                          max_seq_len=2048, rope_theta=500000.0, tie_word_embeddings=True, rms_norm_eps=1e-5, bos_id=128000, eos_id=128001)
LLAMA_3_2_3B = TextConfig(vocab_size=128256, hidden_size=3072, num_layers=28, num_heads=24, num_kv_heads=8, intermediate_size=8192,
                          max_seq_len=2048, rope_theta=500000.0, tie_word_embeddings=True, rms_norm_eps=1e-5, bos_id=128000, eos_id=128001)
LLAMA_3_8B = TextConfig(vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8, intermediate_size=14336,
                        max_seq_len=2048, rope_theta=500000.0, rms_norm_eps=1e-5, bos_id=128000, eos_id=128001)
LLAMA_2_7B = TextConfig(vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32, intermediate_size=11008,
                        max_seq_len=4096, rope_theta=10000.0, rms_norm_eps=1e-5, bos_id=1, eos_id=2)
TEXT_MODELS = {"llama-3.2-1b": LLAMA_3_2_1B, "llama-3.2-3b": LLAMA_3_2_3B, "llama-3-8b": LLAMA_3_8B, "llama-2-7b": LLAMA_2_7B}


def model_config(name: str) -> tuple[TextConfig, MobileVLMConfig | None]:
    if name in PRESETS:
        config = PRESETS[name]
        return config.text, config
    if name in TEXT_MODELS:
        return TEXT_MODELS[name], None
    raise MobileVLMError(f"unknown model {name!r}; expected one of {', '.join([*PRESETS, *TEXT_MODELS])}")
