"""Checkpoints: our format round trip, imports of published MobileVLM / LLaVA folders checked against
`transformers` as the numerical oracle, and bad checkpoints."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from mobilevlm import MobileVLM, load_model, save_pretrained
from mobilevlm.checkpoint import load_config
from mobilevlm.errors import CheckpointError, ConfigError
from mobilevlm.generate import SamplingConfig, iter_tokens

from ..conftest import micro_config

transformers = pytest.importorskip("transformers", reason="transformers is the numerical oracle (the `test` extra)")


# --- the published projectors, written from their published definitions ---------------------------
# (MobileVLM's mobilevlm/model/vision_projector.py with torchvision's InvertedResidual and timm's
# LayerNormAct2d; module nesting reproduced so that state-dict keys are the published ones)


class LayerNorm2d(nn.LayerNorm):
    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps).permute(0, 3, 1, 2)


class SE(nn.Module):
    def __init__(self, c, s):
        super().__init__()
        self.avgpool, self.fc1, self.fc2 = nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, s, 1), nn.Conv2d(s, c, 1)

    def forward(self, x):
        return F.hardsigmoid(self.fc2(F.relu(self.fc1(self.avgpool(x))))) * x


class TorchvisionInvertedResidual(nn.Module):
    def __init__(self, c, stride):
        super().__init__()
        squeeze = max(8, int(c // 4 + 4) // 8 * 8)
        self.use_res = stride == 1
        self.block = nn.Sequential(
            nn.Sequential(nn.Conv2d(c, c, 3, stride, 1, groups=c, bias=False), LayerNorm2d(c, eps=1e-5), nn.Hardswish()),
            SE(c, squeeze),
            nn.Sequential(nn.Conv2d(c, c, 1, bias=False), LayerNorm2d(c, eps=1e-5)),
        )

    def forward(self, x):
        y = self.block(x)
        return x + y if self.use_res else y


class PublishedLDP(nn.Module):  # LDPNetProjector -> LDPBlock
    def __init__(self, inc, ouc):
        super().__init__()
        block = nn.Module()
        block.mlp = nn.Sequential(nn.Identity(), nn.Linear(inc, ouc), nn.GELU(), nn.Linear(ouc, ouc))
        block.mb_block = nn.Sequential(nn.Identity(), TorchvisionInvertedResidual(ouc, 1), TorchvisionInvertedResidual(ouc, 2))
        self.model = block

    def forward(self, x):
        b, n, c = x.shape
        h = int(math.sqrt(n))
        x = self.model.mlp(x).permute(0, 2, 1).reshape(b, -1, h, h)
        return self.model.mb_block(x).flatten(2).permute(0, 2, 1)


class PublishedLDPv2(nn.Module):  # LDPNetV2Projector
    def __init__(self, inc, ouc):
        super().__init__()
        self.mlp = nn.Module()
        self.mlp.mlp = nn.Sequential(nn.Linear(inc, ouc), nn.GELU(), nn.Linear(ouc, ouc))
        self.dwn = nn.AdaptiveAvgPool2d((12, 12))
        self.peg = nn.Module()
        self.peg.peg = nn.Sequential(nn.Conv2d(ouc, ouc, 3, 1, 1, bias=True, groups=ouc))

    def forward(self, x):
        x = self.mlp.mlp(x)
        b, n, c = x.shape
        h = int(math.sqrt(n))
        x = self.dwn(x.permute(0, 2, 1).reshape(b, -1, h, h)).flatten(2).transpose(1, 2)
        b, n, c = x.shape
        h = int(math.sqrt(n))
        feat = x.transpose(1, 2).view(b, c, h, h)
        return (self.peg.peg(feat) + feat).flatten(2).transpose(1, 2)


def published_mlp(inc, ouc):
    return nn.Sequential(nn.Linear(inc, ouc), nn.GELU(), nn.Linear(ouc, ouc))


PUBLISHED = {"ldpnet": PublishedLDP, "ldpnetv2": PublishedLDPv2, "mlp2x_gelu": published_mlp}


def _randomize(module: nn.Module, seed: int) -> nn.Module:
    """Random weights everywhere (incl. norms and biases) so that a swapped tensor cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module


def tiny_llama(kv_heads: int, vocab: int = 128):
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, max_position_embeddings=1024, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_theta=10000.0 if kv_heads == 4 else 500000.0,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    torch.manual_seed(kv_heads)
    return transformers.LlamaForCausalLM(config).eval()


def tiny_clip():
    # image 48 / patch 2 = 24x24 patches: the published grid, so LDP / LDPv2 give 12x12 = 144 tokens
    config = transformers.CLIPVisionConfig(
        hidden_size=128, intermediate_size=96, num_hidden_layers=3, num_attention_heads=2, image_size=48, patch_size=2,
        hidden_act="quick_gelu", layer_norm_eps=1e-5,
    )
    torch.manual_seed(7)
    return _randomize(transformers.CLIPVisionModel(config), 7).eval()


def write_published_folder(path, llama, clip, projector_type: str, embed_vision: bool = True, select_feature="patch"):
    """A folder in MobileVLM's / LLaVA's published layout; returns the reference projector."""
    projector = _randomize(PUBLISHED[projector_type](128, 64), 3).eval()
    llama.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    config.update(
        model_type="mobilevlm", mm_projector_type=projector_type, mm_hidden_size=128, mm_vision_select_layer=-2,
        mm_vision_select_feature=select_feature, mm_vision_tower="clip-folder", vision_tower_type="clip", image_aspect_ratio="pad",
        n_head=99,  # leftover field from another framework, as in the 3B configs: must be ignored
    )
    (path / "config.json").write_text(json.dumps(config))
    extra = {f"model.mm_projector.{k}": v.contiguous() for k, v in projector.state_dict().items()}
    if embed_vision:
        # published checkpoints were saved with transformers 4, whose CLIPVisionModel nests `vision_model`
        extra.update({f"model.vision_tower.vision_tower.vision_model.{k}": v.contiguous() for k, v in clip.state_dict().items()})
    save_file(extra, str(path / "model-extra.safetensors"))
    index = path / "model.safetensors.index.json"
    if index.exists():  # sharded save: register the extra shard
        data = json.loads(index.read_text())
        data["weight_map"].update({k: "model-extra.safetensors" for k in extra})
        index.write_text(json.dumps(data))
    if not embed_vision:
        clip.save_pretrained(path / "clip-folder")
    return projector


def reference_image_features(clip, projector, pixels, select_feature="patch"):
    hidden = clip(pixels, output_hidden_states=True).hidden_states[-2]
    return projector(hidden[:, 1:] if select_feature == "patch" else hidden)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_decoder_logits_match_transformers_llama(tmp_path, kv_heads):
    llama, clip = tiny_llama(kv_heads), tiny_clip()
    write_published_folder(tmp_path, llama, clip, "mlp2x_gelu")
    model = load_model(tmp_path)
    assert model.config.text.num_kv_heads == kv_heads and model.config.text.num_heads == 4
    assert model.config.text.rope_theta == (10000.0 if kv_heads == 4 else 500000.0)
    ids = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(0))
    expected = llama(ids).logits
    torch.testing.assert_close(model.text(model.embed(ids)), expected, atol=1e-4, rtol=0)
    model.setup_cache(2)
    cached = torch.cat([model.decode(model.embed(ids[:, :9]), torch.arange(9)), model.decode(model.embed(ids[:, 9:]), torch.arange(9, 17))], 1)
    torch.testing.assert_close(cached, expected, atol=1e-4, rtol=0)


def test_clip_hidden_states_match_transformers(tmp_path):
    llama, clip = tiny_llama(4), tiny_clip()
    write_published_folder(tmp_path, llama, clip, "mlp2x_gelu")
    model = load_model(tmp_path)
    pixels = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    expected = clip(pixels, output_hidden_states=True).hidden_states
    ours = model.vision.hidden_states(pixels)
    assert len(ours) == len(expected) == 4
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


@pytest.mark.parametrize("projector_type", ["ldpnet", "ldpnetv2", "mlp2x_gelu"])
@pytest.mark.parametrize("embed_vision", [True, False], ids=["v2-embedded-clip", "v1-separate-clip"])
def test_published_layout_gives_same_features_and_greedy_tokens(tmp_path, projector_type, embed_vision):
    llama, clip = tiny_llama(4), tiny_clip()
    projector = write_published_folder(tmp_path, llama, clip, projector_type, embed_vision=embed_vision)
    model = load_model(tmp_path)
    expected_type = {"ldpnet": "ldp", "ldpnetv2": "ldpv2", "mlp2x_gelu": "mlp2x_gelu"}[projector_type]
    assert model.config.projector.type == expected_type
    pixels = torch.randn(1, 3, 48, 48, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = reference_image_features(clip, projector, pixels)
        torch.testing.assert_close(model.encode_image(pixels), reference, atol=1e-4, rtol=0)

        # greedy tokens: the reference pipeline (transformers + published projector, full forward each step)
        before, after = torch.tensor([[1, 5, 6]]), torch.tensor([[7, 8]])
        embed = llama.get_input_embeddings()
        embeds = torch.cat([embed(before), reference, embed(after)], 1)
        expected = []
        for _ in range(8):
            token = int(llama(inputs_embeds=embeds).logits[0, -1].argmax())
            expected.append(token)
            embeds = torch.cat([embeds, embed(torch.tensor([[token]]))], 1)
    ours_embeds = torch.cat([model.embed(before), model.encode_image(pixels), model.embed(after)], 1)
    ours = list(iter_tokens(model, ours_embeds, SamplingConfig(max_new_tokens=8), eos_ids=set()))
    assert ours == expected


def test_separate_clip_folder_given_explicitly(tmp_path):
    llama, clip = tiny_llama(4), tiny_clip()
    write_published_folder(tmp_path / "vlm", llama, clip, "ldpnetv2", embed_vision=False)
    (tmp_path / "vlm" / "clip-folder").rename(tmp_path / "elsewhere")
    with pytest.raises(CheckpointError, match="vision tower"):
        load_model(tmp_path / "vlm")
    model = load_model(tmp_path / "vlm", vision_tower=tmp_path / "elsewhere")
    assert model.config.vision.num_layers == 3


def test_unknown_projector_type_is_a_clear_error(tmp_path):
    write_published_folder(tmp_path, tiny_llama(4), tiny_clip(), "mlp2x_gelu")
    config = json.loads((tmp_path / "config.json").read_text())
    config["mm_projector_type"] = "qformer"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="unknown mm_projector_type 'qformer'"):
        load_model(tmp_path)


# --- our format -----------------------------------------------------------------------------------


def test_round_trip(tmp_path, tokenizer_path):
    torch.manual_seed(0)
    model = MobileVLM(micro_config()).eval()
    save_pretrained(model, tmp_path / "m", tokenizer=tokenizer_path)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    loaded = load_model(tmp_path / "m")
    assert loaded.config == model.config
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k


def test_tied_round_trip(tmp_path):
    model = MobileVLM(micro_config(tie_word_embeddings=True))
    save_pretrained(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert torch.equal(loaded.text.lm_head.weight, model.text.embed_tokens.weight)


def test_save_refuses_existing_folder_unless_overwrite(tmp_path):
    from mobilevlm.fileio import OutputError

    model = MobileVLM(micro_config())
    save_pretrained(model, tmp_path / "m")
    with pytest.raises(OutputError, match="already exists"):
        save_pretrained(model, tmp_path / "m")
    save_pretrained(model, tmp_path / "m", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary siblings left


def _saved(tmp_path):
    return save_pretrained(MobileVLM(micro_config()), tmp_path / "m")


def test_missing_config_field(tmp_path):
    folder = _saved(tmp_path)
    data = json.loads((folder / "config.json").read_text())
    del data["model"]["text"]["num_kv_heads"]
    (folder / "config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"config.json: model: text: missing field 'num_kv_heads'"):
        load_model(folder)


def test_wrong_type_and_absurd_size_are_refused_before_allocation(tmp_path):
    folder = _saved(tmp_path)
    data = json.loads((folder / "config.json").read_text())
    data["model"]["text"]["hidden_size"] = "64"
    (folder / "config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"text.hidden_size: expected an integer, got '64'"):
        load_config(folder)
    data["model"]["text"].update(hidden_size=1_048_576, num_heads=1024, num_kv_heads=1024, intermediate_size=4_194_304)
    (folder / "config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="parameters, more than"):
        load_model(folder)


def test_truncated_safetensors(tmp_path):
    folder = _saved(tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt or truncated"):
        load_model(folder)


def test_missing_and_extra_tensors_are_listed(tmp_path):
    from safetensors.torch import load_file

    folder = _saved(tmp_path)
    state = load_file(folder / "model.safetensors")
    del state["text.layers.1.mlp.up_proj.weight"]
    state["text.layers.9.extra"] = torch.zeros(2)
    state["text.norm.weight"] = torch.zeros(3)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError) as info:
        load_model(folder)
    message = str(info.value)
    assert "missing: text.layers.1.mlp.up_proj.weight" in message
    assert "unexpected: text.layers.9.extra" in message
    assert "text.norm.weight: file (3,) vs model (64,)" in message


def test_nan_weights_are_refused(tmp_path):
    from safetensors.torch import load_file

    folder = _saved(tmp_path)
    state = load_file(folder / "model.safetensors")
    state["text.norm.weight"][3] = float("nan")
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="'text.norm.weight' contains NaN"):
        load_model(folder)


def test_pickle_weights_need_opt_in_and_load_weights_only(tmp_path):
    folder = _saved(tmp_path)
    from safetensors.torch import load_file

    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="refused unless you opt in"):
        load_model(folder)
    assert load_model(folder, allow_pickle=True).config.text.hidden_size == 64

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights-only"):
        load_model(folder, allow_pickle=True)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        load_model(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ConfigError, match="neither a mobilevlm checkpoint"):
        load_model(tmp_path)


def test_written_folders_get_normal_permissions(tmp_path):
    """Folders are built in a private temporary directory; the result must not stay private."""
    import os
    import stat

    folder = save_pretrained(MobileVLM(micro_config()), tmp_path / "m")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask
