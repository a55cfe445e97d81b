"""Small printed text (SceneConfig.word_scale) and the ablation's small-text comparison.

The default scenes and renders must not change by a single byte (the shipped model, datasets and every
other test depend on them), so the default render is pinned to hashes taken before the option existed.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pytest
import torch

from mobilevlm.data.render import render_scene, word_plate
from mobilevlm.data.scene import DEFAULT_CONFIG, GRID, SceneConfig, active_scene_config, make_scene, scene_config_scope

torch.set_num_threads(1)

SMALL = SceneConfig(word_scale=0.2, word_probability=1.0)

# sha256 of render_scene(make_scene(seed), size).tobytes(), computed with render.py / scene.py as they
# were before word_scale existed.
BEFORE = {
    (0, 96): "169163249a9f2044c39b353abbe10b12c6f6e759b0bd7334ae2d95b07f6b210f",
    (3, 96): "032ca43f5eda6e62748edadaf533870bd23a5575b4252cce83a0a36a0a8417ae",
    (3, 192): "465b7db559adf32988c57ce85fbc1fce9a7667db6cf1284a8b490752a6c8ea49",
    (8, 128): "007c371e0f410cd54757e4c155ec0d26b101a1cc31f57c876034d2aa2f9a9bad",
    (10, 64): "dd54c451afe203c1783f054e36a8f2579897f73b745daafd5856375d9dbaf62b",
    (11, 256): "904318ba483dfb6c523a85af7f529d5383c2350d6c41078563de15b793d87018",
}


def _sha(image) -> str:
    return hashlib.sha256(image.tobytes()).hexdigest()


@pytest.mark.parametrize("seed,size", sorted(BEFORE))
def test_default_render_is_byte_identical_to_before(seed, size):
    scene = make_scene(seed)
    assert scene.word_scale == 1.0 and scene.word_offset == (0.0, 0.0)
    assert _sha(render_scene(scene, size)) == BEFORE[seed, size]
    assert _sha(render_scene(make_scene(seed, SceneConfig()), size)) == BEFORE[seed, size]


def test_word_scale_changes_only_the_word_layout():
    for seed in range(20):
        default, small = make_scene(seed), make_scene(seed, SceneConfig(word_scale=0.2))
        assert dataclasses.replace(small, word_scale=1.0, word_offset=(0.0, 0.0)) == default
        if small.word is None:
            assert small.word_offset == (0.0, 0.0)
        else:
            assert all(-1.0 <= v <= 1.0 for v in small.word_offset)
    offsets = {make_scene(s, SMALL).word_offset for s in range(20)}
    assert len(offsets) > 10  # placed anywhere in the row, not always centred


def _glyph_rows(image, row: int) -> np.ndarray:
    """Indices (image rows) of dark text pixels inside grid row `row` (objects never share it)."""
    a = np.asarray(image).astype(int)
    n = a.shape[0]
    band = a[row * n // GRID: (row + 1) * n // GRID]
    dark = band.max(axis=2) < 70
    ys, xs = np.nonzero(dark)
    return ys + row * n // GRID, xs


def test_small_word_is_rendered_smaller_and_inside_its_plate():
    size = 192
    for seed in range(6):
        scene = make_scene(seed, SceneConfig(word_probability=1.0))
        small = make_scene(seed, SMALL)
        ys_big, _ = _glyph_rows(render_scene(scene, size), scene.word_row)
        ys, xs = _glyph_rows(render_scene(small, size), small.word_row)
        big_h, small_h = np.ptp(ys_big) + 1, np.ptp(ys) + 1
        assert big_h >= 30, big_h  # default capitals fill most of the row
        assert 4 <= small_h <= 0.3 * big_h, (big_h, small_h)
        # capitals about 8 px tall at 192 px: twice what a 96 px view of the same image holds
        assert 6 <= small_h <= 12, small_h
        x0, y0, x1, y1 = (v * size for v in word_plate(small.word_row, small.word_scale, small.word_offset))
        assert x0 - 1 <= xs.min() and xs.max() <= x1 + 1 and y0 - 1 <= ys.min() and ys.max() <= y1 + 1


def test_word_plate_geometry():
    full = word_plate(1)
    assert word_plate(1, 1.0, (0.7, -0.3)) == full  # the default plate never moves
    x0, y0, x1, y1 = word_plate(1, 0.2, (0.0, 0.0))
    assert x1 - x0 == pytest.approx(0.2 * (full[2] - full[0])) and y1 - y0 == pytest.approx(0.2 * (full[3] - full[1]))
    left, right = word_plate(1, 0.2, (-1.0, 1.0)), word_plate(1, 0.2, (1.0, -1.0))
    assert left[0] == pytest.approx(full[0]) and left[3] == pytest.approx(full[3])  # left / bottom edge
    assert right[2] == pytest.approx(full[2]) and right[1] == pytest.approx(full[1])  # right / top edge


def test_word_scale_validation():
    for bad in (0.05, 0.0, 1.5):
        with pytest.raises(ValueError, match="word_scale"):
            SceneConfig(word_scale=bad)
    for bad in ((1.5, 0.0), (0.0,), (0.0, -2.0)):
        with pytest.raises(ValueError, match="word_offset"):
            SceneConfig(word_offset=bad)


def test_fixed_word_offset_places_every_plate_alike_and_changes_nothing_else():
    fixed = SceneConfig(word_scale=0.2, word_offset=(-0.8, 0.5))
    worded = [s for s in range(40) if make_scene(s, fixed).word is not None]
    assert len(worded) > 5
    for s in worded:
        scene, anywhere = make_scene(s, fixed), make_scene(s, SMALL)
        assert scene.word_offset == (-0.8, 0.5)
        assert dataclasses.replace(scene, word_offset=anywhere.word_offset) == anywhere
    # the plate is drawn where the offset says: the word changes only pixels of the image's left half
    scene = make_scene(worded[0], fixed)
    x0, _, x1, _ = word_plate(scene.word_row, 0.2, (-0.8, 0.5))
    assert x1 < 0.5
    with_word = np.asarray(render_scene(scene, 192)).astype(int)
    without = np.asarray(render_scene(dataclasses.replace(scene, word=None, word_row=None), 192)).astype(int)
    changed = np.nonzero((with_word != without).any(axis=2))
    assert changed[1].size > 0 and changed[1].max() < 96


def test_scene_config_scope():
    assert active_scene_config() is DEFAULT_CONFIG
    with scene_config_scope(SMALL):
        assert make_scene(3).word_scale == 0.2
        assert make_scene(3, DEFAULT_CONFIG).word_scale == 1.0  # an explicit config wins
        with scene_config_scope(DEFAULT_CONFIG):
            assert make_scene(3).word_scale == 1.0
        assert make_scene(3).word_scale == 0.2
    assert make_scene(3).word_scale == 1.0
    with pytest.raises(RuntimeError):
        with scene_config_scope(SMALL):
            raise RuntimeError("boom")
    assert active_scene_config() is DEFAULT_CONFIG


def test_scene_pool_render_scales():
    from mobilevlm.processing import ImageProcessor
    from mobilevlm.train.batches import ScenePool

    class _Processor:  # ScenePool only reads processor.image
        image = ImageProcessor(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "resize", ())

    with scene_config_scope(SMALL):
        pool = ScenePool(_Processor(), 4, render_scales=(2,))
        for index in range(2):
            expected = _Processor.image.prepare_views(render_scene(make_scene(pool.seed(index)), 64))[0]
            assert torch.equal(pool.pixels(index), _Processor.image.normalize(expected))
            assert pool.scene(index).word_scale == 0.2
    with pytest.raises(ValueError, match="render_scales"):
        ScenePool(_Processor(), 4, render_scales=())


def test_ablation_smalltext_variants():
    from benchmarks import ablate
    from mobilevlm.train.loop import build_config

    direct, tiled = ablate.VARIANTS["clip-ldpv2-smalltext"], ablate.VARIANTS["clip-anyres-smalltext"]
    assert direct.choice == tiled.choice == "resolution (small text)"
    assert direct.scene == tiled.scene == {"word_scale": 0.2}
    assert direct.render_scales == tiled.render_scales == (2, 4)
    assert direct.scene_config() == SceneConfig(word_scale=0.2)
    # the same model shapes as the default-scene rows they are compared with
    assert direct.overrides == ablate.VARIANTS["clip-ldpv2"].overrides
    assert tiled.overrides == ablate.VARIANTS["clip-anyres"].overrides
    for budget in ablate.BUDGETS:
        a, b = ablate.ablation_recipe(direct.name, budget), ablate.ablation_recipe(tiled.name, budget)
        assert a.stages == b.stages == ablate.ablation_recipe("clip-ldpv2", budget).stages  # one identical budget
        assert a.scene_pool == b.scene_pool and a.seed == b.seed
    recipe = ablate.ablation_recipe(tiled.name)
    assert build_config(ablate.ablation_recipe(direct.name), 1024).resolution == "direct"
    config = build_config(recipe, 1024)
    assert config.resolution == "anyres" and config.num_image_tokens > 4 * 36
    # the other variants keep the default scenes and renders
    assert ablate.VARIANTS["clip-anyres"].scene_config() == DEFAULT_CONFIG
    assert ablate.VARIANTS["clip-anyres"].render_scales is None


def test_word_read_counts_scenes_with_a_word():
    from benchmarks import ablate
    from mobilevlm.evaluate import eval_seeds

    words = [make_scene(s, SMALL).word for s in eval_seeds(None, 3)]

    class FirstRight:  # reads the first scene's word right, then nothing
        calls = 0

        def answer(self, image, prompt, max_new_tokens):
            assert prompt == ablate.QUESTION
            self.calls += 1
            return f"{words[0].capitalize()}." if self.calls == 1 else "zzz"

    with scene_config_scope(SMALL):  # SMALL prints a word in every scene
        result = ablate.word_read(FirstRight(), 3)
    assert result["count"] == 3 and result["accuracy"] == pytest.approx(1 / 3)


def test_table_row_and_word_read_note():
    import json
    from pathlib import Path

    from benchmarks import ablate

    record = json.loads(Path(__file__).parents[2].joinpath("benchmarks/results/ablation.jsonl").read_text().splitlines()[0])
    record.update(variant="clip-anyres-smalltext", choice="resolution (small text)", description="tiles")
    record["eval"]["word_read"] = {"accuracy": 0.25, "count": 20, "question": ablate.QUESTION}
    text = ablate.table([record])
    assert "| clip-anyres-smalltext | resolution (small text) |" in text
    assert "0.250 over the 20 test scenes with a word" in text


def test_reading_probe_fine_tunes_and_measures_before_and_after(tmp_path, tokenizer_path):
    """The probe trains the model it is given (the loss is recorded per step), on the scenes of the
    requested word size, and reports word_read before and after on the same held-out scenes."""
    import torch

    from mobilevlm import MobileVLM, save_pretrained
    from mobilevlm.benchmarks.reading_probe import probe
    from mobilevlm.data.scene import active_scene_config

    from ..conftest import micro_config

    torch.manual_seed(0)
    model_dir = save_pretrained(MobileVLM(micro_config()), tmp_path / "m", tokenizer=tokenizer_path)
    lines: list[str] = []
    result = probe(model_dir, 0.2, steps=2, eval_scenes=3, lr=1e-3, log=lines.append)
    assert result["word_scale"] == 0.2 and result["steps"] == 2 and lines and "step 0 loss" in lines[0]
    for key in ("word_read_before", "word_read_after"):
        assert result[key]["question"] == "What word is written in the image?" and 0 <= result[key]["accuracy"] <= 1
    assert result["word_read_before"]["count"] == result["word_read_after"]["count"]
    assert result["first_loss"] > 0 and result["last_loss"] > 0
    assert active_scene_config().word_scale == 1.0  # the scope is left
    fixed = probe(model_dir, 0.2, steps=1, eval_scenes=3, lr=1e-3, log=lines.append, word_offset=(-0.8, -0.8))
    assert fixed["word_offset"] == (-0.8, -0.8) and active_scene_config().word_offset is None


def test_reading_probe_refuses_a_bad_word_offset(capsys):
    from mobilevlm.benchmarks.reading_probe import main

    for bad in ("2,0", "a", "0.1"):
        with pytest.raises(SystemExit):
            main(["some-model", f"--word-offset={bad}"])
        assert "--word-offset: expected X,Y" in capsys.readouterr().err


def _anyres_checkpoint(tmp_path, tokenizer_path):
    from mobilevlm import MobileVLM, save_pretrained

    from ..conftest import micro_config

    torch.manual_seed(0)
    config = dataclasses.replace(micro_config(), resolution="anyres", anyres_grids=(1, 2, 2, 1, 2, 2)).validate()
    return save_pretrained(MobileVLM(config), tmp_path / "tiled", tokenizer=tokenizer_path)


def test_reading_probe_pool_renders_in_workers_exactly_what_a_render_gives(tmp_path, tokenizer_path):
    """The pool's worker processes get the scene config passed (not scoped), keep only scenes with a
    word, and render each at its render size by seed: the same bytes as rendering here."""
    from mobilevlm.benchmarks.reading_probe import _render_sizes, render_pool
    from mobilevlm.checkpoint import load_processor

    model_dir = _anyres_checkpoint(tmp_path, tokenizer_path)
    config = SceneConfig(word_scale=0.2, word_offset=(-0.8, -0.8))
    words, views = render_pool(model_dir, config, 5, workers=2)
    image = load_processor(model_dir).image
    sizes = _render_sizes(load_processor(model_dir))
    seeds = [s for s in range(100) if make_scene(s, config).word is not None][:5]
    assert words == [make_scene(s, config).word for s in seeds]
    assert views.dtype == torch.uint8 and views.shape[:2] == (5, 5)  # five scenes, global view + 2x2 tiles
    for i, s in enumerate(seeds):
        assert torch.equal(views[i], image.prepare_views(render_scene(make_scene(s, config), sizes[s % len(sizes)])))
    assert active_scene_config() == DEFAULT_CONFIG


def test_reading_probe_pool_mode_trains_a_tiled_model_records_a_curve_and_stops_on_time(tmp_path, tokenizer_path):
    from mobilevlm.benchmarks.reading_probe import ProbeConfig, probe

    model_dir = _anyres_checkpoint(tmp_path, tokenizer_path)
    config = ProbeConfig(word_scale=0.2, steps=3, batch=4, lr=1e-3, eval_scenes=3, eval_every=2, pool=8, workers=1)
    lines: list[str] = []
    result = probe(model_dir, config=config, log=lines.append)
    assert [c["step"] for c in result["curve"]] == [0, 2, 3] and result["steps_done"] == 3 and result["pool"] == 8
    assert result["word_read_after"]["accuracy"] == result["curve"][-1]["accuracy"]
    assert result["word_read_before"]["accuracy"] == result["curve"][0]["accuracy"]
    assert any("rendered 8 word scenes" in line for line in lines) and result["last_loss"] > 0
    timed = probe(model_dir, config=dataclasses.replace(config, max_minutes=0.0), log=lines.append)
    assert timed["steps_done"] == 1 and [c["step"] for c in timed["curve"]] == [0, 1]


def test_reading_probe_refuses_a_run_it_cannot_do(capsys):
    from mobilevlm.benchmarks.reading_probe import ProbeConfig, main

    with pytest.raises(ValueError, match="cannot fill a batch"):
        ProbeConfig(pool=4, batch=8)
    for bad in (dict(steps=-1), dict(batch=0), dict(lr=0.0), dict(workers=0), dict(eval_every=-1)):
        with pytest.raises(ValueError, match="ProbeConfig"):
            ProbeConfig(**bad)
    with pytest.raises(SystemExit):
        main(["some-model", "--pool", "4", "--batch", "8"])
    assert "cannot fill a batch of 8" in capsys.readouterr().err


def test_normalize_keeps_the_pixels_device():
    """The probe normalises its uint8 pool where the model trains; mean / std must follow the pixels."""
    from mobilevlm.processing import ImageProcessor

    from ..conftest import micro_config

    image = ImageProcessor.from_config(micro_config())
    assert image.normalize(torch.zeros(2, 3, 4, 4, dtype=torch.uint8, device="meta")).device.type == "meta"
