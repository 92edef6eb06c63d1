"""A downstream team checks a lensflow-signed bundle with the model-signing package alone.

The bundle and its signature are made by lensflow; the checks below use only ``model_signing``
(its command line and its Python API), as someone without lensflow would.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from bundle_tampering import signature_of

from export.bundle import BundleWriter
from export.signing import load_signing_key, write_key_pair

MODEL_SIGNING = Path(sys.executable).with_name("model_signing")


@pytest.fixture
def signed(tmp_path) -> tuple[Path, Path, Path]:
    """(bundle, its signature, the public key) of a bundle lensflow signed at export."""
    private, public = write_key_pair(tmp_path / "keys")
    with BundleWriter(tmp_path / "reg", "ants") as writer:
        (writer.dir / "model.onnx").write_bytes(b"onnx-bytes" * 50)
        (writer.dir / "plots").mkdir()
        (writer.dir / "plots" / "lr_find.png").write_bytes(b"png")
        (writer.dir / "parity.json").write_text(json.dumps({"passed": True}))
        bundle = writer.commit({"task": "single_label", "classes": ["ant", "bee"]},
                               signing_key=load_signing_key(private))
    return bundle, signature_of(bundle), public


def cli_verify(bundle: Path, signature: Path, public: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(MODEL_SIGNING), "verify", "key", str(bundle), "--signature",
                           str(signature), "--public_key", str(public)],
                          capture_output=True, text=True, timeout=120)


def api_verify(bundle: Path, signature: Path, public: Path) -> None:
    from model_signing import verifying

    verifying.Config().use_elliptic_key_verifier(public_key=public).verify(bundle, signature)


def tampered_copy(bundle: Path, tmp_path: Path, edit) -> Path:
    copy = tmp_path / "copy" / bundle.name
    shutil.copytree(bundle, copy)
    for path in copy.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    edit(copy)
    return copy


def test_the_model_signing_cli_and_api_accept_a_lensflow_signed_bundle(signed):
    bundle, signature, public = signed
    result = cli_verify(bundle, signature, public)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Verification succeeded" in result.stdout + result.stderr
    api_verify(bundle, signature, public)


@pytest.mark.parametrize("tamper", ["graph", "manifest", "added file"])
def test_the_model_signing_cli_and_api_refuse_a_tampered_bundle(signed, tmp_path, tamper):
    bundle, signature, public = signed

    def edit(copy: Path) -> None:
        if tamper == "graph":
            (copy / "model.onnx").write_bytes(b"other-bytes" * 50)
        elif tamper == "manifest":  # another name: what substitution across names rewrites
            manifest = json.loads((copy / "manifest.json").read_text())
            (copy / "manifest.json").write_text(json.dumps(manifest | {"name": "bees"}))
        else:
            (copy / "extra.onnx").write_bytes(b"x")

    copy = tampered_copy(bundle, tmp_path, edit)
    result = cli_verify(copy, signature, public)
    assert result.returncode != 0
    assert "Verification failed" in result.stdout + result.stderr
    with pytest.raises(ValueError, match="Signature mismatch"):
        api_verify(copy, signature, public)


def test_the_model_signing_verifier_refuses_another_key(signed, tmp_path):
    bundle, signature, _ = signed
    _, other_public = write_key_pair(tmp_path / "other")
    result = cli_verify(bundle, signature, other_public)
    assert result.returncode != 0
    with pytest.raises(ValueError, match="Key mismatch"):
        api_verify(bundle, signature, other_public)
