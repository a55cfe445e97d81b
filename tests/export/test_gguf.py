"""GGUF export: the pair runs in llama.cpp (llama-cpp-python's llama + mtmd bindings) and answers like
the reference; the files read back exactly; published shapes get the right metadata; bad input fails.

llama-cpp-python is required (the `gguf` extra): without it these tests fail, they do not skip.
Parity is checked two ways. Against the true reference, llama.cpp differs by an upstream defect
(issue 25814: its LLaVA graph appends the class token after the patches), so the manifest records
those numbers and the tests check they are measured. Against `cls_last_image_features` (the reference
with that defect reproduced in PyTorch) the answers must be identical: that isolates our export.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mobilevlm import MobileVLM, load_model, load_processor, save_pretrained
from mobilevlm.config import PRESETS, ProjectorConfig, VisionConfig
from mobilevlm.data import make_scene, render_scene
from mobilevlm.errors import ExportError
from mobilevlm.export import pipeline
from mobilevlm.export.bundle import load_bundle, new_manifest
from mobilevlm.export.gguf import cls_last_image_features, export_gguf, parse_recipe
from mobilevlm.export.gguf_layout import check_representable
from mobilevlm.export.gguf_write import mmproj_metadata, text_metadata, tokenizer_metadata
from mobilevlm.generate import SamplingConfig, iter_tokens
from mobilevlm.gguf_import import find_gguf_pair, load_gguf_processor, read_gguf_pair
from mobilevlm.processing import Processor, Tokenizer

from ..conftest import CORPUS, micro_config


@pytest.fixture(scope="module")
def llama_cpp():
    try:
        import llama_cpp.mtmd_cpp  # noqa: F401
    except ImportError as exc:
        pytest.fail(f"llama-cpp-python with mtmd bindings is required for the GGUF tests (install the `gguf` extra): {exc}")
    import llama_cpp

    return llama_cpp


def grid24_config(projector: str = "ldpv2"):
    """The micro model on llama.cpp's fixed 24x24 patch grid (48 px / 2 px patches)."""
    base = micro_config(projector=projector, max_seq_len=256)
    vision = VisionConfig(image_size=48, patch_size=2, hidden_size=32, num_layers=3, num_heads=2, intermediate_size=64)
    return dataclasses.replace(base, vision=vision, projector=ProjectorConfig(projector, pool_size=12)).validate()


def random_model(config, seed: int = 0) -> MobileVLM:
    """Random weights everywhere (norms and biases too), large enough that the image matters."""
    torch.manual_seed(seed)
    model = MobileVLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.15)
    return model


@pytest.fixture(scope="module")
def gguf_checkpoint(tmp_path_factory, tokenizer_path) -> Path:
    return save_pretrained(random_model(grid24_config("ldpv2")), tmp_path_factory.mktemp("gguf-ckpt") / "m", tokenizer=tokenizer_path)


@pytest.fixture(scope="module")
def bundle(llama_cpp, gguf_checkpoint, tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("gguf-bundles") / "b"
    pipeline.export_bundle(out, "gguf", ("f16", "q8_0"), gguf_checkpoint, num_parity_cases=4, eval_scenes=2, log=lambda s: None)
    return load_bundle(out)


def emulated_answer(model, processor, image, question: str, max_new_tokens: int) -> list[int]:
    """Greedy tokens of the reference with llama.cpp's class-token order reproduced."""
    before, after = processor.prompt_ids(question)
    with torch.inference_mode():
        features = cls_last_image_features(model, processor.image.preprocess(image))
        embeds = torch.cat([model.embed(torch.tensor([before])), features, model.embed(torch.tensor([after]))], 1)
    model.text.remove_cache()
    return list(iter_tokens(model, embeds, SamplingConfig(max_new_tokens=max_new_tokens), {processor.tokenizer.eos_id}))


def session_for(bundle, name):
    from mobilevlm.export.gguf_session import GgufSession

    return GgufSession(bundle.root, bundle.artifact(name), bundle.manifest, threads=1)


# --- bundle, manifest, parity in llama.cpp ----------------------------------------------------------


def test_manifest_describes_the_pair_and_parity(bundle):
    f16, q8 = bundle.artifact("gguf-f16"), bundle.artifact("gguf-q8_0")
    for artifact in (f16, q8):
        folder = bundle.path(artifact["file"])
        assert folder.is_dir() and artifact["file"].endswith("-gguf")
        assert (folder / artifact["metadata"]["text_model"]).is_file() and (folder / artifact["metadata"]["mmproj"]).is_file()
        assert artifact["metadata"]["mmproj_tensor_types"].keys() <= {"F16", "F32"}
        parity = artifact["parity"]
        assert parity["num_cases"] == 4 and 0 <= parity["token_agreement"] <= 1 and "task" in parity
    assert "Q8_0" in q8["metadata"]["text_tensor_types"] and "Q8_0" not in f16["metadata"]["text_tensor_types"]
    assert q8["size_bytes"] < f16["size_bytes"]
    assert f16["quantization"]["text_quantizer"].startswith("llama.cpp llama_model_quantize")
    assert any("25814" in d for d in f16["metadata"]["known_differences"])


def test_llama_cpp_tokenizes_the_prompt_like_our_tokenizer(bundle):
    session = session_for(bundle, "gguf-f16")
    tokenizer = Tokenizer(bundle.path("tokenizer.json"))
    image = render_scene(make_scene(2_000_000_011), 64)
    for question in ["What color is the circle?", "Is there a  blue square?\n", "émoji ünïcödé 日本語 </s> 3.14"]:
        chunks = session.runtime.prompt_tokens(session.prompt_text(question), session.rgb(image))
        prompt = bundle.manifest["prompt"]
        after = tokenizer.encode(prompt["after_image"].replace("{prompt}", question))
        assert chunks == [prompt["before_image_ids"], 144, after]
    for text in CORPUS[:6]:
        ids = tokenizer.encode(text)
        assert b"".join(session.runtime.piece(i) for i in ids).decode() == tokenizer.decode(ids)


def measure(bundle, checkpoint, name: str, eos_position: bool = False) -> tuple[int, int, int]:
    """(identical greedy answers, agreeing positions, positions) of artifact `name` in llama.cpp against
    the reference with llama.cpp's class-token order, teacher-forced; with `eos_position`, the position
    after an answer that stopped early (its EOS) counts too."""
    model, processor = load_model(checkpoint), load_processor(checkpoint)
    session = session_for(bundle, name)
    eos = processor.tokenizer.eos_id
    matches, agree, positions = 0, 0, 0
    for case in bundle.manifest["parity"]["cases"]:
        image = render_scene(make_scene(case["scene_seed"]), 256)
        expected = emulated_answer(model, processor, image, case["question"], case["max_new_tokens"])
        matches += session.answer(image, case["question"], case["max_new_tokens"]) == processor.tokenizer.decode(expected)
        logits = session.forced_logits(image, case["question"], expected)
        targets = expected + ([eos] if eos_position and len(expected) < case["max_new_tokens"] else [])
        agree += sum(int(l.argmax()) == t for l, t in zip(logits, targets))
        positions += len(targets)
    return matches, agree, positions


@pytest.mark.parametrize("name", ["gguf-f16", "gguf-q8_0"])
def test_llama_cpp_answers_like_the_reference_with_its_class_token_order(bundle, gguf_checkpoint, name):
    """f16: every greedy answer identical; q8_0: teacher-forced token agreement of at least 90%."""
    matches, agree, positions = measure(bundle, gguf_checkpoint, name)
    if name == "gguf-f16":
        assert matches == 4 and agree == positions
    else:
        assert agree >= 0.9 * positions


def test_image_embeddings_match_the_emulated_graph(bundle, gguf_checkpoint):
    model, processor = load_model(gguf_checkpoint), load_processor(gguf_checkpoint)
    session = session_for(bundle, "gguf-f16")
    image = render_scene(make_scene(2_000_000_005), 100)
    ours = session.image_embeddings(image)
    emulated = cls_last_image_features(model, processor.image.preprocess(image))[0]
    true_reference = model.encode_image(processor.image.preprocess(image))[0].detach()
    scale = emulated.abs().max()
    assert ours.shape == emulated.shape == (144, 64)
    assert (ours - emulated).abs().max() < 0.05 * scale  # f16 weights, tanh GELU: small
    assert (ours - true_reference).abs().max() > (ours - emulated).abs().max()  # the upstream defect is real


def test_f32_text_model_matches_the_reference_decoder(llama_cpp, tmp_path, tokenizer_path):
    """Rotary permutation, GQA, norms, rope base, untied head: llama.cpp's logits equal ours (f32)."""
    from mobilevlm.export.gguf_session import LlamaCppRuntime

    base = grid24_config("ldpv2")
    config = dataclasses.replace(base, text=dataclasses.replace(base.text, rope_theta=500000.0, rms_norm_eps=1e-5)).validate()
    model = random_model(config, seed=4)
    report = export_gguf(model, Processor.from_config(config, Tokenizer(tokenizer_path)), parse_recipe("f32"), tmp_path / "a")
    runtime = LlamaCppRuntime(*find_gguf_pair(tmp_path / "a"), n_ctx=256, threads=1, kv_type="f32", flash_attention=report.metadata["flash_attention"])
    ids = torch.randint(3, 384, (60,), generator=torch.Generator().manual_seed(0))
    got = runtime.decode(list(range(40)), tokens=ids[:40].tolist())  # a prompt, then one token at a time
    for i in range(40, 60):
        got = runtime.decode([i], tokens=[int(ids[i])])
    with torch.no_grad():
        expected = model.text(model.embed(ids[None]))[0, -1]
    assert np.abs(got - expected.numpy()).max() < 1e-5 * max(1.0, float(expected.abs().max()))


def test_forced_logits_follow_the_answer(bundle, gguf_checkpoint):
    session = session_for(bundle, "gguf-f16")
    image = render_scene(make_scene(2_000_000_003), 64)
    ids = session.generate(image, "Describe the image.", 6)
    assert session.answer(image, "Describe the image.", 6) == Tokenizer(bundle.path("tokenizer.json")).decode(ids)
    logits = session.forced_logits(image, "Describe the image.", ids)
    assert len(logits) == len(ids) + 1 and logits[0].shape == (384,)
    assert [int(l.argmax()) for l in logits[: len(ids)]] == ids


def test_benchmark_contender(bundle):
    from mobilevlm.benchmarks.runner import run_bench

    records = run_bench(bundle.root, threads=(1,), prompt_lengths=(8,), repeats=1, warmup=0, decode_tokens=4, only=("gguf-q8_0",), log=lambda s: None)
    assert records[0]["contender"] == "gguf-q8_0" and "error" not in records[0], records[0]
    metrics = records[0]["metrics"]
    assert metrics["decode_tok_s"]["median"] > 0 and metrics["image_encode_ms"]["median"] > 0 and metrics["file_mb"] > 0


# --- reading GGUF back ------------------------------------------------------------------------------


@pytest.mark.parametrize("projector", ["mlp2x_gelu", "ldp", "ldpv2"])
def test_f32_round_trip_is_exact(tmp_path, tokenizer_path, projector):
    config = micro_config(projector="mlp2x_gelu") if projector == "mlp2x_gelu" else grid24_config(projector)
    model = random_model(config, seed=1)
    processor = Processor.from_config(config, Tokenizer(tokenizer_path))
    export_gguf(model, processor, parse_recipe("f32"), tmp_path / "a")
    back, _ = read_gguf_pair(*find_gguf_pair(tmp_path / "a"))
    assert back.config == config
    original, restored = model.state_dict(), back.state_dict()
    assert set(original) == set(restored)
    for key in original:
        assert torch.equal(original[key], restored[key]), key
    rebuilt = load_gguf_processor(tmp_path / "a")
    assert rebuilt.tokenizer.vocab_size == processor.tokenizer.vocab_size
    for text in CORPUS[:6] + ["<s>USER: x</s>", "  spaces\n\n"]:
        assert rebuilt.tokenizer.encode(text) == processor.tokenizer.encode(text)


def test_quantized_pair_reads_back_dequantized(llama_cpp, tmp_path, tokenizer_path):
    config = grid24_config("ldp")
    model = random_model(config, seed=2)
    export_gguf(model, Processor.from_config(config, Tokenizer(tokenizer_path)), parse_recipe("q8_0"), tmp_path / "a")
    back, _ = read_gguf_pair(*find_gguf_pair(tmp_path / "a"))
    for key, tensor in model.state_dict().items():
        error = (back.state_dict()[key] - tensor).abs().max()
        assert error <= 0.02 * tensor.abs().max() + 1e-6, key  # q8_0 text, f16 mmproj


def test_legacy_llama_cpp_mmproj_reads_back(tmp_path, tokenizer_path):
    """An mmproj as llama.cpp's MobileVLM converter writes it: layers after the selected one dropped,
    no feature_layer key, fc1 / fc2 named ffn_down / ffn_up, no post-LayerNorm, f16 matrices."""
    import gguf

    config = grid24_config("ldp")
    model = random_model(config, seed=5)
    export_gguf(model, Processor.from_config(config, Tokenizer(tokenizer_path)), parse_recipe("f32"), tmp_path / "a")
    reader = gguf.GGUFReader(str(tmp_path / "a" / "mmproj-f32.gguf"))
    writer = gguf.GGUFWriter(str(tmp_path / "legacy.gguf"), "clip")
    for name, field in reader.fields.items():
        if name.startswith(("GGUF.", "general.architecture", "mobilevlm.", "clip.vision.feature_layer", "clip.vision.block_count")):
            continue
        value = field.contents()
        if isinstance(value, list):
            writer.add_array(name, value)
        elif isinstance(value, str):
            writer.add_string(name, value)
        else:
            writer.add_key_value(name, value, field.types[0])
    writer.add_uint32("clip.vision.block_count", 2)
    legacy_names = {"ffn_up": "ffn_down", "ffn_down": "ffn_up"}
    for t in reader.tensors:
        if t.name.startswith(("v.blk.2.", "mobilevlm.")):
            continue
        parts = t.name.split(".")
        if len(parts) == 5 and parts[3] in legacy_names:
            parts[3] = legacy_names[parts[3]]
        data = np.array(t.data).reshape([int(d) for d in reversed(t.shape.tolist())])
        writer.add_tensor(".".join(parts), data.astype(np.float16) if data.ndim >= 2 else data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    back, _ = read_gguf_pair(tmp_path / "a" / "model-f32.gguf", tmp_path / "legacy.gguf")
    assert back.config.vision.num_layers == 2 and back.config.vision.num_layers_used == 2
    pixels = torch.randn(1, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = model.encode_image(pixels), back.encode_image(pixels)
    assert (got - expected).abs().max() < 0.01 * expected.abs().max()  # f16 weights only


@pytest.mark.parametrize("template", ["tiny", "vicuna_v1"])
def test_chat_template_renders_our_prompt(template):
    """The GGUF's tokenizer.chat_template (Jinja, as llama-cpp-python's Jinja2ChatFormatter and
    llama-server --jinja render it) gives our prompt template, turn after turn."""
    import jinja2

    from mobilevlm.export.gguf_write import chat_template
    from mobilevlm.processing import get_template

    t = get_template(template)
    render = jinja2.Environment().from_string(chat_template(t)).render
    first = [{"role": "user", "content": "<image>\nWhat is it?"}]
    assert render(messages=first, bos_token="<s>", eos_token="</s>") == "<s>" + t.text.replace("{prompt}", "What is it?")
    second = first + [{"role": "assistant", "content": "a cat"}, {"role": "user", "content": "Where?"}]
    expected = "<s>" + t.text.replace("{prompt}", "What is it?") + " a cat</s>" + t.followup.replace("{prompt}", "Where?")
    assert render(messages=second, bos_token="<s>", eos_token="</s>") == expected


def test_gguf_folder_needs_one_of_each(tmp_path):
    from mobilevlm.errors import CheckpointError

    assert find_gguf_pair(tmp_path) is None
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\x00" * 20)
    with pytest.raises(CheckpointError, match="junk.gguf"):
        find_gguf_pair(tmp_path)


# --- published shapes and layouts -------------------------------------------------------------------


@pytest.mark.parametrize("preset, kind, width", [("mobilevlm-1.7b", "ldp", 2048), ("mobilevlm-3b", "ldp", 2560), ("mobilevlm-v2-1.7b", "ldpv2", 2048), ("mobilevlm-v2-3b", "ldpv2", 2560)])
def test_published_shapes_metadata(preset, kind, width, tokenizer_path):
    config = PRESETS[preset]
    check_representable(config)
    clip = mmproj_metadata(config, preset)
    assert clip["clip.projector_type"] == kind and clip["clip.vision.projection_dim"] == width
    assert (clip["clip.vision.image_size"], clip["clip.vision.patch_size"], clip["clip.vision.embedding_length"]) == (336, 14, 1024)
    assert clip["clip.vision.block_count"] == 24 and clip["clip.vision.feature_layer"] == [23]  # hidden_states[-2]
    assert clip["clip.vision.feed_forward_length"] == 4096 and clip["clip.vision.attention.head_count"] == 16
    assert not clip["clip.use_gelu"] and clip["clip.vision.image_mean"][0] == pytest.approx(0.48145466)
    text = text_metadata(config, preset)
    layers, heads, ffn = {2048: (24, 16, 5632), 2560: (32, 32, 6912)}[width]
    assert (text["llama.embedding_length"], text["llama.block_count"], text["llama.attention.head_count"]) == (width, layers, heads)
    assert text["llama.feed_forward_length"] == ffn and text["llama.rope.dimension_count"] == width // heads
    assert text["llama.context_length"] == 2048 and text["llama.attention.layer_norm_rms_epsilon"] == 1e-6
    # shrunk to one text layer and two vision layers, the published shape writes and reads back
    small = dataclasses.replace(config, text=dataclasses.replace(config.text, num_layers=1, vocab_size=384, intermediate_size=256),
                                vision=dataclasses.replace(config.vision, num_layers=2)).validate()
    tokens = tokenizer_metadata(Processor.from_config(small, Tokenizer(tokenizer_path)), 384)
    assert tokens["tokenizer.ggml.model"] == "gpt2" and len(tokens["tokenizer.ggml.tokens"]) == 384


def test_published_v2_shape_runs_in_llama_cpp(llama_cpp, tmp_path, tokenizer_path):
    """MobileVLM V2 1.7B widths (CLIP-L/14-336, LDPv2 1024 -> 2048) with one layer of each tower."""
    from mobilevlm.export.gguf_session import LlamaCppRuntime

    config = PRESETS["mobilevlm-v2-1.7b"]
    small = dataclasses.replace(config, text=dataclasses.replace(config.text, num_layers=1, vocab_size=384, intermediate_size=256, max_seq_len=256),
                                vision=dataclasses.replace(config.vision, num_layers=2), prompt_template="tiny").validate()
    model = random_model(small, seed=3)
    processor = Processor.from_config(small, Tokenizer(tokenizer_path))
    export_gguf(model, processor, parse_recipe("f32"), tmp_path / "a")
    runtime = LlamaCppRuntime(*find_gguf_pair(tmp_path / "a"), n_ctx=256, threads=1, kv_type="f32")
    image = render_scene(make_scene(2_000_000_021), 400)
    pixels = processor.image.prepare_image(image)
    got = torch.from_numpy(runtime.encode_image(pixels.permute(1, 2, 0).numpy()))
    expected = cls_last_image_features(model, processor.image.normalize(pixels).unsqueeze(0))[0]
    assert got.shape == (144, 2048)
    assert (got - expected).abs().max() < 0.02 * expected.abs().max()


@pytest.mark.parametrize("published_type", ["ldpnet", "ldpnetv2", "mlp2x_gelu"])
def test_published_checkpoint_folder_exports_and_reads_back(llama_cpp, tmp_path, tokenizer_path, published_type):
    from ..mobilevlm.test_checkpoint import tiny_clip, tiny_llama, write_published_folder

    write_published_folder(tmp_path / "pub", tiny_llama(4, vocab=384), tiny_clip(), published_type)
    shutil.copyfile(tokenizer_path, tmp_path / "pub" / "tokenizer.json")
    model, processor = load_model(tmp_path / "pub"), load_processor(tmp_path / "pub")
    export_gguf(model, processor, parse_recipe("f32"), tmp_path / "a")
    back, _ = read_gguf_pair(*find_gguf_pair(tmp_path / "a"))
    for key, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], tensor), key
    manifest = new_manifest(model, processor, str(tmp_path / "pub"), 256 if model.config.num_image_tokens < 200 else 1024)
    artifact = {"name": "gguf-f32", "file": "a", "metadata": json.loads(json.dumps({"text_model": "model-f32.gguf", "mmproj": "mmproj-f32.gguf", "kv_cache_type": "f32", "context_length": 1024}))}
    from mobilevlm.export.gguf_session import GgufSession

    session = GgufSession(tmp_path, artifact, manifest, threads=1)
    image = render_scene(make_scene(2_000_000_031), 80)
    assert session.image_embeddings(image).shape == (model.config.num_image_tokens, 64)
    assert np.isfinite(session.forced_logits(image, "What is it?", [5, 6])[-1].numpy()).all()


# --- bad input --------------------------------------------------------------------------------------


def test_unknown_recipe_fails_before_any_work(tmp_path, micro_checkpoint):
    with pytest.raises(ExportError, match="unknown quantization recipe 'q3_k' for gguf; expected one of f32, f16, q8_0, q4_0, q4_k_m"):
        pipeline.export_bundle(tmp_path / "b", "gguf", ("q3_k",), micro_checkpoint)
    assert not (tmp_path / "b").exists()


def test_unrepresentable_models_are_named(tmp_path, tokenizer_path):
    cases = [
        (micro_config(projector="ldpv2"), "projector 'ldpv2' on a 4x4 patch grid cannot be represented in llama.cpp"),
        (dataclasses.replace(grid24_config("ldpv2"), projector=ProjectorConfig("ldpv2", pool_size=6)), "pool_size 6 cannot be represented"),
        (dataclasses.replace(micro_config(projector="mlp2x_gelu"), vision=dataclasses.replace(micro_config().vision, select_feature="cls_patch")),
         "select_feature 'cls_patch' cannot be represented"),
        (dataclasses.replace(micro_config(projector="mlp2x_gelu"), vision=dataclasses.replace(micro_config().vision, intermediate_size=32)),
         "intermediate_size equal to vision.hidden_size"),
    ]
    for config, message in cases:
        with pytest.raises(ExportError, match=message):
            export_gguf(MobileVLM(config), Processor.from_config(config, Tokenizer(tokenizer_path)), parse_recipe("f32"), tmp_path / "never")
    fake = dataclasses.replace(micro_config(), projector=dataclasses.replace(micro_config().projector, type="qformer"))
    with pytest.raises(ExportError, match="projector type 'qformer' cannot be represented in llama.cpp's mmproj; supported: mlp2x_gelu, ldp, ldpv2"):
        check_representable(fake)
    assert not (tmp_path / "never").exists()


def test_non_bpe_tokenizer_is_refused(tmp_path, tokenizer_path):
    data = json.loads(Path(tokenizer_path).read_text())
    data["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": False}
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    config = micro_config(projector="mlp2x_gelu")
    with pytest.raises(ExportError, match="pre_tokenizer 'Metaspace'"):
        export_gguf(MobileVLM(config), Processor.from_config(config, Tokenizer(tmp_path / "tokenizer.json")), parse_recipe("f32"), tmp_path / "never")
