"""Reading and checking ratings files: which layout a path holds, and every bad value by line.

Layouts are the ones GroupLens ships MovieLens in (Harper & Konstan, "The MovieLens Datasets",
ACM TiiS 2015) plus any CSV/Parquet table whose columns are named:

- ``u.data`` (tab-separated ``user item rating timestamp``, no header) + ``u.item`` (latin-1,
  ``|``-separated ``id|title|...``, bare quotes in titles) — MovieLens 100K;
- ``ratings.csv`` (``userId,movieId,rating,timestamp``) + ``movies.csv`` (``movieId,title,genres``,
  quoted titles with commas, LF or CRLF, UTF-8) — the CSV releases (ml-latest, 20M, 25M, 32M);
- a ``.csv`` / ``.parquet`` file whose columns you name (or that uses one of the common names).

Everything is read with pandas/pyarrow in one vectorised pass; line numbers in messages are
1-based editor lines counting the header (Parquet: 1-based rows). A line inside a quoted multi-line
field would shift the count, which ratings files never have. Text files may start with a UTF-8
byte-order mark. A row with more fields than the header (or than u.data's four) is refused.

Ids are exact 64-bit integers: a column that is not read as integers is re-read as text and
parsed without a float round trip (``9007199254740993`` stays itself). An id beyond ±2⁶³ − 1,
or written otherwise than in digits (``1e20``), is refused with its file and line, never wrapped.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from export.storage import is_url, local_copy, ref_text
from training.data.ratings_ids import RatingsFormatError, exact_ids

#: Declared rating range of each known format (the GroupLens READMEs); tables declare none.
FORMAT_RANGES = {"ml-100k": (1.0, 5.0), "movielens-csv": (0.5, 5.0)}
_GUESSED_COLUMNS = (("userId", "movieId", "rating"), ("user_id", "item_id", "rating"),
                    ("user", "item", "rating"))
_SHOWN_LINES = 5
_FIELDS_ERROR = re.compile(r"Expected (\d+) fields in line (\d+), saw (\d+)")
_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class RatingsSource:
    """Where the ratings (and optionally titles) live and which columns hold what."""

    ratings_path: Path
    format: str  # "ml-100k" | "movielens-csv" | "table"
    user_col: str
    item_col: str
    rating_col: str
    time_col: str | None
    items_path: Path | None = None
    items_id_col: str | None = None
    title_col: str | None = None

    @property
    def first_data_line(self) -> int:
        """Editor line of the first data row: 2 below a header, 1 for u.data; row 1 in Parquet."""
        has_header = self.format != "ml-100k" and self.ratings_path.suffix != ".parquet"
        return 2 if has_header else 1


def detect_source(path: str | Path, *, user_col: str | None = None, item_col: str | None = None,
                  rating_col: str | None = None, time_col: str | None = None,
                  items_path: str | Path | None = None, title_col: str | None = None,
                  items_id_col: str | None = None) -> RatingsSource:
    """Work out the format from a directory's files (u.data, ratings.csv) or a file's name.

    A URL (``s3://bucket/ml-100k``) is downloaded first into a temporary local folder.
    """
    if is_url(path) or (items_path is not None and is_url(items_path)):
        try:
            path = local_copy(ref_text(path)) if is_url(path) else path
            items_path = local_copy(ref_text(items_path)) if items_path and is_url(items_path) \
                else items_path
        except FileNotFoundError as err:
            raise RatingsFormatError(f"{err}: no such file or directory") from None
    path = Path(path)
    if not path.exists():
        raise RatingsFormatError(f"{path}: no such file or directory")
    if path.is_dir():
        for name in ("u.data", "ratings.csv", "ratings.parquet"):
            if (path / name).is_file():
                return detect_source(path / name, user_col=user_col, item_col=item_col,
                                     rating_col=rating_col, time_col=time_col,
                                     items_path=items_path, title_col=title_col,
                                     items_id_col=items_id_col)
        raise RatingsFormatError(f"{path}: no u.data, ratings.csv or ratings.parquet in directory")
    items = Path(items_path) if items_path else None
    named = any(c is not None for c in (user_col, item_col, rating_col))
    if path.name == "u.data" and not named:
        items = items or _sibling(path, "u.item")
        return RatingsSource(path, "ml-100k", "user", "item", "rating", "timestamp",
                             items, "id", "title")
    if path.name == "ratings.csv" and not named:
        items = items or _sibling(path, "movies.csv")
        return RatingsSource(path, "movielens-csv", "userId", "movieId", "rating",
                             time_col or "timestamp", items, "movieId", title_col or "title")
    if path.suffix.lower() not in (".csv", ".parquet"):
        raise RatingsFormatError(f"{path}: expected u.data, a .csv or a .parquet file")
    user_col, item_col, rating_col = _guess_columns(path, user_col, item_col, rating_col)
    return RatingsSource(path, "table", user_col, item_col, rating_col, time_col, items,
                         items_id_col or item_col, title_col or "title")


def _sibling(path: Path, name: str) -> Path | None:
    return path.with_name(name) if path.with_name(name).is_file() else None


def _guess_columns(path, user_col, item_col, rating_col) -> tuple[str, str, str]:
    if None not in (user_col, item_col, rating_col):
        return user_col, item_col, rating_col
    header = set(_header(path))
    for guess in _GUESSED_COLUMNS:
        if set(guess) <= header:
            return user_col or guess[0], item_col or guess[1], rating_col or guess[2]
    return user_col or "user", item_col or "item", rating_col or "rating"


def _header(path: Path) -> list[str]:
    if path.suffix.lower() == ".parquet":
        return list(pq.read_schema(path).names)
    with open(path, encoding="utf-8-sig", errors="replace", newline="") as f:
        return next(csv.reader(f), [])


def _where(path: Path, first_line: int, rows: np.ndarray) -> str:
    """'ratings.csv line 4' / 'x.parquet rows 2, 9, …' for the 0-based data rows given."""
    unit = "row" if path.suffix.lower() == ".parquet" else "line"
    shown = ", ".join(str(int(r) + first_line) for r in rows[:_SHOWN_LINES])
    more = ", …" if len(rows) > _SHOWN_LINES else ""
    return f"{path.name} {unit}{'s' if len(rows) > 1 else ''} {shown}{more}"


def read_ratings(source: RatingsSource) -> pd.DataFrame:
    """Ratings as columns user, item, rating[, time] plus `row` (0-based data row in the file)."""
    path = source.ratings_path
    wanted = [source.user_col, source.item_col, source.rating_col]
    if source.time_col:
        wanted.append(source.time_col)
    try:
        if path.suffix.lower() == ".parquet":
            frame = _read_parquet(path, wanted)
        elif source.format == "ml-100k":
            frame = _read_delimited(path, 1, sep="\t", header=None, names=wanted[:4],
                                    encoding="utf-8-sig", skip_blank_lines=False)
        else:
            frame = _read_csv(path, wanted)
    except RatingsFormatError:
        raise
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError, OSError) as e:
        layout = " as tab-separated user, item, rating, timestamp" \
            if source.format == "ml-100k" else ""
        raise RatingsFormatError(f"{path.name}: cannot read ratings{layout} "
                                 f"({_first_line(e)})") from e
    if path.suffix.lower() != ".parquet":
        frame = _ids_as_text(frame, source)
    names = {source.user_col: "user", source.item_col: "item", source.rating_col: "rating"}
    if source.time_col:
        names[source.time_col] = "time"
    frame = frame.rename(columns=names)
    frame["row"] = np.arange(len(frame), dtype=np.int64)
    blank = frame[list(names.values())].isna().all(axis=1)
    frame = frame[~blank.to_numpy()]
    if frame.empty:
        raise RatingsFormatError(f"{path.name}: no ratings in file")
    return _validate_numbers(frame, source)


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _read_parquet(path: Path, wanted: list[str]) -> pd.DataFrame:
    _require_columns(path, list(pq.read_schema(path).names), wanted)
    return pq.read_table(path, columns=wanted).to_pandas()


def _read_csv(path: Path, wanted: list[str]) -> pd.DataFrame:
    try:
        header = _header(path)
    except OSError as e:
        raise RatingsFormatError(f"{path.name}: cannot read ({e.strerror})") from e
    if not header:
        raise RatingsFormatError(f"{path.name}: no ratings in file (empty)")
    _require_columns(path, header, wanted)
    # utf-8-sig: a byte-order mark (Excel's UTF-8 export) must not glue itself to the first name.
    return _read_delimited(path, 2, skip_blank_lines=False, encoding="utf-8-sig",
                           encoding_errors="replace")[wanted]


def _read_delimited(path: Path, first_line: int, **options) -> pd.DataFrame:
    """``pd.read_csv`` that refuses a row with more fields than the header (or ``names``).

    Every column is read (``usecols`` would drop extra fields without a word); first_line: the
    editor line of the first data row, which pandas' warning about it does not name.
    """
    # pandas names a long row in an error, except the first data row: that one it cuts to the
    # header's width with only a warning, so it is counted here. (Not by turning the warning into
    # an error: warnings.catch_warnings swaps process-wide filters, which races with any other
    # thread doing the same.)
    expected = len(options.get("names") or _header(path))
    seen = _first_data_row_fields(path, options.get("sep", ","), first_line - 1)
    if seen > expected:
        raise RatingsFormatError(f"{path.name} line {first_line}: {seen} fields, expected "
                                 f"{expected}")
    try:
        return pd.read_csv(path, index_col=False, **options)
    except pd.errors.ParserError as e:
        found = _FIELDS_ERROR.search(str(e))
        if found is None:
            raise
        expected, line, seen = found.groups()
        raise RatingsFormatError(f"{path.name} line {line}: {seen} fields, expected "
                                 f"{expected}") from None


def _first_data_row_fields(path: Path, sep: str, header_rows: int) -> int:
    """Fields of the row after ``header_rows`` rows, split as pandas splits them (0 at the end)."""
    with open(path, encoding="utf-8-sig", errors="replace", newline="") as f:
        rows = csv.reader(f, delimiter=sep)
        for _ in range(header_rows):
            next(rows, None)
        return len(next(rows, []))


def _ids_as_text(frame: pd.DataFrame, source: RatingsSource) -> pd.DataFrame:
    """Id columns pandas did not read as int64 (a blank, a big or odd value made them float or
    object), read again as text so that no id goes through a float."""
    for col in (source.user_col, source.item_col):
        if frame[col].dtype != np.int64:
            if source.format == "ml-100k":
                text = pd.read_csv(source.ratings_path, sep="\t", header=None,
                                   names=list(frame.columns), usecols=[col], dtype=str,
                                   encoding="utf-8-sig", skip_blank_lines=False)[col]
            else:
                text = pd.read_csv(source.ratings_path, usecols=[col], dtype=str,
                                   encoding="utf-8-sig", encoding_errors="replace",
                                   skip_blank_lines=False)[col]
            frame[col] = text.to_numpy()
    return frame


def _require_columns(path: Path, header: list[str], wanted: list[str]) -> None:
    missing = [c for c in wanted if c not in header]
    if missing:
        raise RatingsFormatError(f"{path.name} line 1: missing column {missing[0]!r} "
                                 f"(found: {', '.join(map(str, header)) or 'nothing'})")


def _validate_numbers(frame: pd.DataFrame, source: RatingsSource) -> pd.DataFrame:
    """Ids must be integers and ratings finite numbers; a bad value names its line."""
    rows = frame["row"].to_numpy()

    def where(bad):
        return _where(source.ratings_path, source.first_data_line, rows[bad])

    out = {"row": rows}
    for col, kind in (("user", "user id"), ("item", "item id")):
        out[col] = exact_ids(frame[col], kind, where, _column(source, col))
    out["rating"] = _rating_column(frame["rating"], where, source.rating_col)
    if "time" in frame:
        out["time"] = _time_column(frame["time"], where, source.time_col)
    return pd.DataFrame(out)


def _rating_column(raw: pd.Series, where, name: str) -> np.ndarray:
    values = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~np.isfinite(values)
    if bad.any():
        first = raw.to_numpy()[bad][0]
        what = "missing rating" if pd.isna(first) else f"non-numeric rating {str(first)!r}"
        count = f" ({int(bad.sum())} bad values)" if bad.sum() > 1 else ""
        raise RatingsFormatError(f"{where(bad)}: {what} in column {name!r}{count}")
    return values.astype(np.float32)


def _column(source: RatingsSource, role: str) -> str:
    return {"user": source.user_col, "item": source.item_col, "rating": source.rating_col}[role]


def _time_column(raw: pd.Series, where, name: str) -> np.ndarray:
    """Timestamps only order ratings: epoch numbers as they are, date strings as epoch ns."""
    if pd.api.types.is_numeric_dtype(raw):
        values = raw.to_numpy(dtype=np.float64, na_value=np.nan)
    else:
        parsed = pd.to_datetime(raw, errors="coerce", utc=True, format="mixed")
        values = np.full(len(parsed), np.nan)
        ok = parsed.notna().to_numpy()
        values[ok] = parsed[ok].astype("int64").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        raise RatingsFormatError(f"{where(bad)}: missing or unreadable timestamp "
                                 f"in column {name!r}")
    return values


def read_titles(source: RatingsSource) -> tuple[pd.Series, list[str]]:
    """Item id → title from u.item / movies.csv / a named items file; empty when there is none."""
    path = source.items_path
    if path is None:
        return pd.Series(dtype=object), []
    warnings: list[str] = []
    id_col, title_col = source.items_id_col or source.item_col, source.title_col or "title"
    try:
        if source.format == "ml-100k":
            # u.item is latin-1 (unless a byte-order mark says UTF-8), and titles hold bare
            # quotes: no CSV quoting.
            encoding = "utf-8-sig" if _starts_with_bom(path) else "latin-1"
            frame = pd.read_csv(path, sep="|", header=None, usecols=[0, 1],
                                names=[id_col, title_col], encoding=encoding,
                                quoting=csv.QUOTE_NONE, dtype=str, skip_blank_lines=False)
        elif path.suffix.lower() == ".parquet":
            frame = _read_parquet(path, [id_col, title_col])
        else:
            frame, warnings = _read_titles_csv(path, [id_col, title_col])
    except (pd.errors.ParserError, ValueError, OSError) as e:
        raise RatingsFormatError(f"{path.name}: cannot read titles ({_first_line(e)})") from e
    first = 1 if source.format == "ml-100k" or path.suffix.lower() == ".parquet" else 2
    frame = frame[frame[id_col].notna().to_numpy() | frame[title_col].notna().to_numpy()]
    rows = frame.index.to_numpy()  # read_csv's RangeIndex: the 0-based data row
    ids = exact_ids(frame[id_col], "item id", lambda bad: _where(path, first, rows[bad]),
                     id_col)
    titles = pd.Series(frame[title_col].astype(object).to_numpy(), index=ids)
    titles = titles.where(titles.notna(), None)
    return titles[~titles.index.duplicated(keep="first")], warnings


def _starts_with_bom(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(len(_BOM)) == _BOM


def _read_titles_csv(path: Path, wanted: list[str]) -> tuple[pd.DataFrame, list[str]]:
    """movies.csv is UTF-8 in every GroupLens CSV release; fall back to latin-1 and say so."""
    _require_columns(path, _header(path), wanted)
    try:
        return pd.read_csv(path, usecols=wanted, dtype=str, encoding="utf-8-sig",
                           skip_blank_lines=False)[wanted], []
    except UnicodeDecodeError:
        frame = pd.read_csv(path, usecols=wanted, dtype=str, encoding="latin-1",
                            skip_blank_lines=False)[wanted]
        return frame, [f"{path.name}: not valid UTF-8, read as latin-1"]


def drop_duplicates(frame: pd.DataFrame, source: RatingsSource) -> tuple[pd.DataFrame, list[str]]:
    """Keep the last rating of each (user, item) pair, as a re-rating replaces the earlier one."""
    dup = frame.duplicated(["user", "item"], keep="last").to_numpy()
    if not dup.any():
        return frame, []
    where = _where(source.ratings_path, source.first_data_line, frame["row"].to_numpy()[dup])
    return frame[~dup], [f"{int(dup.sum())} duplicate (user, item) ratings; kept the last of each, "
                         f"dropped {where}"]


def check_range(frame: pd.DataFrame, source: RatingsSource, rating_range, *,
                declared_by: str | None = None) -> None:
    """Every rating within ``rating_range``; else one line naming the file, the lines and the
    ``y_range`` option (CLI ``--y-range``) that sets the range a model can predict.

    declared_by: where the range comes from (default: the file's format, or ``rating_range``).
    """
    lo, hi = rating_range
    ratings = frame["rating"].to_numpy()
    bad = (ratings < lo) | (ratings > hi)
    if bad.any():
        where = _where(source.ratings_path, source.first_data_line, frame["row"].to_numpy()[bad])
        declared_by = declared_by or (f"the {source.format} format's range"
                                      if source.format in FORMAT_RANGES else "the declared range")
        raise RatingsFormatError(
            f"{where}: rating {ratings[bad][0]:g} outside {lo:g}–{hi:g}, {declared_by} "
            f"({int(bad.sum())} bad); fix the file, or set the range with option y_range "
            f"(--y-range LOW,HIGH)")


