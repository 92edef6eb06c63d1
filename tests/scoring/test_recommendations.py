"""Recommendation scoring from a bundle: full table, top-k without seen items, user lists."""

from __future__ import annotations

import tracemalloc
from datetime import date

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch

from export.convert import export_bundle
from scoring.errors import ScoringError
from scoring.options import RecScoreOptions
from scoring.recommendations import (
    FULL_TABLE,
    TOPK_TABLE,
    full_schema,
    score_recommendations,
    topk_schema,
)
from training.models.collab import DotProductBias

DAY = date(2026, 11, 22)
N_USERS, N_ITEMS = 13, 9
USER_IDS = [3 * u + 100 for u in range(N_USERS)]  # raw ids ≠ indices, on purpose
ITEM_IDS = [7 * i + 1 for i in range(N_ITEMS)]
TITLES = [f"Item {i}, été" for i in range(N_ITEMS)]


def make_bundle(root, *, n_users=N_USERS, n_items=N_ITEMS, seen=None, id_type="int64",
                seed=0, name="rec"):
    """A trained-looking dot-product model exported to a real bundle with seen.parquet."""
    torch.manual_seed(seed)
    model = DotProductBias(n_users, n_items, 4, y_range=(0.5, 5.5))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.7)
    users = [3 * u + 100 for u in range(n_users)]
    items = [7 * i + 1 for i in range(n_items)]
    if id_type == "string":
        users, items = [f"u{u}" for u in users], [f"m{i}" for i in items]
    seen = seen if seen is not None else []
    seen_path = root / f"seen-{name}.parquet"
    pq.write_table(pa.table({"user_idx": pa.array([u for u, _ in seen], pa.int32()),
                             "item_idx": pa.array([i for _, i in seen], pa.int32())}), seen_path)
    manifest = {"task": "collab", "users": users, "items": items,
                "titles": [f"Item {i}, été" for i in range(n_items)], "id_type": id_type,
                "y_range": [0.5, 5.5], "model": model.config().to_dict(),
                "seen": {"file": "seen.parquet"}}
    result = export_bundle(model, manifest, root / "registry", name, pt2=False,
                           extra_files={"seen.parquet": seen_path})
    return result.bundle_path, model


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("rec")
    # user 0 has rated the two items the model likes best for it; user 1 has rated all but 2
    torch.manual_seed(0)
    probe = DotProductBias(N_USERS, N_ITEMS, 4, y_range=(0.5, 5.5))
    with torch.no_grad():
        for p in probe.parameters():
            p.normal_(0, 0.7)
    best_of_user0 = probe.score_users(torch.tensor([0]))[0].argsort(descending=True)[:2].tolist()
    seen = [(0, i) for i in best_of_user0] + [(1, i) for i in range(N_ITEMS - 2)]
    path, model = make_bundle(root, seen=seen)
    return path, model, seen


def read(out, table):
    return pq.read_table(out / table / f"run_date={DAY.isoformat()}").to_pandas()


def test_full_table_is_every_user_times_every_item_with_eager_scores(bundle, tmp_path):
    path, model, _ = bundle
    summary = score_recommendations(path, tmp_path, top_k=3, full_table=True, run_date=DAY,
                                    block_size=4, run_id="night-1")
    full = read(tmp_path, FULL_TABLE)

    assert summary.full_rows == len(full) == N_USERS * N_ITEMS
    assert set(zip(full.user_id, full.item_id, strict=True)) == \
        {(u, i) for u in USER_IDS for i in ITEM_IDS}
    eager = model.score_users(torch.arange(N_USERS)).detach().numpy()
    users = np.searchsorted(USER_IDS, full.user_id.to_numpy())
    items = np.searchsorted(ITEM_IDS, full.item_id.to_numpy())
    assert np.allclose(full.score.to_numpy(), eager[users, items], atol=1e-5)
    schema = pq.read_schema(next((tmp_path / FULL_TABLE).rglob("part-*.parquet")))
    assert schema.remove_metadata().equals(full_schema("int64"))
    meta = {k.decode(): v.decode() for k, v in schema.metadata.items()}
    assert meta["lensflow.run_id"] == "night-1" and meta["lensflow.model_name"] == "rec"
    assert len(meta["lensflow.bundle_sha256"]) == 64


def test_topk_excludes_seen_items_and_ranks_by_score(bundle, tmp_path):
    path, model, seen = bundle
    score_recommendations(path, tmp_path, top_k=4, run_date=DAY)
    top = read(tmp_path, TOPK_TABLE)

    pq_schema = pq.read_schema(next((tmp_path / TOPK_TABLE).rglob("part-*.parquet")))
    assert pq_schema.remove_metadata().equals(topk_schema("int64"))
    seen_raw = {(USER_IDS[u], ITEM_IDS[i]) for u, i in seen}
    assert not seen_raw & set(zip(top.user_id, top.item_id, strict=True))
    eager = model.score_users(torch.arange(N_USERS)).detach().numpy()
    for u, rows in top.groupby("user_id"):
        assert rows["rank"].tolist() == list(range(1, len(rows) + 1))
        assert rows.score.is_monotonic_decreasing
        u_idx = USER_IDS.index(u)
        unseen = [i for i in range(N_ITEMS) if (u_idx, i) not in set(seen)]
        expected = sorted(unseen, key=lambda i: -eager[u_idx, i])[:4]
        assert rows.item_id.tolist() == [ITEM_IDS[i] for i in expected]
        assert rows.title.tolist() == [TITLES[i] for i in expected]
    assert (top.user_id == USER_IDS[1]).sum() == 2  # only two items left unseen
    assert len(top) == 4 * (N_USERS - 1) + 2


def test_user_file_skips_and_counts_unknown_ids_in_given_order(bundle, tmp_path):
    path, _, _ = bundle
    users = tmp_path / "users.txt"
    users.write_text(f"{USER_IDS[5]}\n\n999999\n{USER_IDS[2]}\nabc\n{USER_IDS[5]}\n")
    summary = score_recommendations(path, tmp_path / "out", top_k=2, users=users, run_date=DAY)

    top = read(tmp_path / "out", TOPK_TABLE)
    assert summary.users_scored == 2 and summary.unknown_users == 2
    assert list(dict.fromkeys(top.user_id)) == [USER_IDS[5], USER_IDS[2]]
    with pytest.raises(ScoringError, match=r"users\.txt line 3: unknown user id '999999'"):
        score_recommendations(path, tmp_path / "strict", users=users, strict=True, run_date=DAY)
    assert not (tmp_path / "strict" / TOPK_TABLE / f"run_date={DAY}").exists()


@pytest.mark.slow
def test_users_as_list_and_string_ids(tmp_path):
    path, _ = make_bundle(tmp_path, id_type="string", name="strings")
    summary = score_recommendations(path, tmp_path / "out", top_k=1, full_table=True,
                                    users=["u103", "nobody"], run_date=DAY)
    top = read(tmp_path / "out", TOPK_TABLE)
    full = read(tmp_path / "out", FULL_TABLE)
    assert summary.unknown_users == 1
    assert top.user_id.tolist() == ["u103"] and top.item_id.iloc[0].startswith("m")
    assert len(full) == N_ITEMS and set(full.user_id) == {"u103"}
    assert pq.read_schema(next((tmp_path / "out" / FULL_TABLE).rglob("*.parquet"))) \
        .field("user_id").type == pa.string()


def test_user_blocks_run_in_this_process_write_the_single_shard_rows_in_order(bundle, tmp_path):
    path, _, _ = bundle
    options = RecScoreOptions(top_k=3, full_table=True, block_size=4)
    single = score_recommendations(path, tmp_path / "one", options, run_date=DAY)
    sharded = score_recommendations(path, tmp_path / "three", options, run_date=DAY, shards=3)
    assert (sharded.topk_rows, sharded.full_rows) == (single.topk_rows, single.full_rows)
    for table in (TOPK_TABLE, FULL_TABLE):
        assert len(list((tmp_path / "three" / table).rglob("part-*.parquet"))) == 3
        assert read(tmp_path / "three", table).equals(read(tmp_path / "one", table))


def test_torchscript_runtime_writes_the_same_top_k(bundle, tmp_path):
    path, _, _ = bundle
    score_recommendations(path, tmp_path / "onnx", top_k=3, run_date=DAY, runtime="onnx")
    score_recommendations(path, tmp_path / "ts", top_k=3, run_date=DAY, runtime="torchscript")
    a, b = read(tmp_path / "onnx", TOPK_TABLE), read(tmp_path / "ts", TOPK_TABLE)
    assert a.item_id.tolist() == b.item_id.tolist()
    assert np.allclose(a.score, b.score, atol=1e-5)


@pytest.mark.slow
def test_memory_per_block_stays_flat_as_users_grow(tmp_path):
    """Cheap proxy for the RSS benchmark: Python-tracked peak while scoring 1× vs 8× users.

    The 1× peak is the larger of two runs: one run's peak can miss a one-off allocation the
    other sees (a full run once measured 1.6 MB for 64 users against the usual 2.4 MB), and
    flat is judged against what a small run really takes."""
    path, _ = make_bundle(tmp_path, n_users=512, n_items=1000, name="wide")
    user_ids = [3 * u + 100 for u in range(512)]
    score_recommendations(path, tmp_path / "warm", top_k=5, full_table=True, run_date=DAY,
                          block_size=16, users=user_ids[:16])
    peaks = {}
    for run, n_users in enumerate((64, 64, 512)):
        tracemalloc.start()
        score_recommendations(path, tmp_path / f"o{run}", top_k=5, full_table=True,
                              run_date=DAY, block_size=16, users=user_ids[:n_users])
        peaks[n_users] = max(peaks.get(n_users, 0), tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        rows = ds.dataset(tmp_path / f"o{run}" / FULL_TABLE).count_rows()
        assert rows == n_users * 1000
    assert peaks[512] < 1.2 * peaks[64], peaks  # unblocked, 512 users peak at ~5×


def test_bad_requests_are_scoring_errors(bundle, tmp_path):
    path, _, _ = bundle
    with pytest.raises(ScoringError, match="top_k"):
        score_recommendations(path, tmp_path, top_k=0, run_date=DAY)
    with pytest.raises(ScoringError, match="no such"):
        score_recommendations(tmp_path / "missing", tmp_path, run_date=DAY)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ScoringError, match="no user ids"):
        score_recommendations(path, tmp_path, users=empty, run_date=DAY)


def test_a_recommender_whose_parity_failed_is_scored_only_when_allowed(bundle, tmp_path,
                                                                       monkeypatch):
    import scoring.bundle_cache

    path, _, _ = bundle
    monkeypatch.setattr(scoring.bundle_cache, "read_parity_passed", lambda b: False)
    with pytest.raises(ScoringError, match="its parity gate failed .*--allow-failed-parity"):
        score_recommendations(path, tmp_path, top_k=2, run_date=DAY)
    assert not (tmp_path / TOPK_TABLE).exists()
    score_recommendations(path, tmp_path, top_k=2, run_date=DAY, allow_failed_parity=True)
    schema = pq.read_schema(next((tmp_path / TOPK_TABLE).rglob("part-*.parquet")))
    assert schema.metadata[b"lensflow.parity_passed"] == b"false"
    assert schema.metadata[b"lensflow.allow_failed_parity"] == b"true"
