"""Parity: every artifact, run in its own runtime, against the PyTorch reference.

Three measurements per artifact:
- answers: the runtime an app uses (for ExecuTorch: `MultimodalRunner`) answers each parity case;
  the text must equal the reference `generate` answer (greedy).
- token agreement (teacher-forced): the artifact is fed the reference's answer token by token and its
  argmax is compared with the reference token at every position (including the final EOS), so one
  early divergence does not hide how close the rest is. The first-token logits' error is recorded.
- task accuracy: closed-ended accuracy, POPE F1 and CHAIR on held-out test scenes, artifact and
  reference side by side.
"""

from __future__ import annotations

import os
import random
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Protocol

import torch
from PIL import Image

from mobilevlm.data import CAPTION_PROMPTS, instruction_qas, make_scene, render_scene
from mobilevlm.data.splits import SPLITS, text_rng
from mobilevlm.errors import ExportError
from mobilevlm.evaluate import evaluate
from mobilevlm.generate import SamplingConfig, iter_tokens, prompt_embeddings

# Parity scenes come from their own stretch of the test split, away from evaluate's default range.
PARITY_OFFSET = 900_000
PARITY_IMAGE_SIZE = 256


@dataclass(frozen=True)
class ParityCase:
    id: str
    seed: int
    question: str
    max_new_tokens: int

    def image(self) -> Image.Image:
        return render_scene(make_scene(self.seed), PARITY_IMAGE_SIZE)


def parity_cases(num: int = 8) -> list[ParityCase]:
    """`num` fixed (image, question) pairs: short answers of every type, and captions (every fourth)."""
    cases = []
    for i in range(num):
        seed = SPLITS["test"].start + PARITY_OFFSET + i
        if i % 4 == 3:
            question, tokens = random.Random(seed).choice(CAPTION_PROMPTS), 48
        else:
            qas = instruction_qas(make_scene(seed), text_rng(seed, "instruction"))
            question, tokens = qas[i % len(qas)].question, 12
        cases.append(ParityCase(f"case-{i:02d}", seed, question, tokens))
    return cases


class ArtifactSession(Protocol):
    """What parity needs from an artifact's runtime."""

    def answer(self, image: Image.Image, prompt: str, max_new_tokens: int) -> str: ...

    def forced_logits(self, image: Image.Image, prompt: str, tokens: list[int]) -> list[torch.Tensor]:
        """Logits [V] after the prompt and after each of `tokens` (len(tokens) + 1 of them)."""
        ...


def ids_after_image(prompt_spec: dict, tokenizer, prompt: str, artifact: str) -> list[int]:
    """Token ids after the image for `prompt`, from the manifest's prompt template (`prompt_spec`);
    a prompt that does not fit the exported context with the prefix and the image is a PromptError
    naming the artifact, before any runtime is asked."""
    from mobilevlm.errors import PromptError
    from mobilevlm.processing import check_prompt

    after = tokenizer.encode(prompt_spec["after_image"].replace(prompt_spec["prompt_slot"], check_prompt(prompt)))
    total = len(prompt_spec["before_image_ids"]) + prompt_spec["image_tokens"] + len(after)
    if total >= prompt_spec["context_length"]:
        raise PromptError(f"prompt takes {total} tokens (image included); {artifact} was exported with a context of {prompt_spec['context_length']}")
    return after


@dataclass
class Reference:
    text: str
    token_ids: list[int]
    stopped_by_eos: bool
    first_logits: torch.Tensor


def reference_answer(model, processor, case: ParityCase, image: Image.Image) -> Reference:
    with torch.inference_mode():
        embeds = prompt_embeddings(model, processor, image, case.question)
    state: dict = {}
    tokens = list(iter_tokens(model, embeds, SamplingConfig(max_new_tokens=case.max_new_tokens), {processor.tokenizer.eos_id}, state))
    return Reference(processor.tokenizer.decode(tokens), tokens, state["stopped_by_eos"], state["first_logits"])


def compare(session: ArtifactSession, model, processor, cases: list[ParityCase], eval_scenes: int, eval_seed: int | None, reference_eval: dict | None) -> dict:
    """Run all parity measurements; returns the manifest's parity record for one artifact."""
    from mobilevlm.evaluate import ReferenceAnswerer

    eos = processor.tokenizer.eos_id
    rows, matches, agree, positions, logit_errors = [], 0, 0, 0, []
    for case in cases:
        image = case.image()
        ref = reference_answer(model, processor, case, image)
        text = session.answer(image, case.question, case.max_new_tokens)
        if getattr(session, "printed_form", False):  # the runtime could only show its printed text
            ref.text = session.printed_text(ref.token_ids)
        expected = ref.token_ids + ([eos] if ref.stopped_by_eos else [])
        logits = session.forced_logits(image, case.question, ref.token_ids)
        predicted = [int(l.argmax()) for l in logits[: len(expected)]]
        case_agree = sum(p == e for p, e in zip(predicted, expected))
        agree, positions = agree + case_agree, positions + len(expected)
        error = float((logits[0].float() - ref.first_logits.float()).abs().max())
        logit_errors.append(error)
        matches += text == ref.text
        rows.append({"case": case.id, "reference": ref.text, "artifact": text, "match": text == ref.text,
                     "token_agreement": case_agree / len(expected), "first_logit_max_abs_error": error})
    result = {
        "cases": rows,
        "answers_identical": matches,
        "num_cases": len(cases),
        "token_agreement": agree / positions if positions else 1.0,
        "first_logit_max_abs_error": max(logit_errors) if logit_errors else 0.0,
    }
    if eval_scenes:
        reference_eval = reference_eval or evaluate(ReferenceAnswerer(model, processor), eval_seed, eval_scenes, progress=False)
        artifact_eval = evaluate(session, eval_seed, eval_scenes, progress=False)
        result["task"] = {
            "test_seeds": artifact_eval["test_seeds"],
            "reference": _headline(reference_eval),
            "artifact": _headline(artifact_eval),
            "accuracy_delta_points": 100 * (artifact_eval["closed_ended"]["accuracy"] - reference_eval["closed_ended"]["accuracy"]),
        }
    return result


def _headline(result: dict) -> dict:
    return {
        "closed_ended_accuracy": result["closed_ended"]["accuracy"],
        "pope_f1": {k: v["f1"] for k, v in result["pope"].items()},
        "chair_i": result["chair"]["chair_i"],
        "chair_s": result["chair"]["chair_s"],
    }


@dataclass
class NativeOutput:
    stdout: bytes = b""
    stderr: list[str] | None = None


@contextmanager
def captured_native_output() -> Iterator[NativeOutput]:
    """Silence what native runtimes print on file descriptors 1 and 2, keeping both: stdout raw (a C
    runner prints the generated text there), stderr as lines so a failure can quote it."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    captured = NativeOutput()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            out.seek(0)
            err.seek(0)
            captured.stdout = out.read()
            captured.stderr = err.read().decode("utf-8", "replace").splitlines()


def native_error(message: str, captured: NativeOutput) -> ExportError:
    lines = (captured.stderr or []) + captured.stdout.decode("utf-8", "replace").splitlines()
    detail = [l for l in lines if any(k in l for k in ("rror", "ailed", "Missing", "ttempted"))][-3:]
    return ExportError(message + (": " + " | ".join(detail) if detail else ""))
