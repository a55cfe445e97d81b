"""Peer `ort-genai`: the checkpoint through our `hf` export (export/hf.py, a transformers Llama folder
in fp32), then ONNX Runtime GenAI's own model builder

    python -m onnxruntime_genai.models.builder -m <name> -i <hf folder> -o OUT -p int4 -e cpu

(int4: MatMulNBits weights, the builder's defaults), run through `onnxruntime_genai` (Model, Generator,
append_tokens). The builder has no MobileVLM vision path, so this peer is the text decoder only
(`scope: text decoder`), fed token ids; threads via the genai config's `intra_op_num_threads`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from mobilevlm.fileio import disk_bytes

QUANTS = ("int4",)
BACKEND = "onnxruntime-genai"
SCOPE_REASON = "ONNX Runtime GenAI's model builder builds the Llama decoder; it has no MobileVLM vision tower / projector"


def available() -> None:
    from . import PeerSkipped

    try:
        import onnxruntime_genai  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        raise PeerSkipped(f"ort-genai peer needs onnxruntime-genai (the `onnx` extra) and transformers: {exc.name} is not installed") from None


def build(model_dir: Path, quant: str, out: Path, context: int) -> dict:
    import onnxruntime_genai

    from mobilevlm.checkpoint import load_model, load_processor
    from mobilevlm.errors import ExportError
    from mobilevlm.export.pipeline import get_backend

    from . import PeerSkipped

    model, processor = load_model(model_dir).eval(), load_processor(model_dir)
    hf = get_backend("hf")
    try:
        hf.export(model, processor, hf.parse_recipe("fp32"), out / "hf", context)
    except ExportError as exc:
        raise PeerSkipped(f"ort-genai: our hf export refuses this model: {exc}") from None
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", "mobilevlm-decoder", "-i", str(out / "hf"), "-o", str(out / "onnx"),
               "-p", quant, "-e", "cpu", "-c", str(out / "builder-cache")]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode or not (out / "onnx" / "genai_config.json").is_file():
        tail = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()][-3:]
        raise PeerSkipped(f"onnxruntime_genai.models.builder failed ({result.returncode}): {' | '.join(tail)}")
    for scratch in ("builder-cache",):
        import shutil

        shutil.rmtree(out / scratch, ignore_errors=True)
    graph = (out / "onnx" / "model.onnx").read_bytes()
    return {"scope": "text decoder", "scope_reason": SCOPE_REASON, "files": "onnx", "hf_folder": "hf",
            "builder": " ".join(["python", *command[1:]]).replace(str(out), "<peer>"), "onnxruntime_genai": onnxruntime_genai.__version__,
            "matmul_nbits_nodes": graph.count(b"MatMulNBits")}


class Contender:
    backend = BACKEND
    text_only = True

    def __init__(self, folder: Path, info: dict, bundle):
        import onnxruntime_genai as og

        self.og = og
        self.name = f"peer-ort-genai-{info['quant']}"
        onnx = folder / info["files"]
        self.file_bytes = disk_bytes(onnx)
        config = og.Config(str(onnx))
        threads = torch.get_num_threads()
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
        self.model = og.Model(config)
        self.context = min(info["context_length"], json.loads((onnx / "genai_config.json").read_text())["model"]["context_length"])
        self.generator = None

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return ids

    def decode(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        start = int(pos[0])
        if start == 0:
            params = self.og.GeneratorParams(self.model)
            params.set_search_options(max_length=self.context, do_sample=False)
            self.generator = self.og.Generator(self.model, params)
        elif start != self.generator.token_count():
            raise ValueError(f"{self.name}: decode at position {start}, but the generator holds {self.generator.token_count()} tokens")
        self.generator.append_tokens(np.ascontiguousarray(ids.numpy(), dtype=np.int32))
        return torch.from_numpy(np.asarray(self.generator.get_logits())).reshape(-1)
