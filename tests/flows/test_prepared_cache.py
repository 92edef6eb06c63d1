"""The data-prep cache is JSON: a pickle planted in the cache directory is never run."""

from __future__ import annotations

import base64
import json
import pickle

import pytest

from flows.cache_keys import prepared_data_key
from flows.demo_data import make_shapes_dataset
from flows.prepared_cache import cache_file, decode, encode, prepared_or_cached


class _Payload:
    """Unpickling this creates ``marker``: proof that a pickle was loaded."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def shapes(tmp_path, monkeypatch):
    monkeypatch.setenv("LENSFLOW_CACHE_DIR", str(tmp_path / "cache"))
    return make_shapes_dataset(tmp_path / "shapes", n_train=4, n_valid=2, size=24)


def test_prepared_splits_round_trip_through_json(shapes, tmp_path):
    from training.data.multilabel import from_multilabel_csv
    from training.recipes.image import prepare_image_data

    folder = prepare_image_data(shapes, valid_pct=0.2, seed=0)
    csv = tmp_path / "labels.csv"
    rows = [f"{p.relative_to(shapes).as_posix()},{p.parent.name} shape\n"
            for p in sorted(shapes.rglob("*.jpg"))]
    csv.write_text("fname,labels\n" + "".join(rows))
    multilabel = from_multilabel_csv(csv, shapes, valid_pct=0.5, seed=0)
    for prepared in (folder, multilabel):
        stored = json.loads(json.dumps(encode(prepared)))
        assert decode(stored) == prepared


def test_unknown_types_in_the_cache_are_refused_not_imported():
    with pytest.raises(ValueError, match="unknown type 'os.system'"):
        decode({"$type": "os.system", "fields": {}})


def test_a_planted_pickle_is_never_executed_and_a_hit_skips_prep(shapes, tmp_path):
    from training.recipes.image import prepare_image_data

    marker = tmp_path / "pwned"
    evil = pickle.dumps(_Payload(marker))
    params = {"kind": "image", "data": str(shapes), "csv": None, "valid_pct": 0.2, "seed": 0}
    key = prepared_data_key(None, params)
    # Where this prep's JSON lives, and a Prefect result record naming the pickle serializer
    # where earlier versions kept their persisted results.
    cache_file(key).parent.mkdir(parents=True)
    cache_file(key).write_bytes(evil)
    record = {"metadata": {"storage_key": key, "expiration": None,
                           "serializer": {"type": "pickle"}, "prefect_version": "3"},
              "result": base64.b64encode(evil).decode()}
    (tmp_path / "cache" / key).write_text(json.dumps(record))

    runs = []

    def prepare():
        runs.append(1)
        return prepare_image_data(shapes, valid_pct=0.2, seed=0)

    first = prepared_or_cached(params, prepare)
    second = prepared_or_cached(params, prepare)
    assert not marker.exists()
    assert runs == [1], "the planted file was a miss, the JSON written then was a hit"
    assert second.name == "Cached" and second.is_completed()
    assert second.data == first
    assert json.loads(cache_file(key).read_text())["format"] == 1
