"""Training: every stage learns (loss falls on a fixed batch), runs end to end, resumes exactly, and
runs under torchrun with two gloo processes."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from mobilevlm import load_model
from mobilevlm.errors import ConfigError, MobileVLMError
from mobilevlm.model import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from mobilevlm.train import Trainer, get_recipe
from mobilevlm.train import batches as B
from mobilevlm.train.loop import lr_at, make_optimizer, set_trainable
from mobilevlm.train.losses import ContrastiveModel, dpo_loss


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    torch.set_num_threads(1)
    return Trainer(tmp_path_factory.mktemp("run") / "micro", get_recipe("micro"), progress=False)


@pytest.mark.parametrize("name", ["vision", "text", "align", "instruct", "dpo"])
def test_each_stage_loss_falls_on_a_fixed_batch(trainer, name):
    # contrastive learning sits on a plateau for its first steps: give it more of them
    stage = dataclasses.replace(trainer.recipe.stage(name), steps=30 if name in ("vision", "align") else 12, warmup=1)
    torch.manual_seed(0)
    model = trainer.model
    aux = None
    if name == "vision":
        aux = ContrastiveModel(model, trainer.config.text.vocab_size)
        params = list(aux.parameters())
    else:
        set_trainable(model, stage.trainable)
        params = [p for p in model.parameters() if p.requires_grad]
    reference = trainer._dpo_reference(5, stage) if name == "dpo" else None
    frozen = {k: v.clone() for k, v in model.state_dict().items() if name == "align" and not k.startswith("projector.")}
    optimizer = make_optimizer(params, dataclasses.replace(stage, lr={"vision": 1e-3, "dpo": 3e-4}.get(name, 3e-3)))
    losses = []
    for _ in range(stage.steps):
        loss, _ = trainer._loss(stage, 0, aux, reference)  # step 0 every time: the same batch
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    if name == "align":
        # the projector alone moves a frozen, barely trained decoder's loss only a little; the
        # encoder and decoder must not move at all
        assert losses[-1] < losses[0] - 0.02, losses
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in frozen.items())
    else:
        assert losses[-1] < 0.8 * losses[0], losses


def test_conversation_labels_cover_answers_only(trainer):
    processor = trainer.processor
    ids, labels = B.encode_conversation(processor, [("What color is the circle?", "red"), ("How many objects are there?", "2")], 200)
    assert ids.count(IMAGE_TOKEN_INDEX) == 1
    answer_tokens = [t for t, l in zip(ids, labels) if l != IGNORE_INDEX]
    eos = processor.tokenizer.eos_id
    assert processor.tokenizer.decode(answer_tokens) == " red 2"
    labelled = [l for l in labels if l != IGNORE_INDEX]
    assert labelled.count(eos) == 2  # each answer ends with EOS, which is learned too
    text = processor.tokenizer.decode([t for t in ids if t >= 0], skip_special_tokens=False)
    assert text == "<s>USER: \nWhat color is the circle? ASSISTANT: red</s>USER: How many objects are there? ASSISTANT: 2</s>"


def test_conversation_respects_max_length(trainer):
    turns = [(f"Question number {i}?", "yes") for i in range(50)]
    ids, labels = B.encode_conversation(trainer.processor, turns, 60)
    assert len(ids) <= 60 and len(ids) == len(labels)


def test_batches_are_deterministic_and_differ_across_ranks(trainer):
    stage = trainer.recipe.stage("instruct")
    a = trainer._loss(stage, 3, None, None)[0].item()
    b = trainer._loss(stage, 3, None, None)[0].item()
    assert a == b
    assert B.sample_indices(3, 0, 2, 4) != B.sample_indices(3, 1, 2, 4)
    assert set(B.sample_indices(3, 0, 2, 4)).isdisjoint(B.sample_indices(3, 1, 2, 4))


def test_dpo_loss_on_a_hand_made_example():
    chosen, rejected = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0])
    ref_c, ref_r = torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -2.0])
    loss, accuracy = dpo_loss(chosen, rejected, ref_c, ref_r, beta=0.5)
    # margins: (1) - (-1) = 2 and (0) - (1) = -1
    expected = -(torch.nn.functional.logsigmoid(torch.tensor(1.0)) + torch.nn.functional.logsigmoid(torch.tensor(-0.5))) / 2
    assert torch.isclose(loss, expected) and accuracy == 0.5


def test_learning_rate_schedule():
    stage = get_recipe("tiny").stage("instruct")
    assert lr_at(stage, 0) == pytest.approx(stage.lr / stage.warmup)
    assert lr_at(stage, stage.warmup) == pytest.approx(stage.lr)
    assert lr_at(stage, stage.steps - 1) == pytest.approx(0.1 * stage.lr, rel=0.01)


def test_full_micro_run_and_exact_resume(tmp_path):
    torch.set_num_threads(1)
    recipe = get_recipe("micro")
    full = Trainer(tmp_path / "full", recipe, progress=False, save_every=3).run()
    stages = sorted(p.name for p in (tmp_path / "full" / "stages").iterdir())
    assert stages == ["01-vision", "02-text", "03-align", "04-instruct", "05-dpo"]
    assert not any(p.name.endswith((".partial", ".reference")) for p in (tmp_path / "full" / "stages").iterdir())

    # interrupted run: stop inside the instruct stage after its step-6 checkpoint, then resume
    class Interrupt(Exception):
        pass

    partial = Trainer(tmp_path / "cut", recipe, progress=False, save_every=3)
    original = partial._save_partial

    def save_then_stop(index, stage, aux, optimizer, step):
        original(index, stage, aux, optimizer, step)
        if stage.name == "instruct" and step == 6:
            raise Interrupt

    partial._save_partial = save_then_stop
    with pytest.raises(Interrupt):
        partial.run()
    assert (tmp_path / "cut" / "stages" / "04-instruct.partial").is_dir()
    with pytest.raises(MobileVLMError, match="--resume"):
        Trainer(tmp_path / "cut", recipe, progress=False)
    resumed = Trainer(tmp_path / "cut", recipe, resume=True, progress=False, save_every=3).run()
    a, b = load_model(full).state_dict(), load_model(resumed).state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key)


def test_resume_with_another_recipe_is_refused(tmp_path):
    recipe = get_recipe("micro").select(["text"])
    Trainer(tmp_path / "r", recipe, progress=False).run()
    with pytest.raises(MobileVLMError, match="different recipe"):
        Trainer(tmp_path / "r", get_recipe("micro").select(["align"]), resume=True, progress=False)


def test_unknown_recipe_and_stage():
    with pytest.raises(ConfigError, match="unknown training recipe"):
        get_recipe("huge")
    with pytest.raises(ConfigError, match="has no stage 'pretrain'"):
        get_recipe("micro").select(["pretrain"])


def test_torchrun_two_gloo_processes(tmp_path):
    """The same code on two CPU processes: ranks see different batches, gradients are averaged, and
    both ranks end with identical weights (rank 0 writes them)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    result = subprocess.run(
        [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "mobilevlm.cli", "train", "--recipe", "micro", "--stages", "text,instruct", "--out", str(tmp_path / "ddp")],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    stage = json.loads((tmp_path / "ddp" / "stages" / "02-instruct" / "stage.json").read_text())
    assert stage["world_size"] == 2
    log = [json.loads(line) for line in (tmp_path / "ddp" / "train_log.jsonl").read_text().splitlines()]
    assert all(r["loss"] > 0 for r in log)
    assert load_model(tmp_path / "ddp" / "model").config.text.hidden_size == 64
