"""A scoring run that stops after its first batch and waits to be killed (orphan tests).

Usage: ``python score_until_killed.py FOLDER MODEL OUT``. Prints ``scoring`` once the first
batch is written, while its decoding workers hold the next batches, then sleeps.
"""

from __future__ import annotations

import sys
import time

from scoring.image_scoring import score_image_folder


def _hang_after_first_batch(event: dict) -> None:
    if event["event"] == "advance":
        print("scoring", flush=True)
        time.sleep(600)


if __name__ == "__main__":
    folder, model, out = sys.argv[1:4]
    score_image_folder(folder, model, out, workers=2, batch_size=1,
                       progress=_hang_after_first_batch)
