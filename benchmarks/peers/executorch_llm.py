"""Peer `executorch-llm`: ExecuTorch's own LLM export path (executorch ships
`executorch.examples.models.llama.export_llama`) applied to the checkpoint's text decoder:

    python -m executorch.examples.models.llama.export_llama -c <meta>.pth -p params.json \
        -kv --use_sdpa_with_kv_cache -X -qmode 8da4w -G 32 -d fp32 \
        --max_seq_length C --max_context_length C -o OUT -n model.pte

- weights: our `TextDecoder` (mobilevlm/text.py, Hugging Face Llama names) renamed to the Meta
  checkpoint layout export_llama reads (tok_embeddings, layers.N.attention.wq/wk/wv/wo,
  feed_forward.w1/w2/w3, attention_norm, ffn_norm, norm, output). No q/k permutation: our rotary is
  the Hugging Face half-split ("rotate_half") layout, and params.json sets `use_hf_rope: true`, which
  makes export_llama's Rope use the same `hf_apply_rotary_emb`. Tied embeddings are written as two
  copies (`output.weight` = `tok_embeddings.weight`); grouped KV heads map to `n_kv_heads`.
- params.json: dim, n_layers, n_heads, n_kv_heads, vocab_size, hidden_dim (the SwiGLU width, given
  explicitly so no `multiple_of` rounding applies), norm_eps, rope_theta, use_hf_rope.
- the checkpoint is written outside the peer folder, in a path without "8da4w" / "int8" in it:
  export_llama treats such a path as already quantized.
- runtime: `executorch.runtime`, with ExecuTorch's llm custom ops (custom SDPA / KV-cache update)
  and the quantized kernels registered first; the method is `forward(tokens [1, T], input_pos [1])`
  (start position; the KV cache lives in the program) and returns the last position's logits.

The builder has no MobileVLM vision path, so this peer is the text decoder only (`scope: text decoder`).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

QUANTS = ("8da4w",)
BACKEND = "executorch"
GROUP_SIZE = 32
SCOPE_REASON = "ExecuTorch's export_llama builds the Llama decoder; it has no MobileVLM vision tower / projector"
EXPORT_MODULE = "executorch.examples.models.llama.export_llama"


def available() -> None:
    from . import PeerSkipped

    import importlib.util

    try:
        found = importlib.util.find_spec(EXPORT_MODULE) is not None
        import executorch.runtime  # noqa: F401
    except ImportError:
        found = False
    if not found:
        raise PeerSkipped("executorch-llm peer needs executorch (the `executorch` extra) with examples.models.llama.export_llama, which is not installed here")


def meta_params(config) -> dict:
    """params.json for export_llama's ModelArgs, from our TextConfig."""
    return {"dim": config.hidden_size, "n_layers": config.num_layers, "n_heads": config.num_heads, "n_kv_heads": config.num_kv_heads,
            "vocab_size": config.vocab_size, "hidden_dim": config.intermediate_size, "norm_eps": config.rms_norm_eps,
            "rope_theta": config.rope_theta, "use_hf_rope": True}


def meta_state_dict(text) -> dict[str, torch.Tensor]:
    """Our TextDecoder's weights under Meta's Llama checkpoint names (fp32, contiguous, untied)."""
    names = {"embed_tokens.weight": "tok_embeddings.weight", "norm.weight": "norm.weight", "lm_head.weight": "output.weight"}
    per_layer = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
                 "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
                 "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm"}
    out = {}
    # keep_vars + no dedup: a tied lm_head is listed under both names (state_dict keeps both keys)
    for key, tensor in text.state_dict().items():
        if key in names:
            new = names[key]
        else:
            parts = key.split(".")  # layers.N.<module path>.weight
            if parts[0] != "layers" or parts[-1] != "weight":
                continue
            new = f"layers.{parts[1]}.{per_layer['.'.join(parts[2:-1])]}.weight"
        out[new] = tensor.detach().float().clone().contiguous()
    if "output.weight" not in out:  # tied embeddings not listed separately
        out["output.weight"] = out["tok_embeddings.weight"].clone()
    return out


def export_command(checkpoint: Path, params: Path, out: Path, context: int, quant: str = "8da4w", group_size: int = GROUP_SIZE) -> list[str]:
    command = [sys.executable, "-m", EXPORT_MODULE, "-c", str(checkpoint), "-p", str(params), "-kv", "--use_sdpa_with_kv_cache", "-X",
               "-d", "fp32", "--max_seq_length", str(context), "--max_context_length", str(context), "-o", str(out), "-n", str(out / "model.pte")]
    if quant != "fp32":
        command += ["-qmode", quant, "-G", str(group_size)]
    return command


def export_pte(text, out: Path, context: int, quant: str = "8da4w", group_size: int = GROUP_SIZE) -> tuple[Path, list[str]]:
    """Run export_llama on `text`'s weights; returns (the .pte path, the command)."""
    from . import PeerSkipped

    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="mobilevlm-etllm-"))  # a path export_llama will not read as "pre-quantized"
    try:
        torch.save(meta_state_dict(text), scratch / "consolidated.pth")
        (scratch / "params.json").write_text(json.dumps(meta_params(text.config), indent=1))
        shutil.copy(scratch / "params.json", out / "params.json")
        command = export_command(scratch / "consolidated.pth", scratch / "params.json", out, context, quant, group_size)
        result = subprocess.run(command, capture_output=True, text=True, cwd=scratch)
        (out / "export.log").write_text(result.stdout + result.stderr)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    pte = out / "model.pte"
    if result.returncode or not pte.is_file():
        tail = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()][-3:]
        raise PeerSkipped(f"executorch-llm: export_llama failed ({result.returncode}): {' | '.join(tail)}")
    return pte, command


def build(model_dir: Path, quant: str, out: Path, context: int) -> dict:
    import executorch

    from mobilevlm.checkpoint import load_model

    text = load_model(model_dir).eval().text
    context = min(context, text.config.max_seq_len)
    pte, command = export_pte(text, out, context, quant)
    shown = [Path(command[0]).name, *command[1:]]
    shown[shown.index("-c") + 1], shown[shown.index("-p") + 1] = "<meta>.pth", "params.json"
    return {"scope": "text decoder", "scope_reason": SCOPE_REASON, "files": pte.name, "group_size": GROUP_SIZE, "max_seq_length": context,
            "builder": " ".join(shown).replace(str(out), "<peer>"), "executorch": getattr(executorch, "__version__", None) or _version("executorch"),
            "params": meta_params(text.config)}


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def load_runtime_ops() -> None:
    """ExecuTorch's llm custom ops (custom_sdpa, update_cache) and quantized kernels, registered in this
    process before a .pte that uses them is loaded."""
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401

    try:
        import executorch.kernels.quantized  # noqa: F401
    except ImportError:
        pass


def prepare() -> None:
    """Runtime library start-up, called by the worker before the timed load (as for the bundle's
    executorch contender): registering the ops imports torch-side libraries, which is not model load."""
    load_runtime_ops()
    import executorch.runtime  # noqa: F401


class Program:
    """A loaded export_llama .pte: `logits(tokens [1, T], start)` -> the last position's logits."""

    def __init__(self, pte: Path):
        load_runtime_ops()
        from executorch.runtime import Runtime

        self.program = Runtime.get().load_program(Path(pte))
        self.method = self.program.load_method("forward")

    def logits(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        out = self.method.execute((tokens.to(torch.long).reshape(1, -1).contiguous(), torch.tensor([start], dtype=torch.long)))[0]
        return out.reshape(-1, out.shape[-1])[-1]


class Contender:
    backend = BACKEND
    text_only = True

    def __init__(self, folder: Path, info: dict, bundle):
        self.name = f"peer-executorch-llm-{info['quant']}"
        pte = Path(folder) / info["files"]
        self.file_bytes = pte.stat().st_size
        self.program = Program(pte)
        self.context = info["max_seq_length"]

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return ids

    def decode(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        start = int(pos[0])
        if start + ids.shape[1] > self.context:
            raise ValueError(f"{self.name}: positions {start}..{start + ids.shape[1] - 1} exceed the exported max_seq_length {self.context}")
        return self.program.logits(ids, start)
