"""Ed25519 signatures over a bundle's digest: who exported it, not only that it is intact.

The digest (sha256 of ``manifest.json``, which lists the sha256 of every other file) pins every
byte of a bundle; a detached Ed25519 signature over it says the bundle came from a holder of the
signing key. The signed message is ``lensflow-bundle-v1 sha256:<digest>`` (ASCII), so a signature
made for something else can never pass for a bundle's. Keys are PEM files as ``openssl genpkey
-algorithm ed25519`` or ``lensflow keygen`` write them. Settings, read when a bundle is loaded:

- ``LENSFLOW_SIGNING_KEY``: private key PEM an export signs with (export, train ``--registry``,
  the training flows).
- ``LENSFLOW_VERIFY_KEY``: public key PEM every load checks a signature against; with it set, an
  unsigned bundle is refused unless ``LENSFLOW_REQUIRE_SIGNED`` says ``0`` (then each load of
  one logs a warning line).
- ``LENSFLOW_REQUIRE_SIGNED``: ``1``, ``true``, ``yes`` or ``on`` refuses unsigned bundles (and
  needs ``LENSFLOW_VERIFY_KEY``); ``0``, ``false``, ``no`` or ``off`` lets unsigned bundles
  through; unset, signatures are required exactly when a verify key is set. Any other value,
  the empty string included, is refused: a typo must never turn the check off.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
from pathlib import Path

from export.errors import BundleSignatureError, SigningKeyError, SigningSettingError

SIGNING_KEY_ENV = "LENSFLOW_SIGNING_KEY"
VERIFY_KEY_ENV = "LENSFLOW_VERIFY_KEY"
REQUIRE_SIGNED_ENV = "LENSFLOW_REQUIRE_SIGNED"
ALGORITHM = "ed25519"
PRIVATE_KEY_FILE = "lensflow-signing.pem"
PUBLIC_KEY_FILE = "lensflow-verify.pem"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")

_log = logging.getLogger(__name__)


def signed_message(digest: str) -> bytes:
    """The bytes a bundle signature covers: a domain tag and the bundle digest."""
    return f"lensflow-bundle-v1 sha256:{digest}".encode("ascii")


def _read_key_file(path: str | Path, what: str) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as err:
        raise SigningKeyError(f"{what} {path}: cannot read ({err.strerror})") from None


def load_signing_key(path: str | Path):
    """The Ed25519 private key in a PEM file (unencrypted PKCS#8, as ``lensflow keygen`` writes)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    data = _read_key_file(path, "signing key")
    try:
        key = load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as err:
        raise SigningKeyError(f"signing key {path}: not an unencrypted PEM private key "
                              f"({err})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"signing key {path}: {type(key).__name__} is not an Ed25519 key")
    return key


def load_verify_key(path: str | Path):
    """The Ed25519 public key in a PEM file."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    data = _read_key_file(path, "verify key")
    try:
        key = load_pem_public_key(data)
    except (ValueError, TypeError) as err:
        raise SigningKeyError(f"verify key {path}: not a PEM public key ({err})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SigningKeyError(f"verify key {path}: {type(key).__name__} is not an Ed25519 key")
    return key


def key_id(public_key) -> str:
    """sha256 of the raw public key bytes: names the key in a signature record."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return hashlib.sha256(public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)).hexdigest()


def signing_key_from_env():
    """The key ``$LENSFLOW_SIGNING_KEY`` names, or None when it is unset."""
    path = os.environ.get(SIGNING_KEY_ENV)
    return load_signing_key(path) if path else None


def sign_digest(private_key, digest: str) -> dict:
    """A signature record for a bundle digest: algorithm, key id, base64 signature."""
    value = private_key.sign(signed_message(digest))
    return {"algorithm": ALGORITHM, "key_id": key_id(private_key.public_key()),
            "value": base64.b64encode(value).decode("ascii")}


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


def check_signature(where: str, signature: object, digest: str) -> str:
    """Check a bundle's signature record against ``$LENSFLOW_VERIFY_KEY``; returns how it stands
    (``verified``, ``unchecked`` (signed, no verify key set) or ``unsigned``).

    With a verify key set an unsigned bundle is refused, unless ``$LENSFLOW_REQUIRE_SIGNED`` is
    explicitly off, which logs a warning line on every such load.
    where: what to name in the one-line error (the bundle directory).
    """
    key_path = os.environ.get(VERIFY_KEY_ENV)
    required = require_signed()
    if required and not key_path:
        raise BundleSignatureError(
            f"bundle {where}: {REQUIRE_SIGNED_ENV} is on but {VERIFY_KEY_ENV} names no public "
            "key")
    if signature is None:
        if required:
            raise BundleSignatureError(
                f"bundle {where}: unsigned, and {REQUIRE_SIGNED_ENV}=1 refuses unsigned bundles")
        if key_path and required is None:
            raise BundleSignatureError(
                f"bundle {where}: unsigned, and {VERIFY_KEY_ENV} is set, so a signature is "
                f"required (set {REQUIRE_SIGNED_ENV}=0 to allow unsigned bundles)")
        if key_path:
            _log.warning("warning: bundle %s: unsigned, loaded only because %s=%s with %s set",
                         where, REQUIRE_SIGNED_ENV, os.environ[REQUIRE_SIGNED_ENV],
                         VERIFY_KEY_ENV)
        return "unsigned"
    if not key_path:
        return "unchecked"
    public_key = load_verify_key(key_path)
    if not isinstance(signature, dict) or signature.get("algorithm") != ALGORITHM:
        raise BundleSignatureError(f"bundle {where}: signature record is not an {ALGORITHM} "
                                   "signature")
    from cryptography.exceptions import InvalidSignature

    try:
        value = base64.b64decode(str(signature.get("value", "")), validate=True)
        public_key.verify(value, signed_message(digest))
    except (InvalidSignature, binascii.Error, ValueError):
        raise BundleSignatureError(
            f"bundle {where}: signature does not verify with {VERIFY_KEY_ENV} ({key_path}) — "
            "signed with another key, or changed after signing") from None
    return "verified"


def write_key_pair(out_dir: str | Path) -> tuple[Path, Path]:
    """Write a new Ed25519 key pair as PEM files in ``out_dir``: (private, public).

    The private key file is readable by its owner only; existing files are never overwritten.
    """
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        NoEncryption,
        PrivateFormat,
        PublicFormat,
    )

    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise SigningKeyError(f"keygen {out}: exists and is not a directory")
    private_path, public_path = out / PRIVATE_KEY_FILE, out / PUBLIC_KEY_FILE
    for path in (private_path, public_path):
        if path.exists():
            raise SigningKeyError(f"keygen {path}: already exists (not overwritten)")
    out.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    public_pem = key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private_pem)
    public_path.write_bytes(public_pem)
    return private_path, public_path
