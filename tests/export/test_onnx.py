"""ONNX Runtime export: the three graphs run in onnxruntime (and the decoder in onnxruntime-genai) and
give the reference's answers; the KV-cached loop equals the full-sequence graph; the graphs carry the
names and dynamic axes GenAI expects; bad input fails with one clear line.

The module fixture exports the micro model once to fp32 (decomposed attention) and to int4-gqa (4-bit
MatMuls and fused GroupQueryAttention), about two minutes on 2 busy cores; plain int4, fp16, int8 and
the .ort conversion are in a test marked slow."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import torch

from mobilevlm import generate_ids, load_model, load_processor
from mobilevlm.data import make_scene, render_scene
from mobilevlm.errors import BundleError, ExportError, PromptError
from mobilevlm.export import pipeline
from mobilevlm.export.bundle import load_bundle
from mobilevlm.export.onnx import parse_recipe
from mobilevlm.export.onnx_session import GenAISession, OnnxSession

QUESTIONS = [(2_000_123_456, "How many objects are there?"), (2_000_000_077, "Describe the image.")]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, micro_checkpoint):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("onnx") / "micro"
    pipeline.export_bundle(out, "onnx", ("fp32", "int4-gqa"), micro_checkpoint, num_parity_cases=3, eval_scenes=0, log=lambda s: None)
    return load_bundle(out)


@pytest.fixture(scope="module")
def reference(micro_checkpoint):
    return load_model(micro_checkpoint), load_processor(micro_checkpoint)


def test_manifest_records_parity_in_both_runtimes(bundle):
    fp32, q4 = bundle.artifact("onnx-fp32"), bundle.artifact("onnx-int4-gqa")
    assert fp32["file"] == "model-fp32" and bundle.path("model-fp32/decoder.onnx").is_file()
    assert fp32["parity"]["answers_identical"] == fp32["parity"]["num_cases"] == 3
    assert fp32["parity"]["token_agreement"] == 1.0 and fp32["parity"]["first_logit_max_abs_error"] < 1e-4
    genai = fp32["metadata"]["onnxruntime_genai"]
    assert genai["ran"] and genai["runtime"].startswith("onnxruntime-genai decoder-pipeline")
    assert genai["answers_identical"] == genai["num_cases"] and genai["token_agreement"] == 1.0
    assert fp32["metadata"]["execution_provider"] == "CPUExecutionProvider" and fp32["metadata"]["context_length"] == 96
    assert q4["metadata"]["graph_bytes"]["decoder"] < fp32["metadata"]["graph_bytes"]["decoder"] / 2  # micro graphs: node overhead dominates
    assert q4["quantization"]["decoder_matmuls"].startswith("int4 MatMulNBits, asymmetric blocks of 32, accuracy_level 4")
    assert 0.5 <= q4["parity"]["token_agreement"] <= 1 and q4["metadata"]["onnxruntime_genai"]["ran"]
    vision_input = fp32["methods"]["vision"]["inputs"][0]
    assert vision_input["dtype"] == "uint8" and vision_input["shape"] == ["batch_size", 3, 32, 32] and vision_input["normalized_inside"]


def test_graphs_have_genai_names_dynamic_axes_and_quantized_ops(bundle):
    decoder = onnx.load(str(bundle.path("model-fp32/decoder.onnx")), load_external_data=False)
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in [*decoder.graph.input, *decoder.graph.output]}
    assert dims["inputs_embeds"] == ["batch_size", "sequence_length", 64]
    assert dims["attention_mask"] == ["batch_size", "total_sequence_length"]
    assert dims["past_key_values.1.value"] == ["batch_size", 2, "past_sequence_length", 16]
    assert dims["logits"] == ["batch_size", "sequence_length", 384] and "present.1.key" in dims
    assert {o.domain: o.version for o in decoder.opset_import}[""] == 18
    assert "GroupQueryAttention" not in [n.op_type for n in decoder.graph.node]
    q4 = onnx.load(str(bundle.path("model-int4-gqa/decoder.onnx")))
    ops = [n.op_type for n in q4.graph.node]
    assert ops.count("MatMulNBits") == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer + the output head
    assert ops.count("GroupQueryAttention") == 2 and "Softmax" not in ops
    constant_matmuls = [n for n in q4.graph.node if n.op_type == "MatMul" and any(i in {t.name for t in q4.graph.initializer} for i in n.input)]
    assert constant_matmuls == []
    embedding = onnx.load(str(bundle.path("model-int4-gqa/embedding.onnx")))
    assert "GatherBlockQuantized" in [n.op_type for n in embedding.graph.node]
    config = json.loads(bundle.path("model-int4-gqa/genai_config.json").read_text())
    assert config["model"]["type"] == "decoder-pipeline" and config["search"]["past_present_share_buffer"]  # GQA writes in place
    assert not json.loads(bundle.path("model-fp32/genai_config.json").read_text())["search"]["past_present_share_buffer"]  # concat cache
    assert config["model"]["decoder"]["pipeline"][0]["embedding"]["inputs"] == ["input_ids", "image_features"]


def _full_and_looped(session, embeds):
    full = session.step(embeds)
    session.reset()
    looped = [session.step(embeds[:, :4]), session.step(embeds[:, 4:6])]  # a chunk after a past, too
    looped += [session.step(embeds[:, i : i + 1]) for i in range(6, embeds.shape[1])]
    session.reset()
    return full, np.concatenate(looped)


def test_kv_cached_loop_equals_full_sequence_and_reference(bundle, reference):
    model, _ = reference
    session = OnnxSession(bundle.root, bundle.artifact("onnx-fp32"), bundle.manifest)
    embeds = np.random.default_rng(0).standard_normal((1, 10, 64)).astype(np.float32)
    full, looped = _full_and_looped(session, embeds)
    np.testing.assert_allclose(looped, full, atol=1e-5)
    fused, fused_looped = _full_and_looped(OnnxSession(bundle.root, bundle.artifact("onnx-int4-gqa"), bundle.manifest), embeds)
    np.testing.assert_allclose(fused_looped, fused, atol=1e-4)
    model.setup_cache(1)
    with torch.inference_mode():
        expected = model.decode(torch.from_numpy(embeds), torch.arange(10))[0].numpy()
    np.testing.assert_allclose(full, expected, atol=1e-4)
    # dynamic batch: a left-padded second row gives the same logits as the row alone
    feeds = {"inputs_embeds": np.concatenate([embeds, np.concatenate([np.zeros((1, 3, 64), np.float32), embeds[:, :7]], 1)]),
             "attention_mask": np.array([[1] * 10, [0] * 3 + [1] * 7])}
    feeds.update({name: np.zeros((2, 2, 0, 16), np.float32) for name in session.past_names})
    batched = session.decoder.run(["logits"], feeds)[0]
    np.testing.assert_allclose(batched[0], full, atol=1e-5)
    np.testing.assert_allclose(batched[1, 3:], full[:7], atol=1e-5)


def test_embedding_graph_puts_image_rows_at_negative_ids(bundle, reference):
    model, _ = reference
    session = OnnxSession(bundle.root, bundle.artifact("onnx-fp32"), bundle.manifest)
    features = np.random.default_rng(1).standard_normal((1, 4, 64)).astype(np.float32)
    merged = session.embed([1, 5, -1, -1, -1, -1, 7], features)[0]
    with torch.inference_mode():
        table = model.text.embed_tokens.weight.numpy()
    np.testing.assert_allclose(merged, np.concatenate([table[[1, 5]], features[0], table[[7]]]), atol=1e-6)


@pytest.mark.parametrize("runtime", [OnnxSession, GenAISession])
def test_runtimes_answer_new_questions_like_the_reference(bundle, reference, runtime):
    model, processor = reference
    session = runtime(bundle.root, bundle.artifact("onnx-fp32"), bundle.manifest)
    for seed, question in QUESTIONS:
        image = render_scene(make_scene(seed), 100)
        assert session.answer(image, question, 10) == generate_ids(model, processor, image, question, max_new_tokens=10).text


def test_genai_config_loads_in_onnxruntime_genai(bundle):
    import onnxruntime_genai as og

    from mobilevlm.processing import Tokenizer

    model = og.Model(str(bundle.path("model-int4-gqa")))
    assert model.type == "decoder-pipeline"
    ours = Tokenizer(bundle.path("tokenizer.json")).encode("red circle")
    assert list(og.Tokenizer(model).encode("red circle"))[-len(ours):] == ours  # the folder's own tokenizer copy


def test_context_length_mismatch_and_long_prompt(bundle):
    manifest = copy.deepcopy(bundle.manifest)
    manifest["prompt"]["context_length"] = 64
    with pytest.raises(BundleError, match="'onnx-fp32' was exported with a context length of 96 but the bundle's prompt.context_length is 64"):
        OnnxSession(bundle.root, bundle.artifact("onnx-fp32"), manifest)
    session = OnnxSession(bundle.root, bundle.artifact("onnx-fp32"), bundle.manifest)
    with pytest.raises(PromptError, match="exported with a context of 96"):
        session.answer(render_scene(make_scene(2_000_000_001), 64), "word " * 120, 4)


def test_recipe_grammar():
    r = parse_recipe("int4-b64-acc0-sym-embfp-vis8-opset23-ort")
    assert (r.block_size, r.accuracy_level, r.symmetric, r.embedding_bits, r.vision_int8, r.opset, r.ort_format) == (64, 0, True, None, True, 23, True)
    assert parse_recipe("int4").describe()["embedding"].startswith("int4 GatherBlockQuantized")
    assert parse_recipe("int8").vision_int8 and parse_recipe("fp16").embedding_bits is None
    for name, message in [("int3", "unknown quantization recipe 'int3' for the onnx backend; expected fp32 | fp16"),
                          ("fp32-opset17", "opset 17 is not supported; expected one of 18..23"),
                          ("int4-b48", "block size 48 is not one of"), ("int4-acc5", "accuracy level 5"),
                          ("fp32-b32", "apply to int4 only"), ("int4-ort", "add -embfp")]:
        with pytest.raises(ExportError, match=message):
            parse_recipe(name)


def test_bad_exports_fail_before_any_work(tmp_path, micro_checkpoint):
    with pytest.raises(ExportError, match="opset 16 is not supported"):
        pipeline.export_bundle(tmp_path / "b", "onnx", ("fp32-opset16",), micro_checkpoint)
    with pytest.raises(ExportError, match="unknown quantization recipe '8da4w' for the onnx backend"):
        pipeline.export_bundle(tmp_path / "b", "onnx", ("8da4w",), micro_checkpoint)
    with pytest.raises(ExportError, match="context length 5 must hold the 4 image tokens plus text"):
        pipeline.export_bundle(tmp_path / "b", "onnx", ("fp32",), micro_checkpoint, context_length=5, log=lambda s: None)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_other_recipes_int4_fp16_int8_opset23_and_ort_format(tmp_path, micro_checkpoint):
    out = tmp_path / "b"
    recipes = ("int4", "fp16", "int8", "fp32-opset23", "int4-embfp-ort")
    pipeline.export_bundle(out, "onnx", recipes, micro_checkpoint, num_parity_cases=2, eval_scenes=0, log=lambda s: None)
    bundle = load_bundle(out)
    assert bundle.artifact("onnx-fp32-opset23")["parity"]["answers_identical"] == 2
    decoder = onnx.load(str(bundle.path("model-fp32-opset23/decoder.onnx")))
    assert {"Attention", "RMSNormalization"} <= {n.op_type for n in decoder.graph.node}
    plain_int4 = {n.op_type for n in onnx.load(str(bundle.path("model-int4/decoder.onnx"))).graph.node}
    assert "MatMulNBits" in plain_int4 and "Softmax" in plain_int4 and "GroupQueryAttention" not in plain_int4
    fp16 = bundle.artifact("onnx-fp16")["parity"]
    assert fp16["answers_identical"] == 2 and fp16["first_logit_max_abs_error"] < 1e-2
    assert bundle.artifact("onnx-int8")["parity"]["token_agreement"] > 0.5
    ort = bundle.artifact("onnx-int4-embfp-ort")
    assert sorted(p.name for p in bundle.path("model-int4-embfp-ort").glob("*.ort")) == ["decoder.ort", "embedding.ort", "vision.ort"]
    assert bundle.path("model-int4-embfp-ort/required_operators_and_types.config").is_file()
    assert ort["metadata"]["onnxruntime_genai"]["ran"] and ort["parity"]["num_cases"] == 2
