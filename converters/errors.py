"""Converter errors: user input the converter cannot use. The CLI prints the message on one line."""
from __future__ import annotations

from flashmoe_gguf.errors import FlashMoEError


class ConvertError(FlashMoEError):
    """A source folder or file, flag or output location that cannot be converted as asked."""
