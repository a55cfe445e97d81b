"""Configuration: one frozen dataclass per component, one `MobileVLMConfig` holding them, named presets.

Shapes decide latency, so the presets carry the exact shapes of the published MobileVLM models; a
benchmark of such a shape with random weights measures what the real model would cost. `tiny` is the
shape the toolkit trains from scratch on 2 CPU cores.

Configs are validated when built from a dict (a config.json), before any tensor is allocated: a
missing field, a wrong type or an absurd size is a `ConfigError` naming the field.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Vision encoder families (`mobilevlm.vision`): CLIP ViT, EVA-02-style ViT, ConvNeXt, and none at all
# ("patch": Fuyu's encoder-free path, raw patches linearly projected, with a row-separator token).
VISION_TYPES = ("clip_vit", "eva_vit", "convnext", "patch")
# Token-level projectors (`mlp2x_gelu`, `ldp`, `ldpv2`, `linear`) map every patch or pooled cell to a
# token; query-based ones (`qformer`: BLIP-2's Q-Former, `resampler`: Flamingo's Perceiver resampler)
# give `num_queries` tokens whatever the resolution.
PROJECTOR_TYPES = ("mlp2x_gelu", "ldp", "ldpv2", "linear", "qformer", "resampler")
GRID_PROJECTORS = ("ldp", "ldpv2")
QUERY_PROJECTORS = ("qformer", "resampler")
# How an image becomes encoder input: one resized view ("direct"), or a grid of tiles chosen by aspect
# ratio plus a downscaled global view ("anyres": LLaVA-NeXT / Monkey / SPHINX), or a low-resolution
# view whose tokens cross-attend to a small high-resolution encoder's features ("dual": CogAgent-style).
RESOLUTION_STRATEGIES = ("direct", "anyres", "dual")
# Where image and text meet in the decoder: image tokens in the sequence ("token", MobileVLM / LLaVA),
# gated cross-attention to the image features every `cross_attention_every` layers with no image
# tokens in the sequence ("cross_attention", Flamingo), or image tokens in the sequence with their own
# QKV and MLP weights in every layer, routed by a token-type mask ("visual_expert", CogVLM).
INTERFACES = ("token", "cross_attention", "visual_expert")
SELECT_FEATURES = ("patch", "cls_patch")
VISION_ACTIVATIONS = ("quick_gelu", "gelu")
IMAGE_ASPECT_MODES = ("pad", "resize", "crop")

# Refuse configs whose weights alone would exceed this many parameters (about 400 GB in fp32):
# such a config is a corrupt or hostile file, and allocating it would take the machine down.
MAX_PARAMETERS = 100_000_000_000
# The same bound for what the context length allocates at run time (rotary tables, the KV cache and
# the square attention mask grow with text.max_seq_len, which the parameter count does not see).
MAX_BUFFER_BYTES = 4 * MAX_PARAMETERS


@dataclass(frozen=True)
class VisionConfig:
    """The vision encoder. `type` picks the family (see VISION_TYPES); the ViT fields describe CLIP and
    EVA alike. For `convnext`, `stage_depths` / `stage_dims` describe the stages, `hidden_size` must be
    the last stage's width and `patch_size` the total stride (4 * 2 ** (stages - 1)), so `grid_size`
    means the same for every family. `patch` has no layers: `hidden_size` is the width patches are
    projected to, and each grid row ends with a learned separator token."""

    image_size: int = 336
    patch_size: int = 14
    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    intermediate_size: int = 4096
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    # Which hidden state feeds the projector: -2 is the second-to-last layer's output, as MobileVLM
    # and LLaVA use. Index 0 would be the embeddings, so layers after the selected one never run.
    select_layer: int = -2
    select_feature: str = "patch"
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    type: str = "clip_vit"
    stage_depths: tuple[int, ...] = ()
    stage_dims: tuple[int, ...] = ()

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def num_layers_used(self) -> int:
        """Transformer layers that run to produce the selected hidden state."""
        return self.select_layer % (self.num_layers + 1)

    @property
    def num_output_tokens(self) -> int:
        if self.type == "patch":
            return self.grid_size * (self.grid_size + 1)
        if self.type == "convnext":
            return self.num_patches
        return self.num_patches + (1 if self.select_feature == "cls_patch" else 0)

    def validate(self) -> None:
        _choice(self, "type", VISION_TYPES)
        _positive(self, "image_size", "patch_size", "hidden_size", "num_layers", "num_heads", "intermediate_size")
        if self.type == "convnext":
            if not self.stage_depths or len(self.stage_depths) != len(self.stage_dims):
                raise ConfigError("vision.stage_depths and vision.stage_dims must be non-empty and of equal length for a convnext encoder")
            if any(int(v) != v or v <= 0 for v in self.stage_depths + self.stage_dims):
                raise ConfigError(f"vision.stage_depths / stage_dims must be positive integers, got {self.stage_depths} / {self.stage_dims}")
            if self.hidden_size != self.stage_dims[-1]:
                raise ConfigError(f"vision.hidden_size {self.hidden_size} must equal the last ConvNeXt stage width {self.stage_dims[-1]}")
            stride = 4 * 2 ** (len(self.stage_dims) - 1)
            if self.patch_size != stride:
                raise ConfigError(f"vision.patch_size {self.patch_size} must be the ConvNeXt total stride {stride} ({len(self.stage_dims)} stages)")
        if self.image_size % self.patch_size:
            raise ConfigError(f"vision.image_size {self.image_size} is not a multiple of vision.patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"vision.hidden_size {self.hidden_size} is not divisible by vision.num_heads {self.num_heads}")
        if self.type == "eva_vit" and (self.hidden_size // self.num_heads) % 4:
            raise ConfigError(f"vision head size {self.hidden_size // self.num_heads} must be a multiple of 4 for EVA's 2-D rotary embedding")
        vit = self.type in ("clip_vit", "eva_vit")  # select_layer / select_feature mean nothing to the others
        if vit and (not -(self.num_layers + 1) <= self.select_layer <= self.num_layers or self.num_layers_used == 0):
            raise ConfigError(
                f"vision.select_layer {self.select_layer} must pick one of the {self.num_layers} layer outputs "
                f"(1..{self.num_layers} or -1..-{self.num_layers})"
            )
        _choice(self, "select_feature", SELECT_FEATURES)
        _choice(self, "hidden_act", VISION_ACTIVATIONS)
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            if len(value) != 3 or not all(isinstance(v, (int, float)) for v in value):
                raise ConfigError(f"vision.{name} must be three numbers, got {value!r}")
        if any(v <= 0 for v in self.image_std):
            raise ConfigError(f"vision.image_std must be positive, got {self.image_std!r}")


@dataclass(frozen=True)
class ProjectorConfig:
    """Maps vision features to the decoder's width (and, for LDP / LDPv2, shrinks the token grid 2x)."""

    type: str = "ldpv2"
    # Side of the output token grid for `ldpv2` (12 in MobileVLM V2: 24x24 patches -> 12x12 tokens).
    # `ldp` always halves the grid with its stride-2 block; `mlp2x_gelu` keeps every token.
    pool_size: int = 12
    # Query-based projectors (`qformer`, `resampler`): learned queries, layers, attention heads.
    num_queries: int = 32
    depth: int = 2
    num_heads: int = 4

    def validate(self) -> None:
        _choice(self, "type", PROJECTOR_TYPES)
        _positive(self, "pool_size", "num_queries", "depth", "num_heads")


@dataclass(frozen=True)
class TextConfig:
    """LLaMA-style decoder: RMSNorm, rotary positions, grouped KV heads, SwiGLU, static KV cache."""

    vocab_size: int = 32000
    hidden_size: int = 2048
    num_layers: int = 24
    num_heads: int = 16
    num_kv_heads: int = 16
    intermediate_size: int = 5632
    max_seq_len: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = 0
    # Sparse decoder (MoE-LLaVA style): 0 = dense SwiGLU everywhere. Otherwise every `moe_every`-th
    # layer (layers moe_every-1, 2*moe_every-1, ...) holds `num_experts` SwiGLU experts of
    # `intermediate_size`, of which each token uses the top `experts_per_token`, with a
    # load-balancing loss weighted by `router_aux_loss_coef` in training.
    num_experts: int = 0
    experts_per_token: int = 2
    moe_every: int = 1
    router_aux_loss_coef: float = 0.01

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def is_moe_layer(self, index: int) -> bool:
        return self.num_experts > 0 and index % self.moe_every == self.moe_every - 1

    def validate(self) -> None:
        _positive(self, "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "max_seq_len")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"text.hidden_size {self.hidden_size} is not divisible by text.num_heads {self.num_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"text head size {self.head_dim} must be even for rotary embeddings")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"text.num_heads {self.num_heads} is not a multiple of text.num_kv_heads {self.num_kv_heads}")
        if self.rope_theta <= 0 or self.rms_norm_eps <= 0:
            raise ConfigError("text.rope_theta and text.rms_norm_eps must be positive")
        if self.num_experts < 0 or (self.num_experts and not 1 <= self.experts_per_token <= self.num_experts):
            raise ConfigError(f"text.experts_per_token {self.experts_per_token} must be in 1..text.num_experts {self.num_experts}")
        if self.num_experts and (self.moe_every < 1 or self.moe_every > self.num_layers):
            raise ConfigError(f"text.moe_every {self.moe_every} must be in 1..text.num_layers {self.num_layers}")
        if self.router_aux_loss_coef < 0:
            raise ConfigError(f"text.router_aux_loss_coef must be >= 0, got {self.router_aux_loss_coef}")
        for name in ("bos_id", "eos_id", "pad_id"):
            value = getattr(self, name)
            if not 0 <= value < self.vocab_size:
                raise ConfigError(f"text.{name} {value} is outside the vocabulary (size {self.vocab_size})")


@dataclass(frozen=True)
class MobileVLMConfig:
    """The whole model: vision encoder -> projector -> decoder, plus how images and prompts are prepared."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    text: TextConfig = field(default_factory=TextConfig)
    # "pad": pad to a square with the mean colour, then resize (MobileVLM); "resize": stretch to a
    # square; "crop": resize the short side, crop the centre (CLIP's own processor, LLaVA's default).
    image_aspect_ratio: str = "pad"
    # Name of a template in `mobilevlm.processing.PROMPT_TEMPLATES`.
    prompt_template: str = "vicuna_v1"
    # See RESOLUTION_STRATEGIES. `anyres_grids` lists the allowed tile layouts as flattened
    # (rows, cols) pairs, e.g. (1, 2, 2, 1, 2, 2); each tile is `vision.image_size` square.
    # `high_res_vision` is the small encoder of the "dual" strategy; the image is prepared at its
    # `image_size` and average-pooled down to `vision.image_size` for the main encoder.
    resolution: str = "direct"
    anyres_grids: tuple[int, ...] = ()
    high_res_vision: VisionConfig | None = None
    # See INTERFACES. For "cross_attention", a gated cross-attention block runs before decoder layers
    # cross_attention_every - 1, 2 * cross_attention_every - 1, ...
    interface: str = "token"
    cross_attention_every: int = 2

    @property
    def tokens_per_view(self) -> int:
        """Image tokens one encoder view gives after the projector."""
        grid = self.vision.grid_size
        if self.projector.type in QUERY_PROJECTORS:
            return self.projector.num_queries
        if self.projector.type == "ldp":
            return ((grid + 1) // 2) ** 2
        if self.projector.type == "ldpv2":
            return self.projector.pool_size**2
        return self.vision.num_output_tokens

    @property
    def grids(self) -> list[tuple[int, int]]:
        """Allowed anyres tile layouts as (rows, cols)."""
        g = self.anyres_grids
        return [(int(g[i]), int(g[i + 1])) for i in range(0, len(g) - 1, 2)]

    @property
    def max_tiles(self) -> int:
        return max((r * c for r, c in self.grids), default=0)

    def image_tokens_for_grid(self, rows: int, cols: int) -> int:
        """anyres: the global view and each tile, each followed by one separator token."""
        return (1 + rows * cols) * (self.tokens_per_view + 1)

    @property
    def num_image_tokens(self) -> int:
        """Image tokens in the sequence (for anyres, the most any image can take; none for
        cross-attention, whose image features enter beside the sequence: see `num_image_features`)."""
        if self.interface == "cross_attention":
            return 0
        if self.resolution == "anyres":
            return (1 + self.max_tiles) * (self.tokens_per_view + 1)
        return self.tokens_per_view

    @property
    def num_image_features(self) -> int:
        """Rows of `encode_image`'s output: image tokens, or the cross-attention memory."""
        if self.resolution == "anyres":
            return (1 + self.max_tiles) * (self.tokens_per_view + 1)
        return self.tokens_per_view

    @property
    def input_image_size(self) -> int:
        """Side of the (square) image the processor prepares: the high-resolution side for "dual"."""
        return self.high_res_vision.image_size if self.resolution == "dual" else self.vision.image_size

    def validate(self) -> MobileVLMConfig:
        self.vision.validate()
        self.projector.validate()
        self.text.validate()
        _choice(self, "image_aspect_ratio", IMAGE_ASPECT_MODES)
        _choice(self, "resolution", RESOLUTION_STRATEGIES)
        _choice(self, "interface", INTERFACES)
        if self.interface == "cross_attention" and not 1 <= self.cross_attention_every <= self.text.num_layers:
            raise ConfigError(f"cross_attention_every {self.cross_attention_every} must be in 1..text.num_layers {self.text.num_layers}")
        if self.interface != "token" and self.resolution == "anyres":
            raise ConfigError(f"interface {self.interface!r} with resolution 'anyres' is not supported (tiles are joined as tokens)")
        grid = self.vision.grid_size
        if self.projector.type in GRID_PROJECTORS and (self.vision.select_feature != "patch" or self.vision.type == "patch"):
            raise ConfigError(
                f"projector {self.projector.type!r} reshapes tokens to a grid and needs a patch grid "
                "(vision.select_feature 'patch', and not the encoder-free 'patch' type whose rows end in separators)"
            )
        if self.projector.type == "ldpv2" and grid % self.projector.pool_size:
            raise ConfigError(
                f"projector.pool_size {self.projector.pool_size} must divide the patch grid side {grid} "
                f"(image_size {self.vision.image_size} / patch_size {self.vision.patch_size})"
            )
        if self.projector.type in QUERY_PROJECTORS and self.text.hidden_size % self.projector.num_heads:
            raise ConfigError(f"text.hidden_size {self.text.hidden_size} is not divisible by projector.num_heads {self.projector.num_heads}")
        if self.resolution == "anyres":
            g = self.anyres_grids
            if not g or len(g) % 2 or any(int(x) != x or x < 1 for x in g):
                raise ConfigError(f"anyres_grids must be (rows, cols) pairs of positive integers, got {g!r}")
        elif self.anyres_grids:
            raise ConfigError(f"anyres_grids is set but resolution is {self.resolution!r}")
        if self.resolution == "dual":
            if self.high_res_vision is None:
                raise ConfigError("resolution 'dual' needs high_res_vision (the small high-resolution encoder)")
            self.high_res_vision.validate()
            if self.high_res_vision.image_size % self.vision.image_size or self.high_res_vision.image_size == self.vision.image_size:
                raise ConfigError(
                    f"high_res_vision.image_size {self.high_res_vision.image_size} must be a larger multiple of vision.image_size {self.vision.image_size}"
                )
        elif self.high_res_vision is not None:
            raise ConfigError(f"high_res_vision is set but resolution is {self.resolution!r}")
        if self.num_image_tokens >= self.text.max_seq_len:
            raise ConfigError(
                f"the image alone takes {self.num_image_tokens} tokens, more than text.max_seq_len {self.text.max_seq_len}"
            )
        if (n := estimate_parameters(self)) > MAX_PARAMETERS:
            raise ConfigError(f"config describes {n:,} parameters, more than the {MAX_PARAMETERS:,} this toolkit accepts")
        if (n := estimate_buffer_bytes(self)) > MAX_BUFFER_BYTES:
            raise ConfigError(
                f"text.max_seq_len {self.text.max_seq_len} needs {n:,} bytes of rotary tables, KV cache and attention mask, "
                f"more than the {MAX_BUFFER_BYTES:,} this toolkit accepts"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, source: str = "config") -> MobileVLMConfig:
        """Build and validate a config from a dict (e.g. the `model` section of config.json)."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected an object, got {type(data).__name__}")
        parts = {}
        for name, sub in (("vision", VisionConfig), ("projector", ProjectorConfig), ("text", TextConfig)):
            if name not in data:
                raise ConfigError(f"{source}: missing field '{name}'")
            parts[name] = _build(sub, data[name], f"{source}: {name}")
        high = data.get("high_res_vision")
        parts["high_res_vision"] = None if high is None else _build(VisionConfig, high, f"{source}: high_res_vision")
        rest = {k: v for k, v in data.items() if k not in parts}
        config = _build(cls, rest, source, **parts)
        try:
            return config.validate()
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None


def estimate_parameters(config: MobileVLMConfig) -> int:
    """Parameter count from the shapes alone (no allocation), close enough to refuse absurd configs."""
    v, t = config.vision, config.text
    vision = _vision_parameters(v) + (_vision_parameters(config.high_res_vision) if config.high_res_vision else 0)
    if config.high_res_vision is not None:  # two gated cross-attention blocks (vision/dual.py)
        d, e = v.hidden_size, config.high_res_vision.hidden_size
        vision += 2 * (2 * d * d + 2 * e * d + 8 * d * d)
    kv = t.num_kv_heads * t.head_dim
    attention = 2 * t.hidden_size**2 + 2 * t.hidden_size * kv
    mlp = 3 * t.hidden_size * t.intermediate_size
    moe_layers = sum(t.is_moe_layer(i) for i in range(t.num_layers))
    text = t.num_layers * (attention + mlp) + moe_layers * (t.num_experts - 1) * mlp
    text += t.vocab_size * t.hidden_size * (1 if t.tie_word_embeddings else 2)
    if config.interface == "cross_attention":  # one gated block (4 D^2 attention + SwiGLU) per interval
        text += t.num_layers // config.cross_attention_every * (4 * t.hidden_size**2 + mlp)
    elif config.interface == "visual_expert":  # a second set of attention and MLP weights per layer
        text += t.num_layers * (attention + mlp)
    projector = v.hidden_size * t.hidden_size + 3 * t.hidden_size**2
    if config.projector.type in QUERY_PROJECTORS:
        projector += config.projector.depth * (16 if config.projector.type == "qformer" else 12) * t.hidden_size**2
    return int(vision + text + projector)


def _vision_parameters(v: VisionConfig) -> int:
    if v.type == "convnext":
        return int(sum(depth * (8 * dim**2 + 49 * dim) for depth, dim in zip(v.stage_depths, v.stage_dims)))
    patch = 3 * v.patch_size**2 * v.hidden_size
    if v.type == "patch":
        return patch
    mlp = (3 if v.type == "eva_vit" else 2) * v.hidden_size * v.intermediate_size  # SwiGLU has three matrices
    return v.num_layers * (4 * v.hidden_size**2 + mlp) + (v.num_patches + 1) * v.hidden_size + patch


def estimate_buffer_bytes(config: MobileVLMConfig) -> int:
    """Bytes the context length allocates (no allocation): float64 rotary angles and float32 cos / sin
    tables, a float32 KV cache for one sequence, and the boolean [L, L] causal mask."""
    t = config.text
    positions = t.max_seq_len
    rope = positions * t.head_dim // 2 * 8 + 2 * positions * t.head_dim * 4
    cache = t.num_layers * 2 * t.num_kv_heads * t.head_dim * positions * 4
    return int(rope + cache + positions * positions)


def _build(cls: type, data: Any, source: str, **given: Any) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected an object, got {type(data).__name__}")
    kwargs = dict(given)
    for f in dataclasses.fields(cls):
        if f.name in given:
            continue
        if f.name not in data and f.name in ADDED_FIELDS:
            continue  # written by a toolkit older than the field: the default is what it meant
        if f.name not in data:
            # Every field is required: a config.json is written whole by `save_pretrained`, and a
            # silently defaulted shape would load weights into the wrong model.
            raise ConfigError(f"{source}: missing field '{f.name}' (expected {_type_name(f)})")
        kwargs[f.name] = _coerce(data[f.name], f, source)
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ConfigError(f"{source}: unknown field(s) {', '.join(map(repr, unknown))}")
    return cls(**kwargs)


# Fields added after the first config.json format; a file without them means their default (e.g.
# every model trained before the model families existed is a CLIP ViT with a token interface).
ADDED_FIELDS = frozenset(
    {"type", "stage_depths", "stage_dims", "num_queries", "depth", "num_heads", "num_experts", "experts_per_token", "moe_every",
     "router_aux_loss_coef", "resolution", "anyres_grids", "high_res_vision", "interface", "cross_attention_every"}
)


def _type_name(f: dataclasses.Field) -> str:
    return str(f.type).replace("typing.", "")


def _coerce(value: Any, f: dataclasses.Field, source: str) -> Any:
    kind = str(f.type)
    where = f"{source}.{f.name}"
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if kind == "str":
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if kind.startswith("tuple[int"):
        if not isinstance(value, (list, tuple)) or not all(isinstance(x, int) and not isinstance(x, bool) for x in value):
            raise ConfigError(f"{where}: expected a list of integers, got {value!r}")
        return tuple(value)
    if kind.startswith("tuple"):
        if not isinstance(value, (list, tuple)) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value):
            raise ConfigError(f"{where}: expected a list of numbers, got {value!r}")
        return tuple(float(x) for x in value)
    raise AssertionError(f"unhandled config field type {kind}")


def _positive(obj: Any, *names: str) -> None:
    prefix = type(obj).__name__.replace("Config", "").lower()
    for name in names:
        value = getattr(obj, name)
        if value <= 0:
            raise ConfigError(f"{prefix}.{name} must be positive, got {value}")


def _choice(obj: Any, name: str, allowed: tuple[str, ...]) -> None:
    value = getattr(obj, name)
    if value not in allowed:
        prefix = type(obj).__name__.replace("Config", "").lower()
        prefix = "" if prefix == "mobilevlm" else prefix + "."
        raise ConfigError(f"unknown {prefix}{name} {value!r}; expected one of {', '.join(allowed)}")


# --- presets -------------------------------------------------------------------------------------

CLIP_VIT_L14_336 = VisionConfig()  # the defaults are CLIP ViT-L/14 at 336 px
MOBILELLAMA_1_4B = TextConfig()  # the defaults are MobileLLaMA 1.4B
MOBILELLAMA_2_7B = TextConfig(hidden_size=2560, num_layers=32, num_heads=32, num_kv_heads=32, intermediate_size=6912)
VICUNA_7B = TextConfig(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32, intermediate_size=11008, max_seq_len=4096, rms_norm_eps=1e-5)

# 96 px in 8 px patches: a 12x12 grid that LDPv2 pools to 6x6 = 36 image tokens, 2x2 per cell of the
# generated scenes' 3x3 layout. Linear widths are multiples of 128 so every 4-bit group size fits.
TINY = MobileVLMConfig(
    vision=VisionConfig(image_size=96, patch_size=8, hidden_size=128, num_layers=4, num_heads=4, intermediate_size=512),
    projector=ProjectorConfig(type="ldpv2", pool_size=6),
    text=TextConfig(
        vocab_size=2048, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=640, max_seq_len=256, rms_norm_eps=1e-6
    ),
    prompt_template="tiny",
)

PRESETS: dict[str, MobileVLMConfig] = {
    "tiny": TINY,
    "mobilevlm-1.7b": MobileVLMConfig(CLIP_VIT_L14_336, ProjectorConfig("ldp"), MOBILELLAMA_1_4B),
    "mobilevlm-3b": MobileVLMConfig(CLIP_VIT_L14_336, ProjectorConfig("ldp"), MOBILELLAMA_2_7B),
    "mobilevlm-v2-1.7b": MobileVLMConfig(CLIP_VIT_L14_336, ProjectorConfig("ldpv2"), MOBILELLAMA_1_4B),
    "mobilevlm-v2-3b": MobileVLMConfig(CLIP_VIT_L14_336, ProjectorConfig("ldpv2"), MOBILELLAMA_2_7B),
    "mobilevlm-v2-7b": MobileVLMConfig(CLIP_VIT_L14_336, ProjectorConfig("ldpv2"), VICUNA_7B),
}


def get_preset(name: str) -> MobileVLMConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
    return PRESETS[name].validate()
