"""A scoring process killed by any signal leaves no process behind: forkserver, decoding workers
and resource tracker all exit within seconds (PR_SET_PDEATHSIG, see export.loader_workers)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny_image_bundle import make_image_bundle

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="walks /proc; PDEATHSIG is Linux-only")
SCRIPT = Path(__file__).parents[1] / "support" / "score_until_killed.py"
ROOT = Path(__file__).parents[2]


def _children() -> dict[int, int]:
    """pid → parent pid of every process visible in /proc."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:  # gone meanwhile
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    return parents


def _descendants(pid: int) -> set[int]:
    parents, found, todo = _children(), set(), [pid]
    while todo:
        parent = todo.pop()
        kids = {p for p, pp in parents.items() if pp == parent}
        found |= kids
        todo += kids
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")  # a zombie has exited; only its reaper is late


@pytest.fixture(scope="module")
def folder_and_model(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("orphans")
    make_image_bundle(root / "registry")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(
            images / f"{i:03d}.jpg")
    return images, root / "registry" / "tiny"


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_scorer_leaves_no_process_behind(folder_and_model, tmp_path, sig):
    folder, model = folder_and_model
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests/support")])}
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(folder), str(model),
                             str(tmp_path / "out")], stdout=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    descendants: set[int] = set()
    try:
        assert proc.stdout.readline().strip() == "scoring", "the run never wrote a batch"
        deadline = time.monotonic() + 30
        while len(descendants) < 3 and time.monotonic() < deadline:  # server + 2 workers
            time.sleep(0.2)
            descendants = _descendants(proc.pid)
        assert len(descendants) >= 3, f"expected a forkserver and 2 workers, saw {descendants}"
        os.kill(proc.pid, sig)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while any(map(_alive, descendants)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [p for p in descendants if _alive(p)]
    finally:
        for pid in [proc.pid, *descendants]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        proc.stdout.close()
        proc.wait()
