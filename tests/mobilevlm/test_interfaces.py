"""Feature-level modality interfaces: gated cross-attention (Flamingo) and the visual expert (CogVLM).

For each: shapes and placement, what it reduces to (gates at zero = the text-only decoder; experts
copied from the text weights = the token interface), gradients to every new weight, training, the KV
cache against the uncached forward, DPO's log-probabilities, the reference prompt flow, checkpoints,
and (slow) an ExecuTorch export whose runtime answers like the reference.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mobilevlm import MobileVLM, load_model, save_pretrained
from mobilevlm.interfaces import GatedCrossAttention, VisualExpert
from mobilevlm.model import IGNORE_INDEX, IMAGE_TOKEN_INDEX

from ..conftest import micro_config

torch.set_num_threads(1)
INTERFACES = ("cross_attention", "visual_expert")
NEW_WEIGHTS = ("cross_attn", "image_expert")


def interface_config(interface: str, every: int = 1, **text):
    return dataclasses.replace(micro_config(**text), interface=interface, cross_attention_every=every).validate()


def batch(seed: int = 1, rows: int = 2, length: int = 10, where: int = 3):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 384, (rows, length), generator=generator)
    ids[:, where] = IMAGE_TOKEN_INDEX
    labels = ids.clone()
    labels[:, : where + 1] = IGNORE_INDEX
    return ids, torch.randn(rows, 3, 32, 32, generator=generator), labels


def model_for(interface: str, seed: int = 0, **text) -> MobileVLM:
    """A micro model whose interface matters: cross-attention gates open, image experts re-drawn
    (they start as copies of the text weights)."""
    torch.manual_seed(seed)
    model = MobileVLM(interface_config(interface, **text)).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, GatedCrossAttention):
                module.attn_gate.fill_(1.0)
                module.mlp_gate.fill_(0.5)
            elif isinstance(module, VisualExpert):
                for linear in module.modules():
                    if isinstance(linear, nn.Linear):
                        nn.init.normal_(linear.weight, std=0.05)
    return model


# --- shapes and placement ---------------------------------------------------------------------


def test_cross_attention_blocks_and_a_sequence_without_image_tokens():
    config = interface_config("cross_attention", every=2, num_layers=4)
    model = MobileVLM(config).eval()
    assert [layer.cross_attn is not None for layer in model.text.layers] == [False, True, False, True]
    assert all(layer.image_expert is None for layer in model.text.layers)
    assert config.num_image_tokens == 0 and config.num_image_features == 4
    ids, pixels, labels = batch()
    features = model.encode_image(pixels)
    assert features.shape == (2, config.num_image_features, config.text.hidden_size)
    embeds, merged = model.merge_inputs(ids, features, labels)
    keep = ids != IMAGE_TOKEN_INDEX
    assert embeds.shape == (2, 9, 64)
    torch.testing.assert_close(embeds, model.embed(ids[keep].view(2, 9)))
    assert torch.equal(merged, labels[keep].view(2, 9))
    assert model(ids, pixels).shape == (2, 9, 384)
    for block in (m for m in model.modules() if isinstance(m, GatedCrossAttention)):
        assert block.attn_gate.item() == block.mlp_gate.item() == 0.0  # reset_parameters leaves them closed
        assert all(linear.bias is None for linear in (block.q_proj, block.k_proj, block.v_proj, block.o_proj))


def test_visual_expert_in_every_layer_and_its_mask():
    config = interface_config("visual_expert")
    model = MobileVLM(config).eval()
    assert all(isinstance(layer.image_expert, VisualExpert) and layer.cross_attn is None for layer in model.text.layers)
    names = {n for n, _ in model.named_parameters() if "image_expert" in n}
    assert "text.layers.0.image_expert.q_proj.weight" in names and "text.layers.1.image_expert.mlp.down_proj.weight" in names
    ids, pixels, labels = batch(where=3)
    ids[1, 3], ids[1, 5] = 7, IMAGE_TOKEN_INDEX  # the image at a different place in row 1
    assert model(ids, pixels).shape == (2, 9 + config.num_image_tokens, 384)
    mask = model.image_inputs(ids, model.encode_image(pixels))["image_mask"]
    n = config.num_image_tokens
    assert mask.shape == (2, 9 + n) and mask.sum(1).tolist() == [n, n]
    assert mask[0, 3 : 3 + n].all() and mask[1, 5 : 5 + n].all()


def test_image_inputs_belong_to_their_interface():
    embeds = torch.randn(1, 3, 64)
    with pytest.raises(ValueError, match="cross_attention interface only"):
        MobileVLM(micro_config()).text(embeds, image_features=torch.zeros(1, 4, 64))
    with pytest.raises(ValueError, match="visual_expert interface only"):
        MobileVLM(interface_config("cross_attention")).text(embeds, image_mask=torch.zeros(3))
    with pytest.raises(ValueError, match="does not fit"):
        MobileVLM(interface_config("visual_expert")).text(embeds, image_mask=torch.zeros(4))


# --- what each interface reduces to -----------------------------------------------------------


def test_closed_gates_give_exactly_the_text_only_decoder():
    torch.manual_seed(0)
    token = MobileVLM(micro_config()).eval()
    cross = MobileVLM(interface_config("cross_attention")).eval()
    missing, unexpected = cross.load_state_dict(token.state_dict(), strict=False)
    assert not unexpected and all(".cross_attn." in k for k in missing)
    embeds = torch.randn(2, 7, 64)
    features = torch.randn(2, 4, 64) * 10
    with torch.no_grad():
        assert torch.equal(cross.text(embeds, image_features=features), token.text(embeds))
        ids, pixels, _ = batch()
        text_only = token.text(token.embed(ids[ids != IMAGE_TOKEN_INDEX].view(2, 9)))
        assert torch.equal(cross(ids, pixels), text_only)


def test_zero_features_equal_no_image_because_values_have_no_bias():
    model = model_for("cross_attention")
    embeds = torch.randn(1, 6, 64)
    with torch.no_grad():
        no_image = model.text(embeds)
        assert torch.equal(model.text(embeds, image_features=torch.zeros(1, 4, 64)), no_image)
        assert not torch.equal(model.text(embeds, image_features=torch.randn(1, 4, 64)), no_image)
        # with a bias on the values, zero features would be an input like any other
        block = model.text.layers[0].cross_attn
        biased = nn.Linear(64, 64, bias=True)
        biased.weight.copy_(block.v_proj.weight)
        nn.init.normal_(biased.bias, std=0.5)
        block.v_proj = biased
        assert not torch.equal(model.text(embeds, image_features=torch.zeros(1, 4, 64)), model.text(embeds))


def test_experts_copied_from_the_text_weights_give_the_token_interface():
    torch.manual_seed(0)
    token = MobileVLM(micro_config()).eval()
    expert = MobileVLM(interface_config("visual_expert")).eval()
    layer = expert.text.layers[1]
    assert torch.equal(layer.image_expert.k_proj.weight, layer.self_attn.k_proj.weight)  # CogVLM's init at construction
    assert torch.equal(layer.image_expert.mlp.up_proj.weight, layer.mlp.up_proj.weight)
    missing, unexpected = expert.load_state_dict(token.state_dict(), strict=False)
    assert not unexpected and all(".image_expert." in k for k in missing)
    expert.text.copy_text_weights_to_image_experts()
    ids, pixels, labels = batch()
    with torch.no_grad():
        assert torch.equal(expert(ids, pixels), token(ids, pixels))
        # re-drawn experts change the answer with an image, never a text-only sequence
        for m in expert.modules():
            if isinstance(m, VisualExpert):
                for linear in m.modules():
                    if isinstance(linear, nn.Linear):
                        nn.init.normal_(linear.weight, std=0.05)
        assert not torch.allclose(expert(ids, pixels), token(ids, pixels))
        text = token.embed(ids.clamp(min=0))
        assert torch.equal(expert.text(text), token.text(text))
        assert torch.equal(expert.text(text, image_mask=torch.zeros(10)), token.text(text))


# --- training -----------------------------------------------------------------------------------


@pytest.mark.parametrize("interface", INTERFACES)
def test_gradients_reach_every_new_parameter(interface):
    model = model_for(interface).train()
    ids, pixels, labels = batch()
    model(ids, pixels, labels).backward()
    new = {n: p for n, p in model.named_parameters() if any(w in n for w in NEW_WEIGHTS)}
    assert len(new) == (2 * 11 if interface == "cross_attention" else 2 * 7)
    for name, p in new.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.projector.parameters())  # the image reaches the loss


@pytest.mark.parametrize("interface", INTERFACES)
def test_trains_with_falling_loss(interface):
    torch.manual_seed(0)
    model = MobileVLM(interface_config(interface)).train()
    ids, pixels, labels = batch(rows=4, length=12)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(10):
        loss = model(ids, pixels, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    if interface == "cross_attention":  # training opens the gates, from exactly 0
        assert all(m.attn_gate.item() != 0 for m in model.modules() if isinstance(m, GatedCrossAttention))


@pytest.mark.parametrize("interface", INTERFACES)
def test_sequence_logprobs_for_dpo(interface):
    from mobilevlm.train.losses import sequence_logprobs

    model = model_for(interface)
    ids, pixels, labels = batch()
    logprobs = sequence_logprobs(model, ids, pixels, labels)
    embeds, merged, image_input = model.prepare_inputs(ids, pixels, labels)
    logits = model(ids, pixels)
    assert logits.shape[1] == merged.shape[1] == embeds.shape[1]
    token_logp = -F.cross_entropy(logits[:, :-1].transpose(1, 2), merged[:, 1:], ignore_index=IGNORE_INDEX, reduction="none")
    torch.testing.assert_close(logprobs, token_logp.sum(1))
    logprobs.sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if any(w in n for w in NEW_WEIGHTS) and "gate" not in n)


# --- inference ----------------------------------------------------------------------------------


@pytest.mark.parametrize("interface", INTERFACES)
def test_kv_cached_decoding_equals_the_uncached_forward(interface):
    model = model_for(interface)
    embeds = torch.randn(1, 12, 64, generator=torch.Generator().manual_seed(3))
    if interface == "cross_attention":
        features = torch.randn(1, 4, 64)
        image = lambda a, b: {"image_features": features}  # noqa: E731  the same features on every call
    else:
        mask = torch.zeros(12)
        mask[2:6] = 1.0
        image = lambda a, b: {"image_mask": mask[a:b]}  # noqa: E731
    with torch.no_grad():
        full = model.text(embeds, **image(0, 12))
        model.setup_cache(1)
        chunks = [model.decode(embeds[:, :7], torch.arange(7), **image(0, 7))]
        chunks += [model.decode(embeds[:, t : t + 1], torch.tensor([t]), **image(t, t + 1)) for t in range(7, 12)]
    torch.testing.assert_close(torch.cat(chunks, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("interface", INTERFACES)
def test_reference_prompt_flow(interface, tokenizer_path, image_path):
    from mobilevlm import generate_ids
    from mobilevlm.generate import prompt_inputs
    from mobilevlm.processing import Processor, Tokenizer

    model = model_for(interface)
    processor = Processor.from_config(model.config, Tokenizer(tokenizer_path))
    before, after = processor.prompt_ids("What is in the image?")
    n = model.config.num_image_features
    with torch.no_grad():
        prompt = prompt_inputs(model, processor, image_path, "What is in the image?")
        if interface == "cross_attention":  # text before + after as one sequence, the features beside it
            assert prompt.embeds.shape[1] == len(before) + len(after) and prompt.image_mask is None
            assert prompt.image_features.shape == (1, n, 64)
            full = model.text(prompt.embeds, image_features=prompt.image_features)
        else:  # the image chunk with mask 1, the text chunks with 0
            assert prompt.embeds.shape[1] == len(before) + n + len(after) and prompt.image_features is None
            assert prompt.image_mask.tolist() == [0.0] * len(before) + [1.0] * n + [0.0] * len(after)
            full = model.text(prompt.embeds, image_mask=prompt.image_mask)
    result = generate_ids(model, processor, image_path, "What is in the image?", max_new_tokens=4)
    assert result.prompt_len == prompt.embeds.shape[1]
    torch.testing.assert_close(result.first_logits, full[0, -1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("interface", INTERFACES)
def test_checkpoint_round_trip(interface, tmp_path, tokenizer_path):
    model = model_for(interface)
    loaded = load_model(save_pretrained(model, tmp_path / "model", tokenizer=tokenizer_path))
    assert loaded.config.interface == interface
    ids, pixels, _ = batch()
    with torch.no_grad():
        assert torch.equal(loaded(ids, pixels), model(ids, pixels))


# --- ExecuTorch (slow: one export each) --------------------------------------------------------------


@pytest.mark.slow  # an ExecuTorch export and its parity run (~30 s); CI's slow job runs it
@pytest.mark.parametrize("interface", INTERFACES)
def test_executorch_export_answers_like_the_reference(interface, tmp_path, tokenizer_path):
    from mobilevlm import generate_ids, load_processor
    from mobilevlm.benchmarks.contenders.executorch import Contender
    from mobilevlm.data import make_scene, render_scene
    from mobilevlm.errors import MobileVLMError
    from mobilevlm.export import pipeline
    from mobilevlm.export.bundle import load_bundle
    from mobilevlm.export.executorch import ExecuTorchSession

    model = model_for(interface, seed=3)
    model_dir = save_pretrained(model, tmp_path / "model", tokenizer=tokenizer_path)
    out = pipeline.export_bundle(tmp_path / "bundle", "executorch", ("fp32",), model_dir, num_parity_cases=2, eval_scenes=0, log=lambda s: None)
    bundle = load_bundle(out)
    artifact = bundle.artifact("executorch-fp32")
    parity = artifact["parity"]
    assert parity["answers_identical"] == parity["num_cases"] == 2 and parity["token_agreement"] == 1.0
    assert parity["first_logit_max_abs_error"] < 1e-4
    decoder = artifact["methods"]["text_decoder"]
    n = model.config.num_image_features
    assert artifact["methods"]["vision_encoder"]["outputs"][0]["shape"] == [1, n, 64]
    assert decoder["interface"] == interface and decoder["multimodal_runner"] is False
    extra = decoder["inputs"][2]
    if interface == "cross_attention":
        assert extra["name"] == "image_features" and extra["shape"] == [1, n, 64]
    else:
        assert extra["name"] == "image_mask" and extra["shape"] == ["T"]
    session = ExecuTorchSession(bundle.root, artifact, bundle.manifest)
    processor = load_processor(model_dir)
    image = render_scene(make_scene(2_000_000_005), 96)
    reference = generate_ids(load_model(model_dir), processor, image, "What color is the circle?", max_new_tokens=8)
    answer = session.answer(image, "What color is the circle?", 8)
    assert answer == (session.printed_text(reference.token_ids) if session.printed_form else reference.text)
    with pytest.raises(MobileVLMError, match="only token-interface programs"):
        Contender(bundle, artifact)
