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
    "anyres": lambda c: dataclasses.replace(c, resolution="anyres", anyres_grids=(1, 2, 2, 1, 2, 2)),
    "cross_attention": lambda c: dataclasses.replace(c, interface="cross_attention", cross_attention_every=1),
    "visual_expert": lambda c: dataclasses.replace(c, interface="visual_expert"),
}


def confident(config, folder, tokenizer_path, steps: int = 60, lr: float = 3e-3):
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
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
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
    bundle = load_bundle(out)
    parity = bundle.artifact(f"{backend}-{recipe}")["parity"]
    # the pipeline itself refuses a bundle whose exact recipe (onnx fp32, coreml fp16) differs
    assert parity["answers_identical"] == parity["num_cases"] == 4
    if family in ("cross_attention", "visual_expert"):
        check_interface_contract(bundle, bundle.artifact(f"{backend}-{recipe}"), family)
    if family == "anyres":
        check_tiling(bundle, bundle.artifact(f"{backend}-{recipe}"), ckpt)


def check_tiling(bundle, artifact, ckpt):
    """Wide and tall images take fewer views than the square parity scenes (a 1x2 / 2x1 layout: 3
    views, not 5): the runtime's image tokens and answer follow the reference for each."""
    import numpy as np
    from PIL import Image

    from mobilevlm import generate_ids, load_model
    from mobilevlm.export.coreml_check import CoreMLSession
    from mobilevlm.export.onnx_session import OnnxSession

    model, processor = load_model(ckpt), load_processor(ckpt)
    onnx = artifact["backend"] == "onnx"
    session = (OnnxSession if onnx else CoreMLSession)(bundle.root, artifact, bundle.manifest)
    scene = parity_cases(1)[0].image()
    for size in ((scene.width * 2, scene.height // 2 + 7), (scene.width // 2 + 5, scene.height * 2)):
        image = scene.resize(size, Image.Resampling.BICUBIC)
        with torch.no_grad():
            expected = model.encode_image(processor.image.preprocess(image))[0].numpy()
        got = (session.image_features(image) if onnx else session.image_embeddings(image).astype(np.float32))[0]
        assert got.shape == expected.shape == (3 * (model.config.tokens_per_view + 1), model.config.text.hidden_size)
        assert np.abs(got - expected).max() < (1e-4 if onnx else 2e-2 * np.abs(expected).max())
        reference = generate_ids(model, processor, image, "What color is the circle?", max_new_tokens=6)
        assert session.answer(image, "What color is the circle?", 6) == reference.text


def check_interface_contract(bundle, artifact, interface):
    """The decoder's image input is in the manifest, reaches the computation, and (ONNX) runs in
    onnxruntime-genai's pipeline too; the benchmark refuses what its flow cannot drive."""
    import numpy as np

    from mobilevlm.errors import MobileVLMError
    from mobilevlm.export.coreml_check import CoreMLSession
    from mobilevlm.export.onnx_session import OnnxSession

    name = {"cross_attention": "image_features", "visual_expert": "image_mask"}[interface]
    case = parity_cases(1)[0]
    if artifact["backend"] == "onnx":
        from mobilevlm.benchmarks.contenders.onnx import Contender

        specs = artifact["methods"]
        assert artifact["metadata"]["decoder_image_input"] == name and specs["decoder"]["inputs"][-1]["name"] == name
        assert specs["decoder"]["interface"] == interface and "how_to_run" in specs["decoder"]
        assert ("image_mask" in [o["name"] for o in specs["embedding"]["outputs"]]) == (interface == "visual_expert")
        genai = artifact["metadata"]["onnxruntime_genai"]
        assert not genai.get("ran") or genai["answers_identical"] == genai["num_cases"], genai
        session = OnnxSession(bundle.root, artifact, bundle.manifest)
        with_image, _ = session.prefill(case.image(), case.question)
        if interface == "cross_attention":  # same prompt, the image taken away from the decoder
            session.reset()
            without = session.step(session.embed(session.prompt_ids(case.question)))[-1]
        else:  # same embeddings, every position routed as text
            ids = session.prompt_ids(case.question)
            embeds = session.embedding.run(None, {"input_ids": np.asarray([ids]), "image_features": session.image_features(case.image())})[0]
            session.reset()
            without = session.step(embeds, np.zeros((1, len(ids)), np.float32))[-1]
        with pytest.raises(MobileVLMError, match="only token-interface graphs"):
            Contender(bundle, artifact)
    else:
        specs = artifact["methods"]
        assert specs["decoder"]["inputs"][-1]["name"] == name and specs["decoder"]["interface"] == interface
        session = CoreMLSession(bundle.root, artifact, bundle.manifest)
        with_image, _ = session.prefill(case.image(), case.question)
        features = session.features
        session.decoder.reset_state()
        if interface == "cross_attention":
            session.features = np.zeros_like(features)
            embeds = np.concatenate([session.embed(session.prompt["before_image_ids"]), session.embed(session.check_length(case.question))], axis=1)
            without = session.decode(embeds, 0)
        else:
            embeds = np.concatenate([session.embed(session.prompt["before_image_ids"]), session.image_embeddings(case.image()),
                                     session.embed(session.check_length(case.question))], axis=1)
            without = session.decode(embeds, 0, np.zeros(embeds.shape[:2], np.float16))
    assert np.abs(np.asarray(with_image, np.float32) - np.asarray(without, np.float32)).max() > 1e-2
