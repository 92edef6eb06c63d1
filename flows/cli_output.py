"""What the ``lensflow`` commands print: one stderr console for progress, stdout for results."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

# No markup: summaries and paths may hold brackets, which rich would swallow as tags.
console = Console(stderr=True, markup=False, highlight=False)
out = Console(soft_wrap=True, markup=False, highlight=False)
#: Plain help text: our help strings hold brackets such as REG/NAME[/VERSION].
PLAIN = {"no_args_is_help": True, "rich_markup_mode": None}


def print_metrics(title: str, metrics: dict) -> None:
    """The numeric metrics as a two-column table on stdout."""
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        if isinstance(value, int | float):
            table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    out.print(table)


def epoch_line(event: dict) -> str:
    """One line for a finished epoch: its stage, losses, float metrics and seconds."""
    parts = [f"{k}={v:.4f}" for k, v in event.get("metrics", {}).items() if isinstance(v, float)]
    return (f"{event.get('stage', '')} epoch {event.get('epoch')}: "
            f"train_loss={event.get('train_loss', float('nan')):.4f} "
            f"valid_loss={event.get('valid_loss', float('nan')):.4f} "
            + " ".join(parts) + f" ({event.get('seconds', 0):.1f}s)")


class TrainingProgress:
    """The training events as live bars on a terminal: each LR sweep and each epoch's batches,
    with ETA; finished epochs and LR choices stay as lines. Not a terminal: the lines only."""

    def __init__(self, live: bool | None = None, to: Console | None = None) -> None:
        self.console = to or console
        self.live = self.console.is_terminal if live is None else live
        self.bar = None
        self.task = None

    def __enter__(self) -> TrainingProgress:
        return self

    def __exit__(self, *exc) -> None:
        self._stop()  # a failed run must not leave a live bar over its error line

    def __call__(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "lr_find_start":
            self._start(f"LR finder ({event.get('iterations')} steps)", event.get("iterations"))
        elif kind == "lr_find":
            self._update(event.get("iteration", 0) + 1)
        elif kind == "batch":
            if event.get("batch") == 0:
                self._start(f"{event.get('stage', '')} epoch {event.get('epoch')}",
                            event.get("batches"))
            self._update(event.get("batch", 0) + 1)
        elif kind == "features_start":
            self._start(f"body features ({event.get('batches')} batches)", event.get("batches"))
        elif kind == "features":
            self._update(event.get("batch", 0) + 1)
        elif kind == "head_init":
            self._stop()
            self.console.print(f"head: {event.get('why')}")
        elif kind == "lr_found":
            self._stop()
            self.console.print(f"{event.get('stage', '')} LR finder: {event.get('suggestions')}")
        elif kind == "epoch_end":
            self._stop()
            self.console.print(epoch_line(event))
        elif kind == "time_budget":
            self._stop()
            self.console.print(event.get("why"))
        elif kind == "end":
            self._stop()

    def _start(self, description: str, total) -> None:
        if not self.live:
            return
        from rich.progress import Progress

        self._stop()
        self.bar = Progress(console=self.console, transient=True)
        self.bar.start()
        self.task = self.bar.add_task(description, total=total)

    def _update(self, completed: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=completed)

    def _stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
