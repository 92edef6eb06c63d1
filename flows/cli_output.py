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
