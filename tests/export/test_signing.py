"""Optional signatures in the OpenSSF model-signing format: sign at export, verify on every load."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from bundle_tampering import edited_manifest, record_of, reseal, signature_of
from signing_env import isolate_signing, key_pair

from export.bundle import BundleWriter, load_bundle, promote, resolve_bundle, sign_bundle
from export.errors import (
    BundleIntegrityError,
    BundleSignatureError,
    ExportError,
    SigningKeyError,
    SigningSettingError,
)
from export.signing import (
    REQUIRE_SIGNED_ENV,
    SIGNING_KEY_ENV,
    VERIFY_KEY_ENV,
    load_signing_key,
    write_key_pair,
)


@pytest.fixture(autouse=True)
def _no_keys_from_the_environment(monkeypatch, tmp_path):
    isolate_signing(monkeypatch, tmp_path)


@pytest.fixture
def keys(tmp_path) -> tuple[Path, Path]:
    return key_pair(tmp_path)


def write_bundle(registry: Path, signing_key=None) -> Path:
    with BundleWriter(registry, "ants") as writer:
        (writer.dir / "model.onnx").write_bytes(b"onnx-bytes" * 20)
        (writer.dir / "parity.json").write_text(json.dumps({"passed": True}))
        return writer.commit({"task": "single_label", "classes": ["ant", "bee"]},
                             signing_key=signing_key)


def tamper_and_reseal(bundle: Path) -> None:
    """Swap the classes and rewrite the digest record, keeping the old signature."""
    with edited_manifest(bundle) as manifest:
        manifest["classes"] = ["bee", "ant"]
    reseal(bundle)


def test_keygen_writes_a_private_key_only_its_owner_reads_and_never_overwrites(keys):
    private, public = keys
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert b"BEGIN PRIVATE KEY" in private.read_bytes()
    assert b"BEGIN PUBLIC KEY" in public.read_bytes()
    with pytest.raises(SigningKeyError, match="already exists"):
        write_key_pair(private.parent)


def test_signed_bundle_verifies_and_a_tampered_one_is_refused(tmp_path, keys, monkeypatch):
    private, public = keys
    bundle = write_bundle(tmp_path / "reg", load_signing_key(private))
    envelope = json.loads(signature_of(bundle).read_text())["dsseEnvelope"]
    assert envelope["payloadType"] == "application/vnd.in-toto+json"
    assert "signature" not in json.loads(record_of(bundle).read_text())
    assert load_bundle(bundle).signature == "unchecked"  # no verify key configured
    monkeypatch.setenv(VERIFY_KEY_ENV, str(public))
    monkeypatch.setenv(REQUIRE_SIGNED_ENV, "1")
    assert load_bundle(bundle).signature == "verified"
    promote(bundle, signing_key=load_signing_key(private))
    assert resolve_bundle(bundle.parent) == bundle
    tamper_and_reseal(bundle)
    # A fresh copy of the registry (no ``current`` to pin it): only the signature can tell.
    (bundle.parent / "current").unlink()
    with pytest.raises(BundleSignatureError, match=f"bundle {bundle}: the signature is of other "
                                                   "files"):
        load_bundle(bundle)


def test_a_signature_by_another_key_is_refused(tmp_path, keys, monkeypatch):
    _, public = keys
    other_private, _ = write_key_pair(tmp_path / "other")
    bundle = write_bundle(tmp_path / "reg", load_signing_key(other_private))
    monkeypatch.setenv(VERIFY_KEY_ENV, str(public))
    with pytest.raises(BundleSignatureError, match="signed with another key"):
        load_bundle(bundle)
    with pytest.raises(BundleSignatureError):
        promote(bundle, signing_key=load_signing_key(other_private))


def test_unsigned_bundles_are_refused_when_signatures_are_required(tmp_path, keys, monkeypatch):
    private, public = keys
    bundle = write_bundle(tmp_path / "reg")
    assert load_bundle(bundle).signature == "unsigned"
    monkeypatch.setenv(REQUIRE_SIGNED_ENV, "1")
    with pytest.raises(BundleSignatureError, match=f"{VERIFY_KEY_ENV} names no public key"):
        load_bundle(bundle)
    monkeypatch.setenv(VERIFY_KEY_ENV, str(public))
    with pytest.raises(BundleSignatureError, match=f"bundle {bundle}: unsigned, and "
                                                   f"{REQUIRE_SIGNED_ENV}=1 refuses"):
        load_bundle(bundle)
    with pytest.raises(BundleSignatureError, match="unsigned"):
        promote(bundle, signing_key=load_signing_key(private))
    # Signing an existing (verified) bundle afterwards makes it acceptable.
    monkeypatch.delenv(REQUIRE_SIGNED_ENV)
    sign_bundle(bundle, load_signing_key(private))
    monkeypatch.setenv(REQUIRE_SIGNED_ENV, "1")
    assert load_bundle(bundle).signature == "verified"


def test_bad_key_files_are_one_line(tmp_path, keys, monkeypatch):
    private, public = keys
    with pytest.raises(SigningKeyError, match=f"signing key {tmp_path}/nope.pem: cannot read"):
        load_signing_key(tmp_path / "nope.pem")
    with pytest.raises(SigningKeyError, match="not an unencrypted PEM private key"):
        load_signing_key(public)
    bundle = write_bundle(tmp_path / "reg", load_signing_key(private))
    monkeypatch.setenv(VERIFY_KEY_ENV, str(private))
    with pytest.raises(SigningKeyError, match="verify key .*not a PEM public key"):
        load_bundle(bundle)


@pytest.mark.slow
def test_export_signs_with_the_key_from_the_environment(tmp_path, keys, monkeypatch):
    import torch
    from tiny_export_models import TinyCNN, image_manifest, trained_like

    from export.convert import export_bundle

    private, public = keys
    monkeypatch.setenv(SIGNING_KEY_ENV, str(private))
    torch.manual_seed(0)
    result = export_bundle(trained_like(TinyCNN(n_out=4)), image_manifest(), tmp_path / "reg",
                           "pets", pt2=False)
    monkeypatch.setenv(VERIFY_KEY_ENV, str(public))
    monkeypatch.setenv(REQUIRE_SIGNED_ENV, "1")
    assert load_bundle(result.bundle_path).signature == "verified"
    assert os.path.exists(result.bundle_path.parent / f"{result.version}.digest.json")


@pytest.mark.parametrize("value", ["required", "enabled", "y", "", "2"])
def test_require_signed_refuses_a_value_it_does_not_define(tmp_path, keys, monkeypatch, value):
    """A typo must never turn the check off: before, any such value silently meant 'off'."""
    _, public = keys
    bundle = write_bundle(tmp_path / "reg")
    monkeypatch.setenv(VERIFY_KEY_ENV, str(public))
    monkeypatch.setenv(REQUIRE_SIGNED_ENV, value)
    with pytest.raises(SigningSettingError) as refused:
        load_bundle(bundle)
    message = str(refused.value)
    assert message.startswith(f"{REQUIRE_SIGNED_ENV}={value!r}: not one of 1, true, yes, on")
    assert "0, false, no, off" in message and "\n" not in message


@pytest.mark.parametrize("value", ["1", "TRUE", " yes ", "on", "0", "false", "No", "off"])
def test_require_signed_accepts_its_documented_values(tmp_path, keys, monkeypatch, value):
    private, public = keys
    bundle = write_bundle(tmp_path / "reg", load_signing_key(private))
    monkeypatch.setenv(VERIFY_KEY_ENV, str(public))
    monkeypatch.setenv(REQUIRE_SIGNED_ENV, value)
    assert load_bundle(bundle).signature == "verified"


def test_with_a_verify_key_an_unsigned_bundle_is_refused(tmp_path, keys, monkeypatch):
    """The downgrade: a verify key alone used to let an unsigned record pass as 'unsigned'."""
    _, public = keys
    bundle = write_bundle(tmp_path / "reg")
    monkeypatch.setenv(VERIFY_KEY_ENV, str(public))
    with pytest.raises(BundleSignatureError,
                       match=f"bundle {bundle}: unsigned, and {VERIFY_KEY_ENV} is set"):
        load_bundle(bundle)
    with pytest.raises(BundleSignatureError, match="unsigned"):
        promote(bundle)


def test_the_explicit_opt_out_lets_unsigned_bundles_through_with_a_warning(
        tmp_path, keys, monkeypatch, caplog):
    _, public = keys
    bundle = write_bundle(tmp_path / "reg")
    monkeypatch.setenv(VERIFY_KEY_ENV, str(public))
    monkeypatch.setenv(REQUIRE_SIGNED_ENV, "0")
    with caplog.at_level("WARNING", logger="export.signing"):
        assert load_bundle(bundle).signature == "unsigned"
    assert [r.getMessage() for r in caplog.records] == [
        f"warning: bundle {bundle}: unsigned, loaded only because {REQUIRE_SIGNED_ENV}=0 with "
        f"{VERIFY_KEY_ENV} set"]


def test_a_bundle_whose_parity_failed_is_never_signed(tmp_path, keys):
    private, _ = keys
    with BundleWriter(tmp_path / "reg", "ants") as writer:
        (writer.dir / "model.onnx").write_bytes(b"onnx-bytes")
        (writer.dir / "parity.json").write_text(json.dumps({"passed": False}))
        with pytest.raises(ExportError, match="parity.json does not record a passed parity "
                                              "gate; not signed"):
            writer.commit({"task": "single_label"}, signing_key=load_signing_key(private))
    assert not list((tmp_path / "reg" / "ants").iterdir()), "nothing committed"
    with BundleWriter(tmp_path / "reg2", "failed") as writer:
        (writer.dir / "parity.json").write_text(json.dumps({"passed": False}))
        failed = writer.commit({"task": "single_label"})
    with pytest.raises(ExportError, match=f"bundle {failed}: parity.json does not record a "
                                          "passed parity gate; not signed"):
        sign_bundle(failed, load_signing_key(private))
    assert "signature" not in json.loads(record_of(failed).read_text())


def _legacy_sign(bundle: Path, ed_key) -> None:
    """Sign a bundle's record as lensflow did before the model-signing format (Ed25519)."""
    import base64

    record = json.loads(record_of(bundle).read_text())
    value = ed_key.sign(f"lensflow-bundle-v1 sha256:{record['sha256']}".encode())
    record["signature"] = {"algorithm": "ed25519", "key_id": "old",
                           "value": base64.b64encode(value).decode()}
    record_of(bundle).chmod(0o644)
    record_of(bundle).write_text(json.dumps(record))


def test_an_ed25519_registry_is_refused_with_the_migration_command_which_migrates_it(
        tmp_path, keys, monkeypatch, capsys):
    from cli_runs import lensflow
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        NoEncryption,
        PrivateFormat,
        PublicFormat,
    )

    private, public = keys
    old = Ed25519PrivateKey.generate()
    old_private, old_public = tmp_path / "old.pem", tmp_path / "old.pub.pem"
    old_private.write_bytes(old.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    old_public.write_bytes(old.public_key().public_bytes(Encoding.PEM,
                                                         PublicFormat.SubjectPublicKeyInfo))
    registry = tmp_path / "reg"
    bundle = write_bundle(registry)
    _legacy_sign(bundle, old)
    promote(bundle)
    stray = write_bundle(registry)  # never signed: migration leaves it so
    for load in (load_signing_key, lambda p: monkeypatch.setenv(VERIFY_KEY_ENV, str(p)) or
                 load_bundle(bundle)):
        with pytest.raises(SigningKeyError, match="an Ed25519 key .*lensflow keys migrate"):
            load(old_private if load is load_signing_key else old_public)
    monkeypatch.setenv(VERIFY_KEY_ENV, str(public))
    with pytest.raises(BundleSignatureError, match=f"bundle {bundle}: signed only in lensflow's "
                                                   "old Ed25519 format"):
        load_bundle(bundle)

    code, out, err = lensflow(monkeypatch, capsys, "keys", "migrate", registry,
                              "--old-verify-key", old_public, "--sign-key", private)
    assert code == 0, err
    assert "re-signed 1 bundles and 1 promotions" in out
    assert f"left unsigned: {stray}: no Ed25519 signature" in out
    monkeypatch.setenv(REQUIRE_SIGNED_ENV, "1")
    assert resolve_bundle(registry / "ants") == bundle
    assert load_bundle(bundle).signature == "verified"
    with pytest.raises(BundleSignatureError, match="unsigned"):
        load_bundle(stray)


def test_a_bundle_that_names_another_model_or_version_than_where_it_sits_is_refused(tmp_path):
    import shutil

    bundle = write_bundle(tmp_path / "reg")
    for name, version in (("bees", bundle.name), ("ants", "20990101T000000.000000Z-beef")):
        copy = tmp_path / "reg" / name / version
        shutil.copytree(bundle, copy)
        shutil.copy(record_of(bundle), record_of(copy))
        said = "model 'ants', but it sits under 'bees'" if name == "bees" else \
            f"version '{bundle.name}', but it sits at '{version}'"
        with pytest.raises(BundleIntegrityError, match=f"bundle {copy}: manifest.json is {said}"):
            load_bundle(copy)
