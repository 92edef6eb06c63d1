"""Ratings inputs on object storage (the loopback S3 server): a MovieLens folder or a table URL
reads like the same files on disk; a missing one is one line naming the URL."""

from __future__ import annotations

import json

import fsspec
import pytest

from training.data.ratings import load_ratings
from training.data.ratings_ids import RatingsFormatError
from training.recipes.collab import train_recommender

U_DATA = "".join(f"{u}\t{i}\t{(u + i) % 5 + 1}\t{880000000 + u * 10 + i}\n"
                 for u in range(1, 6) for i in range(1, 5))
U_ITEM = "".join(f"{i}|Movie {i} (1995)|01-Jan-1995||http://x|0\n" for i in range(1, 5))


def test_a_movielens_folder_and_a_csv_on_s3_read_as_on_disk(s3_bucket, tmp_path):
    fs = fsspec.filesystem("s3")
    (tmp_path / "ml").mkdir()
    (tmp_path / "ml" / "u.data").write_text(U_DATA)
    (tmp_path / "ml" / "u.item").write_text(U_ITEM)
    fs.put(str(tmp_path / "ml"), f"{s3_bucket}/ml-100k", recursive=True)
    remote = load_ratings(f"{s3_bucket}/ml-100k", valid_pct=0.25, seed=1)
    local = load_ratings(tmp_path / "ml", valid_pct=0.25, seed=1)
    assert remote.source.format == "ml-100k" and remote.titles == local.titles
    assert remote.users.to_list() == local.users.to_list()
    assert (remote.train_pairs == local.train_pairs).all()

    fs.pipe(f"{s3_bucket}/tables/r.csv", b"user,item,rating\n1,10,4\n2,10,3\n2,11,5\n")
    assert load_ratings(f"{s3_bucket}/tables/r.csv", valid_pct=0.34).users.to_list() == [1, 2]


def test_a_missing_ratings_url_is_one_line(s3_bucket):
    with pytest.raises(RatingsFormatError, match=f"{s3_bucket}/nope.csv: no such file"):
        load_ratings(f"{s3_bucket}/nope.csv")


def test_a_recommender_trained_from_a_url_names_it_and_fingerprints_its_contents(
        s3_bucket, tmp_path):
    fs = fsspec.filesystem("s3")
    (tmp_path / "ml").mkdir()
    (tmp_path / "ml" / "u.data").write_text(U_DATA)
    (tmp_path / "ml" / "u.item").write_text(U_ITEM)
    fs.put(str(tmp_path / "ml"), f"{s3_bucket}/ml-100k", recursive=True)

    def lineage_data(run: str) -> dict:
        train_recommender(f"{s3_bucket}/ml-100k", tmp_path / run, factors=2, epochs=1, lr=1e-2)
        return json.loads((tmp_path / run / "lineage.json").read_text())["data"]

    first, second = lineage_data("a"), lineage_data("b")  # two downloads, two mtimes
    assert first["path"] == f"{s3_bucket}/ml-100k" and first["basis"] == "paths, contents"
    assert first == second and first["files"] == 2
    fs.pipe(f"{s3_bucket}/ml-100k/u.data", U_DATA.replace("\t5\t", "\t4\t", 1).encode())
    assert lineage_data("c")["sha256"] != first["sha256"]
