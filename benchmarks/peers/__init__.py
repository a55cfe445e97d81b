"""Peers: the same weights as a bundle, run by the tool a user would pick instead of our artifacts,
measured in the same `mobilevlm bench` run with the same prompts, threads and decode tokens.

    mobilevlm bench BUNDLE --peers llama.cpp,ort-genai,executorch-llm

Each peer is built from the bundle's source checkpoint (manifest `model.source`, or `--model`) with
that tool's own path, cached under ~/.cache/mobilevlm/peers/<checkpoint hash>/<tool>-<quant>/ (override:
$MOBILEVLM_PEERS_CACHE) so a repeated bench does not rebuild it, then measured by the benchmark worker
in a fresh process like every contender. Records are named `peer-<tool>-<quant>`.

- `llama.cpp` (llamacpp.py): our GGUF exporter (export/gguf.py), quantized by llama.cpp's own
  `llama_model_quantize`, run through llama-cpp-python. Recipes q4_0 and q4_k_m.
- `ort-genai` (ortgenai.py): our `hf` export fed to ONNX Runtime GenAI's model builder (int4, CPU),
  run through `onnxruntime_genai`. Decoder only (the builder has no MobileVLM vision path).
- `executorch-llm` (executorch_llm.py): ExecuTorch's own LLM export (`export_llama`: XNNPACK, 8da4w
  group 32, KV cache with its custom SDPA op) of the decoder weights in Meta's checkpoint layout
  (`use_hf_rope`, so no q/k permutation), run through `executorch.runtime` with its llm custom ops.
  Decoder only.

A peer whose tool is not installed, or that cannot represent the model, gives a record with
`skipped: <reason>`; a peer that can run only the text decoder says so in `scope` (`text decoder`)
and has no image-encode figure, so its TTFT is text-only and not comparable with a contender's.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from mobilevlm.errors import MobileVLMError

# peer tool -> module in this package
PEERS: dict[str, str] = {
    "llama.cpp": "llamacpp",
    "ort-genai": "ortgenai",
    "executorch-llm": "executorch_llm",
}
INFO = "peer.json"


class PeerSkipped(Exception):
    """The peer cannot be built or run here (tool missing, model not representable); the message says why."""


@dataclass
class Peer:
    tool: str
    quant: str
    backend: str  # the runtime family, as charts / projection group records
    folder: Path | None = None
    skipped: str | None = None
    info: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"peer-{self.tool}-{self.quant}"


def parse_peers(text: str | None) -> tuple[str, ...]:
    """`llama.cpp,ort-genai` -> ('llama.cpp', 'ort-genai'); an unknown name is an error."""
    if not text:
        return ()
    names = tuple(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
    unknown = [n for n in names if n not in PEERS]
    if unknown:
        raise MobileVLMError(f"unknown peer {unknown[0]!r}; expected one of {', '.join(PEERS)}")
    return names


def module(tool: str):
    return importlib.import_module(f"{__name__}.{PEERS[tool]}")


def cache_root() -> Path:
    return Path(os.environ.get("MOBILEVLM_PEERS_CACHE") or Path.home() / ".cache" / "mobilevlm" / "peers")


def checkpoint_hash(model_dir: Path) -> str:
    """sha256 over the checkpoint's files (names and contents), so a changed weight rebuilds every peer."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(model_dir).rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(model_dir)).encode() + b"\0")
        with open(path, "rb") as handle:
            while block := handle.read(1 << 24):
                digest.update(block)
    return digest.hexdigest()[:16]


def load_info(folder: Path) -> dict:
    return json.loads((Path(folder) / INFO).read_text())


def build_peers(tools: tuple[str, ...], model_dir: Path | None, context: int, log: Callable[[str], None] = print,
                cache: Path | None = None) -> list[Peer]:
    """One `Peer` per (tool, quant): built (or found in the cache), or skipped with the reason."""
    peers: list[Peer] = []
    if not tools:
        return peers
    digest = None
    if model_dir is None or not (Path(model_dir) / "config.json").is_file():
        reason = f"source checkpoint {model_dir} is not on this machine (pass --model); peers are built from it"
    else:
        reason, digest = None, checkpoint_hash(Path(model_dir))
    for tool in tools:
        mod = module(tool)
        for quant in mod.QUANTS:
            peer = Peer(tool, quant, mod.BACKEND)
            peers.append(peer)
            if reason:
                peer.skipped = reason
                continue
            try:
                mod.available()
            except PeerSkipped as exc:
                peer.skipped = str(exc)
                continue
            target = Path(cache or cache_root()) / digest / f"{tool}-{quant}"
            if not (target / INFO).is_file():
                log(f"{peer.name}: building from {model_dir} ...")
                target.parent.mkdir(parents=True, exist_ok=True)
                scratch = Path(tempfile.mkdtemp(prefix=f".{tool}-{quant}-", dir=target.parent))
                try:
                    info = mod.build(Path(model_dir), quant, scratch / "peer", context)
                    info = {"tool": tool, "quant": quant, "checkpoint": str(model_dir), "checkpoint_sha256_16": digest, "context_length": context, **info}
                    (scratch / "peer" / INFO).write_text(json.dumps(info, indent=1))
                    shutil.rmtree(target, ignore_errors=True)
                    os.replace(scratch / "peer", target)
                except PeerSkipped as exc:
                    peer.skipped = str(exc)
                    continue
                finally:
                    shutil.rmtree(scratch, ignore_errors=True)
            else:
                log(f"{peer.name}: cached build {target}")
            peer.folder = target
            peer.info = load_info(target)
    return peers


def load_peer(folder: Path, bundle):
    """The worker's contender for a built peer folder (encode / embed / decode, name, backend, file_bytes)."""
    info = load_info(folder)
    return module(info["tool"]).Contender(Path(folder), info, bundle)
