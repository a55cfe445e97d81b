"""Sparse decoder (MoE-LLaVA style): top-k routing, the load-balancing loss, MoE placement, training,
the KV-cached path, parameter counts, and an ExecuTorch export whose runtime answers like the model."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from mobilevlm import MobileVLM, load_model, save_pretrained
from mobilevlm.config import TextConfig
from mobilevlm.model import IGNORE_INDEX
from mobilevlm.moe import MLP, SparseMoE, active_parameters
from mobilevlm.text import TextDecoder

from ..conftest import micro_config

torch.set_num_threads(1)


def moe_config(hidden: int = 4, experts: int = 4, k: int = 2, **overrides) -> TextConfig:
    fields = dict(vocab_size=16, hidden_size=hidden, num_layers=1, num_heads=1, num_kv_heads=1, intermediate_size=8, max_seq_len=16,
                  num_experts=experts, experts_per_token=k)
    fields.update(overrides)
    config = TextConfig(**fields)
    config.validate()
    return config


def identity_router(moe: SparseMoE) -> SparseMoE:
    """Router logits = the input itself (hidden size = number of experts), so a test picks them."""
    with torch.no_grad():
        moe.gate.weight.copy_(torch.eye(moe.num_experts))
    return moe


def test_routing_keeps_the_top_k_with_renormalised_weights():
    moe = identity_router(SparseMoE(moe_config(k=2))).eval()
    logits = torch.tensor([[[3.0, 1.0, 0.0, -1.0], [0.0, 2.0, -5.0, 2.5], [-1.0, -2.0, 4.0, 0.5]]])
    _, chosen, dense = moe.routing_weights(logits)
    expected_experts = [(0, 1), (3, 1), (2, 3)]  # the two largest logits of each token, largest first
    for token, (a, b) in enumerate(expected_experts):
        assert tuple(chosen[0, token].tolist()) == (a, b)
        row = dense[0, token]
        assert (row != 0).sum() == 2 and row[a] > 0 and row[b] > 0
        la, lb = logits[0, token, a].item(), logits[0, token, b].item()
        # softmax over all experts, then renormalised over the chosen two = softmax over the two
        assert row[a].item() == pytest.approx(math.exp(la) / (math.exp(la) + math.exp(lb)), rel=1e-6)
        assert row.sum().item() == pytest.approx(1.0, abs=1e-6)


def test_output_equals_a_per_token_loop_over_the_chosen_experts():
    torch.manual_seed(0)
    config = moe_config(hidden=8, experts=5, k=2, num_heads=2, num_kv_heads=2)
    moe = SparseMoE(config).eval()
    x = torch.randn(2, 6, 8)
    with torch.no_grad():
        out = moe(x)
        expected = torch.zeros_like(x)
        for b in range(2):
            for t in range(6):
                token = x[b, t]
                probs = torch.softmax(moe.gate(token), dim=-1).tolist()
                ranked = sorted(range(5), key=lambda e: probs[e], reverse=True)[:2]
                total = sum(probs[e] for e in ranked)
                for e in ranked:
                    expert = moe.experts[e]
                    hidden = F.silu(expert.gate_proj(token)) * expert.up_proj(token)
                    expected[b, t] += probs[e] / total * expert.down_proj(hidden)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)


def test_experts_are_swiglu_linears():
    moe = SparseMoE(moe_config(hidden=8, experts=3, k=1, num_heads=2, num_kv_heads=2))
    assert len(moe.experts) == 3 and all(isinstance(e, MLP) for e in moe.experts)
    assert isinstance(moe.gate, torch.nn.Linear) and moe.gate.bias is None and moe.gate.weight.shape == (3, 8)
    assert all(isinstance(e.gate_proj, torch.nn.Linear) and e.gate_proj.out_features == 8 for e in moe.experts)


def routed_loss(probabilities: list[list[float]], k: int) -> SparseMoE:
    """Run 4 tokens whose router probabilities are exactly `probabilities` (inputs = their logs)."""
    moe = identity_router(SparseMoE(moe_config(k=k))).train()
    moe(torch.tensor(probabilities).log().unsqueeze(0))
    return moe


def test_load_balancing_loss_by_hand():
    # loss = E * sum_e f_e * P_e, f_e = assignments to e / (tokens * k), P_e = mean probability of e
    probabilities = [
        [0.5, 0.3, 0.1, 0.1],  # top-2: experts 0, 1
        [0.1, 0.6, 0.2, 0.1],  # 1, 2
        [0.6, 0.1, 0.25, 0.05],  # 0, 2
        [0.1, 0.2, 0.3, 0.4],  # 3, 2
    ]
    f = [2 / 8, 2 / 8, 3 / 8, 1 / 8]
    p = [(0.5 + 0.1 + 0.6 + 0.1) / 4, (0.3 + 0.6 + 0.1 + 0.2) / 4, (0.1 + 0.2 + 0.25 + 0.3) / 4, (0.1 + 0.1 + 0.05 + 0.4) / 4]
    expected = 4 * sum(fe * pe for fe, pe in zip(f, p))  # = 4 * 0.25625 = 1.025
    moe = routed_loss(probabilities, k=2)
    assert moe.aux_loss.dim() == 0
    assert moe.aux_loss.item() == pytest.approx(expected, rel=1e-5) and expected == pytest.approx(1.025)
    moe.aux_loss.backward()  # differentiable through P_e: the router learns from it
    assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0


def test_load_balancing_loss_balanced_and_collapsed():
    # Perfect balance: each expert takes 2 of the 8 assignments (f_e = 1/4) and the mean probability
    # of each is 1/4, so the loss is E * sum_e (1/E)(1/E) = 4 * 4 * 1/16 = 1.0.
    balanced = [[0.4, 0.3, 0.2, 0.1], [0.1, 0.4, 0.3, 0.2], [0.2, 0.1, 0.4, 0.3], [0.3, 0.2, 0.1, 0.4]]
    assert routed_loss(balanced, k=2).aux_loss.item() == pytest.approx(1.0, rel=1e-6)
    # Collapse: every token certain of expert 0 (k = 1): f_0 = P_0 = 1, so the loss is E = 4.
    collapsed = [[1 - 3e-7, 1e-7, 1e-7, 1e-7]] * 4
    assert routed_loss(collapsed, k=1).aux_loss.item() == pytest.approx(4.0, rel=1e-5)


def test_aux_loss_only_in_training():
    moe = SparseMoE(moe_config()).train()
    moe(torch.randn(1, 3, 4))
    assert moe.aux_loss is not None and moe.aux_loss.requires_grad
    assert copy.deepcopy(moe).aux_loss is None  # exporters deep-copy; the graph-bound loss stays behind
    assert moe.aux_loss is not None
    moe.eval()
    moe(torch.randn(1, 3, 4))
    assert moe.aux_loss is None


def test_moe_every_places_sparse_layers():
    decoder = TextDecoder(moe_config(hidden=8, num_heads=2, num_kv_heads=2, num_layers=4, moe_every=2))
    kinds = [type(layer.mlp) for layer in decoder.layers]
    assert kinds == [MLP, SparseMoE, MLP, SparseMoE]
    dense = TextDecoder(moe_config(hidden=8, num_heads=2, num_kv_heads=2, num_layers=4, num_experts=0))
    assert all(type(layer.mlp) is MLP for layer in dense.layers)


def micro_moe_model(seed: int = 0) -> MobileVLM:
    torch.manual_seed(seed)
    return MobileVLM(micro_config(num_experts=4, experts_per_token=2))


def test_micro_moe_model_trains_with_the_aux_loss():
    model = micro_moe_model().train()
    coef = model.config.text.router_aux_loss_coef
    assert coef > 0
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 384, (4, 12), generator=generator)
    pixels = torch.randn(4, 3, 32, 32, generator=generator)
    ids[:, 2] = -200  # the image placeholder
    labels = ids.clone()
    labels[:, :3] = IGNORE_INDEX
    router_before = model.text.layers[0].mlp.gate.weight.detach().clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model(ids, pixels, labels)
        aux = [m.aux_loss for m in model.text.modules() if getattr(m, "aux_loss", None) is not None]
        assert len(aux) == 2  # both layers are MoE layers (moe_every = 1)
        logits = model(ids, pixels)
        _, shifted = model.merge_inputs(ids, model.encode_image(pixels), labels)
        lm = F.cross_entropy(logits[:, :-1].flatten(0, 1), shifted[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
        torch.testing.assert_close(loss, lm + coef * sum(aux))  # what MobileVLM.forward adds
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    assert not torch.equal(router_before, model.text.layers[0].mlp.gate.weight)


def test_kv_cached_decode_equals_the_full_forward():
    model = micro_moe_model(3).eval()
    for layer in model.text.layers:  # larger router weights, so tokens really pick different experts
        torch.nn.init.normal_(layer.mlp.gate.weight, std=1.0)
    embeds = model.embed(torch.randint(3, 384, (1, 9), generator=torch.Generator().manual_seed(2)))
    with torch.no_grad():
        full = model.text(embeds)
        model.setup_cache()
        prefix = model.decode(embeds[:, :5], torch.arange(5))
        steps = [model.decode(embeds[:, t : t + 1], torch.tensor([t])) for t in range(5, 9)]
    cached = torch.cat([prefix, *steps], dim=1)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)
    layer = model.text.layers[0]
    chosen = layer.mlp.routing_weights(layer.post_attention_layernorm(embeds))[1]
    assert chosen.unique().numel() > 2  # the tokens do not all use the same pair of experts


def test_active_parameters():
    config = micro_config(num_experts=4, experts_per_token=2)
    text = config.text
    d, i, e, k = text.hidden_size, text.intermediate_size, text.num_experts, text.experts_per_token
    per_expert = 3 * d * i
    moe_layers = sum(text.is_moe_layer(n) for n in range(text.num_layers))
    assert moe_layers == 2
    dense_total = MobileVLM(micro_config()).num_parameters()
    model = MobileVLM(config)
    active, total = active_parameters(model)
    # each MoE layer swaps one SwiGLU for e of them plus a router of e x d
    assert total == model.num_parameters() == dense_total + moe_layers * ((e - 1) * per_expert + e * d)
    assert active == dense_total + moe_layers * ((k - 1) * per_expert + e * d)
    assert active_parameters(model.text) == (active - (total - sum(p.numel() for p in model.text.parameters())), sum(p.numel() for p in model.text.parameters()))
    dense_model = MobileVLM(micro_config())
    assert active_parameters(dense_model) == (dense_total, dense_total)


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory, tokenizer_path):
    """A saved micro MoE model whose routers are sharp enough that tokens pick different experts."""
    model = micro_moe_model(5).eval()
    for layer in model.text.layers:
        torch.nn.init.normal_(layer.mlp.gate.weight, std=1.0)
    model_dir = save_pretrained(model, tmp_path_factory.mktemp("moe") / "model", tokenizer=tokenizer_path)
    loaded = load_model(model_dir)
    assert isinstance(loaded.text.layers[1].mlp, SparseMoE)
    embeds = model.embed(torch.arange(3, 11).unsqueeze(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded.text(embeds), model.text(embeds))  # the checkpoint round-trips
    return model_dir


def export(model_dir, out, recipe: str) -> dict:
    from mobilevlm.export import pipeline
    from mobilevlm.export.bundle import load_bundle

    pipeline.export_bundle(out, "executorch", (recipe,), model_dir, num_parity_cases=2, eval_scenes=0, log=lambda s: None)
    return load_bundle(out).artifact(f"executorch-{recipe}")


@pytest.mark.slow  # an ExecuTorch export (~60 s); .ci/run runs the slow family suites
def test_executorch_fp32_export_answers_like_the_model(moe_checkpoint, tmp_path):
    # The parity reference is the eager model loaded from the checkpoint (equal to the original above).
    parity = export(moe_checkpoint, tmp_path / "bundle", "fp32")["parity"]
    assert parity["answers_identical"] == parity["num_cases"] == 2
    assert parity["first_logit_max_abs_error"] < 1e-4


@pytest.mark.slow  # about 90 s of CPU: lowering 8da4w linears of four experts per layer
def test_executorch_8da4w_export_runs(moe_checkpoint, tmp_path):
    artifact = export(moe_checkpoint, tmp_path / "bundle", "8da4w-g32")
    assert artifact["parity"]["num_cases"] == 2 and 0 <= artifact["parity"]["token_agreement"] <= 1
    total = active_parameters(load_model(moe_checkpoint))[1]
    assert artifact["size_bytes"] < 2 * total  # 4-bit experts: far below the 4 bytes per weight of fp32
