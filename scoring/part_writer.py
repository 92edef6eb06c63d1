"""The Parquet part writer a shard fills a pending partition with (see :mod:`scoring.partition`).

A part is written under a hidden in-progress name and renamed when whole, so the commit can tell a
finished part from one a crash left behind; on object storage a part appears whole when its upload
completes and an unfinished upload is discarded.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from export.storage import filesystem, join
from scoring.fault_hook import fault_point

if TYPE_CHECKING:
    from scoring.partition import PendingPartition

IN_PROGRESS_SUFFIX = ".inprogress"
Batch = pa.RecordBatch | pa.Table | dict


class PartWriter:
    """Streams record batches into numbered Parquet files of at most ``rows_per_file`` rows.

    Batches are buffered up to ``row_group_rows`` rows (so row groups are not as small as the
    caller's batches) and each file is written under a hidden in-progress name, renamed when
    closed; memory stays bounded by one row group whatever the number of rows.
    """

    def __init__(self, pending: PendingPartition, name_of: Callable[[int], str]):
        self.pending = pending
        self._name_of = name_of
        self._seq = 0
        self._writer: pq.ParquetWriter | None = None
        self._path: Path | str | None = None
        self._sink = None  # the object being uploaded, on object storage
        self._rows_in_file = 0
        self._buffer: list[pa.RecordBatch] = []
        self._buffered = 0
        self.rows = 0
        self.files: list[Path] = []

    def __enter__(self) -> PartWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def write(self, data: Batch) -> None:
        """Append rows: a record batch, a table, or a dict of columns (cast to the schema)."""
        table = _as_table(data, self.pending.schema)
        for batch in table.to_batches():
            self._buffer.append(batch)
            self._buffered += batch.num_rows
            if self._buffered >= self.pending.row_group_rows:
                self._flush()

    def close(self) -> list[Path]:
        """Flush and finish the open file; writes one empty file if no row came, so the schema is
        always there to read."""
        self._flush()
        if self._writer is None and not self.files:
            self._open_file()
        self._close_file()
        return self.files

    def abort(self) -> None:
        """Drop the file being written (finished files stay for the caller to discard)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._sink is not None:  # never completed, so the object never appears
            getattr(self._sink, "discard", lambda: None)()
            self._sink = None
        elif self._path is not None:
            _in_progress(self._path).unlink(missing_ok=True)
        self._path = None

    def _flush(self) -> None:
        if not self._buffered:
            return
        table = pa.Table.from_batches(self._buffer, schema=self.pending.schema)
        self._buffer, self._buffered = [], 0
        offset = 0
        while offset < table.num_rows:
            if self._writer is None:
                self._open_file()
            room = self.pending.rows_per_file - self._rows_in_file
            chunk = table.slice(offset, room)
            self._writer.write_table(chunk, row_group_size=self.pending.row_group_rows)
            fault_point("mid-write")
            self._rows_in_file += chunk.num_rows
            self.rows += chunk.num_rows
            offset += chunk.num_rows
            if self._rows_in_file >= self.pending.rows_per_file:
                self._close_file()

    def _open_file(self) -> None:
        self._path = join(self.pending.temp_dir, self._name_of(self._seq))
        self._seq += 1
        if self.pending.remote:  # an object appears whole when its upload completes
            fs, path = filesystem(self._path)
            self._sink = fs.open(path, "wb")
            self._writer = pq.ParquetWriter(self._sink, self.pending.schema)
        else:
            self._writer = pq.ParquetWriter(_in_progress(self._path), self.pending.schema)
        self._rows_in_file = 0

    def _close_file(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        if self._sink is not None:
            self._sink.close()
            self._sink = None
        else:
            os.rename(_in_progress(self._path), self._path)
        self.files.append(self._path)
        self._writer, self._path = None, None


def _in_progress(path: Path) -> Path:
    return path.with_name(f".{path.name}{IN_PROGRESS_SUFFIX}")


def _as_table(data: Batch, schema: pa.Schema) -> pa.Table:
    if isinstance(data, dict):
        return pa.Table.from_pydict(data, schema=schema)
    table = pa.Table.from_batches([data]) if isinstance(data, pa.RecordBatch) else data
    return table.select(schema.names).cast(schema)
