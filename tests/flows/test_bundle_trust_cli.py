"""What a registry writer without the signing key tries, through the CLI: each is one line.

Each test plays one attack of issue 27 on a real registry folder (the tiny image bundle) with
``lensflow verify``, ``promote`` and ``score images``: exit status 2 and one ``error:`` line that
names what failed, never a traceback, and no partition written.
"""

from __future__ import annotations

import pytest
from cli_runs import assert_one_line, lensflow
from colour_images import colour_folder
from tiny_image_bundle import make_image_bundle

from export.signing import REQUIRE_SIGNED_ENV, SIGNING_KEY_ENV, VERIFY_KEY_ENV, write_key_pair


@pytest.fixture(autouse=True)
def _no_keys(monkeypatch):
    for name in (SIGNING_KEY_ENV, VERIFY_KEY_ENV, REQUIRE_SIGNED_ENV):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def images(tmp_path):
    return colour_folder(tmp_path / "images")


def refused_everywhere(monkeypatch, capsys, bundle, images, out, *needles) -> None:
    """verify, promote and score images each exit 2 with one line holding every needle."""
    for command in (["verify", bundle], ["promote", bundle],
                    ["score", "images", images, "--model", bundle, "--out", out]):
        code, _, err = lensflow(monkeypatch, capsys, *command)
        assert code == 2, (command, err)
        assert_one_line(err, *needles)
    assert not (out / "image_predictions").exists()


@pytest.mark.parametrize("value", ["required", "enabled", "y", ""])
def test_require_signed_with_a_value_it_does_not_define_is_refused(monkeypatch, capsys,
                                                                   tmp_path, images, value):
    bundle = make_image_bundle(tmp_path / "reg", promoted=False)
    _, public = write_key_pair(tmp_path / "keys")
    monkeypatch.setenv(VERIFY_KEY_ENV, str(public))
    monkeypatch.setenv(REQUIRE_SIGNED_ENV, value)
    refused_everywhere(monkeypatch, capsys, bundle, images, tmp_path / "out",
                       f"{REQUIRE_SIGNED_ENV}={value!r}: not one of 1, true, yes, on")


def test_downgrade_an_unsigned_bundle_is_refused_where_a_verify_key_is_set(monkeypatch, capsys,
                                                                          tmp_path, images):
    bundle = make_image_bundle(tmp_path / "reg", promoted=False)
    _, public = write_key_pair(tmp_path / "keys")
    monkeypatch.setenv(VERIFY_KEY_ENV, str(public))
    refused_everywhere(monkeypatch, capsys, bundle, images, tmp_path / "out",
                       f"bundle {bundle}: unsigned, and {VERIFY_KEY_ENV} is set")


def _metadata(out) -> dict[str, str]:
    import pyarrow.parquet as pq

    part = next((out / "image_predictions").rglob("part-*.parquet"))
    return {k.decode(): v.decode() for k, v in pq.read_schema(part).metadata.items()}


def test_a_bundle_whose_parity_failed_is_scored_only_when_the_flag_says_so(monkeypatch, capsys,
                                                                          tmp_path, images):
    """Failed parity: by REG/NAME/VERSION or through a hand-written ``current``, scoring refuses
    it; ``--allow-failed-parity`` scores it and every output file says so."""
    import hashlib

    bundle = make_image_bundle(tmp_path / "reg", promoted=False, parity_passed=False)
    digest = hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()
    (bundle.parent / "current").write_text(f"{bundle.name} sha256:{digest}\n")
    out = tmp_path / "out"
    for ref in (bundle, bundle.parent):
        code, _, err = lensflow(monkeypatch, capsys, "score", "images", images, "--model", ref,
                                "--out", out)
        assert code == 2
        assert_one_line(err, f"tiny/{bundle.name}: its parity gate failed",
                        "--allow-failed-parity")
    assert not out.exists()
    code, _, err = lensflow(monkeypatch, capsys, "score", "images", images, "--model",
                            bundle.parent, "--out", out, "--allow-failed-parity")
    assert code == 0, err
    meta = _metadata(out)
    assert meta["lensflow.parity_passed"] == "false"
    assert meta["lensflow.allow_failed_parity"] == "true"


def test_a_run_records_that_parity_passed_and_no_flag_was_given(monkeypatch, capsys, tmp_path,
                                                                images):
    bundle = make_image_bundle(tmp_path / "reg")
    out = tmp_path / "out"
    code, _, err = lensflow(monkeypatch, capsys, "score", "images", images, "--model",
                            bundle.parent, "--out", out)
    assert code == 0, err
    meta = _metadata(out)
    assert (meta["lensflow.parity_passed"], meta["lensflow.allow_failed_parity"]) == \
        ("true", "false")


@pytest.mark.parametrize("escape", ["dotdot", "absolute", "symlink"])
def test_escape_a_graph_outside_the_bundle_is_refused_by_every_load(monkeypatch, capsys,
                                                                    tmp_path, images, escape):
    """Escape: the manifest names a graph outside the bundle (``..``, an absolute path) or the
    graph is a symlink out of it, with the right sha256; scoring used to load and run it."""
    import hashlib
    import shutil

    from bundle_tampering import edited_manifest, reseal

    bundle = make_image_bundle(tmp_path / "reg", promoted=False)
    outside = tmp_path / "reg" / "outside.onnx"
    shutil.copy(bundle / "model.onnx", outside)
    if escape == "symlink":
        (bundle / "model.onnx").chmod(0o644)
        bundle.chmod(0o755)
        (bundle / "model.onnx").unlink()
        (bundle / "model.onnx").symlink_to(outside)
        needles = [f"bundle {bundle}: model.onnx is a symlink"]
    else:
        rel = "../../outside.onnx" if escape == "dotdot" else str(outside)
        with edited_manifest(bundle) as manifest:
            entry = manifest["files"].pop("model.onnx")
            assert entry["sha256"] == hashlib.sha256(outside.read_bytes()).hexdigest()
            manifest["files"][rel] = entry
            manifest["graphs"]["model"]["files"] = {"onnx": rel}
        reseal(bundle)
        needles = [f"bundle {bundle}: manifest lists an invalid path {rel!r}"]
    refused_everywhere(monkeypatch, capsys, bundle, images, tmp_path / "out", *needles)
