"""``lensflow keys``: the one command that moves a registry to a new signing key."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flows.cli_output import PLAIN, out

keys_app = typer.Typer(**PLAIN, help="Signing keys: move a registry to a new key.")


@keys_app.command("migrate")
def migrate_cmd(
    registry: Annotated[Path, typer.Argument(help="local registry folder (REG)")],
    old_verify_key: Annotated[Path, typer.Option(
        help="the Ed25519 public key PEM the bundles were signed for before")],
    sign_key: Annotated[Path, typer.Option(
        help="the new EC private key PEM (lensflow keygen) that re-signs them")],
) -> None:
    """Re-sign, in the model-signing format with a new EC key, every bundle and promotion of
    REG that lensflow's old Ed25519 signatures vouched for."""
    from export.key_migration import migrate_registry
    from export.signing import VERIFY_KEY_ENV, load_signing_key

    done = migrate_registry(registry, old_verify_key, load_signing_key(sign_key))
    for line in done.skipped:
        out.print(f"left unsigned: {line}", soft_wrap=True)
    out.print(f"re-signed {len(done.signed)} bundles and {len(done.promotions)} promotions; "
              f"set {VERIFY_KEY_ENV} to the new public key on every scorer")
