"""`--backend hf`: the written folders load in transformers (Llama decoder within 1e-4 of ours, CLIP
vision tower too), round-trip through our published-layout importer to identical weights, and run
through the pipeline's parity harness with transformers as the runtime."""

from __future__ import annotations

import json

import pytest
import torch

from mobilevlm import MobileVLM, load_model, load_processor
from mobilevlm.config import ProjectorConfig, VisionConfig
from mobilevlm.errors import ExportError
from mobilevlm.export import pipeline
from mobilevlm.export.bundle import load_bundle
from mobilevlm.export.hf import export_hf, parse_recipe

from ..conftest import micro_config, replace


@pytest.fixture(scope="module")
def written(tmp_path_factory, micro_checkpoint):
    model, processor = load_model(micro_checkpoint), load_processor(micro_checkpoint)
    out = tmp_path_factory.mktemp("hf") / "model-fp32"
    export_hf(model, processor, parse_recipe("fp32"), out, 96)
    return model, processor, out


def test_llama_folder_matches_our_decoder(written):
    from transformers import LlamaForCausalLM

    model, _, folder = written
    llama = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert llama.config.num_key_value_heads == 2 and llama.config.max_position_embeddings == 96
    ids = torch.tensor([[1, 17, 250, 3, 99, 42, 7]])
    embeds = torch.randn(1, 9, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(llama(input_ids=ids).logits, model.text(model.embed(ids)), atol=1e-4, rtol=0)
        torch.testing.assert_close(llama(inputs_embeds=embeds).logits, model.text(embeds), atol=1e-4, rtol=0)


def test_clip_folder_matches_our_vision_tower(written):
    from transformers import CLIPVisionModel

    model, _, folder = written
    clip = CLIPVisionModel.from_pretrained(folder / "vision_tower", dtype=torch.float32).eval()
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        theirs = clip(pixel_values=pixels, output_hidden_states=True).hidden_states
        ours = model.vision.hidden_states(pixels)
    for a, b in zip(theirs, ours, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    preprocessor = json.loads((folder / "vision_tower" / "preprocessor_config.json").read_text())
    assert preprocessor["image_mean"] == list(model.config.vision.image_mean)


def test_tokenizer_folder_loads_in_transformers(written):
    from transformers import AutoTokenizer

    _, processor, folder = written
    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = "USER: What color is the circle? ASSISTANT:"
    assert tokenizer(text, add_special_tokens=False).input_ids == processor.tokenizer.encode(text)
    assert tokenizer.eos_token_id == processor.tokenizer.eos_id


@pytest.mark.parametrize("projector", ["mlp2x_gelu", "ldp", "ldpv2"])
def test_round_trip_through_the_published_importer(tmp_path, micro_checkpoint, projector):
    # The published layout fixes LDPv2's pool at 12x12, so that case uses a 12x12 patch grid.
    config = micro_config(projector=projector, max_seq_len=256)
    if projector == "ldpv2":
        config = replace(config, vision=replace(config.vision, image_size=48, patch_size=4), projector=ProjectorConfig("ldpv2", pool_size=12)).validate()
    torch.manual_seed(3)
    model = MobileVLM(config).eval()
    export_hf(model, load_processor(micro_checkpoint), parse_recipe("fp32"), tmp_path / "hf", 200)
    back = load_model(tmp_path / "hf")
    ours, theirs = model.state_dict(), back.state_dict()
    assert set(ours) == set(theirs)
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    assert back.config.text == model.config.text and back.config.projector.type == projector
    assert back.config.vision.select_layer == model.config.vision.select_layer
    assert isinstance(back.config.vision, VisionConfig)


def test_pipeline_parity_with_transformers_as_the_runtime(tmp_path, micro_checkpoint, monkeypatch):
    monkeypatch.setitem(pipeline.BACKENDS, "hf", "mobilevlm.export.hf")
    pipeline.export_bundle(tmp_path / "b", "hf", ("fp32", "fp16"), micro_checkpoint, num_parity_cases=2, eval_scenes=0, log=lambda s: None)
    bundle = load_bundle(tmp_path / "b")
    fp32, fp16 = bundle.artifact("hf-fp32"), bundle.artifact("hf-fp16")
    assert fp32["runtime"].startswith("transformers") and fp32["file"] == "model-fp32"
    assert fp32["parity"]["answers_identical"] == 2 and fp32["parity"]["first_logit_max_abs_error"] < 1e-4
    assert fp16["size_bytes"] < 0.6 * fp32["size_bytes"] and fp16["parity"]["first_logit_max_abs_error"] < 1e-2
    config = json.loads(bundle.path("model-fp16/config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["mm_projector_type"] == "ldpnetv2" and config["dtype"] == "float16"


def test_unknown_hf_recipe():
    with pytest.raises(ExportError, match="unknown recipe 'int4' for the hf backend; expected one of fp32, fp16, bf16"):
        parse_recipe("int4")
