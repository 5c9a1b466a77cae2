"""Errors the CLI turns into one clear line and a non-zero exit (never a traceback)."""


class DlpError(Exception):
    """A user-facing failure: bad input, missing files, unusable cache dir."""


class InvalidMixError(DlpError, ValueError):
    """An adapter mix that cannot be used (unknown name, bad weights, too many adapters)."""

    def __init__(self, message: str, field: str = "adapters") -> None:
        super().__init__(message)
        self.field = field


class AdapterValidationError(DlpError, ValueError):
    """An adapter on disk that must not be loaded (pickle, wrong shapes, NaNs, ...)."""
