"""Published latency figures the roofline projection is calibrated on and validated against, each
with its source and the conditions it was measured under (`projection.validate()` prints the errors)."""

from __future__ import annotations

from dataclasses import dataclass

# --- published figures: the calibration and the validation set ---------------------------------------

LLAMA_CPP_MOBILEVLM = "llama.cpp docs/multimodal/MobileVLM.md (github.com/ggml-org/llama.cpp), MobileVLM 1.7B / V2 1.7B, q4_k_s decoder + f16 mmproj"
EXECUTORCH_LLAMA = "ExecuTorch examples/models/llama/README.md (github.com/pytorch/executorch), 'Performance' tables, prompt length 64, KleidiAI on"


@dataclass(frozen=True)
class PublishedFigure:
    id: str
    model: str
    recipe: str
    device: str
    threads: int
    runtime: str
    metric: str  # decode_tok_s | prefill_tok_s | encode_s
    value: float
    tokens: int  # prompt tokens (prefill) or the average context while decoding
    role: str  # calibration | held-out
    source: str
    note: str = ""
    positions: int = 1  # positions computed per decoded token (a fixed-shape Neural Engine model runs its whole window)


COREML_LLM_CLI = ("coreml-llm-cli README (github.com/smpanaro/coreml-llm-cli), 'Performance': Llama 2 7B on the Neural Engine, "
                  "--max-new-tokens 80; the model processes 64 tokens per call against a 448-token cache")

# Decode contexts: prompt tokens + half the generated tokens of the logged run. Threads: as logged
# (-t 4 on the phones; llama.cpp's default, the physical core count, on the i7; ExecuTorch's runner
# default, its "performant" cores = the 6 non-little cores of the Snapdragon 8 Gen 3).
PUBLISHED: tuple[PublishedFigure, ...] = (
    PublishedFigure("sd888-encode", "mobilevlm-1.7b", "q4_k_s", "snapdragon-888", 4, "llama.cpp-cpu-arm", "encode_s", 21.149, 0, "calibration", LLAMA_CPP_MOBILEVLM),
    PublishedFigure("sd888-prefill", "mobilevlm-1.7b", "q4_k_s", "snapdragon-888", 4, "llama.cpp-cpu-arm", "prefill_tok_s", 19.74, 246, "calibration", LLAMA_CPP_MOBILEVLM),
    PublishedFigure("sd888-decode", "mobilevlm-1.7b", "q4_k_s", "snapdragon-888", 4, "llama.cpp-cpu-arm", "decode_tok_s", 14.12, 249, "calibration", LLAMA_CPP_MOBILEVLM),
    PublishedFigure("sd888-paper-decode", "mobilevlm-1.7b", "q4_k_s", "snapdragon-888", 4, "llama.cpp-cpu-arm", "decode_tok_s", 21.5, 256, "held-out",
                    "MobileVLM paper (arXiv 2312.16886), abstract and latency table: 21.5 tokens/s on a Snapdragon 888 CPU, 4-bit llama.cpp",
                    "threads and context not stated (4 and 256 assumed); the same model on the same chip as sd888-decode, 1.5x faster"),
    PublishedFigure("sd778g-encode", "mobilevlm-1.7b", "q4_k_s", "snapdragon-778g", 4, "llama.cpp-cpu-arm", "encode_s", 18.729, 0, "held-out", LLAMA_CPP_MOBILEVLM),
    PublishedFigure("sd778g-prefill", "mobilevlm-1.7b", "q4_k_s", "snapdragon-778g", 4, "llama.cpp-cpu-arm", "prefill_tok_s", 23.52, 191, "held-out", LLAMA_CPP_MOBILEVLM),
    PublishedFigure("sd778g-decode", "mobilevlm-1.7b", "q4_k_s", "snapdragon-778g", 4, "llama.cpp-cpu-arm", "decode_tok_s", 13.92, 198, "held-out", LLAMA_CPP_MOBILEVLM),
    PublishedFigure("sd778g-v2-encode", "mobilevlm-v2-1.7b", "q4_k_s", "snapdragon-778g", 4, "llama.cpp-cpu-arm", "encode_s", 20.610, 0, "held-out", LLAMA_CPP_MOBILEVLM),
    PublishedFigure("sd778g-v2-prefill", "mobilevlm-v2-1.7b", "q4_k_s", "snapdragon-778g", 4, "llama.cpp-cpu-arm", "prefill_tok_s", 21.12, 191, "held-out", LLAMA_CPP_MOBILEVLM),
    PublishedFigure("sd778g-v2-decode", "mobilevlm-v2-1.7b", "q4_k_s", "snapdragon-778g", 4, "llama.cpp-cpu-arm", "decode_tok_s", 12.83, 284, "held-out", LLAMA_CPP_MOBILEVLM),
    PublishedFigure("i7-10750h-encode", "mobilevlm-1.7b", "q4_k_s", "intel-i7-10750h", 6, "llama.cpp-cpu-x86", "encode_s", 2.731, 0, "calibration", LLAMA_CPP_MOBILEVLM),
    PublishedFigure("i7-10750h-prefill", "mobilevlm-1.7b", "q4_k_s", "intel-i7-10750h", 6, "llama.cpp-cpu-x86", "prefill_tok_s", 93.52, 190, "calibration", LLAMA_CPP_MOBILEVLM),
    PublishedFigure("i7-10750h-decode", "mobilevlm-1.7b", "q4_k_s", "intel-i7-10750h", 6, "llama.cpp-cpu-x86", "decode_tok_s", 27.34, 196, "calibration", LLAMA_CPP_MOBILEVLM),
    PublishedFigure("i7-10750h-v2-encode", "mobilevlm-v2-1.7b", "q4_k_s", "intel-i7-10750h", 6, "llama.cpp-cpu-x86", "encode_s", 3.224, 0, "held-out", LLAMA_CPP_MOBILEVLM),
    PublishedFigure("i7-10750h-v2-prefill", "mobilevlm-v2-1.7b", "q4_k_s", "intel-i7-10750h", 6, "llama.cpp-cpu-x86", "prefill_tok_s", 76.77, 190, "held-out", LLAMA_CPP_MOBILEVLM),
    PublishedFigure("i7-10750h-v2-decode", "mobilevlm-v2-1.7b", "q4_k_s", "intel-i7-10750h", 6, "llama.cpp-cpu-x86", "decode_tok_s", 25.34, 301, "held-out", LLAMA_CPP_MOBILEVLM),
    PublishedFigure("orin-gpu-encode", "mobilevlm-1.7b", "q4_k_s", "jetson-agx-orin", 1, "llama.cpp-cuda", "encode_s", 0.2966, 0, "calibration", LLAMA_CPP_MOBILEVLM, "GPU (--n-gpu-layers 999); Orin variant not named, AGX Orin 64GB assumed"),
    PublishedFigure("orin-gpu-prefill", "mobilevlm-1.7b", "q4_k_s", "jetson-agx-orin", 1, "llama.cpp-cuda", "prefill_tok_s", 801.72, 246, "calibration", LLAMA_CPP_MOBILEVLM, "GPU"),
    PublishedFigure("orin-gpu-decode", "mobilevlm-1.7b", "q4_k_s", "jetson-agx-orin", 1, "llama.cpp-cuda", "decode_tok_s", 65.58, 249, "calibration", LLAMA_CPP_MOBILEVLM, "GPU"),
    PublishedFigure("orin-gpu-decode-2", "mobilevlm-1.7b", "q4_k_s", "jetson-agx-orin", 1, "llama.cpp-cuda", "decode_tok_s", 66.01, 237, "held-out", LLAMA_CPP_MOBILEVLM, "GPU; a second run of the same setup (case 2), so only a repeatability check"),
    PublishedFigure("op12-1b-spinquant-prefill", "llama-3.2-1b", "et-spinquant", "snapdragon-8-gen-3", 6, "executorch-xnnpack", "prefill_tok_s", 260.5, 64, "calibration", EXECUTORCH_LLAMA, "OnePlus 12"),
    PublishedFigure("op12-1b-spinquant-decode", "llama-3.2-1b", "et-spinquant", "snapdragon-8-gen-3", 6, "executorch-xnnpack", "decode_tok_s", 50.2, 96, "calibration", EXECUTORCH_LLAMA, "OnePlus 12"),
    PublishedFigure("op12-3b-spinquant-prefill", "llama-3.2-3b", "et-spinquant", "snapdragon-8-gen-3", 6, "executorch-xnnpack", "prefill_tok_s", 89.7, 64, "held-out", EXECUTORCH_LLAMA, "OnePlus 12"),
    PublishedFigure("op12-3b-spinquant-decode", "llama-3.2-3b", "et-spinquant", "snapdragon-8-gen-3", 6, "executorch-xnnpack", "decode_tok_s", 19.7, 96, "held-out", EXECUTORCH_LLAMA, "OnePlus 12"),
    PublishedFigure("op12-1b-qat-lora-decode", "llama-3.2-1b", "et-spinquant", "snapdragon-8-gen-3", 6, "executorch-xnnpack", "decode_tok_s", 45.8, 96, "held-out", EXECUTORCH_LLAMA, "OnePlus 12; QAT+LoRA keeps bf16 LoRA adapters (not counted)"),
    PublishedFigure("op12-1b-bf16-decode", "llama-3.2-1b", "bf16", "snapdragon-8-gen-3", 6, "executorch-xnnpack", "decode_tok_s", 19.2, 96, "held-out", EXECUTORCH_LLAMA, "OnePlus 12"),
    PublishedFigure("op12-1b-bf16-prefill", "llama-3.2-1b", "bf16", "snapdragon-8-gen-3", 6, "executorch-xnnpack", "prefill_tok_s", 60.3, 64, "held-out", EXECUTORCH_LLAMA, "OnePlus 12"),
    PublishedFigure("op12-3b-bf16-decode", "llama-3.2-3b", "bf16", "snapdragon-8-gen-3", 6, "executorch-xnnpack", "decode_tok_s", 7.6, 96, "held-out", EXECUTORCH_LLAMA, "OnePlus 12"),
    PublishedFigure("op12-3b-bf16-prefill", "llama-3.2-3b", "bf16", "snapdragon-8-gen-3", 6, "executorch-xnnpack", "prefill_tok_s", 21.2, 64, "held-out", EXECUTORCH_LLAMA, "OnePlus 12"),
    PublishedFigure("op12-llama3-8b-decode", "llama-3-8b", "8da4w-g128-emb4", "snapdragon-8-gen-3", 6, "executorch-xnnpack", "decode_tok_s", 10.85, 128, "held-out", EXECUTORCH_LLAMA, "OnePlus 12; context not published, 128 assumed"),
    PublishedFigure("s24-llama3-8b-decode", "llama-3-8b", "8da4w-g128-emb4", "snapdragon-8-gen-3", 6, "executorch-xnnpack", "decode_tok_s", 10.91, 128, "held-out", EXECUTORCH_LLAMA, "Galaxy S24, US model (Snapdragon 8 Gen 3) assumed"),
    PublishedFigure("s22-llama3-8b-decode", "llama-3-8b", "8da4w-g128-emb4", "snapdragon-8-gen-1", 4, "executorch-xnnpack", "decode_tok_s", 7.85, 128, "held-out", EXECUTORCH_LLAMA, "Galaxy S22, US model (Snapdragon 8 Gen 1) assumed; 4 performant cores"),
    # Core ML on the Neural Engine: one model version (a76a14d) measured on five chips. Calibration on
    # one chip, the other four held out; they test the device scaling (Neural Engine bandwidth and fp16 rate).
    PublishedFigure("m1max-ane-llama2-7b-decode", "llama-2-7b", "palettize4-fp16head", "apple-m1-max", 1, "coreml-ane", "decode_tok_s", 4.97, 512, "calibration",
                    COREML_LLM_CLI, "model version 1 (a76a14d)", positions=64),
    PublishedFigure("m2-ane-llama2-7b-decode", "llama-2-7b", "palettize4-fp16head", "apple-m2", 1, "coreml-ane", "decode_tok_s", 5.51, 512, "held-out",
                    COREML_LLM_CLI, "model version 1; published 5.51 +- 0.56", positions=64),
    PublishedFigure("m3-ane-llama2-7b-decode", "llama-2-7b", "palettize4-fp16head", "apple-m3", 1, "coreml-ane", "decode_tok_s", 7.12, 512, "held-out",
                    COREML_LLM_CLI, "model version 1", positions=64),
    PublishedFigure("m3max-ane-llama2-7b-decode", "llama-2-7b", "palettize4-fp16head", "apple-m3-max", 1, "coreml-ane", "decode_tok_s", 7.6, 512, "held-out",
                    COREML_LLM_CLI, "model version 1; M3 Max variant (16- or 14-core) not named, 16-core assumed", positions=64),
    PublishedFigure("m4-ane-llama2-7b-decode", "llama-2-7b", "palettize4-fp16head", "apple-m4", 1, "coreml-ane", "decode_tok_s", 7.76, 512, "held-out",
                    COREML_LLM_CLI, "model version 1 on an M4 iPad (iPad Pro 2024)", positions=64),
    PublishedFigure("m1max-ane-llama2-7b-v2-decode", "llama-2-7b", "palettize4-fp16head", "apple-m1-max", 1, "coreml-ane", "decode_tok_s", 7.02, 512, "held-out",
                    COREML_LLM_CLI, "the current model version (8x8-reshaped MLP convolutions, split-einsum attention): 1.41x version 1 on the same chip, "
                    "a software gain the profile (calibrated on version 1) does not contain", positions=64),
)
