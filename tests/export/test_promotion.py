"""Signed promotions: ``current`` binds NAME → VERSION → digest with a counter that only grows."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from signing_env import isolate_signing, key_pair

from export.bundle import BundleWriter, promote, resolve_bundle
from export.errors import BundleNotFoundError, BundleSignatureError, PromotionError
from export.pins import read_pointer
from export.promotion import signed_pointer_text
from export.signing import VERIFY_KEY_ENV, load_signing_key


@pytest.fixture(autouse=True)
def _settings(monkeypatch, tmp_path):
    isolate_signing(monkeypatch, tmp_path)


@pytest.fixture
def key(tmp_path, monkeypatch):
    private, public = key_pair(tmp_path)
    monkeypatch.setenv(VERIFY_KEY_ENV, str(public))
    return load_signing_key(private)


def signed_bundle(registry: Path, key) -> Path:
    with BundleWriter(registry, "ants") as writer:
        (writer.dir / "parity.json").write_text(json.dumps({"passed": True}))
        return writer.commit({"task": "single_label", "classes": ["ant", "bee"]},
                             signing_key=key)


def record(current: Path) -> dict:
    envelope = json.loads(read_pointer(current).promotion)
    return json.loads(base64.b64decode(envelope["payload"]))


def test_promote_will_not_write_an_unsigned_promotion_where_scorers_require_one(tmp_path, key):
    bundle = signed_bundle(tmp_path / "reg", key)
    with pytest.raises(PromotionError, match="scorers here require signed promotions"):
        promote(bundle)
    assert not (bundle.parent / "current").exists()


def test_the_counter_grows_and_names_the_model_version_and_digest(tmp_path, key):
    first, second = signed_bundle(tmp_path / "reg", key), signed_bundle(tmp_path / "reg", key)
    current = promote(first, signing_key=key)
    one = record(current)
    assert (one["name"], one["version"], one["rollback_from"]) == ("ants", first.name, None)
    assert one["sha256"] == read_pointer(current).digest
    promote(second, signing_key=key)
    two = record(current)
    assert two["counter"] > one["counter"]
    promote(first, signing_key=key, rollback=True)
    assert record(current)["counter"] > two["counter"]
    assert record(current)["rollback_from"] == second.name
    assert resolve_bundle(tmp_path / "reg" / "ants") == first


def test_a_promotion_edited_after_signing_is_refused(tmp_path, key):
    first, second = signed_bundle(tmp_path / "reg", key), signed_bundle(tmp_path / "reg", key)
    current = promote(first, signing_key=key)
    envelope = json.loads(read_pointer(current).promotion)
    payload = json.loads(base64.b64decode(envelope["payload"]))
    payload["version"] = second.name  # what a registry writer would like it to say
    envelope["payload"] = base64.b64encode(json.dumps(payload).encode()).decode()
    current.write_text(current.read_text().splitlines()[0] + "\npromotion "
                       + json.dumps(envelope) + "\n")
    with pytest.raises(BundleSignatureError, match=f"{current}: signature does not verify"):
        resolve_bundle(current.parent)


def test_two_signed_records_for_one_counter_are_refused(tmp_path, key):
    import hashlib

    first, second = signed_bundle(tmp_path / "reg", key), signed_bundle(tmp_path / "reg", key)
    current = promote(first, signing_key=key)
    assert resolve_bundle(current.parent) == first  # this scorer has seen it now
    digest = hashlib.sha256((second / "manifest.json").read_bytes()).hexdigest()
    current.write_text(signed_pointer_text(key, "ants", second.name, digest,
                                           record(current)["counter"]))
    with pytest.raises(BundleSignatureError, match=f"names {second.name}, but #.* seen here "
                                                   f".*named {first.name}"):
        resolve_bundle(current.parent)


def test_a_current_whose_second_line_is_not_a_promotion_is_refused(tmp_path, key):
    bundle = signed_bundle(tmp_path / "reg", key)
    current = promote(bundle, signing_key=key)
    current.write_text(current.read_text().splitlines()[0] + "\nsomething else\n")
    with pytest.raises(BundleNotFoundError, match="second line is not a signed promotion"):
        resolve_bundle(current.parent)
