"""Model-family choices in the config: old config.json files still load, bad combinations are named,
backends that cannot carry a family say so before any work, and the ablation's variants are valid."""

from __future__ import annotations

import dataclasses
import json

import pytest

from mobilevlm.config import MobileVLMConfig, ProjectorConfig, TextConfig, VisionConfig, get_preset
from mobilevlm.errors import ConfigError, ExportError

from ..conftest import micro_config


def test_config_without_the_family_fields_loads_as_the_baseline():
    data = get_preset("tiny").to_dict()
    for key in ("resolution", "anyres_grids", "high_res_vision"):
        del data[key]
    for key in ("type", "stage_depths", "stage_dims"):
        del data["vision"][key]
    for key in ("num_queries", "depth", "num_heads"):
        del data["projector"][key]
    for key in ("num_experts", "experts_per_token", "moe_every", "router_aux_loss_coef"):
        del data["text"][key]
    config = MobileVLMConfig.from_dict(json.loads(json.dumps(data)))
    assert config == get_preset("tiny")
    assert config.vision.type == "clip_vit" and config.resolution == "direct" and config.text.num_experts == 0


def test_every_family_field_round_trips():
    high = VisionConfig(type="convnext", image_size=64, patch_size=8, hidden_size=32, stage_depths=(1, 1), stage_dims=(16, 32))
    config = dataclasses.replace(
        micro_config(num_experts=4, experts_per_token=2, moe_every=2),
        vision=dataclasses.replace(micro_config().vision, type="eva_vit"),
        projector=ProjectorConfig("qformer", num_queries=8, depth=1, num_heads=4),
        resolution="dual",
        high_res_vision=high,
    ).validate()
    again = MobileVLMConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and again.high_res_vision.stage_dims == (16, 32) and again.input_image_size == 64


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(vision=VisionConfig(type="convnext", image_size=32, patch_size=8, hidden_size=32, stage_depths=(1,), stage_dims=(16, 32))), "equal length"),
        (dict(vision=VisionConfig(type="convnext", image_size=32, patch_size=8, hidden_size=64, stage_depths=(1, 1), stage_dims=(16, 32))), "last ConvNeXt stage"),
        (dict(vision=VisionConfig(type="convnext", image_size=32, patch_size=4, hidden_size=32, stage_depths=(1, 1), stage_dims=(16, 32))), "total stride"),
        (dict(vision=VisionConfig(type="patch", image_size=32, patch_size=8, hidden_size=32)), "needs a patch grid"),
        (dict(vision=VisionConfig(type="vit_huge", image_size=32, patch_size=8, hidden_size=32)), "unknown vision.type"),
        (dict(resolution="dual"), "needs high_res_vision"),
        (dict(resolution="dual", high_res_vision=VisionConfig(image_size=48, patch_size=8, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)), "larger multiple"),
        (dict(high_res_vision=VisionConfig(image_size=64, patch_size=8, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)), "high_res_vision is set"),
        (dict(text=TextConfig(vocab_size=384, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128, max_seq_len=96, num_experts=2, experts_per_token=3)), "experts_per_token"),
        (dict(projector=ProjectorConfig("qformer", num_heads=5)), "divisible by projector.num_heads"),
    ],
)
def test_bad_family_combinations_name_the_field(change, message):
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(micro_config(), **change).validate()


def test_config_json_with_a_bad_stage_list_is_a_config_error():
    data = micro_config().to_dict()
    data["vision"]["stage_dims"] = [16, "wide"]
    with pytest.raises(ConfigError, match="stage_dims: expected a list of integers"):
        MobileVLMConfig.from_dict(data)


@pytest.mark.parametrize(
    "backend, change, feature",
    [
        ("gguf", dict(projector=ProjectorConfig("qformer", num_queries=4, depth=1, num_heads=4)), "projector:qformer"),
        ("hf", dict(resolution="anyres", anyres_grids=(1, 2)), "resolution:anyres"),
        ("gguf", dict(interface="visual_expert"), "interface:visual_expert"),
        ("gguf", dict(text=dataclasses.replace(micro_config().text, num_experts=2, experts_per_token=1)), "decoder:moe"),
    ],
)
def test_backend_that_cannot_carry_a_family_refuses_before_any_work(tmp_path, tokenizer_path, backend, change, feature):
    import torch

    from mobilevlm import MobileVLM, save_pretrained
    from mobilevlm.export import pipeline

    torch.manual_seed(0)
    ckpt = save_pretrained(MobileVLM(dataclasses.replace(micro_config(), **change).validate()), tmp_path / "ckpt", tokenizer=tokenizer_path)
    with pytest.raises(ExportError, match=f"backend '{backend}' cannot export this model: {feature}"):
        pipeline.export_bundle(tmp_path / "bundle", backend, ("fp32" if backend != "gguf" else "f32",), ckpt, log=lambda s: None)
    assert not (tmp_path / "bundle").exists()


def test_counted_image_macs_equal_the_validated_formula_for_mobilevlm_shapes():
    from mobilevlm.benchmarks.counting import counted_vision_macs, vision_macs

    for name in ("tiny", "mobilevlm-v2-1.7b", "mobilevlm-v2-3b"):
        config = get_preset(name)
        assert counted_vision_macs(config) == pytest.approx(vision_macs(config), rel=1e-9)
    # LDP's formula approximates the Squeeze-Excitation and normalisations
    assert counted_vision_macs(get_preset("mobilevlm-1.7b")) == pytest.approx(vision_macs(get_preset("mobilevlm-1.7b")), rel=1e-3)


def test_sparse_decoder_is_counted_with_every_expert():
    from mobilevlm.benchmarks.counting import decode_count, text_linear_params, weight_format

    dense = micro_config().text
    sparse = dataclasses.replace(dense, num_experts=4, experts_per_token=2, moe_every=2)
    mlp = 3 * dense.hidden_size * dense.intermediate_size
    assert text_linear_params(sparse) - text_linear_params(dense) == 1 * (3 * mlp + dense.hidden_size * 4)
    fmt = weight_format("fp32")
    assert decode_count(sparse, fmt, 0).macs > decode_count(dense, fmt, 0).macs


def test_ablation_variants_are_valid_models():
    from mobilevlm.benchmarks.ablate import VARIANTS, ablation_recipe
    from mobilevlm.train.loop import build_config

    tokens = {}
    for name in VARIANTS:
        config = build_config(ablation_recipe(name), 1024)
        tokens[name] = config.num_image_tokens
    assert tokens["clip-ldpv2"] == tokens["clip-qformer"] == tokens["clip-dual"] == 36
    assert tokens["clip-anyres"] == 5 * 37 and tokens["patch-linear"] == 6 * 7
    assert tokens["clip-xattn"] == 0  # its image is beside the sequence, not in it


def test_image_macs_are_counted_for_every_family():
    from mobilevlm.benchmarks.ablate import VARIANTS, ablation_recipe
    from mobilevlm.benchmarks.counting import vision_macs
    from mobilevlm.train.loop import build_config

    macs = {name: vision_macs(build_config(ablation_recipe(name), 1024)) for name in VARIANTS}
    assert all(m > 0 for m in macs.values())
    assert macs["clip-anyres"] == pytest.approx(5 * macs["clip-ldpv2"], rel=0.01)  # five views of the same encoder
    assert macs["patch-linear"] < macs["convnext-ldpv2"] < macs["clip-ldpv2"] < macs["clip-dual"]
    with pytest.raises(ConfigError, match="unknown ablation variant"):
        ablation_recipe("clip-xl")


def test_ablation_table_is_built_from_records():
    from mobilevlm.benchmarks.ablate import table

    record = {
        "variant": "clip-ldpv2", "choice": "baseline", "description": "CLIP", "budget": "ablation", "parameters": 4_000_000, "active_parameters": 4_000_000,
        "image_tokens": 36, "train_minutes": 5.0,
        "eval": {"num_scenes": 40, "closed_ended": {"accuracy": 0.5, "by_type": {"reading": 0.25, "count": 0.75}},
                 "pope": {"random": {"f1": 0.6}, "popular": {"f1": 0.8}}, "chair": {"chair_i": 0.4}},
        "executorch": {"size_bytes": 5_000_000}, "onnx": {"unsupported": "no"}, "host": {"image_encode_ms": 3.0, "ttft_ms": 9.0},
        "projected": {"ttft_ms": 2.0}, "machine": {"cpu": "test cpu"},
    }
    moe = dict(record, variant="clip-ldpv2-moe", active_parameters=3_000_000, parameters=5_000_000, onnx={"size_bytes": 6_000_000})
    text = table([record, moe])
    assert "| clip-ldpv2 | baseline | 4.00M | 36 | 0.500 | 0.250 | 0.750 | 0.700 | 0.400 | 5.0 | n/a | 3.0 | 9.0 | 2.0 | 5.0 |" in text
    assert "| clip-ldpv2-moe | baseline | 5.00M (3.00M) |" in text and "| 6.0 |" in text
    fusion = dict(record, variant="fusion", image_tokens=30, projected={"ttft_ms": None})
    assert "| fusion | baseline | 4.00M | 30 (description) |" in table([fusion]) and "| n/a | 5.0 |" in table([fusion])


def test_onnx_again_exports_only_records_without_onnx(tmp_path, tokenizer_path):
    """`mobilevlm ablate --onnx-again`: a finished variant whose record has no ONNX export gets one from
    its trained model (size and parity in the record, the table rebuilt); one that has it is left alone."""
    import argparse
    import json

    import torch

    from mobilevlm import MobileVLM, save_pretrained
    from mobilevlm.benchmarks import ablate

    torch.manual_seed(0)
    base = {
        "choice": "interface", "description": "x", "budget": "ablation", "parameters": 1, "active_parameters": 1, "image_tokens": 0, "train_minutes": 1.0,
        "eval": {"num_scenes": 2, "closed_ended": {"accuracy": 0.5, "by_type": {}}, "pope": {"random": {"f1": 0.5}}, "chair": {"chair_i": 0.5}},
        "executorch": {"size_bytes": 1}, "host": {"image_encode_ms": 1.0, "ttft_ms": 1.0}, "projected": {"ttft_ms": 1.0}, "machine": {"cpu": "test"},
    }
    records = {"clip-xattn": dict(base, variant="clip-xattn", onnx={"recipe": "int4", "unsupported": "not then"}),
               "clip-ldpv2": dict(base, variant="clip-ldpv2", onnx={"recipe": "int4", "size_bytes": 123, "token_agreement": 1.0})}
    for name, record in records.items():
        save_pretrained(MobileVLM(dataclasses.replace(micro_config(), interface="cross_attention", cross_attention_every=1).validate()),
                        tmp_path / name / "run" / "model", tokenizer=tokenizer_path)
        (tmp_path / name / "result.json").write_text(json.dumps(record))
    args = argparse.Namespace(out=tmp_path, variants="clip-xattn,clip-ldpv2", budget="ablation", eval_scenes=2, jobs=1, retime=False, onnx_again=True, one=None)
    assert ablate.run(args) == 0
    xattn = json.loads((tmp_path / "clip-xattn" / "result.json").read_text())["onnx"]
    assert xattn["recipe"] == "int4" and xattn["size_bytes"] > 0 and 0 <= xattn["token_agreement"] <= 1
    assert json.loads((tmp_path / "clip-ldpv2" / "result.json").read_text())["onnx"]["size_bytes"] == 123
    assert not (tmp_path / "clip-ldpv2" / "bundle-onnx").exists()
    assert f"| {xattn['size_bytes'] / 1e6:.1f} |" in (tmp_path / "ablation.md").read_text()
