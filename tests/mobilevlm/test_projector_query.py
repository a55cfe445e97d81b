"""Query-based projectors (Q-Former, Perceiver resampler): shapes for any N, no position information,
gradients everywhere, a plain reference of one resampler layer, and whole MobileVLMs built on them
that train, decode with the KV cache, and export to ExecuTorch with parity."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from mobilevlm import MobileVLM, save_pretrained
from mobilevlm.config import ProjectorConfig
from mobilevlm.model import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from mobilevlm.projector_query import PerceiverResampler, QFormerProjector, build_query_projector

from ..conftest import micro_config

KINDS = ("qformer", "resampler")


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def query_config(kind: str):
    return dataclasses.replace(micro_config(), projector=ProjectorConfig(kind, num_queries=8, depth=2, num_heads=4)).validate()


@pytest.mark.parametrize("kind", KINDS)
def test_output_shape_for_any_number_of_features(kind):
    config = query_config(kind)
    projector = build_query_projector(config).eval()
    assert isinstance(projector, {"qformer": QFormerProjector, "resampler": PerceiverResampler}[kind])
    for n in (16, 37):  # the micro encoder's 4x4 grid, and a count no grid gives: the same weights serve both
        out = projector(torch.randn(3, n, config.vision.hidden_size))
        assert out.shape == (3, 8, config.text.hidden_size) == (3, config.num_image_tokens, config.text.hidden_size)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("kind", KINDS)
def test_permuting_the_features_leaves_the_output_unchanged(kind):
    torch.manual_seed(0)
    projector = build_query_projector(query_config(kind)).eval()
    features = torch.randn(2, 16, 32)
    permuted = features[:, torch.randperm(16)]
    torch.testing.assert_close(projector(permuted), projector(features), atol=1e-5, rtol=1e-5)
    # ...while the content does matter
    assert not torch.allclose(projector(features), projector(features.flip(0)), atol=1e-3)


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_every_parameter(kind):
    torch.manual_seed(0)
    projector = build_query_projector(query_config(kind))
    out = projector(torch.randn(2, 16, 32))
    # a random projection of the output: a plain sum would give LayerNorm's input almost no gradient
    (out * torch.randn_like(out)).sum().backward()
    for name, p in projector.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def _layer_norm(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def _reference_resampler_layer(layer, latents: torch.Tensor, image: torch.Tensor, heads: int) -> torch.Tensor:
    """Flamingo's resampler layer written out: latents attend to [image; latents], then a bias-free MLP."""
    b, q, d = latents.shape
    c = d // heads
    h = _layer_norm(latents, layer.latent_norm)
    kv = torch.cat([_layer_norm(image, layer.media_norm), h], dim=1)
    attn = layer.attn
    queries = torch.einsum("bqd,ed->bqe", h, attn.q_proj.weight).reshape(b, q, heads, c)
    keys = torch.einsum("bmd,ed->bme", kv, attn.k_proj.weight).reshape(b, -1, heads, c)
    values = torch.einsum("bmd,ed->bme", kv, attn.v_proj.weight).reshape(b, -1, heads, c)
    weights = (torch.einsum("bqhc,bmhc->bhqm", queries, keys) / math.sqrt(c)).softmax(-1)
    mixed = torch.einsum("bhqm,bmhc->bqhc", weights, values).reshape(b, q, d)
    latents = latents + torch.einsum("bqd,ed->bqe", mixed, attn.o_proj.weight)
    up, down = layer.mlp[0].weight, layer.mlp[2].weight
    hidden = F.gelu(torch.einsum("bqd,ed->bqe", _layer_norm(latents, layer.mlp_norm), up))
    return latents + torch.einsum("bqe,de->bqd", hidden, down)


def test_resampler_layer_matches_a_plain_reference():
    torch.manual_seed(0)
    projector = build_query_projector(query_config("resampler"))
    for p in projector.parameters():  # move norms off their identity init so they are checked too
        p.data.add_(0.1 * torch.randn_like(p))
    layer = projector.layers[0]
    latents, image = torch.randn(2, 8, 64), torch.randn(2, 13, 64)
    torch.testing.assert_close(layer(latents, image), _reference_resampler_layer(layer, latents, image, 4), atol=1e-5, rtol=1e-5)
    assert all(m.bias is None for m in layer.modules() if isinstance(m, torch.nn.Linear))


def _image_batch(seed: int = 0):
    """Two rows, same prompt, different images and different answers: only the image tells them apart."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(2, 3, 32, 32, generator=g)
    prompt = [1, 40, 41, IMAGE_TOKEN_INDEX, 42, 43, 44]
    ids = torch.tensor([prompt + [100, 101, 2], prompt + [200, 201, 2]])
    labels = ids.clone()
    labels[:, : len(prompt)] = IGNORE_INDEX
    return ids, pixels, labels


@pytest.mark.parametrize("kind", KINDS)
def test_model_with_query_projector_trains(kind):
    config = query_config(kind)
    assert config.num_image_tokens == 8
    torch.manual_seed(0)
    model = MobileVLM(config)
    ids, pixels, labels = _image_batch()
    assert model.encode_image(pixels).shape == (2, 8, 64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    queries = next(p for n, p in model.projector.named_parameters() if n in ("queries", "latents"))
    start = queries.detach().clone()
    losses = []
    for _ in range(12):
        loss = model(ids, pixels, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert not torch.equal(queries, start)  # the learned queries themselves moved


@pytest.mark.parametrize("kind", KINDS)
def test_kv_cached_decoding_equals_full_forward(kind):
    torch.manual_seed(0)
    model = MobileVLM(query_config(kind)).eval()
    ids, pixels, _ = _image_batch(1)
    with torch.no_grad():
        embeds, _ = model.merge_inputs(ids[:1], model.encode_image(pixels[:1]))
        assert embeds.shape == (1, ids.shape[1] - 1 + 8, 64)
        full = model.text(embeds)
        model.setup_cache(1)
        prefill = 3 + 8  # the text before the image and the image tokens, as the runners prefill them
        chunks = [model.decode(embeds[:, :prefill], torch.arange(prefill))]
        chunks += [model.decode(embeds[:, i : i + 1], torch.tensor([i])) for i in range(prefill, embeds.shape[1])]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.slow  # an ExecuTorch export (~40 s); .ci/run runs the slow family suites
def test_qformer_model_exports_to_executorch_with_parity(tmp_path, tokenizer_path):
    from mobilevlm.export import pipeline
    from mobilevlm.export.bundle import load_bundle

    torch.manual_seed(0)
    model = MobileVLM(query_config("qformer"))
    model_dir = save_pretrained(model, tmp_path / "qformer", tokenizer=tokenizer_path)
    out = tmp_path / "bundle"
    pipeline.export_bundle(out, "executorch", ("fp32",), model_dir, num_parity_cases=2, eval_scenes=0, log=lambda s: None)
    parity = load_bundle(out).artifact("executorch-fp32")["parity"]
    assert parity["answers_identical"] == parity["num_cases"] == 2, parity
    assert parity["first_logit_max_abs_error"] < 1e-4, parity
