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

PROJECTOR_TYPES = ("mlp2x_gelu", "ldp", "ldpv2")
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
    """CLIP-style ViT: patch conv, class token, learned positions, pre-LN transformer."""

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
        return self.num_patches + (1 if self.select_feature == "cls_patch" else 0)

    def validate(self) -> None:
        _positive(self, "image_size", "patch_size", "hidden_size", "num_layers", "num_heads", "intermediate_size")
        if self.image_size % self.patch_size:
            raise ConfigError(f"vision.image_size {self.image_size} is not a multiple of vision.patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"vision.hidden_size {self.hidden_size} is not divisible by vision.num_heads {self.num_heads}")
        if not -(self.num_layers + 1) <= self.select_layer <= self.num_layers or self.num_layers_used == 0:
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

    def validate(self) -> None:
        _choice(self, "type", PROJECTOR_TYPES)
        _positive(self, "pool_size")


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

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

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

    @property
    def num_image_tokens(self) -> int:
        grid = self.vision.grid_size
        extra = 1 if self.vision.select_feature == "cls_patch" else 0
        if self.projector.type == "mlp2x_gelu":
            return grid * grid + extra
        if self.projector.type == "ldp":
            return ((grid + 1) // 2) ** 2
        return self.projector.pool_size**2

    def validate(self) -> MobileVLMConfig:
        self.vision.validate()
        self.projector.validate()
        self.text.validate()
        _choice(self, "image_aspect_ratio", IMAGE_ASPECT_MODES)
        grid = self.vision.grid_size
        if self.projector.type in ("ldp", "ldpv2") and self.vision.select_feature != "patch":
            raise ConfigError(f"projector {self.projector.type!r} reshapes tokens to a grid and needs vision.select_feature 'patch'")
        if self.projector.type == "ldpv2" and grid % self.projector.pool_size:
            raise ConfigError(
                f"projector.pool_size {self.projector.pool_size} must divide the patch grid side {grid} "
                f"(image_size {self.vision.image_size} / patch_size {self.vision.patch_size})"
            )
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
        rest = {k: v for k, v in data.items() if k not in parts}
        config = _build(cls, rest, source, **parts)
        try:
            return config.validate()
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None


def estimate_parameters(config: MobileVLMConfig) -> int:
    """Parameter count from the shapes alone (no allocation), close enough to refuse absurd configs."""
    v, t = config.vision, config.text
    vision = v.num_layers * (4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size)
    vision += (v.num_patches + 1) * v.hidden_size + 3 * v.patch_size**2 * v.hidden_size
    kv = t.num_kv_heads * t.head_dim
    layer = 2 * t.hidden_size**2 + 2 * t.hidden_size * kv + 3 * t.hidden_size * t.intermediate_size
    text = t.num_layers * layer + t.vocab_size * t.hidden_size * (1 if t.tie_word_embeddings else 2)
    projector = v.hidden_size * t.hidden_size + 3 * t.hidden_size**2
    return int(vision + text + projector)


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
        if f.name not in data:
            # Every field is required: a config.json is written whole by `save_pretrained`, and a
            # silently defaulted shape would load weights into the wrong model.
            raise ConfigError(f"{source}: missing field '{f.name}' (expected {_type_name(f)})")
        kwargs[f.name] = _coerce(data[f.name], f, source)
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ConfigError(f"{source}: unknown field(s) {', '.join(map(repr, unknown))}")
    return cls(**kwargs)


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
