"""Signing settings, keys and DSSE envelopes: who exported and who promoted a bundle.

Bundles are signed in the OpenSSF model-signing format (:mod:`export.bundle_signature`), and
promotions are signed records in ``current`` (:mod:`export.promotion`); both are DSSE envelopes
signed with one elliptic-curve key (P-256, P-384 or P-521: the curves the ``model-signing``
package supports for key-based signing). Keys are PEM files as ``lensflow keygen`` or ``openssl
genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256`` write them. Settings, read on every load:

- ``LENSFLOW_SIGNING_KEY``: private key PEM an export signs with, and ``promote`` signs the
  promotion with (export, train ``--registry``, the training flows, promote).
- ``LENSFLOW_VERIFY_KEY``: public key PEM every load checks signatures against; with it set, an
  unsigned bundle or ``current`` is refused unless ``LENSFLOW_REQUIRE_SIGNED`` says ``0`` (then
  each such load logs a warning line).
- ``LENSFLOW_REQUIRE_SIGNED``: ``1``, ``true``, ``yes`` or ``on`` refuses unsigned bundles (and
  needs ``LENSFLOW_VERIFY_KEY``); ``0``, ``false``, ``no`` or ``off`` lets unsigned ones through;
  unset, signatures are required exactly when a verify key is set. Any other value, the empty
  string included, is refused: a typo must never turn the check off.

Ed25519 keys (lensflow's signatures before the model-signing format) are refused with the one
command that migrates a registry to a new key: ``lensflow keys migrate`` (docs/bundles.md).
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from export.errors import BundleSignatureError, SigningKeyError, SigningSettingError

SIGNING_KEY_ENV = "LENSFLOW_SIGNING_KEY"
VERIFY_KEY_ENV = "LENSFLOW_VERIFY_KEY"
REQUIRE_SIGNED_ENV = "LENSFLOW_REQUIRE_SIGNED"
PRIVATE_KEY_FILE = "lensflow-signing.pem"
PUBLIC_KEY_FILE = "lensflow-verify.pem"
#: The curves model-signing's key-based signer and verifier accept.
CURVES = ("secp256r1", "secp384r1", "secp521r1")
MIGRATE_HINT = ("make a P-256 key with `lensflow keygen DIR` and re-sign the registry with "
                "`lensflow keys migrate REG --old-verify-key OLD.pem --sign-key NEW.pem`")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SigningKey:
    """A private key and the PEM file it came from (model-signing signs from the file)."""

    path: Path
    key: object

    def public_key(self):
        return self.key.public_key()


def _read_key_file(path: str | Path, what: str) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as err:
        raise SigningKeyError(f"{what} {path}: cannot read ({err.strerror})") from None


def _check_curve(key, path: object, what: str) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    public = key.public_key() if hasattr(key, "private_bytes") else key
    if isinstance(public, ed25519.Ed25519PublicKey):
        raise SigningKeyError(f"{what} {path}: an Ed25519 key (lensflow's signatures before the "
                              f"model-signing format); {MIGRATE_HINT}")
    if not isinstance(public, ec.EllipticCurvePublicKey) or public.curve.name not in CURVES:
        kind = getattr(getattr(public, "curve", None), "name", type(public).__name__)
        raise SigningKeyError(f"{what} {path}: {kind} is not an EC key on {', '.join(CURVES)}")


def load_signing_key(path: str | Path) -> SigningKey:
    """The EC private key in a PEM file (unencrypted PKCS#8, as ``lensflow keygen`` writes)."""
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    data = _read_key_file(path, "signing key")
    try:
        key = load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as err:
        raise SigningKeyError(f"signing key {path}: not an unencrypted PEM private key "
                              f"({err})") from None
    _check_curve(key, path, "signing key")
    return SigningKey(Path(path).expanduser(), key)


def _load_public_key(path: str | Path, what: str):
    """The public key in a PEM file, of any kind; ``what`` names it in errors."""
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    data = _read_key_file(path, what)
    try:
        return load_pem_public_key(data)
    except (ValueError, TypeError) as err:
        raise SigningKeyError(f"{what} {path}: not a PEM public key ({err})") from None


def load_verify_key(path: str | Path):
    """The EC public key in a PEM file."""
    key = _load_public_key(path, "verify key")
    _check_curve(key, path, "verify key")
    return key


def load_legacy_verify_key(path: str | Path):
    """An Ed25519 public key PEM: the key lensflow signed digest records with before."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    key = _load_public_key(path, "old verify key")
    if not isinstance(key, Ed25519PublicKey):
        raise SigningKeyError(f"old verify key {path}: not an Ed25519 key")
    return key


def public_pem(public_key) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return public_key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)


def signing_key_from_env() -> SigningKey | None:
    """The key ``$LENSFLOW_SIGNING_KEY`` names, or None when it is unset."""
    path = os.environ.get(SIGNING_KEY_ENV)
    return load_signing_key(path) if path else None


def require_signed() -> bool | None:
    """What ``$LENSFLOW_REQUIRE_SIGNED`` says: True (refuse unsigned bundles), False (let them
    through) or None (unset); any other value is a :class:`SigningSettingError`."""
    value = os.environ.get(REQUIRE_SIGNED_ENV)
    if value is None:
        return None
    word = value.strip().lower()
    if word in _TRUE or word in _FALSE:
        return word in _TRUE
    raise SigningSettingError(
        f"{REQUIRE_SIGNED_ENV}={value!r}: not one of {', '.join(_TRUE)} (unsigned bundles "
        f"refused) or {', '.join(_FALSE)} (allowed); unset it to require signatures exactly "
        f"when {VERIFY_KEY_ENV} is set")


def verify_key_path(where: str) -> str | None:
    """The verify key signatures are checked with, or None when they are not checked; refuses
    ``LENSFLOW_REQUIRE_SIGNED`` on without a key (where: what the error names)."""
    key_path = os.environ.get(VERIFY_KEY_ENV)
    if require_signed() and not key_path:
        raise BundleSignatureError(
            f"{where}: {REQUIRE_SIGNED_ENV} is on but {VERIFY_KEY_ENV} names no public key")
    return key_path or None


def signatures_required() -> bool:
    """Whether an unsigned bundle or promotion is refused under the current settings."""
    required = require_signed()
    return bool(required) or (required is None and bool(os.environ.get(VERIFY_KEY_ENV)))


def unsigned(where: str, hint: str = "") -> str:
    """Let an unsigned bundle or ``current`` through, or refuse it, as the settings say;
    returns ``unsigned``. hint: ends the one line (how to sign what is missing)."""
    key_path = verify_key_path(where)
    required = require_signed()
    if required:
        raise BundleSignatureError(
            f"{where}: unsigned, and {REQUIRE_SIGNED_ENV}=1 refuses unsigned bundles{hint}")
    if key_path and required is None:
        raise BundleSignatureError(
            f"{where}: unsigned, and {VERIFY_KEY_ENV} is set, so a signature is required (set "
            f"{REQUIRE_SIGNED_ENV}=0 to allow unsigned bundles){hint}")
    if key_path:
        _log.warning("warning: %s: unsigned, loaded only because %s=%s with %s set", where,
                     REQUIRE_SIGNED_ENV, os.environ[REQUIRE_SIGNED_ENV], VERIFY_KEY_ENV)
    return "unsigned"


# ---- DSSE (https://github.com/secure-systems-lab/dsse), the envelope model-signing uses ----

def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE's pre-authentication encoding: what an envelope's signature is over."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


def _hash_for(public_key):
    from cryptography.hazmat.primitives import hashes

    return {256: hashes.SHA256, 384: hashes.SHA384, 521: hashes.SHA512}[
        public_key.curve.key_size]()


def dsse_sign(key: SigningKey, payload_type: str, payload: bytes) -> dict:
    """A DSSE envelope (JSON form) over ``payload``, ECDSA-signed with ``key``."""
    from cryptography.hazmat.primitives.asymmetric import ec

    sig = key.key.sign(pae(payload_type, payload), ec.ECDSA(_hash_for(key.public_key())))
    return {"payloadType": payload_type, "payload": base64.b64encode(payload).decode(),
            "signatures": [{"keyid": "", "sig": base64.b64encode(sig).decode()}]}


def dsse_verify(public_key, envelope: object, payload_type: str, where: str) -> bytes:
    """The payload of a DSSE envelope whose one signature verifies with ``public_key``; anything
    else is a one-line :class:`BundleSignatureError` naming ``where``."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        if envelope["payloadType"] != payload_type:
            raise BundleSignatureError(f"{where}: signs a {envelope['payloadType']!r}, not a "
                                       f"{payload_type!r}")
        payload = base64.b64decode(envelope["payload"], validate=True)
        sig = base64.b64decode(envelope["signatures"][0]["sig"], validate=True)
        public_key.verify(sig, pae(payload_type, payload), ec.ECDSA(_hash_for(public_key)))
    except (InvalidSignature, binascii.Error, ValueError, KeyError, IndexError, TypeError):
        raise BundleSignatureError(
            f"{where}: signature does not verify with {VERIFY_KEY_ENV} "
            f"({os.environ.get(VERIFY_KEY_ENV)}) — signed with another key, or changed after "
            "signing") from None
    return payload


def verify_legacy(public_key, signature: object, digest: str) -> bool:
    """Whether a pre-model-signing digest record's Ed25519 signature verifies (migration)."""
    from cryptography.exceptions import InvalidSignature

    try:
        value = base64.b64decode(str(signature.get("value", "")), validate=True)
        public_key.verify(value, f"lensflow-bundle-v1 sha256:{digest}".encode("ascii"))
    except (InvalidSignature, binascii.Error, ValueError, AttributeError):
        return False
    return True


def write_key_pair(out_dir: str | Path) -> tuple[Path, Path]:
    """Write a new EC P-256 key pair as PEM files in ``out_dir``: (private, public).

    The private key file is readable by its owner only; existing files are never overwritten.
    """
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        NoEncryption,
        PrivateFormat,
    )

    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise SigningKeyError(f"keygen {out}: exists and is not a directory")
    private_path, public_path = out / PRIVATE_KEY_FILE, out / PUBLIC_KEY_FILE
    for path in (private_path, public_path):
        if path.exists():
            raise SigningKeyError(f"keygen {path}: already exists (not overwritten)")
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    private_pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private_pem)
    public_path.write_bytes(public_pem(key.public_key()))
    return private_path, public_path
