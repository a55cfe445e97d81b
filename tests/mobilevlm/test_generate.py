"""Reference inference: greedy and sampled decoding, streaming, stop conditions, context limits."""

from __future__ import annotations

import pytest
import torch

from mobilevlm import generate, generate_ids, generate_stream, load_model, load_processor
from mobilevlm.errors import PromptError
from mobilevlm.generate import SamplingConfig, prompt_embeddings, sample_token


@pytest.fixture()
def model_and_processor(micro_checkpoint):
    return load_model(micro_checkpoint), load_processor(micro_checkpoint)


def test_greedy_equals_argmax_of_full_forward(model_and_processor, image_path):
    model, processor = model_and_processor
    result = generate_ids(model, processor, image_path, "What color is the circle?", max_new_tokens=6)
    assert len(result.token_ids) == 6 and not result.stopped_by_eos
    with torch.no_grad():
        embeds = prompt_embeddings(model, processor, image_path, "What color is the circle?")
        expected = []
        for _ in range(6):
            token = int(model.text(embeds)[0, -1].argmax())
            expected.append(token)
            embeds = torch.cat([embeds, model.embed(torch.tensor([[token]]))], 1)
    assert result.token_ids == expected
    assert result.prompt_len == embeds.shape[1] - 6
    assert result.text == processor.tokenizer.decode(expected)


def test_generation_is_repeatable_and_restarts_cleanly(model_and_processor, image_path):
    model, processor = model_and_processor
    first = generate(model, processor, image_path, "Where is the red square?", max_new_tokens=8)
    generate(model, processor, image_path, "A much longer and different prompt to fill the cache with other keys", max_new_tokens=8)
    assert generate(model, processor, image_path, "Where is the red square?", max_new_tokens=8) == first


def test_sampling_with_seed_is_repeatable(model_and_processor, image_path):
    model, processor = model_and_processor
    kwargs = dict(max_new_tokens=12, temperature=1.5, top_p=0.95)
    a = generate_ids(model, processor, image_path, "Describe it.", seed=3, **kwargs).token_ids
    b = generate_ids(model, processor, image_path, "Describe it.", seed=3, **kwargs).token_ids
    c = generate_ids(model, processor, image_path, "Describe it.", seed=4, **kwargs).token_ids
    assert a == b and a != c


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([0.6, 0.3, 0.05, 0.05]))
    config = SamplingConfig(temperature=1.0, top_p=0.8)
    g = torch.Generator().manual_seed(0)
    assert {sample_token(logits, config, g) for _ in range(200)} == {0, 1}


def test_stream_equals_full_answer(model_and_processor, image_path):
    model, processor = model_and_processor
    pieces = list(generate_stream(model, processor, image_path, "What shape is it?", max_new_tokens=10))
    assert "".join(pieces) == generate(model, processor, image_path, "What shape is it?", max_new_tokens=10)


def test_stops_at_eos(model_and_processor, image_path):
    model, processor = model_and_processor
    with torch.no_grad():  # make EOS the most likely token after two generated tokens: bias the head
        free = generate_ids(model, processor, image_path, "Stop soon.", max_new_tokens=3).token_ids
        model.text.lm_head.weight[processor.tokenizer.eos_id] = model.text.lm_head.weight[free[1]] * 1.5
    result = generate_ids(model, processor, image_path, "Stop soon.", max_new_tokens=20)
    assert result.stopped_by_eos and processor.tokenizer.eos_id not in result.token_ids
    assert len(result.token_ids) < 20


def test_prompt_longer_than_context_is_a_clear_error(model_and_processor, image_path):
    model, processor = model_and_processor
    with pytest.raises(PromptError, match=r"prompt takes \d+ tokens \(image included\); the model's context holds 96"):
        generate(model, processor, image_path, "word " * 200)


def test_answer_stops_at_the_end_of_the_cache(model_and_processor, image_path):
    model, processor = model_and_processor
    model.setup_cache(1, 40)
    result = generate_ids(model, processor, image_path, "Count.", max_new_tokens=100)
    assert result.prompt_len + len(result.token_ids) == 40


def test_bad_sampling_arguments():
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingConfig(max_new_tokens=0)
