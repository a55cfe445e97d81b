"""Turning an image and a question into model inputs: image loading and preprocessing, the prompt
template, and the tokenizer.

Preprocessing follows MobileVLM: pad the image to a square with the mean colour (or stretch it),
resize bicubically to the encoder's size, scale to [0, 1], normalise with the configured mean / std.
`prepare_image` stops before normalising (uint8 RGB, what exported graphs take when they normalise
inside); `preprocess` finishes the job for the PyTorch reference. Both share every resampling step, so
an artifact fed by an app and the reference see the same pixels.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .config import MobileVLMConfig
from .errors import ImageError, PromptError, TokenizerError
from .model import IMAGE_TOKEN_INDEX

ImageSource = Union[str, Path, bytes, Image.Image]

# Larger images are refused before decoding: a 10-kB PNG can claim gigapixels (a decompression bomb).
MAX_IMAGE_PIXELS = 64_000_000
MAX_ASPECT_RATIO = 50.0


# --- images --------------------------------------------------------------------------------------


def load_image(source: ImageSource) -> Image.Image:
    """Decode an image file (or bytes, or a PIL image) to RGB, upright per its EXIF orientation.

    16-bit images are scaled (not clipped) to 8 bits; transparency is composited over white; CMYK and
    palette images are converted. Anything undecodable is an `ImageError` naming the file.
    """
    name = "<bytes>" if isinstance(source, bytes) else "<image>" if isinstance(source, Image.Image) else str(source)
    if isinstance(source, Image.Image):
        image = source
    else:
        data = source if isinstance(source, bytes) else _read_file(Path(source))
        if not data:
            raise ImageError(f"{name}: file is empty (0 bytes), expected an image")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # Pillow's notes on odd files: not a second stderr line
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data))
                _check_size(name, image.size)
                image.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageError(f"{name}: image claims more than the {MAX_IMAGE_PIXELS:,} pixels accepted ({exc})") from None
        except ImageError:
            raise
        except UnidentifiedImageError as exc:
            raise ImageError(f"{name}: not a decodable image ({exc})") from None
        except Exception as exc:  # a decoder's failure on a hostile file (OSError, struct.error, ...) is bad input
            raise ImageError(f"{name}: image data is corrupt or truncated ({type(exc).__name__}: {exc})") from None
    _check_size(name, image.size)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            image = ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block must not make a readable image unusable
        pass
    try:
        return _to_rgb(image)
    except Exception as exc:  # a mode or palette that decodes but cannot be converted
        raise ImageError(f"{name}: image mode {image.mode!r} cannot be converted to RGB ({type(exc).__name__}: {exc})") from None


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ImageError(f"{path}: no such image file") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a folder, expected an image file") from None
    except OSError as exc:
        raise ImageError(f"{path}: cannot read image ({exc.strerror})") from None


def _check_size(name: str, size: tuple[int, int]) -> None:
    w, h = size
    if w < 1 or h < 1:
        raise ImageError(f"{name}: image has no pixels ({w}x{h})")
    if w * h > MAX_IMAGE_PIXELS:
        raise ImageError(f"{name}: image is {w}x{h} pixels, more than the {MAX_IMAGE_PIXELS:,} accepted")
    if max(w, h) / min(w, h) > MAX_ASPECT_RATIO:
        raise ImageError(f"{name}: image is {w}x{h}, an aspect ratio over {MAX_ASPECT_RATIO:g}:1")


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image).astype(np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


@dataclass(frozen=True)
class ImageProcessor:
    """Square resize (or pad + resize) and normalisation, as the vision encoder was trained with.

    With `grids` (the "anyres" strategy) an image becomes several views of `size` square: first the
    whole image prepared as above (the global view), then the tiles of the allowed (rows, cols) layout
    that best fits its aspect ratio, row-major. The layout is chosen as LLaVA-NeXT does: the one that
    keeps the most of the image's pixels when it is scaled to fit, then the one that wastes least.
    """

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    aspect_mode: str = "pad"
    grids: tuple[tuple[int, int], ...] = ()

    @classmethod
    def from_config(cls, config: MobileVLMConfig) -> ImageProcessor:
        v = config.vision
        grids = tuple(config.grids) if config.resolution == "anyres" else ()
        return cls(config.input_image_size, tuple(v.image_mean), tuple(v.image_std), config.image_aspect_ratio, grids)

    @classmethod
    def from_spec(cls, pre: dict) -> ImageProcessor:
        """From a bundle manifest's `preprocessing` section (what an app reads)."""
        grids = tuple((int(r), int(c)) for r, c in pre.get("tiling", {}).get("grids", ()))
        return cls(pre["image_size"], tuple(pre["mean"]), tuple(pre["std"]), pre["aspect_mode"], grids)

    def select_grid(self, width: int, height: int) -> tuple[int, int]:
        """The (rows, cols) layout for an image of this size (anyres)."""
        best, best_key = None, None
        for rows, cols in self.grids:
            canvas_w, canvas_h = cols * self.size, rows * self.size
            scale = min(canvas_w / width, canvas_h / height)
            kept = min(width * scale * height * scale, width * height)
            key = (kept, -(canvas_w * canvas_h - kept))
            if best_key is None or key > best_key:
                best, best_key = (rows, cols), key
        return best

    def tiles(self, image: Image.Image, rows: int, cols: int) -> list[Image.Image]:
        """The image scaled to fit a (rows, cols) canvas of tiles (aspect kept, centred on pad_color), cut row-major."""
        canvas_w, canvas_h = cols * self.size, rows * self.size
        scale = min(canvas_w / image.width, canvas_h / image.height)
        w, h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
        canvas = Image.new("RGB", (canvas_w, canvas_h), self.pad_color)
        canvas.paste(image.resize((w, h), Image.Resampling.BICUBIC), ((canvas_w - w) // 2, (canvas_h - h) // 2))
        s = self.size
        return [canvas.crop((c * s, r * s, (c + 1) * s, (r + 1) * s)) for r in range(rows) for c in range(cols)]

    def prepare_views(self, source: ImageSource) -> torch.Tensor:
        """uint8 [views, 3, size, size]: one view, or (anyres) the global view and the tiles."""
        image = load_image(source)
        views = [self.prepare_image(image)]
        if self.grids:
            views += [self._square(tile) for tile in self.tiles(image, *self.select_grid(image.width, image.height))]
        return torch.stack(views)

    @property
    def pad_color(self) -> tuple[int, int, int]:
        return tuple(int(m * 255) for m in self.mean)

    def prepare_image(self, source: ImageSource) -> torch.Tensor:
        """uint8 RGB [3, size, size]: padded / resized, not normalised."""
        image = load_image(source)
        if self.aspect_mode == "pad" and image.width != image.height:
            side = max(image.size)
            canvas = Image.new("RGB", (side, side), self.pad_color)
            canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
            image = canvas
        elif self.aspect_mode == "crop" and image.width != image.height:
            scale = self.size / min(image.size)
            w, h = max(self.size, round(image.width * scale)), max(self.size, round(image.height * scale))
            image = image.resize((w, h), Image.Resampling.BICUBIC)
            left, top = (w - self.size) // 2, (h - self.size) // 2
            image = image.crop((left, top, left + self.size, top + self.size))
        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), Image.Resampling.BICUBIC)
        return self._square(image)

    @staticmethod
    def _square(image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [.., 3, H, W] -> float32 (x / 255 - mean) / std."""
        mean = torch.tensor(self.mean, device=pixels.device).view(3, 1, 1)
        std = torch.tensor(self.std, device=pixels.device).view(3, 1, 1)
        return (pixels.float() / 255.0 - mean) / std

    def preprocess(self, source: ImageSource) -> torch.Tensor:
        """float32 [views, 3, size, size] (one view unless anyres), ready for `MobileVLM.encode_image`."""
        return self.normalize(self.prepare_views(source))


# --- prompt template -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptTemplate:
    """A single-turn conversation with one image; `<image>` marks the image, `{prompt}` the question."""

    name: str
    text: str
    # A later turn of a multi-turn conversation (training only): follows the previous answer's EOS.
    followup: str = "USER: {prompt} ASSISTANT:"
    add_bos: bool = True
    stop: tuple[str, ...] = ("</s>",)

    def split(self, prompt: str) -> tuple[str, str]:
        """The text before the image and the text after it, with the question filled in."""
        before, after = self.text.split("<image>")
        return before.replace("{prompt}", prompt), after.replace("{prompt}", prompt)


VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

PROMPT_TEMPLATES: dict[str, PromptTemplate] = {
    # MobileVLM's `v1` conversation: system, " USER: <image>\n{prompt} ASSISTANT:", stop at </s>.
    "vicuna_v1": PromptTemplate("vicuna_v1", VICUNA_SYSTEM + " USER: <image>\n{prompt} ASSISTANT:", followup="USER: {prompt} ASSISTANT:"),
    # The same turn without the 30-token system sentence, for the small models trained here.
    "tiny": PromptTemplate("tiny", "USER: <image>\n{prompt} ASSISTANT:"),
}


def get_template(name: str) -> PromptTemplate:
    if name not in PROMPT_TEMPLATES:
        raise PromptError(f"unknown prompt template {name!r}; expected one of {', '.join(PROMPT_TEMPLATES)}")
    return PROMPT_TEMPLATES[name]


def check_prompt(prompt: object) -> str:
    if isinstance(prompt, bytes):
        try:
            prompt = prompt.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PromptError(f"prompt is not valid UTF-8 (byte {exc.start})") from None
    if not isinstance(prompt, str):
        raise PromptError(f"prompt must be text, got {type(prompt).__name__}")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PromptError(f"prompt is not valid UTF-8 (character {exc.start})") from None
    if not prompt.strip():
        raise PromptError("prompt is empty")
    return prompt


# --- tokenizer -----------------------------------------------------------------------------------


class Tokenizer:
    """A `tokenizers` tokenizer.json with the ids of its special tokens.

    Special tokens are never added implicitly: callers add BOS where the template asks for it, so the
    same ids come out here and in runtimes that tokenize the prompt parts themselves.
    """

    def __init__(self, path: str | Path, bos: str = "<s>", eos: str = "</s>", pad: str = "<pad>"):
        import tokenizers

        self.path = Path(path)
        if not self.path.is_file():
            raise TokenizerError(f"{self.path}: tokenizer file not found")
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(self.path))
        except Exception as exc:
            raise TokenizerError(f"{self.path}: not a valid tokenizer.json ({exc})") from None
        self.bos_id = self._require(bos)
        self.eos_id = self._require(eos)
        self.pad_id = self._tok.token_to_id(pad)

    def _require(self, token: str) -> int:
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise TokenizerError(f"{self.path}: special token {token!r} is not in the vocabulary")
        return token_id

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes one token stands for (a byte-level token may be part of a UTF-8 character)."""
        piece = self._tok.id_to_token(token_id)
        if piece is None:
            raise TokenizerError(f"{self.path}: token id {token_id} is outside the vocabulary")
        if token_id in self._special_ids:
            return piece.encode("utf-8")
        table = _byte_level_table()
        if not all(c in table for c in piece):
            return piece.encode("utf-8")  # not a byte-level token
        return bytes(table[c] for c in piece)

    @property
    def _special_ids(self) -> set[int]:
        return {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}


def _byte_level_table() -> dict[str, int]:
    """Byte-level BPE's character -> byte table: printable Latin-1 characters stand for themselves,
    the other 68 bytes for the characters from U+0100 on, in byte order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[chr(byte)] = byte
        else:
            table[chr(0x100 + extra)] = byte
            extra += 1
    return table


def train_tokenizer(texts: Iterable[str], vocab_size: int, special_tokens: tuple[str, ...] = ("<pad>", "<s>", "</s>")):
    """A byte-level BPE `tokenizers.Tokenizer` trained on `texts` (special tokens get the first ids)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # BOS when a runtime asks for special tokens (ExecuTorch's num_bos, Android's prefill with bos=1);
    # our own `Tokenizer.encode` adds it explicitly instead.
    bos = special_tokens[1] if len(special_tokens) > 1 else special_tokens[0]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
    return tok


# --- the processor -------------------------------------------------------------------------------


@dataclass
class Processor:
    """Everything between (image, question) and model inputs, for one model."""

    image: ImageProcessor
    template: PromptTemplate
    tokenizer: Tokenizer

    @classmethod
    def from_config(cls, config: MobileVLMConfig, tokenizer: Tokenizer) -> Processor:
        if tokenizer.vocab_size > config.text.vocab_size:
            raise TokenizerError(
                f"{tokenizer.path}: tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary holds "
                f"{config.text.vocab_size} (text.vocab_size)"
            )
        return cls(ImageProcessor.from_config(config), get_template(config.prompt_template), tokenizer)

    def prompt_ids(self, prompt: str) -> tuple[list[int], list[int]]:
        """Token ids of the text before the image (with BOS if the template says so) and after it."""
        before, after = self.template.split(check_prompt(prompt))
        return self.tokenizer.encode(before, add_bos=self.template.add_bos), self.tokenizer.encode(after)

    def __call__(self, image: ImageSource, prompt: str) -> tuple[torch.Tensor, list[int]]:
        """(pixel_values [1, 3, H, W], token ids with `IMAGE_TOKEN_INDEX` where the image goes)."""
        before, after = self.prompt_ids(prompt)
        return self.image.preprocess(image), [*before, IMAGE_TOKEN_INDEX, *after]
