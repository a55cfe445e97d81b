"""Evaluation metrics on hand-made predictions with known values, and the evaluation loop."""

from __future__ import annotations

import pytest

from mobilevlm.data.splits import SPLITS
from mobilevlm.errors import MobileVLMError
from mobilevlm.evaluate import chair_metrics, closed_ended_metrics, eval_seeds, evaluate, is_yes, pope_metrics


def test_closed_ended_accuracy_by_type():
    records = [("color", "Red.", "red"), ("color", "blue", "red"), ("count", " 3 ", "3"), ("count", "three", "3"), ("count", "2", "2")]
    m = closed_ended_metrics(records)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["by_type"] == {"color": 0.5, "count": pytest.approx(2 / 3)}
    assert m["count"] == 5


def test_pope_metrics():
    # 4 positives: 3 said yes; 4 negatives: 1 said yes  -> tp 3, fn 1, fp 1, tn 3
    pairs = [("yes", "yes")] * 3 + [("no", "yes")] + [("Yes, there is.", "no")] + [("no", "no"), ("nope", "no"), ("", "no")]
    m = pope_metrics(pairs)
    assert m["accuracy"] == 0.75 and m["precision"] == 0.75 and m["recall"] == 0.75 and m["f1"] == 0.75
    assert m["yes_ratio"] == 0.5
    assert is_yes("Yes.") and is_yes("yes, a red circle") and not is_yes("yesterday") and not is_yes("")


def test_pope_all_no_has_zero_f1():
    m = pope_metrics([("no", "yes"), ("no", "no")])
    assert m["f1"] == 0.0 and m["accuracy"] == 0.5 and m["yes_ratio"] == 0.0


def test_chair_metrics():
    truth = {("red", "circle"), ("blue", "square")}
    captions = [
        ([("red", "circle"), ("blue", "square")], truth),  # faithful
        ([("red", "circle"), ("green", "cross"), ("green", "cross")], truth),  # one hallucinated object (mentioned twice)
        ([], truth),  # says nothing
    ]
    m = chair_metrics(captions)
    assert m["chair_i"] == pytest.approx(1 / 4)  # mentions: 2 + 2 unique; hallucinated: 1
    assert m["chair_s"] == pytest.approx(1 / 3)
    assert m["coverage"] == pytest.approx(3 / 6)


def test_eval_seeds_never_leave_the_test_split():
    test = SPLITS["test"]
    assert eval_seeds(None, 3) == range(test.start, test.start + 3)
    assert eval_seeds(test.start + 10, 2) == range(test.start + 10, test.start + 12)
    assert eval_seeds(5, 2) == range(test.start + 5, test.start + 7)  # offsets into the test split
    with pytest.raises(MobileVLMError, match="test split"):
        eval_seeds(test.stop - 1, 5)


def test_evaluate_scores_a_perfect_model_and_a_yes_sayer():
    from mobilevlm.data import CAPTION_PROMPTS, POPE_SETTINGS, caption, instruction_qas, make_scene, pope_probes, render_scene
    from mobilevlm.data.splits import text_rng

    seeds = eval_seeds(None, 4)
    truth = {}  # (image bytes, prompt) -> the scene graph's answer
    for seed in seeds:
        scene = make_scene(seed)
        image = render_scene(scene, 256).tobytes()
        qas = instruction_qas(scene, text_rng(seed, "instruction"))
        qas += [qa for s in POPE_SETTINGS for qa in pope_probes(scene, s, text_rng(seed, f"pope_{s}"))]
        truth.update({(image, qa.question): qa.answer for qa in qas})
        truth.update({(image, prompt): caption(scene) for prompt in CAPTION_PROMPTS})

    class Perfect:
        def answer(self, image, prompt, max_new_tokens):
            return truth[(image.tobytes(), prompt)]

    result = evaluate(Perfect(), None, 4, progress=False)
    assert result["closed_ended"]["accuracy"] == 1.0
    assert all(m["f1"] == 1.0 and m["yes_ratio"] == 0.5 for m in result["pope"].values())
    assert result["chair"]["chair_i"] == 0.0 and result["chair"]["coverage"] == 1.0

    class YesSayer:
        def answer(self, image, prompt, max_new_tokens):
            return "yes"

    result = evaluate(YesSayer(), None, 4, progress=False)
    assert all(m["recall"] == 1.0 and m["precision"] == 0.5 and m["yes_ratio"] == 1.0 for m in result["pope"].values())
