"""GGUF q4 parity in llama.cpp (issue 8: "f16 gives the same greedy answers as the reference, q4 at
least 95% token agreement"), on a grid-24 model fine-tuned to confident answers on the parity cases.

Random weights (test_gguf.py) give flat logits, where 4-bit rounding flips argmaxes by chance, so a
q4 figure measured on them means nothing; hence the fine-tune (test_families_backends.py's targets,
run longer because this decoder is wider). The decoder is 256 wide with a 512-wide MLP so that every
matrix row is a whole number of k-quant super-blocks (256) and q4_0 blocks (32): llama.cpp gives
rows that do not divide a fallback type, and a narrower decoder would test q5_0 instead of q4_k.

q4 agreement is checked twice: as the manifest records it (llama.cpp against the true reference, so
it includes llama.cpp issue 25814's class-token order, which a confident model absorbs), and against
the reference with llama.cpp's class-token order (`emulated_answer`), which isolates quantization.
Slow (a fine-tune of about a minute and three llama.cpp conversions): run with -m slow.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mobilevlm.export import pipeline
from mobilevlm.export.bundle import load_bundle

from .test_families_backends import ANSWERS, confident
from .test_gguf import grid24_config, measure

RECIPES = ("f16", "q4_0", "q4_k_m")
# The type llama.cpp must give the decoder's matrices for each q4 recipe (not only its fallbacks).
MAIN_TYPE = {"q4_0": "Q4_0", "q4_k_m": "Q4_K"}


def q4_config():
    """grid24_config's vision tower and LDPv2 projector, with a decoder whose rows fit k-quant blocks."""
    base = grid24_config("ldpv2")
    text = dataclasses.replace(base.text, hidden_size=256, intermediate_size=512, num_heads=4, num_kv_heads=2)
    return dataclasses.replace(base, text=text).validate()


@pytest.fixture(scope="module")
def q4_checkpoint(tmp_path_factory, tokenizer_path):
    torch.set_num_threads(1)
    # at the default 60 steps and lr 3e-3 this wider decoder has not converged (or diverges)
    return confident(q4_config(), tmp_path_factory.mktemp("gguf-q4-ckpt") / "m", tokenizer_path, steps=150, lr=1e-3)


@pytest.fixture(scope="module")
def q4_bundle(q4_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf-q4-bundle") / "b"
    pipeline.export_bundle(out, "gguf", RECIPES, q4_checkpoint, num_parity_cases=4, eval_scenes=0, log=lambda s: None)
    return load_bundle(out)


@pytest.mark.slow
def test_f16_gives_the_reference_answers(q4_bundle):
    """The fine-tune took (the reference answers the targets), and f16 in llama.cpp answers alike, as
    the manifest records against the true reference."""
    parity = q4_bundle.artifact("gguf-f16")["parity"]
    assert [c["reference"] for c in parity["cases"]] == ANSWERS
    assert parity["answers_identical"] == parity["num_cases"] == 4 and parity["token_agreement"] == 1.0, parity


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["q4_0", "q4_k_m"])
def test_q4_keeps_95_percent_token_agreement_in_llama_cpp(q4_bundle, q4_checkpoint, recipe):
    artifact = q4_bundle.artifact(f"gguf-{recipe}")
    assert MAIN_TYPE[recipe] in artifact["metadata"]["text_tensor_types"], artifact["metadata"]["text_tensor_types"]
    recorded = artifact["parity"]
    assert recorded["num_cases"] == 4 and recorded["token_agreement"] >= 0.95, recorded
    matches, agree, positions = measure(q4_bundle, q4_checkpoint, f"gguf-{recipe}", eos_position=True)
    assert len(q4_bundle.manifest["parity"]["cases"]) == 4 and agree / positions >= 0.95, (matches, agree, positions)
