"""Start-up cost: ``lensflow --help``, a refused option and a wrong input path answer without
loading torch, and scoring decodes images without loading torchvision.

Each is seconds per process (torch 1.5-4 s, torchvision as much again, since it imports
``torch._dynamo``), paid by every CLI call, flow run, Dask worker and decoding process.
"""

from __future__ import annotations

import json
import subprocess
import sys

from PIL import Image

HEAVY = ("torch", "torchvision")


def _run(code: str, cwd=None) -> dict:
    """Run ``code`` in a fresh interpreter; it prints a JSON object as its last line."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=cwd)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_help_a_refused_option_and_a_wrong_path_load_no_torch(tmp_path):
    (tmp_path / "photos").mkdir()
    seen = _run(f"""
import contextlib, io, json, sys
from flows.cli import main
answers = []
for argv in (["--help"], ["train", "images", "--help"], ["score", "images", "--help"],
             ["train", "images", "photos", "--epochs", "-1"],
             ["train", "images", "no/such/folder"], ["train", "images", "photos"],
             ["verify", "no/such/bundle"],
             ["score", "images", "photos", "--model", "no/such/reg/m", "--out", "out"]):
    sys.argv = ["lensflow", *argv]
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            main()
        except SystemExit as stop:
            answers.append([stop.code, out.getvalue() + err.getvalue()])
print(json.dumps({{"answers": answers, "loaded": [m for m in {HEAVY!r} if m in sys.modules]}}))
""", cwd=tmp_path)
    assert seen["loaded"] == []
    (help_code, help_text), (_, train_help), (_, score_help), (bad_code, bad_text), *wrong = \
        seen["answers"]
    assert help_code == 0 and "train" in help_text and "score" in help_text
    assert "--head-init" in train_help and "--lr-rule" in train_help
    assert "--run-date" in score_help
    assert bad_code == 2 and "--epochs" in bad_text and "Traceback" not in bad_text
    for (code, text), needle in zip(wrong, ["no/such/folder", "photos", "no/such/bundle",
                                                  "no/such/reg/m"],
                                    strict=True):
        assert code == 2 and text.startswith("error: ") and needle in text, text
        assert len(text.strip().splitlines()) == 1, text


def test_scoring_decodes_without_torchvision(tmp_path):
    photo = tmp_path / "a.jpg"
    Image.new("RGB", (640, 480), (200, 30, 30)).save(photo)
    seen = _run(f"""
import json, sys
import scoring.image_scoring, scoring.shards
from export.pixels import Preprocessing, decode_for_model
pixels = decode_for_model({str(photo)!r}, Preprocessing(input_size=64, resize_size=72))
print(json.dumps({{"shape": list(pixels.shape), "red": int(pixels[..., 0].mean()),
                  "loaded": [m for m in {HEAVY!r} if m in sys.modules]}}))
""")
    assert seen["shape"] == [64, 64, 3] and seen["red"] > 190
    assert "torchvision" not in seen["loaded"]
