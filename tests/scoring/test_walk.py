"""The walk of an image folder passes loops, vanished entries and unreadable folders by, counted,
and the run goes on."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny_image_bundle import make_image_bundle

import scoring.image_folder as image_folder
from scoring.image_folder import walk_folder, walk_images
from scoring.image_scoring import score_image_folder


def _image(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(path)
    return path


def _scandir_that(monkeypatch, act):
    """os.scandir for the walk, calling ``act(directory)`` after each listing is read."""
    real = os.scandir

    class Listing:
        def __init__(self, directory):
            with real(directory) as listing:
                self.entries = list(listing)
            act(Path(directory))

        def __enter__(self):
            return iter(self.entries)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(image_folder.os, "scandir", Listing)


def test_symlink_to_itself_and_to_an_ancestor_are_counted_loops(tmp_path):
    _image(tmp_path / "a.jpg")
    _image(tmp_path / "sub" / "b.jpg")
    os.symlink("self.jpg", tmp_path / "self.jpg")  # a file link to itself
    os.symlink("selfdir", tmp_path / "selfdir")  # a name that may be a folder, to itself
    os.symlink(tmp_path, tmp_path / "sub" / "up")  # a folder link to an ancestor
    walk = walk_folder(tmp_path)
    assert [f.relpath for f in walk.files] == ["a.jpg", "sub/b.jpg"]
    assert [(s.relpath, s.reason) for s in walk.skipped] == [
        ("self.jpg", "loop"), ("selfdir", "loop"), ("sub/up", "loop")]
    assert walk.skip_counts() == {"loop": 3, "vanished": 0, "unreadable": 0}
    assert walk.skip_line() == "walk skipped 3 (3 loop): self.jpg, selfdir, sub/up"


def test_a_file_deleted_during_the_walk_is_a_vanished_skip(tmp_path, monkeypatch):
    _image(tmp_path / "keep.jpg")
    gone = _image(tmp_path / "gone.jpg", 1)
    _scandir_that(monkeypatch, lambda d: gone.unlink() if gone.exists() else None)
    walk = walk_folder(tmp_path)
    assert [f.relpath for f in walk.files] == ["keep.jpg"]
    assert [(s.relpath, s.reason) for s in walk.skipped] == [("gone.jpg", "vanished")]


def test_a_folder_deleted_during_the_walk_and_a_dangling_link_are_vanished(tmp_path, monkeypatch):
    _image(tmp_path / "keep.jpg")
    doomed = _image(tmp_path / "doomed" / "x.jpg")
    os.symlink(tmp_path / "nowhere.jpg", tmp_path / "dangling.jpg")

    def remove_doomed(directory: Path) -> None:
        if directory == tmp_path:
            doomed.unlink()
            doomed.parent.rmdir()

    _scandir_that(monkeypatch, remove_doomed)
    walk = walk_folder(tmp_path)
    assert [f.relpath for f in walk.files] == ["keep.jpg"]
    assert walk.skip_counts() == {"loop": 0, "vanished": 2, "unreadable": 0}
    assert [s.relpath for s in walk.skipped] == ["dangling.jpg", "doomed"]


def test_an_unreadable_folder_is_a_counted_skip_and_logged(tmp_path, monkeypatch, caplog):
    _image(tmp_path / "ok" / "a.jpg")
    _image(tmp_path / "locked" / "b.jpg")
    real = os.scandir

    def scandir(directory):
        if Path(directory).name == "locked":  # chmod 000 does not stop root, who runs CI
            raise PermissionError(13, "Permission denied", str(directory))
        return real(directory)

    monkeypatch.setattr(image_folder.os, "scandir", scandir)
    with caplog.at_level(logging.WARNING, logger="scoring.image_folder"):
        files = walk_images(tmp_path)
    assert [f.relpath for f in files] == ["ok/a.jpg"]
    assert "walk skipped 1 (1 unreadable): locked" in caplog.text


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any folder")
def test_a_folder_without_permission_is_an_unreadable_skip(tmp_path):
    _image(tmp_path / "ok" / "a.jpg")
    _image(tmp_path / "locked" / "b.jpg")
    (tmp_path / "locked").chmod(0)
    try:
        walk = walk_folder(tmp_path)
    finally:
        (tmp_path / "locked").chmod(0o755)
    assert [(s.relpath, s.reason) for s in walk.skipped] == [("locked", "unreadable")]


def test_scoring_a_folder_with_a_self_link_goes_on(tmp_path):
    registry = tmp_path / "registry"
    make_image_bundle(registry)
    for i in range(3):
        _image(tmp_path / "in" / f"{i}.jpg", i)
    os.symlink("loop.jpg", tmp_path / "in" / "loop.jpg")
    os.symlink(tmp_path / "in", tmp_path / "in" / "again")
    summary = score_image_folder(tmp_path / "in", registry / "tiny", tmp_path / "out",
                                 workers=0)
    assert (summary.files, summary.scored, summary.failed) == (3, 3, 0)
    assert summary.skipped_walk == 2
    assert "2 passed by in the walk" in summary.summary_line()
