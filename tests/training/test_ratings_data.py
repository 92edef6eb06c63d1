"""Ratings prep: every input layout, every user-caused error with file and line, splits, vocab."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from paths import SHARED_DATA

from training.data.ratings import Vocabulary, build_rating_loaders, load_ratings
from training.errors import TrainingError

SHARED = SHARED_DATA
ML100K = SHARED / "ml-100k"


def write_ml100k(folder: Path, rows: list[tuple], titles: dict[int, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows))
    lines = "".join(f"{i}|{t}|01-Jan-1995||http://x|0|1\n" for i, t in titles.items())
    (folder / "u.item").write_bytes(lines.encode("latin-1"))
    return folder


def write_csv(path: Path, text: str, crlf: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.replace("\n", "\r\n" if crlf else "\n").encode("utf-8"))
    return path


def grid_rows(n_users: int = 6, n_items: int = 5) -> list[tuple]:
    """Every user rates every item, rating and time varying so splits are checkable."""
    return [(10 * u, 100 + i, 1 + (u + i) % 5, 1000 + u * n_items + i)
            for u in range(1, n_users + 1) for i in range(n_items)]


def test_ml100k_layout_reads_latin1_titles_and_encodes_sorted_ids(tmp_path):
    titles = {100 + i: f"Film {i}" for i in range(5)} | {102: "Misérables, Les (1995)"}
    folder = write_ml100k(tmp_path / "ml", grid_rows(), titles)

    data = load_ratings(folder, valid_pct=0.2, seed=0)

    assert data.source.format == "ml-100k"
    assert data.users.to_list() == [10, 20, 30, 40, 50, 60]
    assert data.items.to_list() == [100, 101, 102, 103, 104]
    assert data.titles[2] == "Misérables, Les (1995)"
    assert len(data.train_ratings) + len(data.valid_ratings) == 30
    assert len(data.valid_ratings) == 6
    # Every encoded pair decodes back to a rating that is in the file.
    lookup = {(u, i): r for u, i, r, _ in grid_rows()}
    users = data.users.decode(data.train_pairs[:, 0])
    items = data.items.decode(data.train_pairs[:, 1])
    got = zip(users, items, data.train_ratings, strict=True)
    assert all(lookup[(u, i)] == r for u, i, r in got)
    assert "30 ratings" in data.summary()


def test_movielens_csv_with_crlf_and_quoted_commas(tmp_path):
    folder = tmp_path / "ml-latest"
    write_csv(folder / "ratings.csv", "userId,movieId,rating,timestamp\n"
              "1,7,4.5,100\n1,3,3.0,101\n2,7,0.5,102\n2,3,5.0,103\n3,3,2.5,104\n", crlf=True)
    write_csv(folder / "movies.csv", 'movieId,title,genres\n'
              '3,"American President, The (1995)",Comedy|Drama\n'
              '7,Sabrina (1995),Comedy\n', crlf=True)

    data = load_ratings(folder, valid_pct=0.4)

    assert data.source.format == "movielens-csv"
    assert data.items.to_list() == [3, 7]
    assert data.titles == ("American President, The (1995)", "Sabrina (1995)")
    assert data.rating_range == (0.5, 5.0)
    all_ratings = np.concatenate([data.train_ratings, data.valid_ratings])
    assert sorted(all_ratings.tolist()) == [0.5, 2.5, 3.0, 4.5, 5.0]


def test_parquet_with_custom_columns_and_items_file(tmp_path):
    frame = pd.DataFrame({"who": [5, 5, 9, 9, 2], "what": [1, 2, 1, 3, 3],
                          "stars": [1.0, 8.0, 10.0, 6.0, 7.0]})
    frame.to_parquet(tmp_path / "events.parquet")
    pd.DataFrame({"sku": [1, 2, 3], "name": ["a", "b", "c"]}).to_parquet(tmp_path / "sku.parquet")

    data = load_ratings(tmp_path / "events.parquet", user_col="who", item_col="what",
                        rating_col="stars", items_path=tmp_path / "sku.parquet",
                        items_id_col="sku", title_col="name", valid_pct=0.2,
                        rating_range=(1, 10))

    assert data.source.format == "table"
    assert data.users.to_list() == [2, 5, 9]
    assert data.rating_range == (1.0, 10.0)
    assert data.titles == ("a", "b", "c")
    with pytest.raises(TrainingError, match=r"events\.parquet rows 2, 3: .*outside .*1–7"):
        load_ratings(tmp_path / "events.parquet", user_col="who", item_col="what",
                     rating_col="stars", rating_range=(1, 7))


def test_error_names_file_and_editor_line_for_non_numeric_id(tmp_path):
    path = write_csv(tmp_path / "ratings.csv",
                     "userId,movieId,rating,timestamp\n1,2,3,4\n1,x9,3,5\n2,2,3,6\n")
    with pytest.raises(TrainingError, match=r"ratings\.csv line 3: non-numeric item id 'x9'"):
        load_ratings(path)


def test_error_for_missing_column_names_header_line(tmp_path):
    path = write_csv(tmp_path / "r.csv", "user,item,score\n1,2,3\n")
    with pytest.raises(TrainingError, match=r"r\.csv line 1: missing column 'rating'"):
        load_ratings(path)


def test_error_for_rating_outside_declared_range_counts_lines_with_blank_lines(tmp_path):
    folder = tmp_path / "ml"
    folder.mkdir()
    (folder / "u.data").write_text("1\t1\t5\t1\n\n1\t2\t7\t2\n2\t1\t3\t3\n")
    with pytest.raises(TrainingError, match=r"u\.data line 3: rating 7 outside 1–5"):
        load_ratings(folder)


def test_error_for_non_numeric_rating_and_missing_value(tmp_path):
    path = write_csv(tmp_path / "ratings.csv",
                     "userId,movieId,rating,timestamp\n1,2,3,4\n1,3,good,5\n")
    with pytest.raises(TrainingError, match=r"line 3: non-numeric rating 'good'"):
        load_ratings(path)
    path = write_csv(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp\n1,2,,4\n2,2,3,5\n")
    with pytest.raises(TrainingError, match=r"ratings\.csv line 2: missing rating"):
        load_ratings(path)


def test_parquet_errors_name_rows(tmp_path):
    pd.DataFrame({"user": [1, 2, 3], "item": [1, 2, 2.5], "rating": [1.0, 2.0, 3.0]}) \
        .to_parquet(tmp_path / "x.parquet")
    with pytest.raises(TrainingError, match=r"x\.parquet row 3: non-integer item id '2\.5'"):
        load_ratings(tmp_path / "x.parquet")


def test_empty_inputs_are_errors(tmp_path):
    header_only = write_csv(tmp_path / "a" / "ratings.csv", "userId,movieId,rating,timestamp\n")
    with pytest.raises(TrainingError, match=r"ratings\.csv: no ratings"):
        load_ratings(header_only)
    empty = write_csv(tmp_path / "b" / "ratings.csv", "")
    with pytest.raises(TrainingError, match=r"ratings\.csv: no ratings"):
        load_ratings(empty)
    with pytest.raises(TrainingError, match="no u.data, ratings.csv"):
        load_ratings(tmp_path)
    with pytest.raises(TrainingError, match="no such file"):
        load_ratings(tmp_path / "nope")


def test_duplicate_pairs_keep_last_and_warn_with_lines(tmp_path):
    path = write_csv(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp\n"
                     "1,1,1,1\n1,2,2,2\n1,1,5,3\n2,1,4,4\n2,2,3,5\n1,1,4,6\n")
    data = load_ratings(path, valid_pct=0.2, seed=1)

    assert len(data.train_ratings) + len(data.valid_ratings) == 4
    pairs = np.concatenate([data.train_pairs, data.valid_pairs])
    ratings = np.concatenate([data.train_ratings, data.valid_ratings])
    user1_item1 = ratings[(pairs[:, 0] == 0) & (pairs[:, 1] == 0)]
    assert user1_item1.tolist() == [4.0]  # the last one, at line 7
    assert len(data.warnings) == 1
    assert "2 duplicate" in data.warnings[0] and "lines 2, 4" in data.warnings[0]


def test_random_split_is_deterministic_per_seed_and_disjoint(tmp_path):
    folder = write_ml100k(tmp_path / "ml", grid_rows(10, 10), {})
    a = load_ratings(folder, seed=3)
    b = load_ratings(folder, seed=3)
    c = load_ratings(folder, seed=4)

    assert np.array_equal(a.valid_pairs, b.valid_pairs)
    assert not np.array_equal(a.valid_pairs, c.valid_pairs)
    train = {tuple(p) for p in a.train_pairs}
    valid = {tuple(p) for p in a.valid_pairs}
    assert not train & valid and len(train | valid) == 100 and len(valid) == 20


def test_time_split_puts_the_latest_ratings_in_valid(tmp_path):
    rows = grid_rows(4, 5)
    folder = write_ml100k(tmp_path / "ml", rows[::-1], {})  # file order ≠ time order
    data = load_ratings(folder, split="time", valid_pct=0.25)

    latest = sorted(rows, key=lambda r: r[3])[-5:]
    expected = {(u, i) for u, i, _, _ in latest}
    got = set(zip(data.users.decode(data.valid_pairs[:, 0]).tolist(),
                  data.items.decode(data.valid_pairs[:, 1]).tolist(), strict=True))
    assert got == expected


def test_bad_split_parameters(tmp_path):
    folder = write_ml100k(tmp_path / "ml", grid_rows(), {})
    with pytest.raises(TrainingError, match="valid_pct"):
        load_ratings(folder, valid_pct=1.5)
    with pytest.raises(TrainingError, match="split must be"):
        load_ratings(folder, split="weekly")
    pd.DataFrame({"user": [1, 2], "item": [1, 1], "rating": [1.0, 2.0]}) \
        .to_parquet(tmp_path / "t.parquet")
    with pytest.raises(TrainingError, match="time_col"):
        load_ratings(tmp_path / "t.parquet", split="time", valid_pct=0.5)


def test_vocabulary_round_trip_and_unknown_ids():
    vocab = Vocabulary.from_list([3, 17, 42, 1000])
    raw = np.array([1000, 3, 42, 17, 3])
    idx = vocab.encode(raw)
    assert idx.tolist() == [3, 0, 2, 1, 0]
    assert vocab.decode(idx).tolist() == raw.tolist()
    assert Vocabulary.from_list(vocab.to_list()).to_list() == [3, 17, 42, 1000]
    with pytest.raises(TrainingError, match="unknown id 5"):
        vocab.encode([5])


def test_loaders_cover_every_rating_once_per_epoch(tmp_path):
    folder = write_ml100k(tmp_path / "ml", grid_rows(10, 10), {})
    data = load_ratings(folder)
    train, valid = build_rating_loaders(data, bs=16, seed=0)

    seen = torch.cat([x for x, _ in train])
    assert seen.dtype == torch.int64 and seen.shape == (80, 2)
    assert sorted(map(tuple, seen.tolist())) == sorted(map(tuple, data.train_pairs.tolist()))
    first = next(iter(train))[0]
    assert not torch.equal(first, torch.from_numpy(data.train_pairs[:16]))  # shuffled
    x, y = next(iter(valid))
    assert y.dtype == torch.float32 and len(x) == len(y)


@pytest.mark.skipif(not (ML100K / "u.data").exists(), reason="shared ml-100k data absent")
def test_real_ml100k():
    data = load_ratings(ML100K)
    assert (data.n_users, data.n_items) == (943, 1682)
    assert len(data.train_ratings) == 80_000 and not data.warnings
    assert data.titles[0] == "Toy Story (1995)"
    assert any(t and "é" in t for t in data.titles)


def test_csv_with_byte_order_mark_and_guessed_column_names(tmp_path):
    path = tmp_path / "export.csv"
    path.write_bytes("\ufeffuser_id,item_id,rating\n1,2,4\n2,2,5\n3,1,1\n".encode())
    data = load_ratings(path, valid_pct=0.34)
    assert data.source.user_col == "user_id" and data.n_users == 3
