"""Fuzz the tokenizer path: a hostile tokenizer.json (first byte even) or a hostile prompt given to a
valid tokenizer (first byte odd), through the processor's prompt building and decoding.

    python fuzz/fuzz_tokenizer.py -max_total_time=3600      (see SECURITY.md)
"""

from __future__ import annotations

from _driver import instrumented, main, micro_config, scratch

with instrumented("mobilevlm.processing"):
    from mobilevlm.processing import Processor, Tokenizer, train_tokenizer

FOLDER = scratch()
VALID = FOLDER / "valid.json"
HOSTILE = FOLDER / "tokenizer.json"
CONFIG = micro_config()
CORPUS = ["USER: What color is the circle? ASSISTANT: red", "émoji ünïcödé 日本語 text", "How many objects? 3"] * 10
train_tokenizer(CORPUS, vocab_size=300).save(str(VALID))
PROCESSOR = Processor.from_config(CONFIG, Tokenizer(VALID))


def exercise(processor: Processor, prompt: str) -> None:
    before, after = processor.prompt_ids(prompt)
    ids = before + after
    processor.tokenizer.decode(ids)
    for token in ids[:64]:
        processor.tokenizer.token_bytes(token)


def target(data: bytes) -> None:
    if not data:
        return
    if data[0] % 2:
        exercise(PROCESSOR, data[1:].decode("utf-8", "surrogateescape"))
        return
    HOSTILE.write_bytes(data[1:])
    exercise(Processor.from_config(CONFIG, Tokenizer(HOSTILE)), "What color is the circle?")


def seeds() -> list[bytes]:
    return [b"\x00" + VALID.read_bytes(), b"\x01What color is the circle?", b"\x01\xff\xfe \xe6\x97\xa5"]


if __name__ == "__main__":
    main(target, seeds)
