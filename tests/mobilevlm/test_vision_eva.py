"""EVA-02-style vision encoder: shapes and layer selection, gradients, the 2-D rotary embedding's
relative-position property, FLIP masking, import of the published EVA-CLIP layout against a reference
written here from the published formulas, bad layouts, training inside MobileVLM, ExecuTorch export."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from mobilevlm import MobileVLM, save_pretrained
from mobilevlm.checkpoint import load_model
from mobilevlm.config import VisionConfig
from mobilevlm.errors import CheckpointError, ConfigError
from mobilevlm.model import IMAGE_TOKEN_INDEX
from mobilevlm.vision import build_encoder
from mobilevlm.vision.eva import EVAVisionEncoder, apply_rotary, eva_clip_state_dict

from ..conftest import micro_config

torch.set_num_threads(1)

MICRO = VisionConfig(type="eva_vit", image_size=32, patch_size=8, hidden_size=32, num_layers=3, num_heads=2,
                     intermediate_size=64, layer_norm_eps=1e-6, select_layer=-1, select_feature="cls_patch")


def encoder(**changes) -> EVAVisionEncoder:
    torch.manual_seed(0)
    return build_encoder(dataclasses.replace(MICRO, **changes)).eval()


@pytest.mark.parametrize("feature,tokens", [("patch", 16), ("cls_patch", 17)])
def test_output_shapes(feature, tokens):
    model = encoder(select_feature=feature, select_layer=-2)
    assert isinstance(model, EVAVisionEncoder)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, tokens, 32) == (2, model.config.num_output_tokens, model.config.hidden_size)
    assert model.pooled(torch.randn(2, 3, 32, 32)).shape == (2, 32)


def test_select_layer_runs_only_the_needed_layers():
    model, x = encoder(select_layer=1), torch.randn(1, 3, 32, 32)
    states = model.hidden_states(x)
    assert len(states) == 4
    before = model(x)
    torch.testing.assert_close(before, states[1], rtol=0, atol=0)
    with torch.no_grad():  # layers after the selected one never run
        for layer in model.layers[1:]:
            layer.mlp.w3.weight.mul_(5.0)
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    torch.testing.assert_close(encoder(select_layer=-2)(x), states[2], rtol=0, atol=0)


def test_head_size_must_allow_two_rotary_axes():
    with pytest.raises(ConfigError, match="multiple of 4"):
        EVAVisionEncoder(dataclasses.replace(MICRO, hidden_size=12, num_heads=2))


def test_gradients_reach_every_parameter():
    model = encoder().train()
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(1)
    # random projections: a plain sum of a LayerNorm output has zero gradient
    loss = (model(x) * torch.randn(2, 17, 32)).sum() + (model.pooled(x) * torch.randn(2, 32)).sum()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert set(model.state_dict()) == {n for n, _ in model.named_parameters()}  # rotary tables are not saved


def test_rotary_depends_only_on_relative_position():
    model = encoder(image_size=64)  # 8 x 8 grid, head size 16
    cos, sin = model.rope_cos, model.rope_sin
    g = model.config.grid_size
    at = lambda r, c: 1 + r * g + c  # noqa: E731  (row 0 is the class token)
    torch.manual_seed(3)
    q, k = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    cos, sin = cos.double(), sin.double()

    def score(a, b):
        return float(apply_rotary(q, cos[a], sin[a]) @ apply_rotary(k, cos[b], sin[b]))

    for (r1, c1), (r2, c2) in [((0, 0), (2, 3)), ((1, 5), (4, 1)), ((3, 3), (3, 3))]:
        base = score(at(r1, c1), at(r2, c2))
        for dr, dc in [(1, 0), (0, 2), (2, 1), (3, 2)]:
            assert score(at(r1 + dr, c1 + dc), at(r2 + dr, c2 + dc)) == pytest.approx(base, abs=1e-5)  # float32 tables
    assert abs(score(at(0, 0), at(2, 3)) - score(at(0, 0), at(3, 2))) > 1e-3  # offsets are told apart
    # half the head turns with the row, half with the column; the class token is not rotated
    torch.testing.assert_close(apply_rotary(q, cos[at(2, 0)], sin[at(2, 0)])[8:], q[8:])
    torch.testing.assert_close(apply_rotary(q, cos[at(0, 5)], sin[at(0, 5)])[:8], q[:8])
    torch.testing.assert_close(apply_rotary(q, cos[0], sin[0]), q)
    assert torch.linalg.vector_norm(apply_rotary(q, cos[at(4, 6)], sin[at(4, 6)])) == pytest.approx(float(torch.linalg.vector_norm(q)))


def test_pooled_with_mask_ratio():
    model, x = encoder(), torch.randn(2, 3, 32, 32)
    full = model.pooled(x)
    torch.testing.assert_close(full, model.post_norm(model.hidden_states(x)[-1][:, 0]))
    masked = model.pooled(x, mask_ratio=0.5, generator=torch.Generator().manual_seed(0))
    assert masked.shape == (2, 32) and not torch.allclose(masked, full, atol=1e-4)
    again = model.pooled(x, mask_ratio=0.5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(masked, again, rtol=0, atol=0)
    # a ratio that keeps all 16 patches only shuffles them: positions and rotary angles travel with
    # the tokens, so the class token's output is unchanged
    shuffled = model.pooled(x, mask_ratio=0.01, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(shuffled, full, rtol=1e-5, atol=1e-5)


# --- the published EVA-CLIP layout --------------------------------------------------------------


def published_rope_tables(head_dim: int, grid: int, reference_grid: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """EVA-02's `VisionRotaryEmbeddingFast(dim=head_dim // 2, pt_seq_len=16, ft_seq_len=grid)` buffers,
    entry by entry: channel 2j and 2j+1 of the first half carry row * f_j, of the second half col * f_j,
    with f_j = theta ** (-2j / (head_dim / 2)) and positions rescaled to the reference grid."""
    half = head_dim // 2
    angles = torch.zeros(grid * grid, head_dim, dtype=torch.float64)
    for r in range(grid):
        for c in range(grid):
            for j in range(half // 2):
                f = 10000.0 ** (-2 * j / half)
                for pair in (2 * j, 2 * j + 1):
                    angles[r * grid + c, pair] = r * reference_grid / grid * f
                    angles[r * grid + c, half + pair] = c * reference_grid / grid * f
    return angles.cos().float(), angles.sin().float()


def published_state(config: VisionConfig, clip_dim: int = 24) -> dict[str, torch.Tensor]:
    """A whole EVA-02-CLIP checkpoint's vision tower with the published names and shapes (random
    values), its rotary buffers, the CLIP head, and a few text-tower tensors that must be ignored."""
    g = torch.Generator().manual_seed(7)
    d, f, n = config.hidden_size, config.intermediate_size, config.num_patches
    rnd = lambda *shape, scale=0.08: torch.randn(*shape, generator=g) * scale  # noqa: E731
    ln = lambda width: {"weight": 1 + rnd(width, scale=0.1), "bias": rnd(width, scale=0.05)}  # noqa: E731
    cos, sin = published_rope_tables(d // config.num_heads, config.grid_size)
    s = {"patch_embed.proj.weight": rnd(d, 3, config.patch_size, config.patch_size), "patch_embed.proj.bias": rnd(d),
         "cls_token": rnd(1, 1, d, scale=0.5), "pos_embed": rnd(1, n + 1, d, scale=0.5), "rope.freqs_cos": cos, "rope.freqs_sin": sin,
         "head.weight": rnd(clip_dim, d), "head.bias": rnd(clip_dim)}
    s.update({f"norm.{k}": v for k, v in ln(d).items()})
    for i in range(config.num_layers):
        b = f"blocks.{i}."
        s.update({b + "attn.q_proj.weight": rnd(d, d, scale=0.3), b + "attn.k_proj.weight": rnd(d, d, scale=0.3),
                  b + "attn.v_proj.weight": rnd(d, d), b + "attn.q_bias": rnd(d), b + "attn.v_bias": rnd(d),
                  b + "attn.proj.weight": rnd(d, d), b + "attn.proj.bias": rnd(d),
                  b + "attn.rope.freqs_cos": cos, b + "attn.rope.freqs_sin": sin})
        for name, out_dim, in_dim in (("w1", f, d), ("w2", f, d), ("w3", d, f)):
            s.update({b + f"mlp.{name}.weight": rnd(out_dim, in_dim), b + f"mlp.{name}.bias": rnd(out_dim)})
        for name, width in (("norm1", d), ("norm2", d), ("attn.inner_attn_ln", d), ("mlp.ffn_ln", f)):
            s.update({b + f"{name}.{k}": v for k, v in ln(width).items()})
    state = {"visual." + k: v for k, v in s.items()}
    state.update({"text.token_embedding.weight": rnd(50, 16), "logit_scale": torch.tensor(4.6)})
    return state


def published_forward(state: dict[str, torch.Tensor], config: VisionConfig, pixels: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """EVA-02-CLIP's vision tower from its published formulas, in float64: every block's output, and
    the pooled output (final norm, class token, before the head). Rotary as complex multiplication of
    channel pairs (x_2j + i x_2j+1) by e^(i angle), on patch tokens only."""
    p = lambda key: state["visual." + key].double()  # noqa: E731
    eps, heads, d = config.layer_norm_eps, config.num_heads, config.hidden_size
    hd = d // heads
    ln = lambda x, name: F.layer_norm(x, x.shape[-1:], p(name + ".weight"), p(name + ".bias"), eps)  # noqa: E731
    cos, sin = (t.double() for t in published_rope_tables(hd, config.grid_size))
    turn = torch.complex(cos[:, 0::2], sin[:, 0::2])  # pairs share one angle

    def rope(t):  # t [B, H, N_patches, hd]
        pairs = torch.view_as_complex(t.reshape(*t.shape[:-1], hd // 2, 2).contiguous())
        return torch.view_as_real(pairs * turn).reshape(t.shape)

    x = F.conv2d(pixels.double(), p("patch_embed.proj.weight"), p("patch_embed.proj.bias"), stride=config.patch_size)
    x = x.flatten(2).transpose(1, 2)
    b, n = x.shape[0], x.shape[1] + 1
    x = torch.cat([p("cls_token").expand(b, -1, -1), x], dim=1) + p("pos_embed")
    outputs = []
    for i in range(config.num_layers):
        blk = f"blocks.{i}."
        h = ln(x, blk + "norm1")
        q = F.linear(h, p(blk + "attn.q_proj.weight"), p(blk + "attn.q_bias")).reshape(b, n, heads, hd).permute(0, 2, 1, 3)
        k = F.linear(h, p(blk + "attn.k_proj.weight")).reshape(b, n, heads, hd).permute(0, 2, 1, 3)
        v = F.linear(h, p(blk + "attn.v_proj.weight"), p(blk + "attn.v_bias")).reshape(b, n, heads, hd).permute(0, 2, 1, 3)
        q = torch.cat([q[:, :, :1], rope(q[:, :, 1:])], dim=2)
        k = torch.cat([k[:, :, :1], rope(k[:, :, 1:])], dim=2)
        attn = ((q * hd**-0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        y = (attn @ v).transpose(1, 2).reshape(b, n, d)
        x = x + F.linear(ln(y, blk + "attn.inner_attn_ln"), p(blk + "attn.proj.weight"), p(blk + "attn.proj.bias"))
        h = ln(x, blk + "norm2")
        hidden = F.silu(F.linear(h, p(blk + "mlp.w1.weight"), p(blk + "mlp.w1.bias"))) * F.linear(h, p(blk + "mlp.w2.weight"), p(blk + "mlp.w2.bias"))
        x = x + F.linear(ln(hidden, blk + "mlp.ffn_ln"), p(blk + "mlp.w3.weight"), p(blk + "mlp.w3.bias"))
        outputs.append(x)
    return outputs, ln(x, "norm")[:, 0]


@pytest.mark.parametrize("image_size", [32, 56])  # grids of 4 and 7: positions rescaled onto EVA-02's 16
def test_published_layout_imports_to_the_published_function(image_size):
    config = dataclasses.replace(MICRO, image_size=image_size)
    state = published_state(config)
    weights = eva_clip_state_dict(state, config)
    model = EVAVisionEncoder(config).eval()
    model.load_state_dict(weights, strict=True)
    pixels = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))
    outputs, pooled = published_forward(state, config, pixels)
    with torch.no_grad():
        torch.testing.assert_close(model(pixels).double(), outputs[-1], rtol=0, atol=1e-5)
        torch.testing.assert_close(model.pooled(pixels).double(), pooled, rtol=0, atol=1e-5)
        second = EVAVisionEncoder(dataclasses.replace(config, select_layer=-2, select_feature="patch")).eval()
        second.load_state_dict(weights)
        torch.testing.assert_close(second(pixels).double(), outputs[-2][:, 1:], rtol=0, atol=1e-5)
    assert outputs[-1].abs().max() > 0.5  # the comparison is not between near-zero tensors


def test_published_layout_under_another_prefix():
    config = MICRO
    state = {k.replace("visual.", "vision_tower.", 1): v for k, v in published_state(config).items()}
    assert set(eva_clip_state_dict(state, config, prefix="vision_tower.")) == set(EVAVisionEncoder(config).state_dict())


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda s: s.pop("visual.blocks.2.attn.q_bias"), r"visual\.blocks\.2\.attn\.q_bias: missing"),
        (lambda s: s.pop("visual.norm.weight"), r"visual\.norm\.weight: missing"),
        (lambda s: s.update({"visual.blocks.3.norm1.weight": torch.ones(32)}), r"visual\.blocks\.3\.norm1\.weight: unexpected"),
        (lambda s: s.update({"visual.blocks.0.attn.k_bias": torch.ones(32)}), r"visual\.blocks\.0\.attn\.k_bias: unexpected"),
        (lambda s: s.update({"visual.fc_norm.weight": torch.ones(32)}), r"visual\.fc_norm\.weight: unexpected"),
        (lambda s: s.update({"visual.cls_token": torch.ones(32)}), r"visual\.cls_token: shape \(32,\), expected \(1, 1, 32\)"),
        (lambda s: s.update({"visual.pos_embed": torch.ones(1, 10, 32)}), r"visual\.pos_embed: shape \(1, 10, 32\), expected \(1, 17, 32\)"),
        (lambda s: s.update({"visual.blocks.1.mlp.w1.weight": torch.ones(48, 32)}), r"visual\.blocks\.1\.mlp\.w1\.weight: shape \(48, 32\)"),
        # rotary tables of another convention: EVA-02's positions without the rescaling to 16
        (lambda s: s.update({"visual.rope.freqs_cos": published_rope_tables(16, 4, reference_grid=4)[0]}), r"visual\.rope\.freqs_cos: rotary table differs"),
        (lambda s: s.update({"visual.blocks.0.attn.rope.freqs_sin": torch.zeros(9, 16)}), r"visual\.blocks\.0\.attn\.rope\.freqs_sin: shape \(9, 16\)"),
    ],
)
def test_bad_layout_names_the_key(change, match):
    state = published_state(MICRO)
    change(state)
    with pytest.raises(CheckpointError, match=match):
        eva_clip_state_dict(state, MICRO)


def test_wrong_prefix_reports_missing_keys():
    with pytest.raises(CheckpointError, match=r"model\.patch_embed\.proj\.weight: missing"):
        eva_clip_state_dict(published_state(MICRO), MICRO, prefix="model.")


# --- inside MobileVLM ----------------------------------------------------------------------------


def eva_vlm_config():
    config = micro_config()
    return dataclasses.replace(config, vision=dataclasses.replace(config.vision, type="eva_vit")).validate()


def test_mobilevlm_with_eva_trains():
    torch.manual_seed(0)
    model = MobileVLM(eva_vlm_config()).train()
    assert isinstance(model.vision, EVAVisionEncoder)
    ids = torch.randint(3, 384, (2, 12))
    ids[:, 0], ids[:, 3] = 1, IMAGE_TOKEN_INDEX
    pixels = torch.randn(2, 3, 32, 32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model(ids, pixels, labels=ids.clone())
        optimizer.zero_grad()
        loss.backward()
        assert model.vision.layers[0].attn.q_proj.weight.grad.abs().sum() > 0  # the image path learns too
        optimizer.step()
        losses.append(float(loss))
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 0.5, losses


@pytest.mark.slow  # an ExecuTorch export (~40 s); .ci/run runs the slow family suites
def test_executorch_export_matches_reference(tmp_path, tokenizer_path):
    from mobilevlm.export import pipeline
    from mobilevlm.export.bundle import load_bundle

    torch.manual_seed(0)
    model = MobileVLM(eva_vlm_config()).eval()
    folder = save_pretrained(model, tmp_path / "eva", tokenizer=tokenizer_path)
    loaded = load_model(folder)  # built on the meta device: the rotary tables must still be real
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(pixels), model.encode_image(pixels), rtol=0, atol=0)
    out = tmp_path / "bundle"
    pipeline.export_bundle(out, "executorch", ("fp32",), folder, num_parity_cases=2, eval_scenes=0, log=lambda s: None)
    parity = load_bundle(out).artifact("executorch-fp32")["parity"]
    assert parity["answers_identical"] == parity["num_cases"] == 2
    assert parity["first_logit_max_abs_error"] < 1e-4
