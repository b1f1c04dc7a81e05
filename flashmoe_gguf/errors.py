"""User-facing errors: the CLI prints their message on one line and exits non-zero, no traceback."""


class FlashMoEError(Exception):
    """Base class of every error caused by user input (a file, a flag, a prompt)."""


class GGUFError(FlashMoEError):
    """A GGUF file that is malformed, truncated or inconsistent; the message names the file."""


class ModelError(FlashMoEError):
    """A well-formed GGUF that this runtime cannot run (unknown architecture, missing tensor...)."""


class ContextOverflowError(FlashMoEError):
    """The tokens do not fit the context window."""
