"""Image loading and preprocessing, the prompt template, the tokenizer wrapper."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from mobilevlm.checkpoint import load_processor
from mobilevlm.config import CLIP_MEAN, CLIP_STD
from mobilevlm.errors import ImageError, PromptError, TokenizerError
from mobilevlm.model import IMAGE_TOKEN_INDEX
from mobilevlm.processing import PROMPT_TEMPLATES, ImageProcessor, Tokenizer, check_prompt, load_image

transformers = pytest.importorskip("transformers", reason="transformers is the numerical oracle (the `test` extra)")


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format="PNG")
    return buffer.getvalue()


def test_pad_preprocessing_matches_mobilevlm_pipeline(image_path):
    """MobileVLM's 'pad': expand to a square with the mean colour, then CLIPImageProcessor."""
    processor = ImageProcessor(32, CLIP_MEAN, CLIP_STD, "pad")
    image = Image.open(image_path).convert("RGB")
    side = max(image.size)
    square = Image.new("RGB", (side, side), tuple(int(x * 255) for x in CLIP_MEAN))
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    clip = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_mean=CLIP_MEAN, image_std=CLIP_STD)
    expected = torch.as_tensor(np.asarray(clip(images=square, return_tensors="np")["pixel_values"]))
    ours = processor.preprocess(image_path)
    assert ours.shape == (1, 3, 32, 32)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def test_crop_preprocessing_matches_clip_processor(image_path):
    processor = ImageProcessor(32, CLIP_MEAN, CLIP_STD, "crop")
    clip = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_mean=CLIP_MEAN, image_std=CLIP_STD)
    expected = torch.as_tensor(np.asarray(clip(images=Image.open(image_path).convert("RGB"), return_tensors="np")["pixel_values"]))
    torch.testing.assert_close(processor.preprocess(image_path), expected, atol=1e-5, rtol=0)


def test_prepare_image_is_uint8_and_normalize_finishes_it(image_path):
    processor = ImageProcessor(32, CLIP_MEAN, CLIP_STD, "resize")
    raw = processor.prepare_image(image_path)
    assert raw.dtype == torch.uint8 and raw.shape == (3, 32, 32)
    torch.testing.assert_close(processor.normalize(raw).unsqueeze(0), processor.preprocess(image_path))


@pytest.mark.parametrize(
    "data,message",
    [
        (b"", "file is empty"),
        (b"this is not an image at all", "not a decodable image"),
        ("truncated", "corrupt or truncated"),
        ("tall", "aspect ratio"),
    ],
)
def test_bad_images_are_clear_errors(tmp_path, data, message):
    if data == "truncated":
        data = _png(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))[:300]
    if data == "tall":
        data = _png(np.zeros((1000, 2, 3), dtype=np.uint8))
    path = tmp_path / "bad.png"
    path.write_bytes(data)
    with pytest.raises(ImageError, match=message) as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_missing_image_file(tmp_path):
    with pytest.raises(ImageError, match="no such image file"):
        load_image(tmp_path / "missing.jpg")


def test_sixteen_bit_grey_is_scaled_not_clipped():
    array = np.full((8, 8), 32768, dtype=np.uint16)
    image = load_image(_png(array))
    assert image.mode == "RGB" and abs(image.getpixel((0, 0))[0] - 128) <= 1


def test_transparency_is_composited_over_white():
    array = np.zeros((4, 4, 4), dtype=np.uint8)  # fully transparent black
    assert load_image(_png(array, "RGBA")).getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    assert load_image(buffer.getvalue()).size == (20, 40)


def test_template_split_and_prompt_ids(micro_checkpoint):
    processor = load_processor(micro_checkpoint)
    before, after = processor.template.split("What color is the circle?")
    assert (before, after) == ("USER: ", "\nWhat color is the circle? ASSISTANT:")
    before_ids, after_ids = processor.prompt_ids("What color is the circle?")
    assert before_ids[0] == processor.tokenizer.bos_id and processor.tokenizer.decode(before_ids) == "USER: "
    assert processor.tokenizer.decode(after_ids) == "\nWhat color is the circle? ASSISTANT:"


def test_processor_call(micro_checkpoint, image_path):
    processor = load_processor(micro_checkpoint)
    pixels, ids = processor(image_path, "How many objects are there?")
    assert pixels.shape == (1, 3, 32, 32)
    assert ids.count(IMAGE_TOKEN_INDEX) == 1 and ids[0] == processor.tokenizer.bos_id


def test_vicuna_template_is_mobilevlms():
    before, after = PROMPT_TEMPLATES["vicuna_v1"].split("Q?")
    assert before.endswith("polite answers to the user's questions. USER: ")
    assert after == "\nQ? ASSISTANT:"


@pytest.mark.parametrize("prompt,message", [("", "empty"), ("   \n", "empty"), (b"\xff\xfe", "not valid UTF-8"), ("bad \udcff", "not valid UTF-8"), (3, "must be text")])
def test_bad_prompts(prompt, message):
    with pytest.raises(PromptError, match=message):
        check_prompt(prompt)


def test_tokenizer_round_trip_and_specials(tokenizer_path):
    tok = Tokenizer(tokenizer_path)
    text = "A red circle at the top left. ünïcödé 日本語"
    ids = tok.encode(text, add_bos=True)
    assert ids[0] == tok.bos_id and tok.decode(ids) == text
    assert (tok.token_to_id("<pad>"), tok.bos_id, tok.eos_id) == (0, 1, 2)


def test_tokenizer_errors(tmp_path, tokenizer_path, micro_checkpoint):
    with pytest.raises(TokenizerError, match="not found"):
        Tokenizer(tmp_path / "nope.json")
    (tmp_path / "broken.json").write_text("{}")
    with pytest.raises(TokenizerError, match="not a valid tokenizer.json"):
        Tokenizer(tmp_path / "broken.json")
    with pytest.raises(TokenizerError, match="special token '<bos>'"):
        Tokenizer(tokenizer_path, bos="<bos>")


def test_tokenizer_larger_than_vocabulary_is_refused(tmp_path, micro_checkpoint):
    import json
    import shutil

    from mobilevlm.processing import train_tokenizer

    folder = tmp_path / "m"
    shutil.copytree(micro_checkpoint, folder)
    corpus = [" ".join(f"w{i}x{j}" for j in range(40)) for i in range(200)]
    train_tokenizer(corpus, vocab_size=600).save(str(folder / "tokenizer.json"))
    assert json.loads((folder / "config.json").read_text())["model"]["text"]["vocab_size"] == 384
    with pytest.raises(TokenizerError, match="vocab_size"):
        load_processor(folder)


def test_missing_tokenizer(tmp_path, micro_checkpoint):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(micro_checkpoint, folder)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(TokenizerError, match="tokenizer.json: missing"):
        load_processor(folder)
