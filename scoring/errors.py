"""Errors a user can cause in `scoring`: one line that names the file, row or parameter."""


class ScoringError(Exception):
    """Base of every user-facing scoring error; the CLI prints its message without a traceback."""


class PartitionError(ScoringError):
    """A partition cannot be opened or committed (e.g. a shard still writing, a bad run id)."""


class RuntimeUnavailableError(ScoringError):
    """The requested runtime or device is not usable here (e.g. ``device="cuda"`` with no GPU)."""


class BundleRefError(ScoringError):
    """A model reference does not resolve to a usable image bundle."""


class ImageFolderError(ScoringError):
    """The folder to score does not exist, is not a directory, or holds no images."""
