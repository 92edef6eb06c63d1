"""Errors a user can cause in `training`: one line that names the file, row or parameter."""


class TrainingError(Exception):
    """Base of every user-facing training error; the CLI prints its message without a traceback."""
