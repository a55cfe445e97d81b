"""Peers (benchmarks/peers/): the same checkpoint through llama.cpp, ONNX Runtime GenAI's builder and
ExecuTorch's export_llama, measured in the same run as the bundle's contenders, on the micro fixtures."""

from __future__ import annotations

import sys

# The peers' runtimes are in the `gguf` and `onnx` extras that setup.sh installs: without them these
# tests fail rather than skip (the skip path of a missing tool is tested on its own below).
import llama_cpp  # noqa: F401
import numpy as np
import onnxruntime_genai  # noqa: F401
import pytest
import torch

from mobilevlm import cli
from mobilevlm.benchmarks.peers import build_peers, checkpoint_hash, load_info, parse_peers
from mobilevlm.benchmarks.runner import SCHEMA, run_bench
from mobilevlm.errors import MobileVLMError

MEASURED = ["peer-llama.cpp-q4_0", "peer-llama.cpp-q4_k_m", "peer-ort-genai-int4", "peer-executorch-llm-8da4w"]


@pytest.fixture(scope="module")
def peer_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("peer-cache")


@pytest.fixture(scope="module")
def records(micro_bundle, micro_checkpoint, peer_cache):
    return run_bench(micro_bundle, threads=(1,), prompt_lengths=(8, 32), repeats=2, warmup=1, decode_tokens=8, model_dir=micro_checkpoint,
                     only=("executorch-8da4w-g32",), peers=("llama.cpp", "ort-genai", "executorch-llm"), peer_cache=peer_cache, log=lambda s: None)


@pytest.mark.slow
def test_peer_records_named_and_measured_like_contenders(records):
    assert [r["contender"] for r in records] == ["executorch-8da4w-g32", *MEASURED]
    ours = records[0]
    for r in records[1:]:
        assert "error" not in r and "skipped" not in r, r.get("error") or r.get("skipped")
        assert r["schema"] == SCHEMA and r["threads"] == 1 and r["model_config"] == ours["model_config"]
        assert r["contender"] == f"peer-{r['peer']['tool']}-{r['quantization']}"
        m = r["metrics"]
        for key in ("ttft_ms", "decode_tok_s"):
            assert 0 < m[key]["min"] <= m[key]["median"] <= m[key]["max"], key
        assert set(m["prefill_tok_s"]) == set(ours["metrics"]["prefill_tok_s"]) == {"8", "32"}
        assert m["decode_tokens"] == ours["metrics"]["decode_tokens"] == 8
        # decode starts at the same cache position: text tokens stand in for the image's
        assert m["prompt_tokens"] == ours["metrics"]["prompt_tokens"]
        assert m["peak_rss_mb"] > 0 and m["file_mb"] > 0 and m["load_s"] > 0
        # the micro model's 12x12-ish grid cannot go through llama.cpp's LDP graph; the builders have no vision path
        assert r["peer"]["scope"] == "text decoder" and m["scope"] == "text decoder" and m["image_encode_ms"] is None and r["peer"]["scope_reason"]
    assert records[1]["backend"] == "llama.cpp" and records[3]["backend"] == "onnxruntime-genai" and records[4]["backend"] == "executorch"
    # q4_k_m and q4_0 are different files of the same weights
    assert records[1]["metrics"]["file_mb"] != records[2]["metrics"]["file_mb"]
    et = records[4]["peer"]
    assert "-qmode 8da4w -G 32" in et["builder"] and "--use_sdpa_with_kv_cache" in et["builder"] and et["params"]["use_hf_rope"] is True


@pytest.mark.slow
def test_peers_hold_the_checkpoint_weights(records, micro_checkpoint):
    import gguf
    from safetensors.numpy import load_file

    from mobilevlm.checkpoint import load_model
    from mobilevlm.export.gguf_write import text_tensors
    from mobilevlm.export.hf import llama_weights

    model = load_model(micro_checkpoint)
    by_name = {r["contender"]: r for r in records}
    folder = by_name["peer-ort-genai-int4"]["peer"]["folder"]
    info = load_info(folder)
    assert info["checkpoint_sha256_16"] == checkpoint_hash(micro_checkpoint) and info["matmul_nbits_nodes"] > 0
    exported = load_file(f"{folder}/{info['hf_folder']}/model.safetensors")
    expected = llama_weights(model)
    assert set(exported) == set(expected)
    for key, tensor in expected.items():
        np.testing.assert_array_equal(exported[key], tensor.detach().float().numpy(), err_msg=key)

    reference = text_tensors(model)
    for quant in ("q4_0", "q4_k_m"):
        folder = by_name[f"peer-llama.cpp-{quant}"]["peer"]["folder"]
        reader = gguf.GGUFReader(f"{folder}/gguf/{load_info(folder)['metadata']['text_model']}")
        tensors = {t.name: t for t in reader.tensors}
        assert set(tensors) == set(reference)
        quantized = 0
        for name, want in reference.items():
            t = tensors[name]
            got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
            if t.tensor_type == gguf.GGMLQuantizationType.F32:
                np.testing.assert_array_equal(got, want, err_msg=name)
            else:
                quantized += 1
                assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.95, name
        assert quantized > 0


@pytest.mark.slow
def test_builds_are_cached(micro_checkpoint, peer_cache, records):
    lines = []
    peers = build_peers(("llama.cpp",), micro_checkpoint, 64, log=lines.append, cache=peer_cache)
    assert [p.name for p in peers] == MEASURED[:2] and all(p.folder for p in peers)
    lines = []
    peers = build_peers(("executorch-llm",), micro_checkpoint, 64, log=lines.append, cache=peer_cache)
    assert [p.name for p in peers] == MEASURED[3:] and peers[0].folder and "cached build" in lines[0]
    assert all("cached build" in line for line in lines) and not any("building" in line for line in lines)


def test_skip_paths(micro_bundle, tmp_path, monkeypatch):
    records = run_bench(micro_bundle, repeats=1, warmup=0, decode_tokens=2, model_dir=tmp_path / "gone", only=("none",),
                        peers=("llama.cpp",), peer_cache=tmp_path / "cache", log=lambda s: None)
    assert [r["contender"] for r in records] == MEASURED[:2]
    assert all("is not on this machine" in r["skipped"] for r in records)
    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)  # as if the package were not installed
    (tmp_path / "config.json").write_text("{}")
    peers = build_peers(("ort-genai",), tmp_path, 64, log=lambda s: None, cache=tmp_path / "cache")
    assert peers[0].name == "peer-ort-genai-int4" and "onnxruntime_genai is not installed" in peers[0].skipped


def test_unknown_peer_is_one_error_line(tmp_path, capsys):
    with pytest.raises(MobileVLMError, match="unknown peer 'vllm'"):
        parse_peers("llama.cpp,vllm")
    assert parse_peers("llama.cpp, ort-genai,llama.cpp") == ("llama.cpp", "ort-genai")
    assert cli.main(["bench", str(tmp_path / "no-bundle"), "--peers", "llama.cpp,vllm"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown peer 'vllm'" in err[0]


def _prompt_logits(text, ids):
    with torch.no_grad():
        return text(text.embed_tokens(ids))[0]


def test_executorch_llm_weight_and_rotary_mapping(micro_checkpoint):
    """Our decoder's weights under Meta names + params.json, loaded into export_llama's own eager
    Transformer: the same logits at fp32 at every position. Without `use_hf_rope` (Meta's interleaved
    rotary) they differ, so the mapping needs no q/k permutation only because of that flag."""
    from executorch.examples.models.llama.llama_transformer import construct_transformer
    from executorch.examples.models.llama.model_args import ModelArgs

    from mobilevlm.benchmarks.peers.executorch_llm import meta_params, meta_state_dict
    from mobilevlm.checkpoint import load_model

    text = load_model(micro_checkpoint).eval().text
    ids = torch.randint(0, text.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(0))
    want = _prompt_logits(text, ids)
    for hf_rope in (True, False):
        params = {**meta_params(text.config), "use_hf_rope": hf_rope}
        theirs = construct_transformer(ModelArgs(max_seq_len=32, max_context_len=32, generate_full_logits=True, **params)).eval()
        weights = meta_state_dict(text)
        missing, unexpected = theirs.load_state_dict(weights, strict=False)
        assert not [k for k in missing if k.endswith(".weight")] and not unexpected
        with torch.no_grad():
            got = theirs(ids)
        got = (got[0] if isinstance(got, tuple) else got).reshape(want.shape)
        if hf_rope:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        else:
            assert (got - want).abs().max() > 1e-3  # 100x the fp32 match above


def _peer_logits(pte, ids, prefill):
    from mobilevlm.benchmarks.peers.executorch_llm import Program

    program = Program(pte)
    got = [program.logits(ids[:, :prefill], 0)]
    got += [program.logits(ids[:, i:i + 1], i) for i in range(prefill, ids.shape[1])]
    return torch.stack(got)


@pytest.mark.slow
def test_executorch_llm_pte_logits_match_ours(records, micro_checkpoint, tmp_path):
    """The exported programs (custom SDPA + KV cache, XNNPACK): prefill then one token at a time.
    fp32 export_llama .pte == our model; the peer's 8da4w .pte correlates with it per position."""
    from mobilevlm.benchmarks.peers.executorch_llm import export_pte
    from mobilevlm.checkpoint import load_model

    text = load_model(micro_checkpoint).eval().text
    ids = torch.randint(0, text.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(1))
    want = _prompt_logits(text, ids)[15:]
    fp32, _ = export_pte(text, tmp_path / "fp32", 64, "fp32")
    torch.testing.assert_close(_peer_logits(fp32, ids, 16), want, rtol=1e-4, atol=1e-4)

    folder = {r["contender"]: r for r in records}["peer-executorch-llm-8da4w"]["peer"]["folder"]
    got = _peer_logits(f"{folder}/{load_info(folder)['files']}", ids, 16)
    corr = [np.corrcoef(g.numpy(), w.numpy())[0, 1] for g, w in zip(got, want)]
    assert min(corr) > 0.9, corr
    assert (got - want).abs().max() > 1e-4  # it is quantized
