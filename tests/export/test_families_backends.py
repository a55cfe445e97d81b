"""Every model family that ONNX and Core ML claim to carry exports to them with parity in their runtimes
(onnxruntime; our MIL interpreter for Core ML, which cannot predict off macOS). Slow: two exports per
family (run by .ci/run)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mobilevlm import MobileVLM, load_processor, save_pretrained
from mobilevlm.config import ProjectorConfig, VisionConfig
from mobilevlm.export import pipeline
from mobilevlm.export.bundle import load_bundle
from mobilevlm.export.parity import parity_cases
from mobilevlm.model import IGNORE_INDEX, IMAGE_TOKEN_INDEX

from ..conftest import micro_config

ANSWERS = [" red", " 3", " yes", " A red circle at the top left."]
CONVNEXT = VisionConfig(type="convnext", image_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=2, stage_depths=(1, 1), stage_dims=(16, 32))
FAMILIES = {
    "eva_vit": lambda c: dataclasses.replace(c, vision=dataclasses.replace(c.vision, type="eva_vit")),
    "convnext": lambda c: dataclasses.replace(c, vision=CONVNEXT),
    "patch": lambda c: dataclasses.replace(c, vision=VisionConfig(type="patch", image_size=32, patch_size=8, hidden_size=64, num_layers=2, num_heads=2),
                                           projector=ProjectorConfig("linear")),
    "dual": lambda c: dataclasses.replace(c, resolution="dual", high_res_vision=dataclasses.replace(CONVNEXT, image_size=64)),
    "qformer": lambda c: dataclasses.replace(c, projector=ProjectorConfig("qformer", num_queries=8, depth=1, num_heads=4)),
    "resampler": lambda c: dataclasses.replace(c, projector=ProjectorConfig("resampler", num_queries=8, depth=1, num_heads=4)),
    "moe": lambda c: dataclasses.replace(c, text=dataclasses.replace(c.text, num_experts=4, experts_per_token=2, moe_every=2)),
}


def confident(config, folder, tokenizer_path):
    """A model of this family fine-tuned on the parity cases, so fp16 rounding cannot flip a flat argmax."""
    torch.manual_seed(0)
    model = MobileVLM(config.validate())
    save_pretrained(model, folder, tokenizer=tokenizer_path)
    processor = load_processor(folder)
    for module in model.modules():  # open the dual encoder's gates so its cross-attention is exercised
        for name in ("attn_gate", "mlp_gate"):
            if isinstance(getattr(module, name, None), torch.nn.Parameter):
                torch.nn.init.constant_(getattr(module, name), 0.5)
    rows = []
    for case, answer in zip(parity_cases(4), ANSWERS):
        before, after = processor.prompt_ids(case.question)
        target = processor.tokenizer.encode(answer) + [processor.tokenizer.eos_id]
        ids = before + [IMAGE_TOKEN_INDEX] + after + target
        labels = [IGNORE_INDEX] * (len(ids) - len(target)) + target
        rows.append((torch.tensor([ids]), processor.image.preprocess(case.image()), torch.tensor([labels])))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(60):
        loss = sum(model(ids, pixels, labels) for ids, pixels, labels in rows)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return save_pretrained(model.eval(), folder, tokenizer=tokenizer_path, overwrite=True)


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("backend, recipe", [("onnx", "fp32"), ("coreml", "fp16")])
def test_family_exports_with_parity(tmp_path, tokenizer_path, family, backend, recipe):
    torch.set_num_threads(1)
    ckpt = confident(FAMILIES[family](micro_config()), tmp_path / "ckpt", tokenizer_path)
    out = pipeline.export_bundle(tmp_path / "bundle", backend, (recipe,), ckpt, num_parity_cases=4, eval_scenes=0, log=lambda s: None)
    parity = load_bundle(out).artifact(f"{backend}-{recipe}")["parity"]
    # the pipeline itself refuses a bundle whose exact recipe (onnx fp32, coreml fp16) differs
    assert parity["answers_identical"] == parity["num_cases"] == 4
