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
