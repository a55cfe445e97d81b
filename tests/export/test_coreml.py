"""Core ML export: the micro model converted (fp16, int4, palettize4) into a bundle, the saved specs
inspected (inputs, outputs, states, deployment target, compression on every weight), the programs run
by the numpy MIL interpreter against the PyTorch reference; the conversion traps and bad input."""

from __future__ import annotations

import copy

import coremltools as ct
import numpy as np
import pytest
import torch
from coremltools.converters.mil.mil import types

from mobilevlm import MobileVLM, load_model, load_processor, save_pretrained
from mobilevlm.errors import ExportError, PromptError
from mobilevlm.export import coreml, pipeline
from mobilevlm.export.bundle import load_bundle
from mobilevlm.export.coreml_check import VERIFICATION_NOTE, CoreMLSession, MILProgram, load_program
from mobilevlm.export.coreml_compress import compress, parse_recipe
from mobilevlm.export.parity import parity_cases, reference_answer
from mobilevlm.model import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from mobilevlm.text import rope_tables

from ..conftest import micro_config

FeatureTypes = ct.proto.FeatureTypes_pb2
ANSWERS = [" red", " 3", " yes", " A red circle at the top left and a small green triangle in the center."]


@pytest.fixture(scope="module")
def confident_checkpoint(tmp_path_factory, micro_checkpoint, tokenizer_path):
    """The micro model fine-tuned to answer the parity cases from the tokenizer's corpus.

    A randomly initialised model's logits are nearly flat, so any 4-bit rounding flips its argmax and
    token agreement says nothing; a trained model's margins are what the int4 target is about."""
    torch.manual_seed(0)
    model, processor = load_model(micro_checkpoint), load_processor(micro_checkpoint)
    eos = processor.tokenizer.eos_id
    rows = []
    for case, answer in zip(parity_cases(4), ANSWERS):
        before, after = processor.prompt_ids(case.question)
        target = processor.tokenizer.encode(answer) + [eos]
        ids = before + [IMAGE_TOKEN_INDEX] + after + target
        labels = [IGNORE_INDEX] * (len(ids) - len(target)) + target
        rows.append((torch.tensor([ids]), processor.image.preprocess(case.image()), torch.tensor([labels])))
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(80):
        loss = sum(model(ids, pixels, labels) for ids, pixels, labels in rows)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return save_pretrained(model.eval(), tmp_path_factory.mktemp("ckpt") / "confident", tokenizer=tokenizer_path)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, confident_checkpoint):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("bundles") / "coreml"
    pipeline.export_bundle(out, "coreml", ("fp16", "int4", "palettize4"), confident_checkpoint, num_parity_cases=4, eval_scenes=0, log=lambda s: None)
    return load_bundle(out)


@pytest.fixture(scope="module")
def reference(confident_checkpoint):
    return load_model(confident_checkpoint), load_processor(confident_checkpoint)


def test_parity_targets_are_met_and_marked_as_interpreted(bundle):
    fp16, int4, lut4 = (bundle.artifact(f"coreml-{r}") for r in ("fp16", "int4", "palettize4"))
    assert fp16["parity"]["answers_identical"] == fp16["parity"]["num_cases"] == 4
    assert fp16["parity"]["token_agreement"] == 1.0
    assert fp16["parity"]["first_logit_max_abs_error"] < 0.05
    assert int4["parity"]["token_agreement"] >= 0.95
    assert lut4["parity"]["token_agreement"] >= 0.9
    for artifact in (fp16, int4, lut4):
        assert VERIFICATION_NOTE in artifact["runtime"] and VERIFICATION_NOTE in artifact["metadata"]["verification"]
        assert artifact["metadata"]["minimum_deployment_target"] == "iOS18"
    assert int4["size_bytes"] < lut4["size_bytes"] * 1.5 and lut4["size_bytes"] < fp16["size_bytes"] / 2


def test_artifact_is_a_folder_of_three_packages_described_in_the_manifest(bundle):
    artifact = bundle.artifact("coreml-int4")
    folder = bundle.path(artifact["file"])
    assert artifact["file"] == "model-int4-coreml" and folder.is_dir()
    for name in coreml.MODELS:
        assert (folder / artifact["methods"][name]["file"] / "Manifest.json").is_file()
    assert any(k.startswith("model-int4-coreml/decoder.mlpackage/") for k in bundle.manifest["files"])
    decoder = artifact["methods"]["decoder"]
    assert decoder["max_positions"] == 95 and len(decoder["states"]) == 4
    assert {s["name"] for s in decoder["states"]} == {f"text_layers_{i}_self_attn_{k}_cache" for i in range(2) for k in "kv"}
    assert "makeState" in artifact["methods"]["how_to_run"]
    assert artifact["quantization"]["recipe"] == "int4" and "affine (scale and zero point) per-block 32" in artifact["quantization"]["decoder_linears"]


def test_specs_inputs_outputs_states_and_deployment_target(bundle):
    folder = bundle.path(bundle.artifact("coreml-fp16")["file"])
    decoder = ct.utils.load_spec(str(folder / "decoder.mlpackage"))
    assert decoder.specificationVersion >= 9  # iOS 18 / macOS 15: needed for state
    inputs = {i.name: i.type.multiArrayType for i in decoder.description.input}
    assert list(inputs) == ["inputs_embeds", "causal_mask"]
    assert all(t.dataType == FeatureTypes.ArrayFeatureType.FLOAT16 for t in inputs.values())
    seq = inputs["inputs_embeds"].shapeRange.sizeRanges[1]
    width = inputs["causal_mask"].shapeRange.sizeRanges[3]
    assert (seq.lowerBound, seq.upperBound) == (1, 95) and (width.lowerBound, width.upperBound) == (1, 95)
    states = decoder.description.state
    assert len(states) == 4
    for state in states:
        assert state.type.stateType.arrayType.dataType == FeatureTypes.ArrayFeatureType.FLOAT16
        assert list(state.type.stateType.arrayType.shape) == [1, 2, 96, 16]
    (logits,) = decoder.description.output
    assert logits.name == "logits" and list(logits.type.multiArrayType.shape) == [1, 384]

    vision = ct.utils.load_spec(str(folder / "vision.mlpackage"))
    (image,) = vision.description.input
    assert image.name == "image" and image.type.imageType.colorSpace == FeatureTypes.ImageFeatureType.RGB
    assert (image.type.imageType.width, image.type.imageType.height) == (32, 32)
    first = load_program(folder / "vision.mlpackage").functions["main"].operations
    scale = next(op for op in first if op.op_type == "mul")
    assert scale.x.name == "image" and scale.y.val == pytest.approx(1 / 255)

    embedding = ct.utils.load_spec(str(folder / "embedding.mlpackage"))
    (ids,) = embedding.description.input
    assert ids.name == "input_ids" and ids.type.multiArrayType.dataType == FeatureTypes.ArrayFeatureType.INT32


def _weight_producers(package) -> dict[str, str]:
    """op name -> type of the op producing its weight, for every linear / conv / gather with a weight."""
    found = {}
    for op in load_program(package).functions["main"].operations:
        weight = op.inputs.get({"linear": "weight", "conv": "weight", "gather": "x"}.get(op.op_type, ""))
        if weight is not None and weight.op is not None and weight.rank >= 2:
            found[op.name] = weight.op.op_type
    return found


@pytest.mark.parametrize("recipe,decoder_op", [("int4", "constexpr_blockwise_shift_scale"), ("palettize4", "constexpr_lut_to_dense")])
def test_every_weight_is_stored_compressed(bundle, recipe, decoder_op):
    artifact = bundle.artifact(f"coreml-{recipe}")
    folder = bundle.path(artifact["file"])
    rows = artifact["metadata"]["layers"]
    for name in coreml.MODELS:
        producers = _weight_producers(folder / f"{name}.mlpackage")
        expected = decoder_op if name == "decoder" else "constexpr_blockwise_shift_scale"
        assert producers and set(producers.values()) == {expected}, name
    linears = [r for r in rows if r["op_type"] == "linear" and r["layer"].startswith("text.")]
    assert len(linears) == 15  # 2 layers x 7 + the output head
    assert all(r["compression"] != "fp16" for r in rows)
    assert {r["layer"] for r in rows} >= {"text.embed_tokens.weight", "vision.embeddings.patch_embedding.weight", "text.lm_head.weight"}


def test_int4_weights_decompress_to_the_quantization_grid(bundle, reference):
    model, _ = reference
    folder = bundle.path(bundle.artifact("coreml-int4")["file"])
    function = load_program(folder / "decoder.mlpackage").functions["main"]
    interpreter = MILProgram(folder / "decoder.mlpackage", "fp32")
    linear = next(op for op in function.operations if op.op_type == "linear" and "q_proj" in op.weight.name)
    data, scale, offset = linear.weight.op.data, linear.weight.op.scale, linear.weight.op.offset
    assert types.builtin_to_string(data.dtype) == "int4" and list(scale.shape) == list(offset.shape) == [64, 2]  # per 32 inputs
    restored = interpreter.constants[linear.weight.name]
    original = model.text.layers[0].self_attn.q_proj.weight.detach().numpy()
    error = np.abs(restored - original)
    step = np.repeat(scale.val.astype(np.float32), 32, axis=1)
    assert 0 < error.max() and np.all(error <= step / 2 + 1e-3)


def test_interpreter_fp32_reproduces_the_reference_and_fp16_stays_close(bundle, reference):
    model, processor = reference
    artifact = bundle.artifact("coreml-fp16")
    case = parity_cases(4)[0]
    ref = reference_answer(model, processor, case, case.image())
    errors = {}
    for precision in ("fp32", "fp16"):
        session = CoreMLSession(bundle.root, artifact, bundle.manifest, precision)
        logits = session.forced_logits(case.image(), case.question, ref.token_ids)
        errors[precision] = float((logits[0] - ref.first_logits).abs().max())
        assert [int(l.argmax()) for l in logits[: len(ref.token_ids)]] == ref.token_ids
    assert errors["fp32"] < 0.02  # fp16 weights only
    assert errors["fp32"] < errors["fp16"] < 0.1


def test_state_carries_the_cache_between_chunks_and_resets(bundle, reference):
    session = CoreMLSession(bundle.root, bundle.artifact("coreml-fp16"), bundle.manifest, "fp32")
    embeds = session.embed([1, 5, 9, 13, 17, 21, 25])
    whole = session.decode(embeds, 0)
    session.decoder.reset_state()
    session.decode(embeds[:, :4], 0)
    chunked = session.decode(embeds[:, 4:], 4)
    np.testing.assert_allclose(chunked, whole, atol=1e-5)
    case = parity_cases(4)[1]
    assert session.answer(case.image(), case.question, 6) == session.answer(case.image(), case.question, 6)


def test_rope_tables_reach_the_program_without_a_reciprocal(bundle):
    folder = bundle.path(bundle.artifact("coreml-fp16")["file"])
    interpreter = MILProgram(folder / "decoder.mlpackage", "fp32")
    assert "inverse" not in interpreter.op_types
    cos, sin = rope_tables(16, 96, 10000.0)
    tables = [v for v in interpreter.constants.values() if getattr(v, "shape", None) == (96, 16)]
    assert len(tables) == 2
    for table, exact in zip(sorted(tables, key=lambda t: -t[0, 0]), (cos, sin)):
        np.testing.assert_allclose(table, exact.numpy(), atol=1e-3)


def test_prompt_longer_than_the_exported_context(bundle):
    session = CoreMLSession(bundle.root, bundle.artifact("coreml-fp16"), bundle.manifest)
    case = parity_cases(4)[0]
    with pytest.raises(PromptError, match="exported with a context of 96"):
        session.answer(case.image(), "word " * 120, 4)


def test_compression_is_verified_on_the_saved_program(bundle):
    artifact = bundle.artifact("coreml-fp16")
    package = bundle.path(artifact["file"]) / "decoder.mlpackage"
    rows = [{**r, "compression": "int4 per-block 32"} for r in artifact["metadata"]["layers"] if r["op_type"] == "linear" and r["layer"].startswith("text.")]
    with pytest.raises(ExportError, match="coremltools left text.* uncompressed"):
        coreml.verify_compressed(package, rows)


# --- traps ---------------------------------------------------------------------------------------


def test_dynamic_length_reaching_the_cache_length_fails_a_torch_export_guard():
    """Why the decoder's flexible lengths stop at cache length - 1 (see the spec test: 95 for a 96 cache)."""
    from torch.export import Dim

    torch.manual_seed(0)
    model = MobileVLM(micro_config()).eval()
    model.text.remove_cache()
    decoder = coreml.DecoderProgram(copy.deepcopy(model), 96)
    example = (torch.zeros(1, 3, 64), torch.zeros(1, 1, 3, 5))
    seq, width = Dim("seq", min=1, max=96), Dim("width", min=1, max=96)
    with pytest.raises(Exception, match="Constraints violated"):
        torch.export.export(decoder, example, dynamic_shapes=({1: seq}, {2: seq, 3: width}), strict=False)


def test_numpy_2_4_is_refused_before_conversion(monkeypatch):
    monkeypatch.setattr(coreml.np, "__version__", "2.4.0")
    with pytest.raises(ExportError, match=r"numpy 2.4.0 breaks coremltools 9.0 conversion; install numpy<2.4"):
        coreml.check_environment()


def test_untested_torch_version_is_noted(bundle, monkeypatch):
    note = coreml.untested_torch_note()
    assert note and torch.__version__.split("+")[0] in note
    assert bundle.artifact("coreml-fp16")["metadata"]["torch_note"] == note
    from coremltools import _deps

    monkeypatch.setattr(_deps, "_TORCH_MAX_VERSION", "99.0")
    assert coreml.untested_torch_note() is None


# --- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["int3", "palettize2", "fp16-b32", "int4-g16", "palettize4-b32", "int4-b0", "8da4w", ""])
def test_unknown_compression_modes_are_clear_errors(name):
    with pytest.raises(ExportError, match="Core ML quantization recipe"):
        parse_recipe(name)


def test_recipe_names():
    assert (parse_recipe("int4").block_size, parse_recipe("int8-b64").block_size, parse_recipe("palettize4").group_size) == (32, 64, 16)
    assert parse_recipe("fp16").describe()["decoder_linears"] == "fp16"


def test_unknown_recipe_fails_before_any_work(tmp_path, micro_checkpoint):
    with pytest.raises(ExportError, match="unknown Core ML quantization recipe 'int3'"):
        pipeline.export_bundle(tmp_path / "b", "coreml", ("fp16", "int3"), micro_checkpoint)
    assert not (tmp_path / "b").exists()


def test_ios_target_below_18_with_a_stateful_decoder(tmp_path):
    model = MobileVLM(micro_config())
    with pytest.raises(ExportError, match="KV cache as Core ML state, which needs minimum deployment target iOS18 or later; got iOS17"):
        coreml.export_coreml(model, None, parse_recipe("fp16"), tmp_path / "a", 96, target="iOS17")
    with pytest.raises(ExportError, match="needs minimum deployment target iOS18"):
        coreml.convert_decoder(model, 96, "iOS16")
    with pytest.raises(ExportError, match="unknown Core ML deployment target 'android'"):
        coreml.convert_decoder(model, 96, "android")
    assert not (tmp_path / "a").exists()


def test_block_size_that_fits_no_layer(tmp_path):
    model = MobileVLM(micro_config())
    with pytest.raises(ExportError, match=r"block size 48 divides the input width of no decoder linear \(widths 64, 128\)"):
        coreml.export_coreml(model, None, parse_recipe("int4-b48"), tmp_path / "a", 96)
    assert not (tmp_path / "a").exists()


def test_layer_the_block_does_not_divide_gets_a_reported_per_channel_override(tmp_path):
    torch.manual_seed(0)
    model = MobileVLM(micro_config(intermediate_size=96)).eval()
    model.text.remove_cache()
    converted = coreml.convert_decoder(copy.deepcopy(model), 96)
    compressed, rows = compress(converted, parse_recipe("int4-b64"), "decoder", [n for n, _ in model.named_parameters()])
    compressed.save(str(tmp_path / "decoder.mlpackage"))
    coreml.verify_compressed(tmp_path / "decoder.mlpackage", rows)  # nothing left in fp16
    by_layer = {r["layer"]: r["compression"] for r in rows}
    assert by_layer["text.layers.0.mlp.down_proj.weight"] == "int4 per-channel (input width 96 is not a multiple of block 64)"
    assert by_layer["text.layers.0.mlp.up_proj.weight"] == "int4 per-block 64"
    assert set(_weight_producers(tmp_path / "decoder.mlpackage").values()) == {"constexpr_blockwise_shift_scale"}


def test_backend_is_registered():
    backend = pipeline.get_backend("coreml")
    assert backend.name == "coreml" and backend.session is CoreMLSession and VERIFICATION_NOTE in backend.runtime
