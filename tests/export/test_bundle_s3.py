"""A model registry on object storage (the loopback S3 server): export, promote, resolve and
load through a local cache keyed by digest, every file verified before anything is loaded."""

from __future__ import annotations

import fsspec
import pytest
from tiny_image_bundle import make_image_bundle

from export import bundle_remote
from export.bundle import current_version, list_versions, load_bundle, resolve_bundle
from export.errors import BundleIntegrityError, BundleNotFoundError


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(bundle_remote.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_export_promote_resolve_and_load_through_the_digest_cache(s3_bucket, cache):
    registry = f"{s3_bucket}/registry"
    url = make_image_bundle(registry)
    assert isinstance(url, str) and url.startswith(f"{registry}/tiny/")
    version = url.rsplit("/", 1)[1]
    assert list_versions(registry, "tiny") == [version]
    assert current_version(registry, "tiny") == version
    assert resolve_bundle(f"{registry}/tiny") == url

    bundle = load_bundle(f"{registry}/tiny/{version}/")
    assert bundle.source == url and bundle.ref == url
    assert bundle.path == cache / bundle.sha256 / version
    assert bundle.file("model.onnx").read_bytes() == fsspec.open(f"{url}/model.onnx").open().read()
    load_bundle(url)
    assert bundle_remote.downloads[url] == 1  # the second load is served by the cache


def test_a_file_changed_in_the_store_is_refused_and_never_cached(s3_bucket, cache):
    url = make_image_bundle(f"{s3_bucket}/registry", promoted=False)
    with fsspec.open(f"{url}/model.onnx", "wb") as f:
        f.write(b"not the exported graph")
    with pytest.raises(BundleIntegrityError, match="model.onnx sha256 mismatch"):
        load_bundle(url)
    assert not any(p for p in cache.iterdir() if not p.name.startswith("."))


def test_a_changed_manifest_is_refused_by_the_pin_of_current(s3_bucket, cache):
    registry = f"{s3_bucket}/registry"
    url = make_image_bundle(registry)
    fs = fsspec.filesystem("s3")
    manifest = fs.cat(f"{url}/manifest.json")
    fs.pipe(f"{url}/manifest.json", manifest.replace(b'"tiny"', b'"tiny" '))
    with pytest.raises(BundleIntegrityError, match="changed after promotion"):
        resolve_bundle(f"{registry}/tiny")
    with pytest.raises(BundleIntegrityError, match="changed after promotion"):
        load_bundle(url)


def test_an_upload_without_its_manifest_is_not_a_version(s3_bucket, cache):
    registry = f"{s3_bucket}/registry"
    url = make_image_bundle(registry, promoted=False)
    fsspec.filesystem("s3").pipe(f"{registry}/tiny/20990101T000000.000000Z-dead/model.onnx",
                                 b"half an export")
    assert list_versions(registry, "tiny") == [url.rsplit("/", 1)[1]]
    with pytest.raises(BundleNotFoundError, match="no promoted version"):
        resolve_bundle(f"{registry}/tiny")
    with pytest.raises(BundleNotFoundError, match="no manifest.json"):
        load_bundle(f"{registry}/tiny/20990101T000000.000000Z-dead")


def test_the_next_export_deletes_uploads_that_died_before_their_manifest(
        s3_bucket, cache, monkeypatch):
    registry = f"{s3_bucket}/registry"
    fs = fsspec.filesystem("s3")
    first = make_image_bundle(registry)
    dead = f"{registry}/tiny/20990101T000000.000000Z-dead"
    fs.pipe(f"{dead}/model.onnx", b"half an export")
    fs.pipe(f"{dead}/plots/lr_find.png", b"half an export")
    fs.pipe(f"{dead}.digest.json", b"{}")  # killed between the record and the manifest
    fs.invalidate_cache()

    second = make_image_bundle(registry, promoted=False)  # young: may be a live upload elsewhere
    assert fs.exists(f"{dead}/model.onnx") and fs.exists(f"{dead}.digest.json")

    monkeypatch.setattr(bundle_remote, "ORPHAN_GRACE_S", 0)
    third = make_image_bundle(registry, promoted=False)
    fs.invalidate_cache()
    assert not fs.exists(f"{dead}/model.onnx") and not fs.exists(f"{dead}/plots/lr_find.png")
    assert not fs.exists(f"{dead}.digest.json")
    versions = [u.rsplit("/", 1)[1] for u in (first, second, third)]
    assert list_versions(registry, "tiny") == versions
    assert current_version(registry, "tiny") == versions[0]
    for url in (first, second, third):  # every whole version, files and record, untouched
        assert load_bundle(url).version == url.rsplit("/", 1)[1]


def test_an_export_stands_when_its_role_may_not_delete_dead_uploads(
        s3_bucket, cache, monkeypatch, caplog):
    registry = f"{s3_bucket}/registry"
    fsspec.filesystem("s3").pipe(f"{registry}/tiny/20990101T000000.000000Z-dead/model.onnx",
                                 b"half an export")

    def refuse(url):
        raise PermissionError(f"{url}: AccessDenied")

    monkeypatch.setattr(bundle_remote, "remove_tree", refuse)
    monkeypatch.setattr(bundle_remote, "ORPHAN_GRACE_S", 0)
    url = make_image_bundle(registry, promoted=False)
    assert load_bundle(url).version == url.rsplit("/", 1)[1]
    assert "dead uploads not cleared" in caplog.text and "AccessDenied" in caplog.text


@pytest.mark.parametrize("planted", ["manifest", "graph"])
def test_cache_substitution_a_changed_cached_copy_is_fetched_again(s3_bucket, cache, planted,
                                                                   monkeypatch, capsys, tmp_path):
    """Cache substitution: whoever can write the local cache plants another manifest (with a
    record that agrees with it) or another graph under the digest's folder; the copy is checked
    against the digest just read from the store on every use, and fetched again."""
    import hashlib

    import pyarrow.parquet as pq
    from bundle_tampering import edited_manifest, reseal
    from cli_runs import lensflow
    from colour_images import colour_folder

    url = make_image_bundle(f"{s3_bucket}/registry", promoted=False)
    first = load_bundle(url)
    copy = first.path
    graph = (copy / "model.onnx").read_bytes()
    if planted == "manifest":
        with edited_manifest(copy) as manifest:
            manifest["classes"] = list(reversed(manifest["classes"]))
        reseal(copy)
    else:
        (copy / "model.onnx").chmod(0o644)
        (copy / "model.onnx").write_bytes(graph[:-1] + bytes([graph[-1] ^ 1]))
    code, _, err = lensflow(monkeypatch, capsys, "score", "images",
                            colour_folder(tmp_path / "images"), "--model", url, "--out",
                            tmp_path / "out")
    assert code == 0, err
    part = next((tmp_path / "out" / "image_predictions").rglob("part-*.parquet"))
    assert pq.read_schema(part).metadata[b"lensflow.bundle_sha256"] == first.sha256.encode()
    assert bundle_remote.downloads[url] == 2
    assert hashlib.sha256((copy / "manifest.json").read_bytes()).hexdigest() == first.sha256
    assert (copy / "model.onnx").read_bytes() == graph
    assert load_bundle(url).manifest["classes"] == first.manifest["classes"]


def test_signed_registry_on_s3_refuses_substitution_and_rollback(s3_bucket, cache, monkeypatch,
                                                                 capsys, tmp_path):
    """Substitution across names and rollback on object storage, through ``lensflow score
    images``: the signature and the signed promotion travel with the bundle into the cache."""
    from cli_runs import assert_one_line, lensflow
    from colour_images import colour_folder

    from export.bundle import promote, sign_bundle
    from export.promotion import STATE_ENV
    from export.signing import VERIFY_KEY_ENV, load_signing_key, write_key_pair

    private, public = write_key_pair(tmp_path / "keys")
    key = load_signing_key(private)
    monkeypatch.setenv(STATE_ENV, str(tmp_path / "promotions.json"))
    registry, fs = f"{s3_bucket}/registry", fsspec.filesystem("s3")
    first, second, other = (make_image_bundle(registry, name=name, seed=seed, promoted=False)
                            for name, seed in (("tiny", 0), ("tiny", 1), ("other", 2)))
    for url in (first, second, other):
        sign_bundle(url, key)
    promote(first, signing_key=key)
    first_current = fs.cat(f"{registry}/tiny/current")
    promote(second, signing_key=key)
    monkeypatch.setenv(VERIFY_KEY_ENV, str(public))
    images = colour_folder(tmp_path / "images")

    def score(model: str) -> tuple[int, str]:
        code, _, err = lensflow(monkeypatch, capsys, "score", "images", images, "--model",
                                model, "--out", tmp_path / "out")
        return code, err

    assert score(f"{registry}/tiny") == (0, "")
    version = other.rsplit("/", 1)[1]
    copied = f"{registry}/tiny/{version}"
    for suffix in ("", ".digest.json", ".sig"):
        fs.copy(other + suffix, copied + suffix, recursive=not suffix)
    code, err = score(copied)
    assert code == 2
    assert_one_line(err, "manifest.json is model 'other', but it sits under 'tiny'")

    fs.pipe(f"{registry}/tiny/current", first_current)  # a registry writer replays it
    code, err = score(f"{registry}/tiny")
    assert code == 2
    assert_one_line(err, f"{registry}/tiny/current: promotion #", "a rollback")


def test_two_processes_fetching_the_same_bundle_at_once_download_it_once(s3_bucket, cache,
                                                                          monkeypatch):
    import fcntl
    import threading

    url = make_image_bundle(f"{s3_bucket}/registry", promoted=False)
    before = bundle_remote.downloads[url]
    second_waits = threading.Event()
    real_flock, real_download = fcntl.flock, bundle_remote._download

    def flock(handle, op):
        if op == fcntl.LOCK_EX and threading.current_thread().name == "second":
            second_waits.set()
        return real_flock(handle, op)

    def download(*args, **kwargs):
        # The second fetch starts while the first one downloads, and reaches the lock.
        second = threading.Thread(target=lambda: loaded.append(load_bundle(url)),
                                  name="second")
        second.start()
        assert second_waits.wait(timeout=60), "the second fetch never asked for the lock"
        started.append(second)
        return real_download(*args, **kwargs)

    started, loaded = [], []
    monkeypatch.setattr(fcntl, "flock", flock)
    monkeypatch.setattr(bundle_remote, "_download", download)
    first = load_bundle(url)
    started[0].join(timeout=60)
    assert not started[0].is_alive()
    # flock locks per open file, so two threads stand in for two worker processes here.
    assert bundle_remote.downloads[url] - before == 1
    assert [b.path for b in loaded] == [first.path]  # the second served the first's copy
