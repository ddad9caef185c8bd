"""Exceptions that carry a one-line message meant for the user (the CLI prints them and exits 2)."""


class SdrtError(Exception):
    """Base class: the message is complete and needs no traceback to be understood."""


class BundleError(SdrtError):
    """A bundle is missing, incomplete, of an unknown format, or fails its checksums."""


class ContractError(SdrtError):
    """A tensor does not match a component's I/O contract."""


class RequestError(SdrtError, ValueError):
    """A generation request has an invalid parameter (size, steps, sampler...); also a ValueError, as Python's own
    argument errors are."""


class ExportError(SdrtError):
    """A checkpoint cannot be loaded or an exported component fails its parity check."""


class BackendError(SdrtError):
    """An engine is not installed or cannot run a bundle."""


class ConfigError(SdrtError):
    """A setting from the environment (cache sizes, folders) is invalid."""


# Unicode categories a terminal may act on instead of showing: controls (ESC starts escape sequences, CR rewrites
# the line), format characters (bidirectional overrides reorder what is shown, zero-width ones hide text),
# surrogates (undecodable bytes from the command line) and line or paragraph separators.
_UNPRINTABLE = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
_SURROGATE_ESCAPES = range(0xDC80, 0xDD00)  # Python's surrogateescape: byte b became U+DC00 + b


def printable(text: object) -> str:
    """`text` with every character a terminal would act on written as a backslash escape (\\x1b, \\u202e)."""
    import unicodedata

    text = str(text)
    if text.isprintable():
        return text
    return "".join(_escape(c) if unicodedata.category(c) in _UNPRINTABLE else c for c in text)


def _escape(c: str) -> str:
    code = ord(c)
    if code in _SURROGATE_ESCAPES:
        code -= 0xDC00  # show the undecodable byte itself
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"
class WeightsFileError(SdrtError):
    """A weights file (an embedding, a LoRA) is malformed, or holds something other than tensors and plain data."""
