"""What a registry writer without the signing key tries, through the CLI: each is one line.

Each test plays one attack of issue 27 on a real registry folder (the tiny image bundle) with
``lensflow verify``, ``promote`` and ``score images``: exit status 2 and one ``error:`` line that
names what failed, never a traceback, and no partition written.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from bundle_tampering import record_of, signature_of
from cli_runs import assert_one_line, lensflow
from colour_images import colour_folder
from signing_env import isolate_signing, key_pair
from tiny_image_bundle import make_image_bundle

from export.bundle import promote, sign_bundle
from export.signing import (
    REQUIRE_SIGNED_ENV,
    VERIFY_KEY_ENV,
    load_signing_key,
    write_key_pair,
)


@pytest.fixture(autouse=True)
def _no_keys(monkeypatch, tmp_path):
    isolate_signing(monkeypatch, tmp_path)


@pytest.fixture
def keys(tmp_path) -> tuple[Path, Path]:
    return key_pair(tmp_path)


def signed_bundle(registry, private: Path, name: str = "tiny", seed: int = 0,
                  promoted: bool = True):
    """A tiny bundle signed by the key holder (model-signing) and, by default, promoted with a
    signed promotion."""
    path = make_image_bundle(registry, name=name, seed=seed, promoted=False)
    sign_bundle(path, load_signing_key(private))
    if promoted:
        promote(path, signing_key=load_signing_key(private))
    return path


def scored_version(monkeypatch, capsys, model, images, out) -> str:
    """Score with ``model``; the bundle version every output file records."""
    code, _, err = lensflow(monkeypatch, capsys, "score", "images", images, "--model", model,
                            "--out", out)
    assert code == 0, err
    return _metadata(out)["lensflow.model_version"]


def refused(monkeypatch, capsys, commands, *needles) -> None:
    for command in commands:
        code, _, err = lensflow(monkeypatch, capsys, *command)
        assert code == 2, (command, err)
        assert_one_line(err, *needles)


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

    part = max((out / "image_predictions").rglob("part-*.parquet"), key=lambda p: p.stat().st_mtime)
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


def test_substitution_another_models_signed_bundle_under_this_name_is_refused(
        monkeypatch, capsys, tmp_path, images, keys):
    """Substitution across names: another model's signed bundle, its record and signature copied
    into ``REG/tiny/``, reached by version, through a hand-written ``current`` or through the
    other model's signed ``current`` copied too. The signature used to cover the digest only, so
    verify said "signature verified" and scoring ran ``other`` as ``tiny``."""
    private, public = keys
    reg, out = tmp_path / "reg", tmp_path / "out"
    signed_bundle(reg, private)
    other = signed_bundle(reg, private, name="other", seed=1)
    copied = reg / "tiny" / other.name
    shutil.copytree(other, copied)
    for beside in (record_of, signature_of):
        shutil.copy(beside(other), beside(copied))
    monkeypatch.setenv(VERIFY_KEY_ENV, str(public))
    assert scored_version(monkeypatch, capsys, reg / "other", images, out) == other.name
    refused_everywhere(monkeypatch, capsys, copied, images, tmp_path / "out2",
                       f"bundle {copied}: manifest.json is model 'other', but it sits under "
                       "'tiny'")
    current = reg / "tiny" / "current"
    digest = (reg / "other" / "current").read_text().split()[1]
    current.write_text(f"{other.name} {digest}\n")
    score = ["score", "images", images, "--model", reg / "tiny", "--out", tmp_path / "out2"]
    refused(monkeypatch, capsys, [["verify", reg / "tiny"], score],
            f"{current}: unsigned, and {VERIFY_KEY_ENV} is set",
            "lensflow promote with the signing key writes the signed promotion")
    shutil.copy(reg / "other" / "current", current)
    refused(monkeypatch, capsys, [["verify", reg / "tiny"], score],
            f"{current}: the signed promotion is of other/{other.name}")
    assert not (tmp_path / "out2").exists()


def test_rollback_an_older_signed_current_is_refused_unless_the_key_holder_rolls_back(
        monkeypatch, capsys, tmp_path, images, keys):
    """Rollback: the first version's signed ``current`` written back after the second was
    promoted. A scorer that has seen the second's promotion refuses it; the key holder rolls
    back with ``promote --rollback``, a newer signed record that scorers accept."""
    private, public = keys
    reg, out = tmp_path / "reg", tmp_path / "out"
    first = signed_bundle(reg, private)
    first_current = (reg / "tiny" / "current").read_text()
    second = signed_bundle(reg, private, seed=1)
    monkeypatch.setenv(VERIFY_KEY_ENV, str(public))
    assert scored_version(monkeypatch, capsys, reg / "tiny", images, out) == second.name
    refused(monkeypatch, capsys, [["promote", first, "--sign-key", private]],
            f"bundle {first.name}: older than the current version {second.name}",
            "--rollback")

    (reg / "tiny" / "current").write_text(first_current)  # a registry writer replays it
    score = ["score", "images", images, "--model", reg / "tiny", "--out", tmp_path / "out2"]
    refused(monkeypatch, capsys, [["verify", reg / "tiny"], score],
            f"{reg / 'tiny' / 'current'}: promotion #", f"of {first.name} is older than #",
            f"of {second.name} already seen here", "a rollback")
    assert not (tmp_path / "out2").exists()

    code, _, err = lensflow(monkeypatch, capsys, "promote", first, "--rollback", "--sign-key",
                            private)
    assert code == 0, err
    assert scored_version(monkeypatch, capsys, reg / "tiny", images, out) == first.name


def test_downgrade_a_signature_removed_or_an_unsigned_current_is_refused(
        monkeypatch, capsys, tmp_path, images, keys):
    """Downgrade by deletion: the bundle's model-signing signature removed, or ``current``
    rewritten without its signed promotion, where a verify key is set."""
    private, public = keys
    bundle = signed_bundle(tmp_path / "reg", private)
    current = bundle.parent / "current"
    current.write_text(current.read_text().splitlines()[0] + "\n")
    monkeypatch.setenv(VERIFY_KEY_ENV, str(public))
    score = ["score", "images", images, "--model", bundle.parent, "--out", tmp_path / "out"]
    refused(monkeypatch, capsys, [["verify", bundle.parent], score],
            f"{current}: unsigned, and {VERIFY_KEY_ENV} is set")
    signature_of(bundle).unlink()
    refused_everywhere(monkeypatch, capsys, bundle, images, tmp_path / "out",
                       f"bundle {bundle}: unsigned, and {VERIFY_KEY_ENV} is set")


def test_the_scoring_flow_refuses_a_substituted_bundle_and_a_rollback_in_one_line(
        monkeypatch, tmp_path, images, keys, prefect_api):
    """The Prefect scoring flow resolves and loads through the same checks as the CLI."""
    from flows.score_flows import score_image_folder_flow

    private, public = keys
    reg, out = tmp_path / "reg", tmp_path / "out"
    first = signed_bundle(reg, private)
    first_current = (reg / "tiny" / "current").read_text()
    other = signed_bundle(reg, private, name="other", seed=1)
    signed_bundle(reg, private, seed=2)
    copied = reg / "tiny" / other.name
    shutil.copytree(other, copied)
    for beside in (record_of, signature_of):
        shutil.copy(beside(other), beside(copied))
    monkeypatch.setenv(VERIFY_KEY_ENV, str(public))
    assert score_image_folder_flow(str(images), str(reg / "tiny"), str(out),
                                   return_state=True).is_completed()
    (reg / "tiny" / "current").write_text(first_current)
    for model, needle in ((copied, "manifest.json is model 'other', but it sits under 'tiny'"),
                          (reg / "tiny", f"of {first.name} is older than #")):
        state = score_image_folder_flow(str(images), str(model), str(tmp_path / "out2"),
                                        return_state=True)
        assert state.is_failed()
        assert needle in state.message and "\n" not in state.message
    assert not (tmp_path / "out2").exists()
