"""Move a registry from lensflow's old Ed25519 signatures to the model-signing format, new key.

Before the OpenSSF model-signing format, an export signed ``lensflow-bundle-v1 sha256:<digest>``
with an Ed25519 key into the digest record. model-signing's key-based signer takes EC keys only,
so those keys cannot sign the new format. ``lensflow keys migrate REG --old-verify-key OLD.pem
--sign-key NEW.pem`` re-signs, with the new EC key, every bundle whose old signature verifies with
the old public key and whose every file still hashes to its manifest and whose parity passed,
and re-signs each model's ``current`` that names such a bundle as a promotion. Nothing else is
signed: a bundle the old key never signed stays as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from export import signing
from export.bundle import load_bundle, read_parity_passed, sign_bundle
from export.bundle_remote import MANIFEST
from export.errors import BundleIntegrityError, ExportError
from export.pins import CURRENT, read_pointer, read_record, write_atomically
from export.promotion import promotion_text


@dataclass
class Migration:
    """What a migration re-signed, and what it left and why (``REG/NAME/VERSION: reason``)."""

    signed: list[str] = field(default_factory=list)
    promotions: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def migrate_registry(registry: str | Path, old_verify_key: str | Path,
                     new_key: signing.SigningKey) -> Migration:
    """Re-sign a local registry's Ed25519-signed bundles and promotions with ``new_key``."""
    root = Path(registry)
    if not root.is_dir():
        raise ExportError(f"registry {root}: no such directory (keys migrate takes a local "
                          "registry folder)")
    old = signing.load_legacy_verify_key(old_verify_key)
    done = Migration()
    for model in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        signed = {}
        for bundle_dir in sorted(p for p in model.iterdir() if (p / MANIFEST).is_file()):
            reason = _why_not(bundle_dir, old)
            if reason:
                done.skipped.append(f"{bundle_dir}: {reason}")
                continue
            sign_bundle(bundle_dir, new_key)
            signed[bundle_dir.name] = bundle_dir
            done.signed.append(str(bundle_dir))
        pin = read_pointer(model / CURRENT)
        if pin is not None and pin.version in signed:
            bundle = load_bundle(signed[pin.version], signature=False)
            write_atomically(model / CURRENT,
                             promotion_text(model / CURRENT, None, bundle, new_key, False))
            done.promotions.append(str(model / CURRENT))
    return done


def _why_not(bundle_dir: Path, old_key) -> str | None:
    """Why a bundle is not re-signed, or None when it is to be."""
    try:
        record = read_record(bundle_dir)
        if not signing.verify_legacy(old_key, record.get("signature"), record["sha256"]):
            return "no Ed25519 signature that verifies with the old key"
        bundle = load_bundle(bundle_dir, signature=False)
    except BundleIntegrityError as err:
        return str(err)
    if not read_parity_passed(bundle):
        return "its parity gate did not pass"
    return None
