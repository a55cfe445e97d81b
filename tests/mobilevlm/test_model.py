"""The model itself: shapes, the KV cache against the uncached forward, gradients, projector grids."""

from __future__ import annotations

import pytest
import torch

from mobilevlm import MobileVLM
from mobilevlm.config import get_preset
from mobilevlm.model import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from mobilevlm.projector import _make_divisible

from ..conftest import micro_config


@pytest.mark.parametrize("projector,tokens", [("mlp2x_gelu", 16), ("ldp", 4), ("ldpv2", 4)])
def test_encode_image_shapes(projector, tokens):
    config = micro_config(projector=projector)
    model = MobileVLM(config).eval()
    out = model.encode_image(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, tokens, 64) == (2, config.num_image_tokens, config.text.hidden_size)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_kv_cache_decode_equals_full_forward(kv_heads):
    torch.manual_seed(0)
    model = MobileVLM(micro_config(num_kv_heads=kv_heads)).eval()
    embeds = torch.randn(1, 20, 64)
    full = model.text(embeds)
    model.setup_cache(1)
    # prefill 7, then 5, then token by token: every split of the sequence gives the full-forward logits
    chunks = [model.decode(embeds[:, :7], torch.arange(7)), model.decode(embeds[:, 7:12], torch.arange(7, 12))]
    chunks += [model.decode(embeds[:, i : i + 1], torch.tensor([i])) for i in range(12, 20)]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=1e-5)


def test_cache_is_overwritten_not_appended():
    """A second prompt at positions 0.. must not see the first prompt's keys."""
    torch.manual_seed(0)
    model = MobileVLM(micro_config()).eval()
    model.setup_cache(1)
    model.decode(torch.randn(1, 30, 64), torch.arange(30))
    embeds = torch.randn(1, 6, 64)
    torch.testing.assert_close(model.decode(embeds, torch.arange(6)), model.text(embeds), atol=1e-5, rtol=1e-5)


def test_batched_cache():
    torch.manual_seed(0)
    model = MobileVLM(micro_config()).eval()
    embeds = torch.randn(3, 9, 64)
    model.setup_cache(3)
    out = torch.cat([model.decode(embeds[:, :5], torch.arange(5)), model.decode(embeds[:, 5:], torch.arange(5, 9))], 1)
    torch.testing.assert_close(out, model.text(embeds), atol=1e-5, rtol=1e-5)


def test_cache_longer_than_context_is_refused():
    model = MobileVLM(micro_config())
    with pytest.raises(ValueError, match="cache length"):
        model.setup_cache(1, 97)


def test_decode_without_cache_is_a_clear_error():
    model = MobileVLM(micro_config())
    with pytest.raises(RuntimeError, match="setup_cache"):
        model.decode(torch.randn(1, 2, 64), torch.arange(2))


def test_tied_embeddings_share_storage():
    model = MobileVLM(micro_config(tie_word_embeddings=True))
    assert model.text.lm_head.weight.data_ptr() == model.text.embed_tokens.weight.data_ptr()


def test_training_forward_places_image_and_ignores_it_in_the_loss():
    torch.manual_seed(0)
    model = MobileVLM(micro_config())
    ids = torch.tensor([[1, 5, IMAGE_TOKEN_INDEX, 7, 8, 9], [1, 6, IMAGE_TOKEN_INDEX, 7, 3, 4]])
    labels = torch.tensor([[IGNORE_INDEX] * 4 + [8, 9], [IGNORE_INDEX] * 4 + [3, 4]])
    pixels = torch.randn(2, 3, 32, 32)
    features = model.encode_image(pixels)
    embeds, new_labels = model.merge_inputs(ids, features, labels)
    n = features.shape[1]
    assert embeds.shape == (2, 6 - 1 + n, 64)
    torch.testing.assert_close(embeds[0, 2 : 2 + n], features[0])
    torch.testing.assert_close(embeds[1, 2 + n], model.embed(torch.tensor(7)))
    assert (new_labels[:, 2 : 2 + n] == IGNORE_INDEX).all() and new_labels[0, -1] == 9
    loss = model(ids, pixels, labels)
    loss.backward()
    for name in ("vision.embeddings.patch_embedding.weight", "projector.peg.weight", "text.layers.0.mlp.up_proj.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_rows_without_exactly_one_image_placeholder_are_refused():
    model = MobileVLM(micro_config())
    ids = torch.tensor([[1, IMAGE_TOKEN_INDEX, IMAGE_TOKEN_INDEX, 4]])
    with pytest.raises(ValueError, match="2 image placeholders"):
        model.merge_inputs(ids, torch.zeros(1, 4, 64))


def test_vision_select_layer_runs_only_the_needed_layers():
    model = MobileVLM(micro_config()).eval()
    pixels = torch.randn(1, 3, 32, 32)
    states = model.vision.hidden_states(pixels)
    assert len(states) == 4  # embeddings + 3 layers
    torch.testing.assert_close(model.vision(pixels), states[-2][:, 1:])  # select_layer -2, patch


def test_flip_masking_keeps_class_token_and_changes_output():
    torch.manual_seed(0)
    model = MobileVLM(micro_config())
    pixels = torch.randn(2, 3, 32, 32)
    full = model.vision.pooled(pixels)
    masked = model.vision.pooled(pixels, mask_ratio=0.5, generator=torch.Generator().manual_seed(0))
    assert full.shape == masked.shape == (2, 32)
    assert not torch.allclose(full, masked)


def test_make_divisible_matches_mobilenet():
    assert _make_divisible(2048 // 4, 8) == 512
    assert _make_divisible(2560 // 4, 8) == 640
    assert _make_divisible(16 // 4, 8) == 8


@pytest.mark.parametrize(
    "name,params,layers,width",
    [("mobilevlm-1.7b", 1.68e9, 24, 2048), ("mobilevlm-v2-1.7b", 1.67e9, 24, 2048), ("mobilevlm-3b", 3.03e9, 32, 2560), ("mobilevlm-v2-3b", 3.02e9, 32, 2560)],
)
def test_published_presets(name, params, layers, width):
    """The published shapes, checked without allocating them (parameter count from shapes)."""
    from mobilevlm.config import estimate_parameters

    config = get_preset(name)
    assert config.text.num_layers == layers and config.text.hidden_size == width
    assert config.num_image_tokens == 144 and config.vision.num_patches == 576
    assert abs(estimate_parameters(config) - params) / params < 0.02
    assert config.prompt_template == "vicuna_v1" and not config.text.tie_word_embeddings


def test_tiny_preset_has_few_million_parameters():
    model = MobileVLM(get_preset("tiny"))
    assert 1e6 < model.num_parameters() < 2e7
