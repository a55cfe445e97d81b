"""The "anyres" resolution strategy: the tile layout chosen for wide, tall and square images, the views
an app must build, the model's token layout, training, and ExecuTorch parity with a variable number of
views."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from PIL import Image

from ..conftest import micro_config
from mobilevlm import MobileVLM, save_pretrained
from mobilevlm.processing import ImageProcessor, Processor, Tokenizer

GRIDS = (1, 2, 2, 1, 2, 2)


def anyres_config():
    return dataclasses.replace(micro_config(), resolution="anyres", anyres_grids=GRIDS).validate()


def processor(grids=((1, 2), (2, 1), (2, 2))) -> ImageProcessor:
    return ImageProcessor(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "pad", grids)


@pytest.mark.parametrize(
    "size, grid",
    [((640, 300), (1, 2)), ((300, 640), (2, 1)), ((400, 400), (2, 2)), ((64, 30), (1, 2)), ((20, 20), (1, 2)), ((1000, 100), (1, 2))],
)
def test_layout_follows_the_aspect_ratio(size, grid):
    assert processor().select_grid(*size) == grid


def test_small_image_prefers_the_layout_that_wastes_least():
    # 32x32 fits every layout without upscaling past its own pixels; the 1x2 and 2x1 canvases waste less than 2x2
    assert processor(((2, 2), (1, 2))).select_grid(32, 32) == (1, 2)


def test_views_are_global_then_tiles_row_major():
    image = Image.new("RGB", (64, 32), (0, 0, 0))
    image.paste((255, 0, 0), (0, 0, 32, 32))  # left half red, right half black
    views = processor().prepare_views(image)
    assert views.shape == (3, 3, 32, 32)  # global view + 1x2 tiles
    left, right = views[1], views[2]
    assert left[0].float().mean() > 250 and left[1:].float().mean() < 5
    assert right.float().max() < 5
    direct = ImageProcessor(32, (0.5,) * 3, (0.5,) * 3, "pad").prepare_image(image)
    assert torch.equal(views[0], direct)


def test_processor_from_config_and_manifest_spec():
    config = anyres_config()
    tok = None
    image = ImageProcessor.from_config(config)
    assert image.grids == ((1, 2), (2, 1), (2, 2)) and image.size == 32
    from mobilevlm.export.bundle import preprocessing_spec

    spec = preprocessing_spec(Processor(image, None, tok), config.tokens_per_view + 1)
    assert spec["tiling"]["grids"] == [[1, 2], [2, 1], [2, 2]] and spec["tiling"]["tokens_per_view"] == 5
    assert ImageProcessor.from_spec(spec) == image


def test_token_layout_and_counts():
    config = anyres_config()
    assert config.tokens_per_view == 4 and config.max_tiles == 4
    assert config.num_image_tokens == (1 + 4) * 5 and config.image_tokens_for_grid(1, 2) == 15
    torch.manual_seed(0)
    model = MobileVLM(config).eval()
    views = torch.randn(3, 3, 32, 32)
    tokens = model.encode_image(views)
    assert tokens.shape == (1, 15, 64)
    # each view's tokens are the direct encoding of that view, then the separator
    for i in range(3):
        view = model.projector(model.vision(views[i : i + 1]))[0]
        torch.testing.assert_close(tokens[0, 5 * i : 5 * i + 4], view)
        torch.testing.assert_close(tokens[0, 5 * i + 4], model.image_separator)
    batch = model.encode_image(torch.stack([views, views]))
    assert batch.shape == (2, 15, 64)
    torch.testing.assert_close(batch[1], tokens[0])


def test_config_errors():
    from mobilevlm.errors import ConfigError

    with pytest.raises(ConfigError, match="anyres_grids must be"):
        dataclasses.replace(micro_config(), resolution="anyres", anyres_grids=(1, 2, 2)).validate()
    with pytest.raises(ConfigError, match="anyres_grids is set"):
        dataclasses.replace(micro_config(), anyres_grids=(1, 2)).validate()
    with pytest.raises(ConfigError, match="unknown resolution"):
        dataclasses.replace(micro_config(), resolution="tiles").validate()


def test_trains_with_falling_loss():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = MobileVLM(anyres_config())
    views = torch.randn(2, 3, 3, 32, 32)
    ids = torch.randint(3, 384, (2, 12))
    ids[:, 2] = -200
    labels = ids.clone()
    labels[:, :3] = -100
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        loss = model(ids, views, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0] * 0.8
    assert model.image_separator.grad is not None


@pytest.mark.slow  # an ExecuTorch export (~60 s); .ci/run runs the slow family suites
def test_executorch_parity_with_a_variable_number_of_views(tmp_path, tokenizer_path):
    from mobilevlm.data import make_scene, render_scene
    from mobilevlm.export import pipeline
    from mobilevlm.export.bundle import load_bundle
    from mobilevlm.export.executorch import ExecuTorchSession
    from mobilevlm import generate_ids, load_processor

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = MobileVLM(anyres_config()).eval()
    ckpt = save_pretrained(model, tmp_path / "ckpt", tokenizer=tokenizer_path)
    out = pipeline.export_bundle(tmp_path / "bundle", "executorch", ("fp32",), ckpt, num_parity_cases=2, eval_scenes=0, log=lambda s: None)
    bundle = load_bundle(out)
    artifact = bundle.artifact("executorch-fp32")
    assert artifact["parity"]["answers_identical"] == artifact["parity"]["num_cases"] == 2
    assert artifact["methods"]["vision_encoder"]["inputs"][0]["dynamic"] == {"K": [2, 5]}
    assert bundle.manifest["preprocessing"]["tiling"]["grids"] == [[1, 2], [2, 1], [2, 2]]
    # a wide image (3 views) and a tall one (3 views) and a square one (5 views) through the runtime
    session = ExecuTorchSession(bundle.root, artifact, bundle.manifest)
    processor = load_processor(ckpt)
    scene = render_scene(make_scene(2_000_000_001), 96)
    for image in (scene.resize((96, 40)), scene.resize((40, 96)), scene):
        reference = generate_ids(model, processor, image, "What is in the image?", max_new_tokens=6)
        assert session.answer(image, "What is in the image?", 6) == reference.text
