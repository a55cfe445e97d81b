"""Peer `executorch-llm`: ExecuTorch's own LLM export (executorch 1.4.1 ships
`executorch.examples.models.llama.export_llama`: 8da4w, its custom SDPA op and KV cache) of the same
Llama decoder weights.

Not wired yet: it needs the hf export's Llama weights converted to the Meta checkpoint layout that
export_llama reads (examples/models/llama/convert_weights.py), a params.json of the decoder shape, and
the exported .pte run with ExecuTorch's llm custom ops registered in the Python runtime. Until that is
done the peer reports itself skipped with that reason (never a made-up figure).
"""

from __future__ import annotations

from pathlib import Path

QUANTS = ("8da4w",)
BACKEND = "executorch"
REASON = ("executorch-llm peer not implemented yet: export_llama (executorch.examples.models.llama) needs the decoder converted to "
          "its Meta checkpoint layout + params.json and a runner with its llm custom ops; this harness does not build that path")


def available() -> None:
    from . import PeerSkipped

    import importlib.util

    try:
        found = importlib.util.find_spec("executorch.examples.models.llama.export_llama") is not None
    except ImportError:
        found = False
    if not found:
        raise PeerSkipped("executorch-llm peer needs executorch's examples.models.llama.export_llama, which this executorch does not ship")
    raise PeerSkipped(REASON)


def build(model_dir: Path, quant: str, out: Path, context: int) -> dict:
    from . import PeerSkipped

    raise PeerSkipped(REASON)
