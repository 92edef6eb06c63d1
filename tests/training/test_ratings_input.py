"""Bad ratings input is one line naming the file and line: exact ids, extra fields, ratings
outside the range, byte-order marks; and a users file with a byte-order mark works."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from scoring.rec_tables import CollabVocab, select_users
from training.data.ratings import load_ratings
from training.errors import TrainingError

BIG, BIGGER = 9007199254740992, 9007199254740993  # 2**53 and 2**53 + 1: one float apart


def _write(path: Path, text: str, bom: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(("\ufeff" if bom else "").encode() + text.encode())
    return path


def test_ids_beyond_float_precision_stay_distinct(tmp_path):
    path = _write(tmp_path / "r.csv", f"user,item,rating\n{BIGGER},1,3\n{BIG},1,4\n3,2,1\n")
    data = load_ratings(path, valid_pct=0.34)
    assert data.users.to_list() == [3, BIG, BIGGER] and not data.warnings


def test_ids_stay_exact_when_a_column_is_not_all_integers(tmp_path):
    # "2.0" makes pandas read the column as float; the ids must still be exact.
    path = _write(tmp_path / "r.csv", f"user,item,rating\n{BIGGER},1,3\n{BIG},2.0,4\n3,2,1\n")
    assert load_ratings(path, valid_pct=0.34).users.to_list() == [3, BIG, BIGGER]
    pd.DataFrame({"user": [str(BIGGER), "2", "3"], "item": [1.0, 2.0, 3.0],
                  "rating": [1.0, 2.0, 3.0]}).to_parquet(tmp_path / "r.parquet")
    assert load_ratings(tmp_path / "r.parquet", valid_pct=0.34).users.to_list() == [2, 3, BIGGER]


@pytest.mark.parametrize("big", ["1e20", "100000000000000000000", "9223372036854775808"])
def test_an_id_beyond_int64_is_an_error_with_file_and_line(tmp_path, big):
    path = _write(tmp_path / "r.csv", f"user,item,rating\n1,1,3\n{big},1,4\n")
    with pytest.raises(TrainingError, match=rf"^r\.csv line 3: user id '{big}' beyond 64-bit "
                                            r"integers .* column 'user'$"):
        load_ratings(path)


def test_a_float_id_above_two_to_the_53_in_parquet_is_refused(tmp_path):
    pd.DataFrame({"user": [float(BIG) * 4, 2.0], "item": [1, 2], "rating": [1.0, 2.0]}) \
        .to_parquet(tmp_path / "r.parquet")
    with pytest.raises(TrainingError, match=r"r\.parquet row 1: user id .* float column past 2⁵³"):
        load_ratings(tmp_path / "r.parquet")


def test_int64_extremes_are_ids(tmp_path):
    top = np.iinfo(np.int64).max
    path = _write(tmp_path / "r.csv", f"user,item,rating\n{top},1,3\n{-top},1,4\n3,2,1\n")
    assert load_ratings(path, valid_pct=0.34).users.to_list() == [-top, 3, top]


@pytest.mark.parametrize(("text", "line"), [("1,1,3\n2,1,4,5\n3,2,1\n", 3),
                                            ("1,1,3,9\n2,1,4\n3,2,1\n", 2)])
def test_a_csv_row_with_extra_fields_is_refused(tmp_path, text, line):
    path = _write(tmp_path / "r.csv", "user,item,rating\n" + text)
    with pytest.raises(TrainingError, match=rf"^r\.csv line {line}: .*fields.*expected.*3"):
        load_ratings(path)


@pytest.mark.parametrize(("text", "line"), [("1\t1\t3\t5\n2\t1\t4\t5\t7\n3\t2\t1\t1\n", 2),
                                            ("1\t1\t3\t5\t7\n2\t1\t4\t5\n3\t2\t1\t1\n", 1)])
def test_a_u_data_row_with_five_fields_is_refused(tmp_path, text, line):
    # The first row is the one pandas would cut to width with only a warning.
    _write(tmp_path / "ml" / "u.data", text)
    with pytest.raises(TrainingError, match=rf"^u\.data line {line}: 5 fields, expected 4$"):
        load_ratings(tmp_path / "ml")


def test_a_rating_outside_the_format_range_names_file_line_and_option(tmp_path):
    _write(tmp_path / "ml" / "u.data", "1\t1\t3\t5\n2\t1\t-3\t5\n3\t2\t1\t1\n")
    with pytest.raises(TrainingError, match=r"^u\.data line 2: rating -3 outside 1–5, .*"
                                            r"option y_range \(--y-range LOW,HIGH\)$"):
        load_ratings(tmp_path / "ml")


def test_a_rating_outside_the_asked_range_names_file_line_and_option(tmp_path):
    path = _write(tmp_path / "r.csv", "user,item,rating\n1,1,3\n2,1,-3\n3,2,1\n")
    with pytest.raises(TrainingError, match=r"^r\.csv line 3: rating -3 outside 0–5\.5, the "
                                            r"range asked for .*--y-range"):
        load_ratings(path, rating_range=(0, 5.5))
    assert load_ratings(path, valid_pct=0.34, rating_range=(-5, 5)).rating_range == (-3.0, 3.0)


def test_u_data_and_u_item_with_byte_order_marks(tmp_path):
    _write(tmp_path / "ml" / "u.data", "1\t1\t3\t5\n2\t1\t4\t5\n3\t2\t1\t1\n", bom=True)
    _write(tmp_path / "ml" / "u.item", "1|Amélie (2001)|x\n2|B|x\n", bom=True)
    data = load_ratings(tmp_path / "ml", valid_pct=0.34)
    assert data.users.to_list() == [1, 2, 3]
    assert data.titles == ("Amélie (2001)", "B")


def test_movies_csv_with_byte_order_mark(tmp_path):
    _write(tmp_path / "ml" / "ratings.csv", "userId,movieId,rating,timestamp\n1,1,3,1\n"
           "2,1,4,2\n3,2,1,3\n", bom=True)
    _write(tmp_path / "ml" / "movies.csv", "movieId,title,genres\n1,Heat (1995),x\n2,B,x\n",
           bom=True)
    assert load_ratings(tmp_path / "ml", valid_pct=0.34).titles == ("Heat (1995)", "B")


def _vocab() -> CollabVocab:
    return CollabVocab.from_manifest({"users": [1, BIG, BIGGER], "items": [7]})


def test_users_file_with_byte_order_mark_is_read_strictly(tmp_path):
    users = _write(tmp_path / "users.txt", f"1\n{BIGGER}\n", bom=True)
    indices, unknown = select_users(_vocab(), str(users), strict=True)
    assert indices.tolist() == [0, 2] and unknown == 0


def test_requested_user_ids_match_exactly():
    indices, unknown = select_users(_vocab(), [str(BIGGER), BIG, "1.0", "1e20", "x"],
                                    strict=False)
    assert indices.tolist() == [2, 1, 0] and unknown == 2


def test_a_rating_outside_the_asked_y_range_is_named_before_training(tmp_path):
    from training.recipes.collab import train_recommender

    ratings = tmp_path / "r.csv"
    ratings.write_text("user,item,rating\n1,10,4\n2,10,8\n2,11,3\n")
    with pytest.raises(TrainingError, match=r"r\.csv line 3.*rating 8.*--y-range"):
        train_recommender(ratings, tmp_path / "out", y_range="0,5.5")
    assert not (tmp_path / "out").exists()
