"""The toolkit's own tokenizer: a byte-level BPE trained on the generated text.

Byte-level, so any text (including what a user types) round-trips; trained on the synthetic corpus
plus the prompt template's own words, so a question costs few tokens. Special tokens `<pad>`, `<s>`,
`</s>` take ids 0, 1, 2 (LLaMA's BOS / EOS ids).
"""

from __future__ import annotations

import itertools
from typing import Iterator

from .splits import iter_instructions, text_corpus

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")


def tokenizer_corpus(template_text: str, num_texts: int) -> Iterator[str]:
    """Generated sentences, and questions wrapped in the prompt template as the model will see them."""
    before, after = template_text.split("<image>")
    yield from itertools.islice(text_corpus("train"), num_texts)
    for sample in iter_instructions("train", count=max(1, num_texts // 20)):
        yield before.replace("{prompt}", sample.prompt) + after.replace("{prompt}", sample.prompt) + " " + sample.answer


def build_tokenizer(template_text: str, vocab_size: int = 1024, num_texts: int = 20000):
    """A trained `tokenizers.Tokenizer` (its vocabulary may end below `vocab_size`: the corpus is small)."""
    from ..processing import train_tokenizer

    return train_tokenizer(tokenizer_corpus(template_text, num_texts), vocab_size, SPECIAL_TOKENS)


def pad_vocabulary(tokenizer, size: int):
    """Add placeholder tokens `<unused_N>` until the vocabulary has `size` entries.

    A model's output layer and its tokenizer must agree in size: runtimes such as ExecuTorch's runner
    sample only over the tokenizer's ids, so an output the tokenizer cannot name would make the
    reference and the artifacts disagree. Placeholders are ordinary (not special) tokens so that every
    runtime decodes them to the same text."""
    missing = size - tokenizer.get_vocab_size()
    if missing < 0:
        raise ValueError(f"tokenizer already has {tokenizer.get_vocab_size()} tokens, more than {size}")
    if missing:
        tokenizer.add_tokens([f"<unused_{i}>" for i in range(missing)])
    return tokenizer
