"""Signed promotions: ``current`` binds NAME → VERSION → digest with a counter that only grows.

With a signing key, ``promote`` writes ``current`` as two lines, one file replaced whole::

    <version> sha256:<digest>
    promotion {"payloadType": "application/vnd.lensflow.promotion+json", "payload": ..., ...}

The second line is a DSSE envelope signed with the same EC key as the bundles
(:mod:`export.signing`); its payload names the model, the version, the manifest's digest, a
``counter`` and, for a rollback, the version rolled back from. The counter is at least the
previous promotion's plus one and at least the promotion time in microseconds, so it grows even
when someone deletes ``current``. A scorer (every process that resolves ``REG/NAME`` with a verify
key set) keeps the newest counter it has verified per model in a small state file
(``$LENSFLOW_PROMOTION_STATE``, default ``promotions.json`` in the bundle cache folder) and
refuses a ``current`` whose counter is lower (a rollback), or equal with another version (two
records for one counter). Only the key holder can roll back, with ``lensflow promote --rollback``,
which signs a new record with a higher counter that names the older version.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path

from export import signing
from export.errors import BundleSignatureError, PromotionError
from export.pins import Pin, pointer_text, write_atomically

PROMOTION_TYPE = "application/vnd.lensflow.promotion+json"
PROMOTION_PREFIX = "promotion "
STATE_ENV = "LENSFLOW_PROMOTION_STATE"
STATE_FILE = "promotions.json"


def state_path() -> Path:
    """The scorer's record of the newest promotion it has verified, per model."""
    from export.bundle_remote import cache_dir

    return Path(os.environ.get(STATE_ENV) or cache_dir() / STATE_FILE)


def next_counter(previous: int | None) -> int:
    """A counter above ``previous`` and at least now in microseconds."""
    return max((previous or 0) + 1, time.time_ns() // 1000)


def signed_pointer_text(key: signing.SigningKey, name: str, version: str, digest: str,
                        counter: int, rollback_from: str | None = None) -> str:
    """The text of a signed ``current``: the pointer line and the signed promotion."""
    record = {"_type": "https://lensflow/promotion/v1", "name": name, "version": version,
              "sha256": digest, "counter": counter, "rollback_from": rollback_from,
              "promoted_at": datetime.now(timezone.utc).isoformat()}
    payload = json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
    envelope = signing.dsse_sign(key, PROMOTION_TYPE, payload)
    return pointer_text(version, digest) + PROMOTION_PREFIX + json.dumps(envelope) + "\n"


def promotion_text(pointer: object, previous: Pin | None, bundle, key: signing.SigningKey | None,
                   rollback: bool) -> str:
    """What ``promote`` writes to ``current`` for ``bundle`` (a loaded ``Bundle``): signed with
    ``key``, with a counter above the previous signed promotion's; a version older than the
    current one only with ``rollback`` (the record then names the version rolled back from)."""
    older = previous is not None and bundle.version < previous.version
    if older and not rollback:
        raise PromotionError(
            f"bundle {bundle.version}: older than the current version {previous.version} of "
            f"{bundle.name!r} — to roll back, promote it with --rollback")
    if key is None:
        if signing.signatures_required():
            raise PromotionError(
                f"{pointer}: scorers here require signed promotions ({signing.VERIFY_KEY_ENV} "
                f"or {signing.REQUIRE_SIGNED_ENV}); set {signing.SIGNING_KEY_ENV} or pass "
                "--sign-key")
        return pointer_text(bundle.version, bundle.sha256)
    counter = None
    if previous is not None and previous.promotion is not None:
        try:
            counter = int(verified_record(pointer, previous, key.public_key())["counter"])
        except BundleSignatureError:
            counter = None  # another key's, or forged: time alone keeps the counter growing
    return signed_pointer_text(key, bundle.name, bundle.version, bundle.sha256,
                               next_counter(counter),
                               previous.version if older else None)


def verified_record(pointer: object, pin: Pin, public_key) -> dict:
    """The promotion record of a signed ``current`` whose signature verifies with
    ``public_key``; a missing or forged one is a :class:`BundleSignatureError`."""
    where = f"{pointer}"
    try:
        envelope = json.loads(pin.promotion or "")
    except json.JSONDecodeError:
        raise BundleSignatureError(f"{where}: the promotion line is not JSON") from None
    payload = signing.dsse_verify(public_key, envelope, PROMOTION_TYPE, where)
    try:
        record = json.loads(payload)
        int(record["counter"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise BundleSignatureError(f"{where}: the signed promotion has no counter") from None
    return record


def check_promotion(pointer: object, pin: Pin, model_name: str, state_key: str) -> str:
    """Check ``current`` as a scorer must before it resolves ``REG/NAME`` through it: signed by
    the verify key, for this model, this version and this digest, and not older than the newest
    promotion this machine has seen. Returns ``verified``, ``unchecked`` or ``unsigned``."""
    key_path = signing.verify_key_path(f"{pointer}")
    if pin.promotion is None:
        return signing.unsigned(f"{pointer}", "; lensflow promote with the signing key writes "
                                "the signed promotion")
    if not key_path:
        return "unchecked"
    record = verified_record(pointer, pin, signing.load_verify_key(key_path))
    said = (record.get("name"), record.get("version"), record.get("sha256"))
    if said != (model_name, pin.version, pin.digest):
        raise BundleSignatureError(
            f"{pointer}: the signed promotion is of {said[0]}/{said[1]} sha256 "
            f"{str(said[2])[:12]}…, not of {model_name}/{pin.version} sha256 "
            f"{str(pin.digest)[:12]}… — a promotion copied from elsewhere")
    _remember(pointer, state_key, record)
    return "verified"


def _remember(pointer: object, state_key: str, record: dict) -> None:
    """Refuse a promotion older than the newest seen for ``state_key``; else remember it."""
    path = state_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_name(path.name + ".lock"), "a")  # noqa: SIM115 - closed below
    except OSError as err:
        raise BundleSignatureError(f"{path}: cannot keep the newest promotion seen here "
                                   f"({err.strerror}); point {STATE_ENV} at a writable file") \
            from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            state = json.loads(path.read_text())
        except FileNotFoundError:
            state = {}
        except (OSError, json.JSONDecodeError) as err:
            raise BundleSignatureError(f"{path}: promotion state unreadable ({err}); it holds "
                                       f"the newest promotion seen per model ({STATE_ENV})") \
                from None
        seen = state.get(state_key)
        counter = int(record["counter"])
        if seen is not None:
            if counter < seen["counter"]:
                raise BundleSignatureError(
                    f"{pointer}: promotion #{counter} of {record['version']} is older than "
                    f"#{seen['counter']} of {seen['version']} already seen here ({path}) — a "
                    "rollback; only the key holder can roll back (lensflow promote --rollback)")
            if counter == seen["counter"] and seen["sha256"] != record["sha256"]:
                raise BundleSignatureError(
                    f"{pointer}: promotion #{counter} names {record['version']}, but #{counter} "
                    f"seen here ({path}) named {seen['version']}")
            if counter == seen["counter"]:
                return
        state[state_key] = {"counter": counter, "version": record["version"],
                            "sha256": record["sha256"]}
        write_atomically(path, json.dumps(state, indent=1, sort_keys=True) + "\n")
