"""The ONNX benchmark contender: the worker measures an ONNX artifact with the CPU execution provider,
and the contender's decode carries the KV cache between calls like the other contenders."""

from __future__ import annotations

import pytest
import torch

from mobilevlm.benchmarks.contenders.onnx import Contender
from mobilevlm.benchmarks.runner import run_bench
from mobilevlm.export import pipeline
from mobilevlm.export.bundle import load_bundle


@pytest.fixture(scope="module")
def onnx_bundle(tmp_path_factory, micro_checkpoint):
    out = tmp_path_factory.mktemp("bench") / "onnx"
    pipeline.export_bundle(out, "onnx", ("fp32",), micro_checkpoint, num_parity_cases=1, eval_scenes=0, log=lambda s: None)
    return out


def test_contender_decode_carries_the_cache(onnx_bundle):
    bundle = load_bundle(onnx_bundle)
    contender = Contender(bundle, bundle.artifact("onnx-fp32"))
    assert contender.execution_provider == "CPUExecutionProvider" and contender.file_bytes > 0
    assert contender.encode(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)).shape == (1, 4, 64)
    embeds = contender.embed(torch.tensor([[1, 5, 9, 12, 7]]))
    full = contender.decode(embeds, torch.arange(5))
    contender.decode(embeds[:, :3], torch.arange(3))  # position 0 starts a new prompt
    step = contender.decode(embeds[:, 3:4], torch.tensor([3]))
    last = contender.decode(embeds[:, 4:], torch.tensor([4]))
    assert step.shape == (384,)
    torch.testing.assert_close(last, full, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="decode at position 9, but the cache holds 5 positions"):
        contender.decode(embeds[:, :1], torch.tensor([9]))


def test_bench_measures_the_onnx_artifact(onnx_bundle, micro_checkpoint):
    records = run_bench(onnx_bundle, threads=(1,), prompt_lengths=(8,), repeats=1, warmup=0, decode_tokens=4, model_dir=micro_checkpoint, only=("onnx-fp32",), log=lambda s: None)
    (record,) = records
    assert record["backend"] == "onnx" and "error" not in record, record.get("error")
    assert record["metrics"]["decode_tok_s"]["median"] > 0 and record["parity"]["token_agreement"] == 1.0
