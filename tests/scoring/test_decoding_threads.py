"""How scoring decodes: threads of the scoring process on small folders and small hosts,
processes elsewhere; and decoding processes that never re-run the starter's main script."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import scoring.image_batches as image_batches
from export.pixels import Preprocessing, open_rgb
from scoring.image_batches import decoded_batches, default_workers
from scoring.image_folder import walk_images

ROOT = Path(__file__).parents[2]
PRE = Preprocessing(input_size=16, resize_size=18)


def _folder(tmp_path: Path, n: int) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        pixels = rng.integers(0, 256, (24 + i, 30, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:03d}.jpg")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    return folder


def test_workers_0_decodes_in_threads_ahead_of_the_consumer_in_file_order(tmp_path, monkeypatch):
    files = list(walk_images(_folder(tmp_path, 9)))
    seen: list[str] = []
    real = image_batches.decode_for_model

    def recording(path, spec):
        seen.append(threading.current_thread().name)
        return real(path, spec)

    monkeypatch.setattr(image_batches, "decode_for_model", recording)
    batches = list(decoded_batches(files, PRE, batch_size=4, workers=0, threads=2))

    assert seen and all(name.startswith("lensflow-decode") for name in seen)
    indices = np.concatenate([b.indices for b in batches]).tolist()
    failed = [i for b in batches for i, _ in b.failed]
    assert sorted(indices + failed) == list(range(len(files)))
    assert indices == sorted(indices)
    assert [files[i].relpath for i in failed] == ["broken.jpg"]
    expected = real(files[indices[-1]].path, PRE)
    np.testing.assert_array_equal(batches[-1].images[-1].numpy(), expected)


def test_a_decoding_thread_failure_reaches_the_consumer(tmp_path, monkeypatch):
    # A decoder error is its row's (above); anything else stops the run where it happened.
    files = list(walk_images(_folder(tmp_path, 3)))
    monkeypatch.setattr(image_batches, "DecodedImages", _OutOfMemory)
    batches = decoded_batches(files, PRE, batch_size=2, workers=0)
    with pytest.raises(MemoryError, match="image 2"):
        list(batches)


class _OutOfMemory(image_batches.DecodedImages):
    def __getitem__(self, i):
        if i == 2:
            raise MemoryError(f"image {i}")
        return super().__getitem__(i)


@pytest.mark.parametrize(("cores", "files", "processes"), [
    (2, 10_000, 0),   # a small host decodes in threads, whatever the folder
    (4, 10_000, 0),
    (16, 10_000, 8),  # a big one in processes, at most MAX_DECODE_WORKERS
    (6, 10_000, 5),
    (16, 10, 0),      # a tiny folder never pays for a process start
])
def test_default_decoding_by_host_and_folder(monkeypatch, cores, files, processes):
    monkeypatch.setattr(image_batches, "available_cores", lambda: cores)
    assert default_workers(files) == processes


def test_decoding_processes_do_not_rerun_the_starters_main_script(tmp_path):
    # multiprocessing asks every forkserver child to import the main script again; the lensflow
    # command's cost 0.7 s per worker, a Prefect flow run's 1.5 s, before its first image.
    marker = tmp_path / "imports.txt"
    folder = _folder(tmp_path, 4)
    script = tmp_path / "starter.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(ROOT)!r})
        with open({str(marker)!r}, "a") as f:
            f.write(f"{{__name__}} {{os.getpid()}}\\n")
        from export.pixels import Preprocessing
        from scoring.image_batches import decoded_batches
        from scoring.image_folder import walk_images

        if __name__ == "__main__":
            files = list(walk_images({str(folder)!r}))
            pre = Preprocessing(input_size=16, resize_size=18)
            batches = list(decoded_batches(files, pre, batch_size=2, workers=2))
            print(sum(len(b.indices) for b in batches))
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "4"
    assert marker.read_text().split()[0::2] == ["__main__"]  # no "__mp_main__" from a worker


def test_concurrent_decoding_threads_refuse_every_oversized_image(tmp_path, monkeypatch):
    # Pillow only warns above MAX_IMAGE_PIXELS; turning that warning into an error with
    # warnings.catch_warnings races between threads (each restores the filters it saw on entry),
    # and CI once scored an oversized image. Barriers make the threads enter and leave every
    # open together (half of them opening an oversized image), the interleaving a loaded CI
    # machine produced by chance, on every round and on any machine.
    threads, rounds = 8, 50
    entered = threading.Barrier(threads, timeout=60)
    leaving = threading.Barrier(threads, timeout=60)
    pillow_open = Image.open

    def open_together(*args, **kwargs):
        entered.wait()
        try:
            return pillow_open(*args, **kwargs)
        finally:
            leaving.wait()

    monkeypatch.setattr(Image, "open", open_together)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2100)
    Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(tmp_path / "small.png")  # 900 px
    Image.fromarray(np.zeros((50, 50, 3), np.uint8)).save(tmp_path / "big.png")  # 2500 px
    outcomes: dict[int, str] = {}

    def decode(first: int) -> None:
        for i in range(first, threads * rounds, threads):  # odd threads open the big image
            try:
                open_rgb(tmp_path / ("big.png" if i % 2 else "small.png"))
                outcomes[i] = "decoded"
            except Image.DecompressionBombWarning:
                outcomes[i] = "refused"

    workers = [threading.Thread(target=decode, args=(t,)) for t in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert not entered.broken and not leaving.broken
    assert [outcomes.get(i) for i in range(threads * rounds)] == \
        ["refused" if i % 2 else "decoded" for i in range(threads * rounds)]
