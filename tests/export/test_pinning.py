"""Every byte of a bundle is pinned: its digest lives outside it, in its record and in ``current``.

A copied bundle with its classes swapped, an added file, a promoted bundle edited afterwards:
each is refused in one line by load, resolve and promote. Scoring's ``bundle_sha256`` is that
digest.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import stat
from pathlib import Path

import pytest
from bundle_tampering import edited_manifest, record_of, reseal
from tiny_image_bundle import make_image_bundle

from export.bundle import (
    current_version,
    load_bundle,
    promote,
    resolve_bundle,
)
from export.errors import BundleIntegrityError, GraphMismatchError
from export.runtime import open_bundle_graph


@pytest.fixture
def bundle(tmp_path) -> Path:
    return make_image_bundle(tmp_path / "reg", classes=("ants", "bees"), name="insects",
                             promoted=False)


def test_the_digest_is_pinned_in_the_record_and_current_and_is_the_bundle_sha256(bundle):
    digest = hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()
    record = json.loads(record_of(bundle).read_text())
    assert record == {"format": 1, "name": "insects", "version": bundle.name, "sha256": digest}
    assert not record_of(bundle).stat().st_mode & 0o222
    pointer = promote(bundle)
    assert pointer.read_text() == f"{bundle.name} sha256:{digest}\n"
    assert current_version(bundle.parent.parent, "insects") == bundle.name
    loaded = load_bundle(resolve_bundle(bundle.parent))
    assert loaded.sha256 == digest and loaded.signature == "unsigned"


def test_a_copy_with_swapped_classes_is_refused_by_load_and_promote(bundle):
    copy = bundle.parent / "20990101T000000.000000Z-beef"
    shutil.copytree(bundle, copy)
    with edited_manifest(copy) as manifest:
        manifest["version"] = copy.name  # else its location alone refuses it
        manifest["classes"] = ["bees", "ants"]
    with pytest.raises(BundleIntegrityError, match=r"no digest record .*re-export it"):
        load_bundle(copy)
    shutil.copy(record_of(bundle), record_of(copy))
    for refuse in (load_bundle, promote):
        with pytest.raises(BundleIntegrityError, match="manifest.json changed after export"):
            refuse(copy)
    # In place, too: the original bundle edited the same way.
    with edited_manifest(bundle) as manifest:
        manifest["classes"] = ["bees", "ants"]
    with pytest.raises(BundleIntegrityError, match=f"bundle {bundle}: manifest.json changed"):
        promote(bundle)


def test_a_promoted_bundle_edited_and_resealed_is_refused_by_current(bundle):
    promote(bundle)
    with edited_manifest(bundle) as manifest:
        manifest["classes"] = ["bees", "ants"]
    reseal(bundle)
    with pytest.raises(BundleIntegrityError, match="current pins sha256 .* after promotion"):
        resolve_bundle(bundle.parent)
    with pytest.raises(BundleIntegrityError, match="current pins sha256"):
        load_bundle(bundle)


@pytest.mark.parametrize("added", ["extra.onnx", "plots/evil.py"])
def test_an_added_file_is_refused_naming_it(bundle, added):
    target = bundle / added
    target.parent.mkdir(exist_ok=True)
    target.write_bytes(b"print('hello')")
    with pytest.raises(BundleIntegrityError, match=rf"{added} is not listed in manifest.json"):
        load_bundle(bundle)
    with pytest.raises(BundleIntegrityError, match=added):
        promote(bundle)


def test_an_added_link_is_refused(bundle, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (bundle / "more").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(BundleIntegrityError, match="more is not listed"):
        load_bundle(bundle)


def test_an_old_pointer_without_a_digest_asks_for_promote_again(bundle):
    (bundle.parent / "current").write_text(bundle.name + "\n")
    assert current_version(bundle.parent.parent, "insects") == bundle.name
    with pytest.raises(BundleIntegrityError, match="pins no digest .* run lensflow promote again"):
        resolve_bundle(bundle.parent)
    promote(bundle)
    assert resolve_bundle(bundle.parent) == bundle


def test_a_manifest_input_size_other_than_the_graphs_is_one_line(bundle):
    with edited_manifest(bundle) as manifest:
        manifest["preprocessing"]["input_size"] = 48
    reseal(bundle)
    loaded = load_bundle(bundle)
    for kind in ("onnx", "torchscript"):
        with pytest.raises(GraphMismatchError) as err:
            open_bundle_graph(loaded, kind, "cpu")
        message = str(err.value)
        assert f"bundle {bundle}" in message and "preprocessing.input_size 48" in message
        assert "model.onnx's input shape ['N', 32, 32, 3]" in message
        assert "\n" not in message


def test_torchscript_swapped_after_verification_is_never_loaded(bundle, monkeypatch):
    import torch

    loaded = load_bundle(bundle)
    ts = bundle / "model.ts"
    ts.chmod(stat.S_IRUSR | stat.S_IWUSR)
    ts.write_bytes(ts.read_bytes() + b"\0")
    calls = []
    monkeypatch.setattr(torch.jit, "load", lambda *a, **kw: calls.append(a))
    with pytest.raises(BundleIntegrityError, match="model.ts: sha256 differs"):
        open_bundle_graph(loaded, "torchscript", "cpu")
    assert calls == []
