"""Errors the toolkit raises on bad input.

Every error a user can cause (a bad file, a bad argument) is a `MobileVLMError`; the CLI prints its
message as one line and exits non-zero, without a traceback unless `--debug` is given. Messages name
the file, the field and what was expected.
"""

from __future__ import annotations


class MobileVLMError(Exception):
    """Base class of every error caused by input rather than by a bug."""


class ConfigError(MobileVLMError):
    """A config.json or a config value is missing, mistyped or out of range."""


class CheckpointError(MobileVLMError):
    """A checkpoint folder or weight file cannot be read, or does not match the model."""


class ImageError(MobileVLMError):
    """An image file cannot be decoded or is not usable."""


class PromptError(MobileVLMError):
    """A prompt is empty, not valid text, or longer than the model's context."""


class TokenizerError(MobileVLMError):
    """A tokenizer file is missing or does not fit the model."""


class ExportError(MobileVLMError):
    """An export cannot be made as asked (unknown recipe, unsupported backend feature, ...)."""


class BundleError(MobileVLMError):
    """A bundle folder or its manifest is missing, corrupt or from an unknown format version."""
