"""User-facing errors: the CLI prints their message on one line and exits with code 2."""


class FastGRPOError(Exception):
    """A problem the user can fix (bad config, missing file, wrong model directory)."""


class ConfigError(FastGRPOError):
    """The configuration is malformed or asks for something impossible."""


class DataError(FastGRPOError):
    """A prompt source cannot be read or is empty."""


class NonFiniteError(FastGRPOError):
    """Training produced a NaN or infinity (loss, gradient norm, reward or weights)."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; the message says which checkpoint a resume would start from."""


class ModelLoadError(FastGRPOError):
    """A model directory or checkpoint is missing or has the wrong format."""
