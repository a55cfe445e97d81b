"""Shared fixtures: a micro model config, a small trained tokenizer, a saved checkpoint, a test image.

Everything is written by the tests themselves (no downloads, no checked-in blobs).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mobilevlm.config import MobileVLMConfig, ProjectorConfig, TextConfig, VisionConfig

CORPUS = [
    "USER: What color is the circle? ASSISTANT: red",
    "USER: How many objects are there? ASSISTANT: 3",
    "USER: Is there a blue square in the image? ASSISTANT: yes",
    "A red circle at the top left and a small green triangle in the center.",
    "What word is written in the image? The word is cat. Where is the yellow star? bottom right",
    "émoji ünïcödé 日本語 text survives byte-level BPE",
] * 20


def micro_config(vocab_size: int = 384, projector: str = "ldpv2", **text_overrides) -> MobileVLMConfig:
    """A model small enough that every test can build, run and save it in milliseconds."""
    text = dict(vocab_size=vocab_size, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                intermediate_size=128, max_seq_len=96, rms_norm_eps=1e-6, bos_id=1, eos_id=2, pad_id=0)
    text.update(text_overrides)
    return MobileVLMConfig(
        vision=VisionConfig(image_size=32, patch_size=8, hidden_size=32, num_layers=3, num_heads=2, intermediate_size=64),
        projector=ProjectorConfig(projector, pool_size=2),
        text=TextConfig(**text),
        prompt_template="tiny",
    ).validate()


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory) -> Path:
    from mobilevlm.data.tokenizer import pad_vocabulary
    from mobilevlm.processing import train_tokenizer

    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    pad_vocabulary(train_tokenizer(CORPUS, vocab_size=384), 384).save(str(path))  # as large as micro_config's vocabulary
    return path


@pytest.fixture(scope="session")
def micro_checkpoint(tmp_path_factory, tokenizer_path) -> Path:
    from mobilevlm import MobileVLM, save_pretrained

    torch.manual_seed(0)
    model = MobileVLM(micro_config())
    return save_pretrained(model, tmp_path_factory.mktemp("ckpt") / "micro", tokenizer=tokenizer_path)


@pytest.fixture(scope="session")
def image_path(tmp_path_factory) -> Path:
    """A 48x40 RGB image with structure (not square, so padding is exercised)."""
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
    array[10:30, 10:30] = (220, 30, 30)
    path = tmp_path_factory.mktemp("images") / "scene.png"
    Image.fromarray(array).save(path)
    return path


def replace(config, **changes):
    return dataclasses.replace(config, **changes)


@pytest.fixture(scope="session")
def micro_bundle(tmp_path_factory, micro_checkpoint) -> Path:
    """The micro model exported to ExecuTorch fp32 and 8da4w (group 32), with parity measured."""
    from mobilevlm.export import pipeline

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("bundles") / "micro"
    pipeline.export_bundle(out, "executorch", ("fp32", "8da4w-g32"), micro_checkpoint, num_parity_cases=4, eval_scenes=2, log=lambda s: None)
    return out
