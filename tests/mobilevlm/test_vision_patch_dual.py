"""Encoder-free patches (Fuyu) and the dual-resolution path (CogAgent-style): token layout checked
against an independent patch cut, zero gates equal the low-resolution path, gradients, a MobileVLM per
family that learns, and one ExecuTorch export per family that answers as the reference."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from mobilevlm import MobileVLM, save_pretrained
from mobilevlm.config import ProjectorConfig, VisionConfig
from mobilevlm.model import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from mobilevlm.vision import build_encoder, build_vision_encoder
from mobilevlm.vision.dual import CROSS_ATTENTION_DEPTH, DualResolutionEncoder
from mobilevlm.vision.patch import PatchEncoder

from ..conftest import micro_config

PATCH = VisionConfig(type="patch", image_size=32, patch_size=8, hidden_size=64, num_layers=2, num_heads=2, intermediate_size=64)  # ViT fields unused
HIGH = VisionConfig(type="convnext", image_size=64, patch_size=8, hidden_size=32, num_heads=2, stage_depths=(1, 1), stage_dims=(16, 32))


def patch_vlm_config(projector: str = "linear"):
    return dataclasses.replace(micro_config(), vision=PATCH, projector=ProjectorConfig(projector)).validate()


def dual_vlm_config(high: VisionConfig = HIGH):
    return dataclasses.replace(micro_config(), resolution="dual", high_res_vision=high).validate()


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def train_losses(config, steps: int = 10) -> list[float]:
    """Loss on one fixed batch over `steps` AdamW steps of the whole model."""
    torch.manual_seed(0)
    model = MobileVLM(config)
    ids = torch.tensor([[1, 5, IMAGE_TOKEN_INDEX, 7, 8, 9, 10], [1, 6, IMAGE_TOKEN_INDEX, 7, 3, 4, 11]])
    labels = torch.where(torch.arange(7) < 3, IGNORE_INDEX, ids)
    s = config.input_image_size
    pixels = torch.randn(2, 3, s, s)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        loss = model(ids, pixels, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def export_parity(model: MobileVLM, tmp_path, tokenizer_path) -> dict:
    from mobilevlm.export import pipeline
    from mobilevlm.export.bundle import load_bundle

    model_dir = save_pretrained(model, tmp_path / "model", tokenizer=tokenizer_path)
    out = pipeline.export_bundle(tmp_path / "bundle", "executorch", ("fp32",), model_dir, num_parity_cases=2, eval_scenes=0, log=lambda s: None)
    artifact = load_bundle(out).artifact("executorch-fp32")
    assert artifact["parity"]["answers_identical"] == artifact["parity"]["num_cases"] == 2
    assert artifact["parity"]["first_logit_max_abs_error"] < 1e-4
    s = model.config.input_image_size
    assert artifact["methods"]["vision_encoder"]["inputs"][0]["shape"] == [1, 3, s, s]
    return artifact


# --- patch (Fuyu) ---------------------------------------------------------------------------------


def test_patch_tokens_for_a_square_and_a_non_square_image():
    encoder = build_encoder(PATCH)
    assert isinstance(encoder, PatchEncoder)
    assert encoder(torch.randn(2, 3, 32, 32)).shape == (2, PATCH.num_output_tokens, 64) == (2, 4 * 5, 64)
    rows, cols = 3, 5
    assert encoder(torch.randn(2, 3, 8 * rows, 8 * cols)).shape == (2, rows * (cols + 1), 64)
    assert encoder.pooled(torch.randn(2, 3, 32, 32)).shape == (2, 64)
    with pytest.raises(ValueError, match="multiple of vision.patch_size 8"):
        encoder(torch.randn(1, 3, 30, 32))


def test_patch_token_is_the_linear_of_exactly_its_pixels_and_rows_end_in_separators():
    torch.manual_seed(0)
    encoder = PatchEncoder(PATCH)
    p, rows, cols = 8, 3, 5
    pixels = torch.randn(2, 3, p * rows, p * cols)
    tokens = encoder(pixels)
    weight, bias = encoder.patch_embedding.weight, encoder.patch_embedding.bias
    for r in range(rows):
        for c in range(cols):
            patch = pixels[:, :, r * p : (r + 1) * p, c * p : (c + 1) * p]  # [B, 3, p, p]
            flat = patch.permute(0, 2, 3, 1).reshape(2, -1)  # Fuyu's order: pixel row, pixel column, channel
            torch.testing.assert_close(tokens[:, r * (cols + 1) + c], flat @ weight.T + bias)
        assert torch.equal(tokens[:, r * (cols + 1) + cols], encoder.newline.expand(2, -1))
    patch_tokens = tokens.reshape(2, rows, cols + 1, 64)[:, :, :cols]
    torch.testing.assert_close(encoder.pooled(pixels), patch_tokens.mean(dim=(1, 2)))


def test_patch_gradients_reach_every_parameter():
    encoder = PatchEncoder(PATCH)
    (encoder(torch.randn(2, 3, 32, 32)) * torch.randn(2, 20, 64)).sum().backward()
    for name, p in encoder.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("projector", ["linear", "mlp2x_gelu"])
def test_mobilevlm_with_patches_learns(projector):
    config = patch_vlm_config(projector)
    assert MobileVLM(config).encode_image(torch.randn(1, 3, 32, 32)).shape == (1, 20, 64) == (1, config.num_image_tokens, 64)
    losses = train_losses(config)
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.slow  # an ExecuTorch export (~40 s); .ci/run runs the slow family suites
def test_patch_executorch_export_matches_reference(tmp_path, tokenizer_path):
    torch.manual_seed(0)
    export_parity(MobileVLM(patch_vlm_config()), tmp_path, tokenizer_path)


# --- dual resolution ------------------------------------------------------------------------------


def test_dual_shapes_and_zero_gates_equal_the_low_resolution_path():
    torch.manual_seed(0)
    config = dual_vlm_config()
    encoder = build_vision_encoder(config)
    assert isinstance(encoder, DualResolutionEncoder) and len(encoder.cross) == CROSS_ATTENTION_DEPTH
    assert encoder.high.config.type == "convnext" and encoder.low.config.type == "clip_vit"
    pixels = torch.randn(2, 3, 64, 64)
    low = encoder.low(F.avg_pool2d(pixels, 2, 2))
    out = encoder(pixels)
    assert out.shape == (2, config.vision.num_output_tokens, config.vision.hidden_size) == (2, 16, 32)
    assert torch.equal(out, low)
    assert torch.equal(encoder.pooled(pixels), encoder.low.pooled(F.avg_pool2d(pixels, 2, 2)))
    model = MobileVLM(config)  # reset_parameters must leave the gates closed
    assert all(float(b.attn_gate) == 0 and float(b.mlp_gate) == 0 for b in model.vision.cross)
    assert model.encode_image(pixels).shape == (2, config.num_image_tokens, 64)


def test_dual_open_gates_use_the_high_resolution_image_and_every_parameter_learns():
    torch.manual_seed(0)
    encoder = DualResolutionEncoder(dual_vlm_config())
    with torch.no_grad():
        for block in encoder.cross:
            block.attn_gate.fill_(0.5)
            block.mlp_gate.fill_(0.5)
    pixels = torch.randn(2, 3, 64, 64)
    # detail that averages away at low resolution changes the output once the gates are open
    detail = torch.randn(2, 3, 64, 64)
    detail = detail - F.interpolate(F.avg_pool2d(detail, 2, 2), scale_factor=2, mode="nearest")
    assert torch.allclose(F.avg_pool2d(pixels + detail, 2, 2), F.avg_pool2d(pixels, 2, 2), atol=1e-6)
    assert not torch.allclose(encoder(pixels + detail), encoder(pixels), atol=1e-5)
    (encoder(pixels) * torch.randn(2, 16, 32)).sum().backward()
    (encoder.pooled(pixels) * torch.randn(2, 32)).sum().backward()  # the CLIP post-LN only runs in pooled
    for name, p in encoder.named_parameters():
        if name.startswith("high.head."):  # the ConvNeXt classification norm: only its own pooled() uses it
            continue
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_dual_renormalises_for_a_high_encoder_with_other_statistics():
    torch.manual_seed(0)
    high = dataclasses.replace(HIGH, image_mean=(0.5, 0.5, 0.5), image_std=(0.25, 0.5, 0.75))
    encoder = DualResolutionEncoder(dual_vlm_config(high))
    raw = torch.rand(1, 3, 64, 64)
    low_mean, low_std = torch.tensor(encoder.config.image_mean).view(1, 3, 1, 1), torch.tensor(encoder.config.image_std).view(1, 3, 1, 1)
    seen = []
    encoder.high.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    encoder((raw - low_mean) / low_std)
    torch.testing.assert_close(seen[0], (raw - 0.5) / torch.tensor(high.image_std).view(1, 3, 1, 1))
    assert not any("high_scale" in k for k in encoder.state_dict())  # derived from the config, not saved


def test_mobilevlm_dual_learns():
    losses = train_losses(dual_vlm_config())
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.slow  # an ExecuTorch export (~40 s); .ci/run runs the slow family suites
def test_dual_executorch_export_matches_reference(tmp_path, tokenizer_path):
    # Needs the exporter and processor to take images at config.input_image_size (high_res_vision's).
    torch.manual_seed(0)
    model = MobileVLM(dual_vlm_config())
    with torch.no_grad():
        for block in model.vision.cross:  # open the gates so the high-resolution path is exported live
            block.attn_gate.fill_(0.5)
            block.mlp_gate.fill_(0.5)
    export_parity(model, tmp_path, tokenizer_path)
