"""Expert-model fusion: the scene expert, its description, the text-only decoder, and the .pte pair."""

from __future__ import annotations

import pytest
import torch

from mobilevlm.data import caption, make_scene, parse_objects, render_scene, scene_objects
from mobilevlm.data.scene import CELL_PHRASES, ROW_NAMES, WORDS
from mobilevlm.data.splits import SPLITS
from mobilevlm.fusion.expert import (COLOR_CLASSES, HEADS, SHAPE_CLASSES, SIZE_CLASSES, ExpertConfig, SceneExpert, decode_scene,
                                     describe, expert_loss, scene_labels, train_expert_model)
from mobilevlm.model import IGNORE_INDEX

from ..conftest import micro_config

MICRO_EXPERT = ExpertConfig(image_size=32, channels=(8, 16, 16), hidden_size=16, word_columns=3)


def one_hot_logits(scene, words=WORDS) -> tuple[torch.Tensor, ...]:
    """Logits [1, ...] whose argmax is the scene's labels (what a perfect expert would output)."""
    labels = scene_labels(scene, words)
    sizes = {"shape": len(SHAPE_CLASSES), "color": len(COLOR_CLASSES), "size": len(SIZE_CLASSES), "word": 1 + len(words)}
    out = []
    for name in HEADS:
        target = labels[name].clamp(min=0)
        out.append(torch.nn.functional.one_hot(target, sizes[name]).float().unsqueeze(0) * 4.0 - 2.0)
    return tuple(out)


def first_scene(predicate):
    return next(s for s in map(make_scene, range(SPLITS["train"].start, SPLITS["train"].start + 500)) if predicate(s))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    torch.set_num_threads(1)


def test_expert_shapes_and_gradient():
    torch.manual_seed(0)
    expert = SceneExpert(MICRO_EXPERT)
    pixels = torch.randn(2, 3, 32, 32)
    logits = expert(pixels)
    assert [tuple(t.shape) for t in logits] == [(2, 9, 6), (2, 9, 7), (2, 9, 2), (2, 3, 1 + len(WORDS))]
    scenes = [first_scene(lambda s: s.word is not None), first_scene(lambda s: s.word is None)]
    labels = {h: torch.stack([scene_labels(s)[h] for s in scenes]) for h in HEADS}
    loss, parts = expert_loss(logits, labels)
    loss.backward()
    assert set(parts) == set(HEADS) and torch.isfinite(loss)
    for name, p in expert.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_describe_names_every_object_and_the_word_deterministically():
    scene = first_scene(lambda s: s.word is not None and len(s.objects) >= 3)
    text = describe(scene)
    assert text == describe(make_scene(scene.seed)) == describe(scene)
    for o in scene.objects:
        assert f"{o.size} {o.color} {o.shape} {CELL_PHRASES[o.row][o.col]}" in text
    assert f"the word {scene.word} across the {ROW_NAMES[scene.word_row]}" in text
    assert set(parse_objects(text)) == scene_objects(scene)
    assert text == caption(scene).replace(f'"{scene.word}"', scene.word)  # the caption language, word unquoted
    # the manifest's describe rule, run on a perfect expert's logits, writes the same text
    from mobilevlm.export.fusion import describe_spec, description_from_logits, heads_spec

    heads = heads_spec(SceneExpert(MICRO_EXPERT))
    for s in (scene, first_scene(lambda s: s.word is None and len(s.objects) == 2), first_scene(lambda s: len(s.objects) == 1)):
        assert description_from_logits(heads, describe_spec(), list(one_hot_logits(s))) == describe(s)


def test_decode_scene_from_hand_built_logits():
    shape, color, size = torch.zeros(1, 9, 6), torch.zeros(1, 9, 7), torch.zeros(1, 9, 2)
    word = torch.zeros(1, 3, 1 + len(WORDS))
    word[0, :, 0] = 1.0  # "none" wins in every row ...
    shape[0, :, 0] = 1.0  # ... and every cell is empty, except:
    for cell, (s, c, z) in {0: ("circle", "red", "small"), 4: ("square", "blue", "large"), 8: ("triangle", "green", "large")}.items():
        shape[0, cell, SHAPE_CLASSES.index(s)] = 3.0
        color[0, cell, COLOR_CLASSES.index(c)] = 1.0
        size[0, cell, SIZE_CLASSES.index(z)] = 1.0
    scene = decode_scene((shape, color, size, word))
    assert scene.word is None and scene.word_row is None
    assert [(o.row, o.col, o.shape, o.color, o.size) for o in scene.objects] == [
        (0, 0, "circle", "red", "small"), (1, 1, "square", "blue", "large"), (2, 2, "triangle", "green", "large")]
    # a word in the bottom row: the object drawn there cannot exist and is dropped
    word[0, 2, 1 + WORDS.index("fish")] = 2.0
    word[0, 1, 1 + WORDS.index("cat")] = 1.5  # a weaker margin in the middle row loses
    scene = decode_scene((shape, color, size, word))
    assert (scene.word, scene.word_row) == ("fish", 2)
    assert [(o.row, o.col) for o in scene.objects] == [(0, 0), (1, 1)]
    assert describe(scene) == 'A small red circle at the top left, a large blue square in the center, and the word fish across the bottom.'
    # perfect logits decode back to the true graph
    for seed in range(SPLITS["train"].start, SPLITS["train"].start + 20):
        truth = make_scene(seed)
        assert describe(decode_scene(one_hot_logits(truth))) == describe(truth)


def test_expert_training_reduces_the_loss():
    torch.manual_seed(0)
    expert = SceneExpert(MICRO_EXPERT)
    losses = train_expert_model(expert, steps=12, batch_size=8, seed=0, lr=1e-2, pool_size=16, log=lambda s: None)
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3
    assert not expert.training


def test_fusion_conversation_labels_only_answers(micro_checkpoint):
    from mobilevlm import load_processor
    from mobilevlm.fusion.pipeline import encode_fusion_conversation, fusion_prompt_ids

    processor = load_processor(micro_checkpoint)
    tok = processor.tokenizer
    ids, labels = encode_fusion_conversation(processor, "A red circle.", [("What color is the circle?", "red"), ("How many objects are there?", "1")], 200)
    assert ids[: len(fusion_prompt_ids(processor, "A red circle.", "What color is the circle?"))] == fusion_prompt_ids(processor, "A red circle.", "What color is the circle?")
    assert tok.decode(ids).startswith("USER: A red circle.\nWhat color is the circle? ASSISTANT:")
    answers = [i for i, l in zip(ids, labels) if l != IGNORE_INDEX]
    assert [l for l in labels if l != IGNORE_INDEX] == answers
    assert tok.decode(answers, skip_special_tokens=False) == " red</s> 1</s>"


def test_decoder_finetune_trains_only_the_decoder(micro_checkpoint):
    from mobilevlm import load_model, load_processor
    from mobilevlm.fusion.pipeline import finetune_decoder

    model, processor = load_model(micro_checkpoint), load_processor(micro_checkpoint)
    vision = {k: v.clone() for k, v in model.vision.state_dict().items()}
    losses = finetune_decoder(model, processor, steps=8, batch_size=4, lr=3e-3, log=lambda s: None)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert all(torch.equal(v, model.vision.state_dict()[k]) for k, v in vision.items())
    assert not model.training


@pytest.fixture(scope="module")
def fusion_run(tmp_path_factory, tokenizer_path):
    """A micro fusion run: a decoder with room for long descriptions (the micro tokenizer spends ~5
    tokens a word), trained for a couple of steps by `train_fusion`."""
    from mobilevlm import MobileVLM, load_processor, save_pretrained
    from mobilevlm.fusion.pipeline import train_fusion

    torch.manual_seed(0)
    checkpoint = save_pretrained(MobileVLM(micro_config(max_seq_len=320)), tmp_path_factory.mktemp("fusion") / "micro", tokenizer=tokenizer_path)
    config = ExpertConfig.for_processor(load_processor(checkpoint).image, channels=(8, 16, 16), hidden_size=16, word_columns=3)
    out = tmp_path_factory.mktemp("fusion") / "run"
    return train_fusion(out, expert_steps=2, decoder_steps=2, batch_size=4, decoder_batch_size=2, model_dir=checkpoint,
                        expert_config=config, pool_size=8, eval_scenes=4, log=lambda s: None)


def test_fusion_answerer_end_to_end(fusion_run):
    import json

    from mobilevlm.evaluate import EVAL_IMAGE_SIZE
    from mobilevlm.fusion.pipeline import load_fusion

    record = json.loads((fusion_run / "fusion.json").read_text())
    assert set(record["expert"]["test_accuracy"]) >= {*HEADS, "word_read", "scene_exact"}
    answerer = load_fusion(fusion_run)
    scene = make_scene(SPLITS["test"].start)
    image = render_scene(scene, EVAL_IMAGE_SIZE)
    description = answerer.describe_image(image)
    assert description.endswith(".") and description == answerer.describe_image(image)
    ids = answerer.prompt_ids(image, "What color is the circle?")
    assert answerer.processor.tokenizer.decode(ids).startswith("USER: " + description + "\nWhat color is the circle? ASSISTANT:")
    result = answerer.generate(image, "What color is the circle?", 5)
    assert isinstance(result.text, str) and len(result.token_ids) <= 5 and result.prompt_len == len(ids)
    assert answerer.answer(image, "What color is the circle?", 5) == result.text


@pytest.mark.slow
def test_executorch_pair_matches_pytorch(fusion_run, tmp_path):
    from mobilevlm.evaluate import EVAL_IMAGE_SIZE
    from mobilevlm.export.fusion import FusionSession, export_fusion, load_fusion_bundle
    from mobilevlm.fusion.pipeline import load_fusion

    out = export_fusion(tmp_path / "bundle", fusion_run, num_parity_cases=2, log=lambda s: None)
    manifest = load_fusion_bundle(out)
    assert [a["role"] for a in manifest["artifacts"]] == ["expert", "decoder"]
    assert set(manifest["artifacts"][0]["methods"]) == {"scene_expert"}
    assert set(manifest["artifacts"][1]["methods"]) == {"token_embedding", "text_decoder"}
    parity = manifest["parity"]
    assert parity["answers_identical"] == parity["descriptions_identical"] == parity["num_cases"] == 2
    assert parity["expert_logit_max_abs_error"] < 1e-3 and parity["first_logit_max_abs_error"] < 1e-3
    session, answerer = FusionSession(out), load_fusion(fusion_run)
    image = render_scene(make_scene(SPLITS["test"].start + 3), EVAL_IMAGE_SIZE)
    for question in ("How many objects are there?", "Describe the image."):
        assert session.answer(image, question, 12) == answerer.answer(image, question, 12)
    (out / manifest["artifacts"][0]["file"]).write_bytes(b"broken")
    with pytest.raises(Exception, match="SHA-256"):
        load_fusion_bundle(out)
