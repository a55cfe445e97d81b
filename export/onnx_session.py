"""Running an ONNX artifact from the bundle's manifest alone, as an app would (no PyTorch model).

Two runtimes, same prompt handling:
- `OnnxSession`: plain `onnxruntime` (CPU execution provider) runs vision -> embedding -> decoder, a
  prefill then a KV-cached greedy loop; what `mobilevlm export` checks parity with.
- `GenAISession`: `onnxruntime-genai` drives embedding + decoder through the artifact's
  `genai_config.json` (model type `decoder-pipeline`). GenAI cannot run our vision graph (its
  `MultiModalProcessor` only serves registered model types), so the vision graph runs in plain
  onnxruntime and its output goes in with `Generator.set_model_input("image_features", ...)`; the
  prompt's image positions are negative ids, which the embedding graph replaces with those rows.

A prompt is: the template's ids before the image (BOS first), one negative id per image token, the
ids of the text after the image with the question filled in. A decoder with an image input (the
artifact's `decoder_image_input`) also gets, on every call, the vision output (`image_features`,
cross-attention; the prompt then has no image positions) or the embedding graph's `image_mask`
(visual expert; 0.0 for generated tokens). Generation is greedy, at most
`max_new_tokens` tokens and never past the exported context, stops at an EOS id (not included) and
cuts the text at the first stop string, as `mobilevlm.generate` does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mobilevlm.errors import BundleError, ExportError, PromptError

from .onnx_graphs import cache_names

# The embedding graph reads any negative id as "the next image token"; this is the one we write.
IMAGE_PLACEHOLDER_ID = -1
EXECUTION_PROVIDER = "CPUExecutionProvider"


def session_options(threads: int | None = None):
    """CPU sessions sized like torch's thread pool (the benchmark worker sets it per contender).

    Worker threads do not spin between ops: on a shared machine a spinning pool halves decode speed
    (measured on the 1.7B int4 decoder with 2 threads on a busy 2-core host: 2.5 tok/s spinning, 4.8
    not), and phones prefer idle cores to burnt battery."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: ORT warns about unused initializers on every load
    return options


def open_graph(path: Path, threads: int | None = None):
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(path), session_options(threads), providers=[EXECUTION_PROVIDER])
    except Exception as exc:  # onnxruntime raises its own Fail / InvalidGraph / NoSuchFile types
        raise ExportError(f"{path}: onnxruntime cannot load this graph ({str(exc).splitlines()[0]})") from None


class PromptedSession:
    """Manifest-driven prompt, image and context handling shared by the ONNX and hf sessions."""

    def __init__(self, root: Path, artifact: dict, manifest: dict):
        from mobilevlm.processing import ImageProcessor, Tokenizer

        self.root, self.folder = Path(root), Path(root) / artifact["file"]
        self.meta = artifact.get("metadata") or {}
        self.prompt = manifest["prompt"]
        self.context = self.prompt["context_length"]
        if self.meta.get("context_length") != self.context:
            raise BundleError(
                f"{self.root / 'manifest.json'}: artifact {artifact.get('name')!r} was exported with a context length of "
                f"{self.meta.get('context_length')} but the bundle's prompt.context_length is {self.context}; export it again with --context-length {self.context}"
            )
        self.image_processor = ImageProcessor.from_spec(manifest["preprocessing"])  # tiles when the manifest says so
        self.tokenizer = Tokenizer(self.root / manifest["tokenizer"]["file"])
        self.eos_ids = set(self.prompt["eos_ids"])

    def prompt_parts(self, prompt: str) -> tuple[list[int], list[int]]:
        """Ids before and after the image; a prompt too long for the exported context is a PromptError."""
        from .parity import ids_after_image

        return list(self.prompt["before_image_ids"]), ids_after_image(self.prompt, self.tokenizer, prompt, self.folder.name)

    def prompt_ids(self, prompt: str, image_tokens: int | None = None) -> list[int]:
        """The whole prompt's ids, each image position an `IMAGE_PLACEHOLDER_ID`; `image_tokens`
        (the vision output's rows) defaults to the manifest's count, which a tiled image may undercut."""
        return self.join(*self.prompt_parts(prompt), self.prompt["image_tokens"] if image_tokens is None else image_tokens)

    @staticmethod
    def join(before: list[int], after: list[int], image_tokens: int) -> list[int]:
        return [*before, *[IMAGE_PLACEHOLDER_ID] * image_tokens, *after]

    def budget(self, prompt_len: int, max_new_tokens: int) -> int:
        return min(max_new_tokens, self.context - prompt_len)

    def finish(self, tokens: list[int]) -> str:
        text = self.tokenizer.decode(tokens)
        for stop in self.prompt["stop_strings"]:
            text = text.split(stop)[0]
        return text


class _OnnxVision(PromptedSession):
    def __init__(self, root: Path, artifact: dict, manifest: dict):
        super().__init__(root, artifact, manifest)
        self.graphs = {name: self.folder / file for name, file in self.meta["graphs"].items()}
        self.vision = open_graph(self.graphs["vision"])

    def image_features(self, image: Image.Image) -> np.ndarray:
        """[1, N, D]; a tiled model's views ([K, 3, S, S]) go in together and come out as one sequence."""
        pixels = self.image_processor.prepare_views(image).numpy()
        return self.vision.run(None, {"image": pixels})[0]


class OnnxSession(_OnnxVision):
    """vision -> embedding -> decoder in plain onnxruntime, the KV cache carried as present -> past.

    A `-gqa` decoder runs with a shared buffer, as GenAI runs it (`past_present_share_buffer`): one
    [1, kv_heads, context, head_dim] buffer per cache tensor is bound as both past input and present
    output, and GroupQueryAttention writes the new positions in place. The concat-style decoder
    instead returns past ++ new, a copy of the whole cache per token.
    """

    runtime = "onnxruntime"

    def __init__(self, root: Path, artifact: dict, manifest: dict):
        super().__init__(root, artifact, manifest)
        self.embedding = open_graph(self.graphs["embedding"])
        self.decoder = open_graph(self.graphs["decoder"])
        self.providers = self.decoder.get_providers()
        config = manifest["model"]["config"]["text"]
        self.num_layers, self.kv_heads, self.width = config["num_layers"], config["num_kv_heads"], config["hidden_size"]
        self.head_dim = config["hidden_size"] // config["num_heads"]
        self.past_names, self.present_names = cache_names(self.num_layers, True), cache_names(self.num_layers, False)
        self.no_image = np.zeros((0, self.prompt["image_tokens"], self.width), np.float32)
        self.shared_buffer = self.meta.get("kv_cache") == "shared-buffer"
        self.image_input = self.meta.get("decoder_image_input")  # None, "image_features" or "image_mask"
        if self.image_input == "image_features":  # N is fixed in the graph
            rows = next(i.shape[1] for i in self.decoder.get_inputs() if i.name == "image_features")
            self.no_features = np.zeros((1, rows, self.width), np.float32)
        self.reset()

    def reset(self) -> None:
        import onnxruntime as ort

        positions = self.context if self.shared_buffer else 0
        empty = np.zeros((1, self.kv_heads, positions, self.head_dim), np.float32)
        self.past = {name: ort.OrtValue.ortvalue_from_numpy(empty.copy()) if self.shared_buffer else empty for name in self.past_names}
        self.length = 0
        if self.image_input == "image_features":  # the conversation's image for every decoder call (zeros: none)
            self.features = self.no_features

    def embed(self, ids: list[int] | np.ndarray, image_features: np.ndarray | None = None) -> np.ndarray:
        ids = np.asarray(ids, np.int64).reshape(1, -1)
        return self.embedding.run(None, {"input_ids": ids, "image_features": self.no_image if image_features is None else image_features})[0]

    def decoder_image_input(self, embeds: np.ndarray, image_mask: np.ndarray | None) -> dict[str, np.ndarray]:
        """The decoder's interface input for these embeds: the conversation's image features, or the
        image mask (the embedding graph's, else zeros: generated tokens are text)."""
        if self.image_input == "image_features":
            return {"image_features": self.features}
        if self.image_input == "image_mask":
            return {"image_mask": image_mask if image_mask is not None else np.zeros(embeds.shape[:2], np.float32)}
        return {}

    def step(self, embeds: np.ndarray, image_mask: np.ndarray | None = None) -> np.ndarray:
        """Run the decoder on embeds [1, T, D] after the cached positions; logits [T, V]."""
        if self.length + embeds.shape[1] > self.context:
            raise PromptError(f"{self.folder.name}: {self.length + embeds.shape[1]} positions exceed the exported context of {self.context}")
        self.length += embeds.shape[1]
        mask = np.ones((1, self.length), np.int64)
        extra = self.decoder_image_input(embeds, image_mask)
        if self.shared_buffer:
            binding = self.decoder.io_binding()
            binding.bind_cpu_input("inputs_embeds", np.ascontiguousarray(embeds, np.float32))
            binding.bind_cpu_input("attention_mask", mask)
            for name, value in extra.items():
                binding.bind_cpu_input(name, np.ascontiguousarray(value, np.float32))
            binding.bind_output("logits")
            for past, present in zip(self.past_names, self.present_names):
                binding.bind_ortvalue_input(past, self.past[past])
                binding.bind_ortvalue_output(present, self.past[past])
            self.decoder.run_with_iobinding(binding)
            return binding.get_outputs()[0].numpy()[0]  # logits only: copying the cache out would undo the point
        feeds = {"inputs_embeds": embeds, "attention_mask": mask, **self.past, **extra}
        logits, *presents = self.decoder.run(["logits", *self.present_names], feeds)
        self.past = dict(zip(self.past_names, presents))
        return logits[0]

    def prefill(self, image: Image.Image, prompt: str) -> tuple[np.ndarray, int]:
        before, after = self.prompt_parts(prompt)  # a prompt too long is refused before the image is encoded
        self.reset()
        features = self.image_features(image)
        if self.image_input == "image_features":  # beside the sequence, not in it
            self.features = features
            ids = self.join(before, after, self.prompt["image_tokens"])
            return self.step(self.embed(ids))[-1], len(ids)
        ids = self.join(before, after, features.shape[1])
        outputs = self.embedding.run(None, {"input_ids": np.asarray([ids], np.int64), "image_features": features})
        return self.step(outputs[0], outputs[1] if self.image_input == "image_mask" else None)[-1], len(ids)

    def answer(self, image: Image.Image, prompt: str, max_new_tokens: int) -> str:
        logits, prompt_len = self.prefill(image, prompt)
        tokens: list[int] = []
        for step in range(self.budget(prompt_len, max_new_tokens)):
            token = int(logits.argmax())
            if token in self.eos_ids:
                break
            tokens.append(token)
            if step + 1 < self.budget(prompt_len, max_new_tokens):
                logits = self.step(self.embed([token]))[-1]
        return self.finish(tokens)

    def forced_logits(self, image: Image.Image, prompt: str, tokens: list[int]) -> list[torch.Tensor]:
        logits, _ = self.prefill(image, prompt)
        out = [torch.from_numpy(logits.copy())]
        for token in tokens:
            out.append(torch.from_numpy(self.step(self.embed([token]))[-1].copy()))
        return out


class GenAISession(_OnnxVision):
    """Embedding + decoder through onnxruntime-genai's `decoder-pipeline`; vision in onnxruntime."""

    runtime = "onnxruntime-genai"

    def __init__(self, root: Path, artifact: dict, manifest: dict):
        super().__init__(root, artifact, manifest)
        import onnxruntime_genai as og

        self.og = og
        try:
            self.model = og.Model(str(self.folder))
        except Exception as exc:
            raise ExportError(f"{self.folder / 'genai_config.json'}: onnxruntime-genai cannot load the artifact ({str(exc).splitlines()[0]})") from None

    def _generator(self, image: Image.Image, prompt: str, max_new_tokens: int):
        """A generator holding the prompt, and how many tokens it may add (the context's limit)."""
        features = self.image_features(image)
        ids = self.prompt_ids(prompt, None if self.prompt["image_tokens"] == 0 else features.shape[1])
        budget = self.budget(len(ids), max_new_tokens)
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(ids) + budget, do_sample=False)
        generator = self.og.Generator(self.model, params)
        generator.set_model_input("image_features", features)
        generator.append_tokens(np.asarray([ids], np.int32))
        return generator, budget

    def answer(self, image: Image.Image, prompt: str, max_new_tokens: int) -> str:
        generator, budget = self._generator(image, prompt, max_new_tokens)
        tokens: list[int] = []
        while not generator.is_done() and len(tokens) < budget:
            generator.generate_next_token()
            token = int(generator.get_next_tokens()[0])
            if token in self.eos_ids:
                break
            tokens.append(token)
        return self.finish(tokens)

    def forced_logits(self, image: Image.Image, prompt: str, tokens: list[int]) -> list[torch.Tensor]:
        generator, _ = self._generator(image, prompt, len(tokens) + 1)
        out = [torch.from_numpy(np.array(generator.get_logits()).reshape(-1).copy())]
        for token in tokens:
            generator.append_tokens(np.asarray([[token]], np.int32))
            out.append(torch.from_numpy(np.array(generator.get_logits()).reshape(-1).copy()))
        return out
