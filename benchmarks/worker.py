"""One contender, measured in a fresh process (so load time and peak memory are its own).

    python -m mobilevlm.benchmarks.worker --bundle B --contender NAME --out result.json [options]

A contender is an artifact of the bundle (by name) or `pytorch` (the reference checkpoint the bundle
was exported from). Each exposes the same three calls as the model methods, and the same timing code
runs over them: load, image encode, prefill at several prompt lengths, time to first token (image
encode + prefill of the real prompt + first token), decode tokens/s, peak RSS, file size. A warm-up
precedes repeated runs; each figure is reported as median, min and max.
"""

from __future__ import annotations

import argparse
import importlib
import json
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def contender_module(bundle, name: str):
    """benchmarks/contenders/<backend>.py: its `Contender(bundle, artifact or model dir)` exposes
    encode / embed / decode (the three model methods), `name`, `backend` and `file_bytes`."""
    backend = "pytorch" if name == "pytorch" else bundle.artifact(name)["backend"]
    return importlib.import_module(f"mobilevlm.benchmarks.contenders.{backend}")


def load_contender(bundle, name: str, model_dir: Path | None):
    module = contender_module(bundle, name)
    if name == "pytorch":
        return module.Contender(bundle, model_dir or Path(bundle.manifest["model"]["source"]))
    return module.Contender(bundle, bundle.artifact(name))


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def prompt_chunks(contender, manifest: dict, image_u8: torch.Tensor, question: str, tokenizer):
    """The real prompt as the decoder sees it: text before the image, the image, text after it."""
    prompt = manifest["prompt"]
    before = torch.tensor([prompt["before_image_ids"]])
    after = torch.tensor([tokenizer.encode(prompt["after_image"].replace(prompt["prompt_slot"], question))])
    return contender.embed(before), contender.encode(image_u8), contender.embed(after)


def greedy_tokens(contender, manifest: dict, image_u8: torch.Tensor, question: str, tokenizer, count: int) -> dict:
    """`count` greedy token ids for the prompt (no stop tokens: every position is compared) and the
    ten largest logits of the first one (random-weight models often repeat one token)."""
    pos, tokens, top = 0, [], None
    for chunk in prompt_chunks(contender, manifest, image_u8, question, tokenizer):
        logits = contender.decode(chunk, torch.arange(pos, pos + chunk.shape[1]))
        pos += chunk.shape[1]
    count = min(count, manifest["prompt"]["context_length"] - pos)
    for _ in range(count):
        if top is None:
            values, ids = torch.as_tensor(logits).flatten().float().topk(10)
            top = {"ids": ids.tolist(), "values": values.tolist()}
        tokens.append(int(logits.argmax()))
        if len(tokens) < count:
            logits = contender.decode(contender.embed(torch.tensor([[tokens[-1]]])), torch.tensor([pos]))
            pos += 1
    return {"tokens": tokens, "first_top10": top}


def measure(contender, manifest: dict, image_u8: torch.Tensor, question: str, prompt_lengths: list[int], repeats: int, warmup: int, decode_tokens: int, tokenizer) -> dict:
    prompt = manifest["prompt"]
    context = prompt["context_length"]
    before = torch.tensor([prompt["before_image_ids"]])
    after = torch.tensor([tokenizer.encode(prompt["after_image"].replace(prompt["prompt_slot"], question))])
    width = manifest["model"]["config"]["text"]["hidden_size"]
    vocab = manifest["model"]["config"]["text"]["vocab_size"]
    # A text-decoder-only peer (benchmarks/peers/) has no image path: its prompt is the text around
    # the image with random token ids standing in for the image's positions, so that its decode runs
    # at the same cache positions as a multimodal contender's (each decoded token reads the whole
    # filled KV cache: a shorter prompt would make it look faster). Prefill is fed random token ids
    # too (its `embed` passes ids through) instead of random embedding rows.
    text_only = getattr(contender, "text_only", False)
    generator = torch.Generator().manual_seed(0)
    image_stand_in = torch.randint(0, vocab, (1, int(prompt.get("image_tokens", 0))), generator=generator) if text_only else None

    def prefill_input(n: int) -> torch.Tensor:
        if text_only:
            return contender.embed(torch.randint(0, vocab, (1, n), generator=generator))
        return torch.randn(1, n, width)

    def first_token() -> tuple[int, int]:
        pos = 0
        for chunk in ((contender.embed(before), contender.embed(image_stand_in), contender.embed(after)) if text_only else (contender.embed(before), contender.encode(image_u8), contender.embed(after))):
            logits = contender.decode(chunk, torch.arange(pos, pos + chunk.shape[1]))
            pos += chunk.shape[1]
        return int(logits.argmax()), pos

    def decode_run(token: int, pos: int) -> float:
        steps = min(decode_tokens, context - pos - 1)
        start = time.perf_counter()
        for i in range(steps):
            token = int(contender.decode(contender.embed(torch.tensor([[token]])), torch.tensor([pos + i])).argmax())
        return steps / (time.perf_counter() - start)

    lengths = [n for n in prompt_lengths if n < context]
    for _ in range(warmup):
        token, pos = first_token()
        decode_run(token, pos)
        for n in lengths:
            contender.decode(prefill_input(n), torch.arange(n))
    encode, ttft, decode, prefill = [], [], [], {n: [] for n in lengths}
    for _ in range(repeats):
        if not text_only:
            encode.append(1e3 * timed(lambda: contender.encode(image_u8))[0])
        seconds, (token, pos) = timed(first_token)
        ttft.append(1e3 * seconds)
        decode.append(decode_run(token, pos))
        for n in lengths:
            embeds = prefill_input(n)
            prefill[n].append(n / timed(lambda: contender.decode(embeds, torch.arange(n)))[0])
    return {
        "image_encode_ms": None if text_only else spread(encode),  # None: this peer has no image path (not measured)
        **({"scope": "text decoder", "ttft_note": "no image encode: text tokens fill the image's positions (decode starts where a full prompt's does); not comparable with a full prompt's TTFT"} if text_only else {}),
        "ttft_ms": spread(ttft),
        "prompt_tokens": pos,
        "decode_tok_s": spread(decode),
        "decode_tokens": min(decode_tokens, context - pos - 1),
        "prefill_tok_s": {str(n): spread(v) for n, v in prefill.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--contender", required=True)
    parser.add_argument("--model", type=Path, help="reference checkpoint for the pytorch contender")
    parser.add_argument("--peer-dir", type=Path, help="a built peer folder (benchmarks/peers/): measured instead of a bundle contender")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompt-lengths", default="16,64")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--greedy-tokens", type=int, default=0, help="also record this many greedy token ids of the first parity case")
    parser.add_argument("--greedy-only", action="store_true", help="record the greedy tokens only, no timings")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)  # also sizes ExecuTorch's thread pool in this process
    from PIL import Image

    from mobilevlm.export.bundle import load_bundle
    from mobilevlm.processing import ImageProcessor, Tokenizer

    bundle = load_bundle(args.bundle)
    manifest = bundle.manifest
    pre = manifest["preprocessing"]
    case = manifest["parity"]["cases"][0]
    image_u8 = ImageProcessor.from_spec(pre).prepare_views(Image.open(bundle.path(case["image"]))).contiguous()
    tokenizer = Tokenizer(bundle.path(manifest["tokenizer"]["file"]))
    if args.peer_dir:
        from mobilevlm.benchmarks.peers import load_info, load_peer, module as peer_module

        tool = peer_module(load_info(args.peer_dir)["tool"])
        if hasattr(tool, "prepare"):
            tool.prepare()  # runtime library start-up, not model load: kept out of load_s
        started = time.perf_counter()
        contender = load_peer(args.peer_dir, bundle)
    else:
        module = contender_module(bundle, args.contender)
        if hasattr(module, "prepare"):
            module.prepare()  # runtime library start-up, not model load: kept out of load_s
        started = time.perf_counter()
        contender = load_contender(bundle, args.contender, args.model)
    load_s = time.perf_counter() - started
    if args.peer_dir and contender.name != args.contender:
        raise SystemExit(f"--contender {args.contender!r} names {contender.name!r}")
    result = {"contender": contender.name, "backend": contender.backend, "threads": args.threads}
    if args.greedy_tokens or args.greedy_only:
        result["greedy"] = {"case": case["id"], **greedy_tokens(contender, manifest, image_u8, case["question"], tokenizer, args.greedy_tokens or 8)}
    if not args.greedy_only:
        metrics = measure(contender, manifest, image_u8, case["question"], [int(x) for x in args.prompt_lengths.split(",") if x], args.repeats, args.warmup, args.decode_tokens, tokenizer)
        metrics["load_s"] = load_s
        metrics["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        metrics["file_mb"] = contender.file_bytes / 1e6
        result["metrics"] = metrics
    args.out.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
