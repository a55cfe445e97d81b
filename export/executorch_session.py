"""Running a bundle's `.pte` as an app does: ExecuTorch's C++ `MultimodalRunner` where the program
fits its contract, the program's methods through `executorch.runtime` otherwise (tiled images, decoders
with an image input) and for the logits parity compares. The exporter is export/executorch.py."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image


def load_runtime_kernels() -> None:
    """Register the custom and quantized kernels with the ExecuTorch runtime of this process."""
    import executorch.kernels.quantized  # noqa: F401  quantized_decomposed::embedding_*
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  llama::custom_sdpa, update_cache


class ExecuTorchSession:
    """A .pte of a bundle, driven from the manifest alone, as an app drives it.

    `answer` runs ExecuTorch's C++ `MultimodalRunner` (what the phone apps link); `forced_logits` calls
    the program's methods through `executorch.runtime` to read logits, which the runner does not
    expose. The decoder is loaded as its own program there: the Python runtime shares one memory plan
    between all methods of a program, which would let other methods overwrite the KV cache.

    Programs the runner cannot drive (tiled images; a text_decoder with an image input, i.e. the
    cross_attention and visual_expert interfaces) answer through the methods too, following the
    manifest's `text_decoder` inputs.
    """

    def __init__(self, root: Path, artifact: dict, manifest: dict):
        from mobilevlm.processing import ImageProcessor, Tokenizer

        from .parity import captured_native_output, native_error

        self.path = Path(root) / artifact["file"]
        self.prompt = manifest["prompt"]
        pre = manifest["preprocessing"]
        self.image_processor = ImageProcessor.from_spec(pre)
        # Tiled images are several views; MultimodalRunner hands its vision method one image, so such
        # programs are driven through their methods (as an app would with ExecuTorch's Module API).
        self.tiled = bool(self.image_processor.grids)
        # the text decoder's third input, if any: "image_features" (cross_attention) or "image_mask" (visual_expert)
        inputs = artifact["methods"]["text_decoder"]["inputs"]
        self.image_input = inputs[2]["name"] if len(inputs) > 2 else None
        self.tokenizer = Tokenizer(Path(root) / manifest["tokenizer"]["file"])
        with captured_native_output() as output:
            load_runtime_kernels()
            from executorch.extension.llm.runner import MultimodalRunner
            from executorch.runtime import Runtime

            try:
                self.runner = None if self.image_input else MultimodalRunner(str(self.path), str(root))
                runtime = Runtime.get()
                encoders = runtime.load_program(str(self.path))
                self.vision = encoders.load_method("vision_encoder")
                self.embedding = encoders.load_method("token_embedding")
                self.decoder = runtime.load_program(str(self.path)).load_method("text_decoder")
            except RuntimeError:
                raise native_error(f"{self.path}: ExecuTorch cannot load this program", output) from None

    def image_tensor(self, image: Image.Image) -> torch.Tensor:
        """uint8 [1, 3, S, S], or [views, 3, S, S] for a tiled image."""
        return self.image_processor.prepare_views(image).contiguous()

    def check_length(self, prompt: str) -> list[int]:
        """Token ids after the image; a prompt that cannot fit the exported context is a `PromptError`."""
        from .parity import ids_after_image

        return ids_after_image(self.prompt, self.tokenizer, prompt, self.path.name)

    def answer(self, image: Image.Image, prompt: str, max_new_tokens: int) -> str:
        from executorch.extension.llm.runner import GenerationConfig, make_image_input, make_text_input, make_token_input

        from .parity import captured_native_output, native_error

        after = self.check_length(prompt)
        if self.tiled or self.image_input:
            return self._answer_by_methods(image, after, max_new_tokens)
        inputs = [
            make_token_input(list(self.prompt["before_image_ids"])),
            make_image_input(self.image_tensor(image)),
            make_text_input(self.prompt["after_image"].replace(self.prompt["prompt_slot"], prompt)),
        ]
        config = GenerationConfig(temperature=0.0, max_new_tokens=max_new_tokens, echo=False)
        self.printed_form = False
        with captured_native_output() as output:
            self.runner.reset()
            try:
                text = self.runner.generate_text(inputs, config)
            except RuntimeError:
                raise native_error(f"{self.path}: MultimodalRunner failed", output) from None
            except UnicodeDecodeError:
                # The answer's bytes are not valid UTF-8 (a byte-level token split a character) and
                # the Python binding refuses to return them; the runner has printed them already.
                self.printed_form = True
        if self.printed_form:
            # The runner prints each piece, then "\n", then "PyTorchObserver {...}\n".
            text = output.stdout.split(b"PyTorchObserver ", 1)[0].removesuffix(b"\n").decode("utf-8", "replace")
        # The runner does not stop when the very first (prefill) token is EOS: cut at the first stop.
        for stop in self.prompt["stop_strings"]:
            text = text.split(stop)[0]
        return text

    def printed_text(self, token_ids: list[int]) -> str:
        """What the runner prints for these tokens: each piece through ExecuTorch's `safe_printf`,
        which drops single-byte pieces that are neither printable nor whitespace."""
        pieces = [self.tokenizer.token_bytes(t) for t in token_ids]
        kept = [p for p in pieces if len(p) != 1 or 0x20 <= p[0] <= 0x7E or p[0] in b"\t\n\v\f\r"]
        return b"".join(kept).decode("utf-8", "replace")

    def _answer_by_methods(self, image: Image.Image, after: list[int], max_new_tokens: int) -> str:
        """Greedy decoding through the program's methods, stopping at EOS or the context's end."""
        self.printed_form = False
        logits, pos, image_input = self._prefill(image, after)
        eos, tokens = set(self.prompt["eos_ids"]), []
        while len(tokens) < max_new_tokens:
            token = int(logits.argmax())
            if token in eos:
                break
            tokens.append(token)
            if pos >= self.prompt["context_length"]:
                break
            logits = self._step(token, pos, image_input)
            pos += 1
        text = self.tokenizer.decode(tokens)
        for stop in self.prompt["stop_strings"]:
            text = text.split(stop)[0]
        return text

    def _prefill(self, image: Image.Image, after: list[int]) -> tuple[torch.Tensor, int, list[torch.Tensor]]:
        """Logits after the prompt, the next position, and the image input every later decoder call
        takes (the manifest's `how_to_run` for text_decoder)."""
        before = self.prompt["before_image_ids"]
        # cloned: an output may live in the program's planned memory, which its next call reuses
        features = self.vision.execute([self.image_tensor(image)])[0].clone()
        if self.image_input == "image_features":  # one text sequence; the image through cross-attention
            embeds = self.embedding.execute([torch.tensor([before + after])])[0]
            return self.decoder.execute([embeds, torch.arange(embeds.shape[1]), features])[0][0].clone(), embeds.shape[1], [features]
        chunks = [self.embedding.execute([torch.tensor([before])])[0].clone(), features, self.embedding.execute([torch.tensor([after])])[0]]
        pos = 0
        for chunk, is_image in zip(chunks, (False, True, False)):
            n = chunk.shape[1]
            extra = [torch.full((n,), float(is_image))] if self.image_input == "image_mask" else []
            out = self.decoder.execute([chunk, torch.arange(pos, pos + n), *extra])[0]
            pos += n
        return out[0].clone(), pos, ([torch.zeros(1)] if self.image_input == "image_mask" else [])

    def _step(self, token: int, pos: int, image_input: list[torch.Tensor]) -> torch.Tensor:
        """Logits [V] after feeding one generated token at `pos`."""
        embeds = self.embedding.execute([torch.tensor([[token]])])[0]
        return self.decoder.execute([embeds, torch.tensor([pos]), *image_input])[0][0].clone()

    def forced_logits(self, image: Image.Image, prompt: str, tokens: list[int]) -> list[torch.Tensor]:
        first, pos, image_input = self._prefill(image, self.check_length(prompt))
        logits = [first]
        for token in tokens:
            logits.append(self._step(token, pos, image_input))
            pos += 1
        return logits
