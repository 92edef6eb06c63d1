"""A bundle's signature in the OpenSSF model-signing format, beside the bundle as ``<version>.sig``.

``model_signing`` (the ``model-signing`` package, v1) hashes every file of the bundle directory
(sha256 per file; no symlinks) into an in-toto statement, wraps it in a DSSE envelope signed with
an EC key and writes a Sigstore bundle (JSON). The files include ``manifest.json``, which holds the
bundle's name, its version, the sha256 of every other file and the parity verdict (``parity`` and
``parity.json``): so one signature binds the name, the version, every byte and that the gate
passed. Anyone can check a bundle with that package alone::

    model_signing verify key REG/NAME/VERSION --signature REG/NAME/VERSION.sig \\
        --public_key lensflow-verify.pem

lensflow's own loads check the same signature without hashing twice: the envelope's signature
against ``$LENSFLOW_VERIFY_KEY`` (DSSE, :func:`export.signing.dsse_verify`), then that the signed
statement lists exactly ``manifest.json`` at the digest just read and every file the manifest lists
at its sha256; the loader hashes every file against the manifest anyway
(:func:`export.bundle_integrity.verify_files`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from export import signing
from export.errors import BundleSignatureError, ExportError

SIGNATURE_SUFFIX = ".sig"
IN_TOTO = "application/vnd.in-toto+json"
PREDICATE = "https://model_signing/signature/v1.0"
MANIFEST = "manifest.json"


def signature_path(bundle_dir: str | Path) -> Path:
    """``<version>.sig`` beside a bundle directory."""
    bundle_dir = Path(os.path.abspath(bundle_dir))
    return bundle_dir.with_name(bundle_dir.name + SIGNATURE_SUFFIX)


def sign_files(bundle_dir: Path, key: signing.SigningKey, out: Path) -> Path:
    """Sign every file of ``bundle_dir`` with model-signing into ``out`` (written whole)."""
    from model_signing import hashing
    from model_signing import signing as ms_signing

    hashing_config = hashing.Config().use_file_serialization(
        hashing_algorithm="sha256", allow_symlinks=False).set_ignored_paths(
        paths=[], ignore_git_paths=False)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        ms_signing.Config().use_elliptic_key_signer(private_key=key.path).set_hashing_config(
            hashing_config).sign(bundle_dir, tmp)
    except (ValueError, OSError) as err:
        tmp.unlink(missing_ok=True)
        raise ExportError(f"bundle {bundle_dir}: model-signing could not sign it ({err})") \
            from None
    os.chmod(tmp, 0o444)
    os.replace(tmp, out)
    return out


def signed_resources(where: str, raw: bytes, public_key) -> dict[str, str]:
    """``{file: sha256}`` of a model-signing signature's statement, once its envelope verifies."""
    try:
        envelope = json.loads(raw)["dsseEnvelope"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise BundleSignatureError(f"{where}: not a model-signing signature (no DSSE "
                                   "envelope)") from None
    payload = signing.dsse_verify(public_key, envelope, IN_TOTO, where)
    try:
        statement = json.loads(payload)
        if statement["predicateType"] != PREDICATE:
            raise ValueError(statement["predicateType"])
        predicate = statement["predicate"]
        if predicate["serialization"].get("method") != "files":
            raise ValueError("not per-file")
        return {r["name"]: r["digest"] for r in predicate["resources"]
                if r["algorithm"] == "sha256"}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise BundleSignatureError(f"{where}: the signed statement is not a model-signing "
                                   f"v1.0 per-file statement ({err})") from None


def check_bundle_signature(path: Path, raw_signature: bytes | None, manifest: dict, digest: str,
                           record: dict) -> str:
    """Check a bundle's model-signing signature against ``$LENSFLOW_VERIFY_KEY``; returns how it
    stands (``verified``, ``unchecked`` (signed, no verify key set) or ``unsigned``).

    The signed files must be exactly ``manifest.json`` (at ``digest``) and what it lists.
    """
    where = f"bundle {path}"
    key_path = signing.verify_key_path(where)
    if raw_signature is None:
        if isinstance(record.get("signature"), dict) and key_path:
            signing.load_verify_key(key_path)  # an old Ed25519 key is told as such first
            raise BundleSignatureError(
                f"{where}: signed only in lensflow's old Ed25519 format, not model-signing's "
                f"({signature_path(path).name} is missing); {signing.MIGRATE_HINT}")
        return signing.unsigned(where)
    if not key_path:
        return "unchecked"
    signed = signed_resources(f"{where}: {signature_path(path).name}", raw_signature,
                              signing.load_verify_key(key_path))
    expected = {MANIFEST: digest} | {rel: entry.get("sha256") for rel, entry
                                     in manifest["files"].items() if isinstance(entry, dict)}
    if signed != expected:
        changed = sorted(set(signed.items()) ^ set(expected.items()))
        raise BundleSignatureError(
            f"{where}: the signature is of other files ({', '.join(n for n, _ in changed[:3])} "
            "differ) — another bundle's signature, or the bundle changed after signing")
    return "verified"
