"""The bundle contract: staged commit, verified load, resolve and atomic promotion."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from bundle_tampering import edited_manifest, reseal

from export.bundle import (
    BundleWriter,
    current_version,
    list_versions,
    load_bundle,
    new_version,
    promote,
    resolve_bundle,
)
from export.errors import BundleIntegrityError, BundleNotFoundError, ExportError, PromotionError


def write_bundle(registry: Path, name: str = "ants", passed: bool | None = True,
                 version: str | None = None) -> Path:
    with BundleWriter(registry, name, version) as writer:
        (writer.dir / "model.onnx").write_bytes(b"\x08\x01onnx-bytes" * 50)
        (writer.dir / "weights.safetensors").write_bytes(os.urandom(256))
        (writer.dir / "plots").mkdir()
        (writer.dir / "plots" / "lr_find.png").write_bytes(b"\x89PNG fake")
        if passed is not None:
            (writer.dir / "parity.json").write_text(json.dumps({"passed": passed}))
        return writer.commit({"task": "single_label", "classes": ["ant", "bee"]})


def flip_byte(path: Path, offset: int = 0) -> None:
    path.chmod(stat.S_IRUSR | stat.S_IWUSR)
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_round_trip_lists_every_file_with_its_hash(tmp_path):
    path = write_bundle(tmp_path)
    bundle = load_bundle(path)
    assert path.parent == tmp_path / "ants" and path.name == bundle.version
    assert (bundle.name, bundle.task, bundle.manifest["classes"]) == (
        "ants", "single_label", ["ant", "bee"])
    files = bundle.manifest["files"]
    assert set(files) == {"model.onnx", "weights.safetensors", "plots/lr_find.png", "parity.json"}
    for rel, entry in files.items():
        data = (path / rel).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert bundle.sha256 == hashlib.sha256((path / "manifest.json").read_bytes()).hexdigest()
    assert {"torch", "onnx", "onnxruntime", "python"} <= set(bundle.manifest["libraries"])
    assert bundle.file("plots/lr_find.png").read_bytes() == b"\x89PNG fake"
    with pytest.raises(BundleIntegrityError, match="model.pt2"):
        bundle.file("model.pt2")
    # Immutable: no write bit on any file; no staging directory left behind.
    assert all(not (p.stat().st_mode & 0o222) for p in path.rglob("*") if p.is_file())
    assert sorted(p.name for p in (tmp_path / "ants").iterdir()) == [
        path.name, f"{path.name}.digest.json"]
    assert path.stat().st_mode & 0o055 == 0o055, "readable by a scorer running as another user"


def test_exception_inside_writer_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), BundleWriter(tmp_path, "ants") as writer:
        (writer.dir / "model.onnx").write_bytes(b"half")
        raise RuntimeError("export crashed")
    assert list((tmp_path / "ants").iterdir()) == []
    assert list_versions(tmp_path, "ants") == []


def test_a_registry_that_is_a_file_is_one_line(tmp_path):
    registry = tmp_path / "registry"
    registry.write_text("not a folder")
    with pytest.raises(ExportError, match=f"registry {registry}: exists and is not a directory"):
        write_bundle(registry)
    (tmp_path / "reg2").mkdir()
    (tmp_path / "reg2" / "ants").write_text("a file where the model folder goes")
    with pytest.raises(ExportError, match="reg2/ants: exists and is not a directory"):
        write_bundle(tmp_path / "reg2")


def test_version_ids_sort_by_time_and_never_collide():
    ids = [new_version() for _ in range(3000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    t0 = datetime(2026, 11, 23, 10, 45, 12, 999999, tzinfo=timezone.utc)
    assert new_version(t0).startswith("20261123T104512.999999Z-")
    with pytest.raises(ValueError):
        new_version(datetime(2026, 1, 1))


def test_explicit_times_order_lexically():
    t0 = datetime(2026, 1, 31, 23, 59, 59, 999999, tzinfo=timezone.utc)
    later = [t0 + timedelta(microseconds=1), t0 + timedelta(days=400), t0 + timedelta(hours=1)]
    ids = {new_version(t): t for t in [t0, *later]}
    assert [ids[v] for v in sorted(ids)] == sorted(ids.values())


@pytest.mark.parametrize("victim", ["model.onnx", "weights.safetensors", "plots/lr_find.png",
                                    "parity.json"])
def test_a_flipped_byte_in_any_file_is_refused_naming_it(tmp_path, victim):
    path = write_bundle(tmp_path)
    flip_byte(path / victim, offset=3)
    with pytest.raises(BundleIntegrityError, match=rf"{victim} sha256 mismatch \(expected"):
        load_bundle(path)
    with pytest.raises(BundleIntegrityError, match=rf"{victim} sha256 mismatch"):
        promote(path)


def test_missing_file_and_broken_manifest_are_refused(tmp_path):
    path = write_bundle(tmp_path)
    (path / "plots" / "lr_find.png").unlink()
    with pytest.raises(BundleIntegrityError, match="plots/lr_find.png is missing"):
        load_bundle(path)
    manifest = path / "manifest.json"
    manifest.chmod(0o600)
    manifest.write_text(manifest.read_text()[:-20])
    with pytest.raises(BundleIntegrityError, match="manifest.json is not valid JSON"):
        load_bundle(path)
    manifest.unlink()
    with pytest.raises(BundleIntegrityError, match="manifest.json is missing"):
        load_bundle(path)


def test_manifest_cannot_point_outside_the_bundle(tmp_path):
    path = write_bundle(tmp_path)
    with edited_manifest(path) as manifest:
        manifest["files"]["../../etc/passwd"] = {"sha256": "0" * 64, "bytes": 1}
    with pytest.raises(BundleIntegrityError, match="manifest.json changed after export"):
        load_bundle(path)
    reseal(path)
    with pytest.raises(BundleIntegrityError, match="invalid path"):
        load_bundle(path)


def test_promote_refuses_failed_or_missing_parity(tmp_path):
    failed = write_bundle(tmp_path, passed=False)
    with pytest.raises(PromotionError, match="failed parity"):
        promote(failed)
    unchecked = write_bundle(tmp_path, passed=None)
    with pytest.raises(PromotionError, match="no parity.json"):
        promote(unchecked)
    assert current_version(tmp_path, "ants") is None
    with pytest.raises(BundleNotFoundError, match="no promoted version of 'ants'.*run lensflow"):
        resolve_bundle(tmp_path / "ants")


def test_promote_refuses_a_tampered_bundle(tmp_path):
    path = write_bundle(tmp_path)
    flip_byte(path / "model.onnx")
    with pytest.raises(BundleIntegrityError, match="model.onnx"):
        promote(path)
    assert not (tmp_path / "ants" / "current").exists()


def test_promote_and_resolve(tmp_path):
    first, second = write_bundle(tmp_path), write_bundle(tmp_path)
    assert list_versions(tmp_path, "ants") == sorted([first.name, second.name])
    pointer = promote(first)
    assert pointer == tmp_path / "ants" / "current"
    assert pointer.stat().st_mode & 0o044 == 0o044
    assert resolve_bundle(tmp_path / "ants") == first
    promote(second)
    assert resolve_bundle(str(tmp_path / "ants")) == second
    assert resolve_bundle(tmp_path / "ants" / first.name) == first
    # The two bundles, their digest records and the pointer: no temp file left behind.
    assert sorted(p.name for p in (tmp_path / "ants").iterdir()) == sorted(
        [first.name, second.name, "current", f"{first.name}.digest.json",
         f"{second.name}.digest.json"])
    with pytest.raises(BundleNotFoundError, match="no such directory"):
        resolve_bundle(tmp_path / "bees")
    with pytest.raises(BundleNotFoundError, match="no such directory"):
        resolve_bundle(tmp_path / "ants" / "20990101T000000.000000Z-dead")


def test_current_survives_a_crash_while_replacing_it(tmp_path, monkeypatch):
    first, second = write_bundle(tmp_path), write_bundle(tmp_path)
    promote(first)

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        promote(second)
    monkeypatch.undo()
    assert current_version(tmp_path, "ants") == first.name
    assert not [p for p in (tmp_path / "ants").iterdir() if p.name.startswith(".")]


def test_current_naming_a_missing_version_is_a_clear_error(tmp_path):
    write_bundle(tmp_path)
    (tmp_path / "ants" / "current").write_text("20990101T000000.000000Z-dead\n")
    with pytest.raises(BundleNotFoundError, match="not a bundle"):
        resolve_bundle(tmp_path / "ants")


def test_bad_names_and_existing_versions_are_refused(tmp_path):
    with pytest.raises(ExportError, match="bundle name"):
        BundleWriter(tmp_path, "../escape")
    path = write_bundle(tmp_path)
    with pytest.raises(ExportError, match="already exists"), BundleWriter(
            tmp_path, "ants", path.name):
        pass


def test_the_staging_of_a_killed_export_is_removed_by_the_next_export(tmp_path):
    import signal
    import subprocess
    import sys

    # A real export process that stages files, then dies by SIGKILL before its commit.
    script = (
        "import os, signal, sys\n"
        "from export.bundle import BundleWriter\n"
        "with BundleWriter(sys.argv[1], 'ants') as writer:\n"
        "    (writer.dir / 'model.onnx').write_bytes(b'half')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)])
    assert proc.returncode == -signal.SIGKILL
    left = [p for p in (tmp_path / "ants").iterdir() if p.name.startswith(".tmp-")]
    assert any(p.is_dir() for p in left)

    with BundleWriter(tmp_path, "ants") as live:  # a live export's staging is kept meanwhile
        (live.dir / "model.onnx").write_bytes(b"live")
        assert [p.name for p in (tmp_path / "ants").iterdir() if p.is_dir()] == [live.dir.name]
        write_bundle(tmp_path)  # another export while this one is still staging
        assert live.dir.is_dir()
        live.commit({"task": "single_label", "classes": ["ant", "bee"]})
    assert not [p for p in (tmp_path / "ants").iterdir() if p.name.startswith(".tmp-")]
    assert len(list_versions(tmp_path, "ants")) == 2
