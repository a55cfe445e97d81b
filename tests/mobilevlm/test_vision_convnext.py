"""ConvNeXt encoder: grid and token shapes, block behaviour at init, gradients, a MobileVLM that learns,
and an ExecuTorch export that answers as the reference."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mobilevlm import MobileVLM, save_pretrained
from mobilevlm.config import ProjectorConfig, VisionConfig
from mobilevlm.model import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from mobilevlm.vision import build_encoder
from mobilevlm.vision.convnext import ConvNeXtEncoder

from ..conftest import micro_config


def convnext_config(image_size: int = 32, depths=(1, 1), dims=(16, 32)) -> VisionConfig:
    stride = 4 * 2 ** (len(dims) - 1)
    return VisionConfig(
        type="convnext", image_size=image_size, patch_size=stride, hidden_size=dims[-1], num_heads=2, stage_depths=depths, stage_dims=dims
    )


def convnext_vlm_config():
    return dataclasses.replace(micro_config(), vision=convnext_config(), projector=ProjectorConfig("ldpv2", pool_size=2)).validate()


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.mark.parametrize("depths,dims,image_size,grid", [((1, 1, 1), (8, 16, 24), 64, 4), ((1, 2, 1, 1), (8, 16, 16, 24), 64, 2), ((1, 1, 1), (8, 16, 24), 96, 6)])
def test_grid_size_for_three_and_four_stages(depths, dims, image_size, grid):
    config = convnext_config(image_size, depths, dims)
    config.validate()
    encoder = build_encoder(config)
    assert isinstance(encoder, ConvNeXtEncoder) and config.grid_size == grid
    pixels = torch.randn(2, 3, image_size, image_size)
    assert encoder.feature_map(pixels).shape == (2, dims[-1], grid, grid)
    assert encoder(pixels).shape == (2, grid * grid, dims[-1]) == (2, config.num_output_tokens, config.hidden_size)
    assert encoder.pooled(pixels, mask_ratio=0.5).shape == (2, dims[-1])


def test_tokens_are_the_row_major_map_and_pooled_is_the_normed_mean():
    torch.manual_seed(0)
    encoder = ConvNeXtEncoder(convnext_config())
    pixels = torch.randn(2, 3, 32, 32)
    grid = encoder.feature_map(pixels)
    tokens = encoder(pixels)
    assert torch.equal(tokens[:, 1 * 4 + 2], grid[:, :, 1, 2])
    expected = torch.nn.functional.layer_norm(tokens.mean(1), (32,), encoder.head.norm.weight, encoder.head.norm.bias, encoder.config.layer_norm_eps)
    torch.testing.assert_close(encoder.pooled(pixels), expected)


def test_layer_scale_survives_model_init_and_names_follow_timm():
    model = MobileVLM(convnext_vlm_config())
    names = dict(model.vision.named_parameters())
    for name in ("stem.0.weight", "stem.1.weight", "stages.1.downsample.0.weight", "stages.1.downsample.1.weight",
                 "stages.0.blocks.0.conv_dw.weight", "stages.0.blocks.0.norm.weight", "stages.0.blocks.0.mlp.fc1.weight",
                 "stages.0.blocks.0.mlp.fc2.weight", "stages.0.blocks.0.gamma", "head.norm.weight"):
        assert name in names, name
    assert "stages.0.downsample.0.weight" not in names  # the stem already set the first stage's width
    assert torch.all(names["stages.1.blocks.0.gamma"] == 1e-6)
    assert names["stages.0.blocks.0.conv_dw.weight"].shape == (16, 1, 7, 7)
    assert names["stages.0.blocks.0.mlp.fc1.weight"].shape == (64, 16)


def test_block_is_a_residual_scaled_by_gamma():
    torch.manual_seed(0)
    encoder = ConvNeXtEncoder(convnext_config())
    block = encoder.stages[0].blocks[0]
    x = torch.randn(1, 16, 8, 8)
    with torch.no_grad():
        block.gamma.zero_()
        assert torch.equal(block(x), x)
        block.gamma.fill_(1.0)
        y = block.conv_dw(x).permute(0, 2, 3, 1)
        expected = x + block.mlp.fc2(torch.nn.functional.gelu(block.mlp.fc1(block.norm(y)))).permute(0, 3, 1, 2)
        torch.testing.assert_close(block(x), expected)


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    encoder = ConvNeXtEncoder(convnext_config())
    pixels = torch.randn(2, 3, 32, 32)
    loss = (encoder(pixels) * torch.randn(2, 16, 32)).sum() + (encoder.pooled(pixels) * torch.randn(2, 32)).sum()
    loss.backward()
    for name, p in encoder.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_mobilevlm_with_convnext_learns():
    torch.manual_seed(0)
    model = MobileVLM(convnext_vlm_config())
    assert model.encode_image(torch.randn(2, 3, 32, 32)).shape == (2, 4, 64)
    ids = torch.tensor([[1, 5, IMAGE_TOKEN_INDEX, 7, 8, 9, 10], [1, 6, IMAGE_TOKEN_INDEX, 7, 3, 4, 11]])
    labels = torch.where(torch.arange(7) < 3, IGNORE_INDEX, ids)
    pixels = torch.randn(2, 3, 32, 32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(10):
        loss = model(ids, pixels, labels)
        optimizer.zero_grad()
        loss.backward()
        assert model.vision.stem[0].weight.grad.abs().sum() > 0
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.slow  # an ExecuTorch export (~40 s); .ci/run runs the slow family suites
def test_executorch_export_matches_reference(tmp_path, tokenizer_path):
    from mobilevlm.export import pipeline
    from mobilevlm.export.bundle import load_bundle

    torch.manual_seed(0)
    model_dir = save_pretrained(MobileVLM(convnext_vlm_config()), tmp_path / "model", tokenizer=tokenizer_path)
    out = pipeline.export_bundle(tmp_path / "bundle", "executorch", ("fp32",), model_dir, num_parity_cases=2, eval_scenes=0, log=lambda s: None)
    artifact = load_bundle(out).artifact("executorch-fp32")
    assert artifact["parity"]["answers_identical"] == artifact["parity"]["num_cases"] == 2
    assert artifact["parity"]["first_logit_max_abs_error"] < 1e-4
    assert artifact["methods"]["vision_encoder"]["inputs"][0]["shape"] == [1, 3, 32, 32]
