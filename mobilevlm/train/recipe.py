"""Training recipes: which stages run, in which order, with which budget.

The stages follow the MobileVLM recipe and the MLLM literature:

| stage      | trains                           | data                                   | loss                 |
|------------|----------------------------------|----------------------------------------|----------------------|
| `vision`   | vision encoder + a small text tower | (image, caption) pairs              | CLIP contrastive (optional FLIP masking) |
| `text`     | decoder                          | generated text                         | next-token           |
| `align`    | projector (encoder, decoder frozen) | (image, caption)                    | next-token on the caption |
| `instruct` | projector + decoder (+ encoder if asked) | multi-turn QA, captions, probes | next-token on answers only |
| `dpo`      | projector + decoder              | preference pairs (faithful vs hallucinated) | DPO + a small SFT term |

A recipe is plain data so a run can record exactly what it did (`recipe.json` in the run folder).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..errors import ConfigError

STAGES = ("vision", "text", "align", "instruct", "dpo")


@dataclass(frozen=True)
class StageConfig:
    name: str
    steps: int
    batch_size: int
    lr: float
    warmup: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    # Which parts receive gradients: any of "vision", "projector", "text".
    trainable: tuple[str, ...] = ()
    # `vision`: share of patches dropped before the encoder (FLIP); 0 keeps all.
    mask_ratio: float = 0.0
    # `text`: tokens per packed sequence.
    seq_len: int = 128
    # `dpo`: strength of the preference margin, and weight of the SFT term on chosen answers.
    beta: float = 0.1
    sft_weight: float = 0.2

    def validate(self) -> StageConfig:
        if self.name not in STAGES:
            raise ConfigError(f"unknown training stage {self.name!r}; expected one of {', '.join(STAGES)}")
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError(f"stage {self.name}: steps, batch_size and lr must be positive")
        unknown = set(self.trainable) - {"vision", "projector", "text"}
        if unknown:
            raise ConfigError(f"stage {self.name}: unknown trainable part(s) {sorted(unknown)}")
        return self


@dataclass(frozen=True)
class Recipe:
    name: str
    preset: str
    stages: tuple[StageConfig, ...]
    seed: int = 0
    # Scenes rendered once and reused by the image stages (rendering is not free on 2 cores).
    scene_pool: int = 20000
    tokenizer_vocab: int = 1024
    # Matrix products in bfloat16 (torch.autocast; weights and optimizer state stay fp32). On CPUs
    # with AMX / AVX-512 BF16 this trains about 1.5x faster; elsewhere it may be slower.
    bf16: bool = False
    # Optional overrides of the preset's model shape (e.g. {"text": {"num_layers": 2}}).
    model_overrides: dict = field(default_factory=dict)

    def stage(self, name: str) -> StageConfig:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise ConfigError(f"recipe {self.name!r} has no stage {name!r}; it has {', '.join(s.name for s in self.stages)}")

    def select(self, names: list[str] | None) -> Recipe:
        if not names:
            return self
        for name in names:
            self.stage(name)
        return dataclasses.replace(self, stages=tuple(s for s in self.stages if s.name in names))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _tiny() -> Recipe:
    return Recipe(
        name="tiny",
        preset="tiny",
        bf16=True,
        stages=(
            StageConfig("vision", steps=200, batch_size=128, lr=1e-3, warmup=20, weight_decay=0.05, trainable=("vision",), mask_ratio=0.5),
            StageConfig("text", steps=80, batch_size=32, lr=1e-3, warmup=10, trainable=("text",), seq_len=128),
            StageConfig("align", steps=50, batch_size=64, lr=1e-3, warmup=10, trainable=("projector",)),
            StageConfig("instruct", steps=560, batch_size=32, lr=1e-3, warmup=40, trainable=("vision", "projector", "text")),
            StageConfig("dpo", steps=60, batch_size=16, lr=1e-5, warmup=10, trainable=("projector", "text"), beta=0.1, sft_weight=0.2),
        ),
    )


def _micro() -> Recipe:
    """A few steps of every stage on a micro model: what the tests run."""
    return Recipe(
        name="micro",
        preset="tiny",
        scene_pool=64,
        tokenizer_vocab=512,
        model_overrides={
            "vision": {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64},
            "projector": {"pool_size": 2},
            "text": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 128, "max_seq_len": 192},
        },
        stages=(
            StageConfig("vision", steps=8, batch_size=16, lr=1e-3, warmup=2, trainable=("vision",), mask_ratio=0.5),
            StageConfig("text", steps=8, batch_size=8, lr=3e-3, warmup=2, trainable=("text",), seq_len=48),
            StageConfig("align", steps=8, batch_size=8, lr=3e-3, warmup=2, trainable=("projector",)),
            StageConfig("instruct", steps=8, batch_size=8, lr=3e-3, warmup=2, trainable=("vision", "projector", "text")),
            StageConfig("dpo", steps=8, batch_size=4, lr=1e-4, warmup=2, trainable=("projector", "text")),
        ),
    )


RECIPES = {"tiny": _tiny, "micro": _micro}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ConfigError(f"unknown training recipe {name!r}; expected one of {', '.join(RECIPES)}")
    recipe = RECIPES[name]()
    for stage in recipe.stages:
        stage.validate()
    return recipe
