"""Reference inference: the answer every exported artifact is compared with.

Plain functions over a plain module (gpt-fast style): prefill the prompt (text before the image, the
image tokens, text after it) through `decode` at positions 0..T-1, then one token at a time using the
KV cache. Greedy when temperature is 0; otherwise temperature and top-p sampling from a seeded
generator, so a sampled answer is repeatable.

The feature-level interfaces change what a prompt is (`PromptInputs`):
- cross-attention: the text before and after the image as one sequence, and the image features,
  passed to every `decode` call (prompt and each generated token);
- visual expert: the same sequence as the token interface, with an image mask that is 1 on the image
  chunk and 0 on the text chunks; generated tokens are text (no mask).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from .errors import PromptError
from .model import MobileVLM
from .processing import ImageSource, Processor


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class GenerationResult:
    """Token ids and text of an answer, with the logits of the first generated token (for parity)."""

    token_ids: list[int]
    text: str
    prompt_len: int
    first_logits: torch.Tensor | None = None
    stopped_by_eos: bool = False


def sample_token(logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None) -> int:
    """Pick the next token from logits [V]."""
    if sampling.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < sampling.top_p  # always keeps the top token
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


@dataclass
class PromptInputs:
    """A prompt as `decode` takes it: embeddings [1, T, D] and the interface's image input, if any."""

    embeds: torch.Tensor
    image_features: torch.Tensor | None = None  # cross_attention: [1, N, D], for every decode call
    image_mask: torch.Tensor | None = None  # visual_expert: float [T], 1 at image positions (prefill only)

    @property
    def shape(self) -> torch.Size:
        """The embeddings' shape, so code that measures a prompt by `.shape[1]` reads either form."""
        return self.embeds.shape


def prompt_inputs(model: MobileVLM, processor: Processor, image: ImageSource | None, prompt: str) -> PromptInputs:
    """The prompt for `model`'s interface (see the module docstring)."""
    before, after = processor.prompt_ids(prompt)
    features = model.encode_image(processor.image.preprocess(image)) if image is not None else None
    if model.config.interface == "cross_attention":
        return PromptInputs(model.embed(torch.tensor([before + after])), image_features=features)
    parts = [model.embed(torch.tensor([before]))] if before else []
    if features is not None:
        parts.append(features)
    if after:
        parts.append(model.embed(torch.tensor([after])))
    embeds = torch.cat(parts, dim=1)
    if model.config.interface == "visual_expert" and features is not None:
        mask = torch.cat([torch.zeros(len(before)), torch.ones(features.shape[1]), torch.zeros(len(after))])
        return PromptInputs(embeds, image_mask=mask)
    return PromptInputs(embeds)


def prompt_embeddings(model: MobileVLM, processor: Processor, image: ImageSource | None, prompt: str) -> torch.Tensor | PromptInputs:
    """[1, T, D]: embeddings of the text before the image, the image tokens, and the text after it.

    For the cross_attention and visual_expert interfaces the image is not (only) embeddings, so this
    returns their `PromptInputs`; `iter_tokens` takes either."""
    inputs = prompt_inputs(model, processor, image, prompt)
    return inputs.embeds if model.config.interface == "token" else inputs


def iter_tokens(model: MobileVLM, embeds: torch.Tensor | PromptInputs, sampling: SamplingConfig, eos_ids: set[int], state: dict | None = None) -> Iterator[int]:
    """Prefill `embeds` [1, T, D] (or a `PromptInputs`), then yield generated token ids until EOS, the
    token budget or the end of the cache. `state`, if given, receives `first_logits` and `stopped_by_eos`."""
    state = {} if state is None else state
    prompt = embeds if isinstance(embeds, PromptInputs) else PromptInputs(embeds)
    embeds, features = prompt.embeds, prompt.image_features
    prompt_len = embeds.shape[1]
    if model.cache_len == 0:
        model.setup_cache(1)
    room = model.cache_len - prompt_len
    if room < 1:
        raise PromptError(f"prompt takes {prompt_len} tokens (image included); the model's context holds {model.cache_len}")
    generator = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
    budget = min(sampling.max_new_tokens, room)
    state["stopped_by_eos"] = False
    with torch.inference_mode():  # entered per step: a generator must not leak grad mode to its consumer
        logits = model.decode(embeds, torch.arange(prompt_len), features, prompt.image_mask)[0, -1]
    state["first_logits"] = logits.clone()
    for step in range(budget):
        token = sample_token(logits, sampling, generator)
        if token in eos_ids:
            state["stopped_by_eos"] = True
            return
        yield token
        if step + 1 < budget:
            with torch.inference_mode():
                logits = model.decode(model.embed(torch.tensor([[token]])), torch.tensor([prompt_len + step]), features)[0, -1]


def generate_ids(model: MobileVLM, processor: Processor, image: ImageSource | None, prompt: str, on_token: Callable[[int], None] | None = None, **sampling) -> GenerationResult:
    """Generate an answer; returns token ids, text, prompt length and the first token's logits."""
    config = SamplingConfig(**sampling)
    with torch.inference_mode():
        embeds = prompt_inputs(model, processor, image, prompt)
    state: dict = {}
    tokens = []
    for token in iter_tokens(model, embeds, config, {processor.tokenizer.eos_id}, state):
        tokens.append(token)
        if on_token is not None:
            on_token(token)
    return GenerationResult(tokens, processor.tokenizer.decode(tokens), embeds.shape[1], state["first_logits"], state["stopped_by_eos"])


def generate(model: MobileVLM, processor: Processor, image: ImageSource | None, prompt: str, **sampling) -> str:
    """The answer to `prompt` about `image` (greedy unless `temperature` > 0)."""
    return generate_ids(model, processor, image, prompt, **sampling).text


def generate_stream(model: MobileVLM, processor: Processor, image: ImageSource | None, prompt: str, **sampling) -> Iterator[str]:
    """Yield the answer as text pieces as tokens arrive (a multi-byte character waits for its last byte)."""
    config = SamplingConfig(**sampling)
    with torch.inference_mode():
        embeds = prompt_inputs(model, processor, image, prompt)
    streamer = TextStreamer(processor)
    for token in iter_tokens(model, embeds, config, {processor.tokenizer.eos_id}):
        if piece := streamer.push(token):
            yield piece
    if piece := streamer.flush():
        yield piece


class TextStreamer:
    """Turns a stream of token ids into text pieces, holding back an incomplete UTF-8 character."""

    def __init__(self, processor: Processor):
        self.tokenizer = processor.tokenizer
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        piece, self.emitted = text[self.emitted :], len(text)
        return piece

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids)
        piece, self.emitted = text[self.emitted :], len(text)
        return piece
