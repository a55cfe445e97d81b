"""Quantization recipes: names parse to documented mappings; bad names and bad group sizes are errors."""

from __future__ import annotations

import pytest
import torch

from mobilevlm import MobileVLM
from mobilevlm.errors import ExportError
from mobilevlm.export.quantize import check_group_size, parse_recipe, quantize_linears

from ..conftest import micro_config


@pytest.mark.parametrize(
    "name,decoder,group,embedding,vision",
    [
        ("fp32", None, None, None, None),
        ("8da4w", 4, 128, 8, None),
        ("8da4w-g32", 4, 32, 8, None),
        ("8da4w-g64-emb4", 4, 64, 4, None),
        ("8da4w-embfp-vis8", 4, 128, None, 8),
        ("8da8w", 8, None, 8, 8),
    ],
)
def test_recipe_names(name, decoder, group, embedding, vision):
    recipe = parse_recipe(name)
    assert (recipe.decoder_bits, recipe.group_size, recipe.embedding_bits, recipe.vision_bits) == (decoder, group, embedding, vision)
    assert recipe.describe()["recipe"] == name


@pytest.mark.parametrize("name", ["int4", "8da4w-g48", "8da4w-emb2", "fp16", "", "8da4w-vis8-g32"])
def test_unknown_recipes_are_clear_errors(name):
    with pytest.raises(ExportError, match="quantization recipe"):
        parse_recipe(name)


def test_group_size_that_does_not_divide_names_the_layer():
    model = MobileVLM(micro_config(intermediate_size=96))
    with pytest.raises(ExportError, match=r"text.layers.0.mlp.down_proj \(in_features 96\)"):
        check_group_size(model.text, 64)
    check_group_size(model.text, 32)


def test_8da4w_changes_outputs_a_little():
    torch.manual_seed(0)
    model = MobileVLM(micro_config()).eval()
    embeds = torch.randn(1, 5, 64)
    before = model.text(embeds)
    quantize_linears(model.text, 4, 32)
    after = model.text(embeds)
    error = (after - before).abs().max() / before.abs().max()
    assert 0 < error < 0.2


def test_moe_routers_stay_float_while_experts_are_quantized():
    torch.manual_seed(0)
    model = MobileVLM(micro_config(num_experts=4, experts_per_token=2, moe_every=2, hidden_size=96, num_heads=4)).eval()
    check_group_size(model.text, 32)  # the router (96 -> 4 experts) is not a grouped layer
    quantize_linears(model.text, 4, 32)
    moe = model.text.layers[1].mlp
    assert type(moe.gate.weight) is torch.nn.Parameter and moe.gate.weight.dtype == torch.float32
    assert type(moe.experts[0].up_proj.weight) is not torch.nn.Parameter  # a torchao quantized tensor
    assert type(model.text.layers[0].mlp.up_proj.weight) is not torch.nn.Parameter
