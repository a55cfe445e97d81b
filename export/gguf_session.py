"""Running a GGUF pair in llama.cpp, through llama-cpp-python's C bindings (`llama_cpp.llama_cpp`,
`llama_cpp.mtmd_cpp`), the way a llama.cpp app does it:

- the text model is loaded with `llama_model_load_from_file`, a context with `llama_init_from_model`;
- the mmproj with `mtmd_init_from_file` (llama.cpp's multimodal library, libmtmd);
- a prompt is `mtmd_tokenize`d (llama.cpp's own tokenizer for the text parts, the image as a bitmap
  where the media marker stands) and evaluated with `mtmd_helper_eval_chunks`;
- generation is greedy over `llama_get_logits_ith`, one `llama_decode` per token, text from
  `llama_token_to_piece`.

The bindings expose the logits after every decode, so `forced_logits` is exact teacher forcing.
"""

from __future__ import annotations

import ctypes
from collections import deque
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mobilevlm.errors import ExportError, PromptError

# llama.cpp's log lines are kept here (the last ones are quoted when a load fails) instead of going
# to stderr; one callback for the process, referenced for as long as the module lives.
_LOG: deque[str] = deque(maxlen=50)
_CALLBACK = None


def _bindings():
    try:
        from llama_cpp import llama_cpp as ll
        from llama_cpp import mtmd_cpp as mtmd
    except ImportError as exc:
        raise ExportError(f"llama-cpp-python with its mtmd bindings is needed to run GGUF artifacts ({exc}); install the `gguf` extra (README)") from None
    global _CALLBACK
    if _CALLBACK is None:
        _CALLBACK = ll.llama_log_callback(lambda level, text, data: _LOG.append(text.decode("utf-8", "replace").rstrip()))
        ll.llama_backend_init()
        ll.llama_log_set(_CALLBACK, None)
        mtmd.mtmd_log_set(_CALLBACK, None)
        mtmd.mtmd_helper_log_set(_CALLBACK, None)
    return ll, mtmd


def _failure(message: str) -> ExportError:
    detail = [line for line in _LOG if any(k in line for k in ("rror", "ailed", "invalid", "nknown", "xception"))][-3:]
    return ExportError(message + (": " + " | ".join(detail) if detail else ""))


class LlamaCppRuntime:
    """A text GGUF + mmproj GGUF loaded in llama.cpp, with a context of `n_ctx` positions; with
    `mmproj_path` None, the text model alone (no mtmd context: text-only benchmark peers)."""

    def __init__(self, text_path: Path, mmproj_path: Path | None, n_ctx: int, threads: int, kv_type: str = "f16", flash_attention: str = "auto"):
        ll, mtmd = _bindings()
        self.ll, self.mtmd = ll, mtmd
        self.model = self.ctx = self.mtmd_ctx = None
        self.model = ll.llama_model_load_from_file(str(text_path).encode(), ll.llama_model_default_params())
        if not self.model:
            raise _failure(f"{text_path}: llama.cpp cannot load this text model")
        params = ll.llama_context_default_params()
        params.n_ctx = params.n_batch = params.n_ubatch = n_ctx
        params.n_threads = params.n_threads_batch = threads
        params.type_k = params.type_v = {"f32": ll.GGML_TYPE_F32, "f16": ll.GGML_TYPE_F16}[kv_type]
        params.no_perf = True
        # llama.cpp's default ("auto") turns flash attention on; its CPU kernel rounds (about 5e-4
        # relative on the logits here), so the f32 artifact asks for it off.
        params.flash_attn_type = {"auto": ll.LLAMA_FLASH_ATTN_TYPE_AUTO, "disabled": ll.LLAMA_FLASH_ATTN_TYPE_DISABLED}[flash_attention]
        self.ctx = ll.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise _failure(f"{text_path}: llama.cpp cannot create a context of {n_ctx} positions")
        self.vocab = ll.llama_model_get_vocab(self.model)
        self.n_vocab = ll.llama_vocab_n_tokens(self.vocab)
        self.n_embd = ll.llama_model_n_embd(self.model)
        self.n_ctx = n_ctx
        if mmproj_path is None:
            return
        mparams = mtmd.mtmd_context_params_default()
        mparams.use_gpu = False
        mparams.print_timings = False
        mparams.n_threads = threads
        mparams.warmup = False
        self.mtmd_ctx = mtmd.mtmd_init_from_file(str(mmproj_path).encode(), self.model, mparams)
        if not self.mtmd_ctx:
            raise _failure(f"{mmproj_path}: llama.cpp's mtmd cannot load this mmproj with {Path(text_path).name}")
        if not mtmd.mtmd_support_vision(self.mtmd_ctx):
            raise ExportError(f"{mmproj_path}: llama.cpp loads it without vision support")
        self.marker = mtmd.mtmd_default_marker().decode()

    def close(self) -> None:
        if self.mtmd_ctx:
            self.mtmd.mtmd_free(self.mtmd_ctx)
        if self.ctx:
            self.ll.llama_free(self.ctx)
        if self.model:
            self.ll.llama_model_free(self.model)
        self.model = self.ctx = self.mtmd_ctx = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: the bindings may be gone already
            pass

    # --- state -----------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget every position (a new prompt starts at 0)."""
        self.ll.llama_memory_clear(self.ll.llama_get_memory(self.ctx), True)

    def logits(self) -> np.ndarray:
        return np.ctypeslib.as_array(self.ll.llama_get_logits_ith(self.ctx, -1), shape=(self.n_vocab,)).copy()

    # --- prompts with an image -------------------------------------------------------------------

    def _chunks(self, text: str, rgb: np.ndarray):
        """mtmd input chunks for `text` (one media marker) and an HWC uint8 RGB image."""
        mtmd = self.mtmd
        rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
        bitmap = mtmd.mtmd_bitmap_init(rgb.shape[1], rgb.shape[0], rgb.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)))
        chunks = mtmd.mtmd_input_chunks_init()
        data = text.encode("utf-8")
        part = mtmd.mtmd_input_text()
        part.text, part.text_len, part.add_special, part.parse_special = data, len(data), True, True
        status = mtmd.mtmd_tokenize(self.mtmd_ctx, chunks, ctypes.byref(part), (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap), 1)
        mtmd.mtmd_bitmap_free(bitmap)
        if status != 0:
            mtmd.mtmd_input_chunks_free(chunks)
            raise _failure(f"mtmd_tokenize failed (status {status})")
        return chunks

    def prompt_tokens(self, text: str, rgb: np.ndarray) -> list[list[int] | int]:
        """What llama.cpp made of a prompt: token ids per text chunk, and the image's token count."""
        mtmd = self.mtmd
        chunks = self._chunks(text, rgb)
        out: list[list[int] | int] = []
        try:
            for i in range(mtmd.mtmd_input_chunks_size(chunks)):
                chunk = mtmd.mtmd_input_chunks_get(chunks, i)
                if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    n = ctypes.c_size_t()
                    ids = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                    out.append([ids[j] for j in range(n.value)])
                else:
                    out.append(int(mtmd.mtmd_input_chunk_get_n_tokens(chunk)))
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
        return out

    def prefill(self, text: str, rgb: np.ndarray) -> int:
        """Evaluate a whole prompt from position 0; returns the number of positions it took."""
        self.reset()
        chunks = self._chunks(text, rgb)
        try:
            n = self.mtmd.mtmd_helper_get_n_pos(chunks)
            if n >= self.n_ctx:
                raise PromptError(f"prompt takes {n} positions (image included); the context holds {self.n_ctx}")
            new_n_past = self.ll.llama_pos(0)
            status = self.mtmd.mtmd_helper_eval_chunks(self.mtmd_ctx, self.ctx, chunks, 0, 0, self.n_ctx, True, ctypes.byref(new_n_past))
        finally:
            self.mtmd.mtmd_input_chunks_free(chunks)
        if status != 0:
            raise _failure(f"mtmd_helper_eval_chunks failed (status {status})")
        return new_n_past.value

    def encode_image(self, rgb: np.ndarray) -> np.ndarray:
        """The mmproj's output for an image, [N, n_embd] (clip encode + projector, no decoding)."""
        mtmd = self.mtmd
        chunks = self._chunks(self.marker, rgb)
        try:
            for i in range(mtmd.mtmd_input_chunks_size(chunks)):
                chunk = mtmd.mtmd_input_chunks_get(chunks, i)
                if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                    if mtmd.mtmd_encode_chunk(self.mtmd_ctx, chunk) != 0:
                        raise _failure("mtmd_encode_chunk failed")
                    n = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
                    return np.ctypeslib.as_array(mtmd.mtmd_get_output_embd(self.mtmd_ctx), shape=(n, self.n_embd)).copy()
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
        raise ExportError("mtmd_tokenize produced no image chunk")

    # --- decoding --------------------------------------------------------------------------------

    def decode(self, positions: list[int], tokens: list[int] | None = None, embeds: np.ndarray | None = None) -> np.ndarray:
        """`llama_decode` of token ids or embedding rows at explicit positions; logits of the last."""
        ll = self.ll
        n = len(positions)
        batch = ll.llama_batch_init(n, 0 if embeds is None else embeds.shape[1], 1)
        try:
            if embeds is None:
                for i, t in enumerate(tokens):
                    batch.token[i] = t
            else:
                flat = np.ascontiguousarray(embeds, dtype=np.float32).ravel()
                ctypes.memmove(batch.embd, flat.ctypes.data, flat.nbytes)
            for i, p in enumerate(positions):
                batch.pos[i], batch.n_seq_id[i], batch.logits[i] = p, 1, i == n - 1
                batch.seq_id[i][0] = 0
            batch.n_tokens = n
            status = ll.llama_decode(self.ctx, batch)
        finally:
            ll.llama_batch_free(batch)
        if status != 0:
            raise _failure(f"llama_decode failed (status {status})")
        return self.logits()

    def piece(self, token: int) -> bytes:
        """The bytes llama.cpp prints for a token (control tokens print nothing)."""
        size = 64
        while True:
            buffer = ctypes.create_string_buffer(size)
            n = self.ll.llama_token_to_piece(self.vocab, token, buffer, size, 0, False)
            if n >= 0:
                return buffer.raw[:n]
            size = -n


def artifact_paths(root: Path, artifact: dict) -> tuple[Path, Path]:
    folder = Path(root) / artifact["file"]
    meta = artifact.get("metadata") or {}
    if "text_model" not in meta or "mmproj" not in meta:
        raise ExportError(f"artifact {artifact.get('name')!r}: metadata must name its 'text_model' and 'mmproj' files")
    return folder / meta["text_model"], folder / meta["mmproj"]


class GgufSession:
    """A GGUF artifact of a bundle, driven from the manifest alone (parity's `ArtifactSession`)."""

    def __init__(self, root: Path, artifact: dict, manifest: dict, threads: int | None = None, image_mode: str = "prepared"):
        from mobilevlm.processing import ImageProcessor

        text_path, mmproj_path = artifact_paths(root, artifact)
        self.prompt = manifest["prompt"]
        pre = manifest["preprocessing"]
        self.image_processor = ImageProcessor(pre["image_size"], tuple(pre["mean"]), tuple(pre["std"]), pre["aspect_mode"])
        if image_mode not in ("prepared", "original"):
            raise ExportError(f"image_mode {image_mode!r}: expected 'prepared' (our padding and resizing) or 'original' (llama.cpp's)")
        self.image_mode = image_mode
        meta = artifact.get("metadata") or {}
        context = meta.get("context_length", self.prompt["context_length"])
        self.runtime = LlamaCppRuntime(text_path, mmproj_path, context, threads or torch.get_num_threads(),
                                       meta.get("kv_cache_type", "f16"), meta.get("flash_attention", "auto"))
        self.eos_ids = set(self.prompt["eos_ids"])

    def rgb(self, image: Image.Image) -> np.ndarray:
        """HWC uint8 RGB pixels handed to llama.cpp."""
        if self.image_mode == "original":
            from mobilevlm.processing import load_image

            return np.asarray(load_image(image), dtype=np.uint8)
        return self.image_processor.prepare_image(image).permute(1, 2, 0).numpy()

    def prompt_text(self, prompt: str) -> str:
        from mobilevlm.processing import check_prompt

        p = self.prompt
        return p["before_image"] + self.runtime.marker + p["after_image"].replace(p["prompt_slot"], check_prompt(prompt))

    def generate(self, image: Image.Image, prompt: str, max_new_tokens: int) -> list[int]:
        """Greedy token ids until an EOS id (not included), the budget or the end of the context."""
        rt = self.runtime
        pos = rt.prefill(self.prompt_text(prompt), self.rgb(image))
        logits, tokens = rt.logits(), []
        for i in range(max_new_tokens):
            token = int(logits.argmax())
            if token in self.eos_ids:
                break
            tokens.append(token)
            if i == max_new_tokens - 1 or pos >= rt.n_ctx:
                break
            logits = rt.decode([pos], tokens=[token])
            pos += 1
        return tokens

    def answer(self, image: Image.Image, prompt: str, max_new_tokens: int) -> str:
        """The generated text as llama.cpp prints it (`llama_token_to_piece`), cut at a stop string."""
        text = b"".join(self.runtime.piece(t) for t in self.generate(image, prompt, max_new_tokens)).decode("utf-8", "replace")
        for stop in self.prompt["stop_strings"]:
            text = text.split(stop)[0]
        return text

    def forced_logits(self, image: Image.Image, prompt: str, tokens: list[int]) -> list[torch.Tensor]:
        rt = self.runtime
        pos = rt.prefill(self.prompt_text(prompt), self.rgb(image))
        if pos + len(tokens) > rt.n_ctx:
            raise PromptError(f"prompt and answer take {pos + len(tokens)} positions; the context holds {rt.n_ctx}")
        out = [torch.from_numpy(rt.logits())]
        for token in tokens:
            out.append(torch.from_numpy(rt.decode([pos], tokens=[token])))
            pos += 1
        return out

    def image_embeddings(self, image: Image.Image) -> torch.Tensor:
        """[N, D] image tokens as llama.cpp's mmproj computes them (for diagnostics)."""
        return torch.from_numpy(self.runtime.encode_image(self.rgb(image)))
