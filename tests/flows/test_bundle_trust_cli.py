"""What a registry writer without the signing key tries, through the CLI: each is one line.

Each test plays one attack of issue 27 on a real registry folder (the tiny image bundle) with
``lensflow verify``, ``promote`` and ``score images``: exit status 2 and one ``error:`` line that
names what failed, never a traceback, and no partition written.
"""

from __future__ import annotations

import pytest
from cli_runs import assert_one_line, lensflow
from colour_images import colour_folder
from tiny_image_bundle import make_image_bundle

from export.signing import REQUIRE_SIGNED_ENV, SIGNING_KEY_ENV, VERIFY_KEY_ENV, write_key_pair


@pytest.fixture(autouse=True)
def _no_keys(monkeypatch):
    for name in (SIGNING_KEY_ENV, VERIFY_KEY_ENV, REQUIRE_SIGNED_ENV):
        monkeypatch.delenv(name, raising=False)


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
