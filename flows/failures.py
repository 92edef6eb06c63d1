"""How flows fail: user errors end the run at once with their own message; storage hiccups retry.

A user error (a missing folder, a bad bundle, a failed parity gate) fails the same way every
time, so retrying it only delays the message. A flow catches these and returns a ``Failed``
state whose message is the error's one line, which is what the UI, ``prefect deployment run
--watch`` and the CLI show. Transient storage errors (``OSError`` from a network disk, a full
volume being cleaned) are the only ones worth retrying, and only on tasks that write.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from prefect import get_run_logger
from prefect.states import Failed, State

from export.errors import ExportError
from scoring.errors import ScoringError
from training.errors import TrainingError

USER_ERRORS: tuple[type[Exception], ...] = (TrainingError, ExportError, ScoringError)

#: Seconds between attempts of a task that writes to storage (commit, promote).
STORAGE_RETRY_DELAYS = [5, 20]


def retry_on_storage_error(task, task_run, state: State) -> bool:
    """``retry_condition_fn`` for writing tasks: retry an ``OSError``, never a user error."""
    error = state.data
    return isinstance(error, OSError) and not isinstance(error, USER_ERRORS)


def user_failure(error: Exception) -> State:
    """The final state of a run stopped by a user error: its message, no traceback."""
    return Failed(message=str(error))


def user_errors_fail_the_run(body: Callable) -> Callable:
    """Wrap a flow's body: a user error it raises is logged and ends the run as ``user_failure``."""
    @functools.wraps(body)
    def run(*args, **kwargs):
        try:
            return body(*args, **kwargs)
        except USER_ERRORS as err:
            get_run_logger().error(str(err))
            return user_failure(err)
    return run
