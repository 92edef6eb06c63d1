"""The signing settings of a bundle-trust test (signatures, promotions, the trust CLI): none from
the environment it runs in, its own promotion state, and key pairs made on the spot."""

from __future__ import annotations

from pathlib import Path

import pytest

from export.promotion import STATE_ENV
from export.signing import REQUIRE_SIGNED_ENV, SIGNING_KEY_ENV, VERIFY_KEY_ENV, write_key_pair


def isolate_signing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No signing key, verify key or signature requirement from the environment, and the
    scorer's memory of the newest promotion seen in ``tmp_path``: this test's own."""
    for name in (SIGNING_KEY_ENV, VERIFY_KEY_ENV, REQUIRE_SIGNED_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(STATE_ENV, str(tmp_path / "promotions.json"))


def key_pair(tmp_path: Path) -> tuple[Path, Path]:
    """A new (private, public) PEM key pair in ``tmp_path/keys``."""
    return write_key_pair(tmp_path / "keys")
