"""A small real multi-label image set, built from the shared sample data (no download).

No real multi-label set could be found offline (see ``shared/data/README.md``), so this one is
assembled from two single-label sets whose labels nest: the PyTorch tutorial's ants and bees get
``insect ant`` / ``insect bee``, and the Oxford-IIIT Pet sample's three breeds get their species
and breed, ``cat abyssinian`` / ``cat bengal`` / ``dog american_bulldog`` (breed from the file
name, species from ``derived/head_bbox.csv``). Every image has two labels, and the label pairs
overlap (``insect`` and ``cat`` each cover two breeds), so a model must predict several
independent yes/no answers, not one class. Split: the ants/bees ``val/`` folder is validation;
the pets are split at random with a seed (20 %).
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

from training.errors import TrainingError

HYMENOPTERA = "hymenoptera_data"
PETS = "oxford-iiit-pet-sample"
_INSECTS = {"ants": "insect ant", "bees": "insect bee"}
_EXTENSIONS = {".jpg", ".jpeg", ".png"}


def _pet_species(shared: Path) -> dict[str, str]:
    """Image file name → species, from the head-box table (one row per head)."""
    table = shared / PETS / "derived" / "head_bbox.csv"
    if not table.is_file():
        raise TrainingError(f"{table} not found: not a shared data folder")
    with open(table, newline="") as f:
        return {Path(row["fname"]).name: row["species"] for row in csv.DictReader(f)}


def multilabel_rows(shared: Path | str, *, valid_pct: float = 0.2,
                    seed: int = 42) -> list[tuple[str, str, bool]]:
    """(fname relative to ``shared``, space-separated labels, is_valid) for every image."""
    shared = Path(shared)
    rows = []
    for split in ("train", "val"):
        for folder, labels in _INSECTS.items():
            for path in sorted((shared / HYMENOPTERA / split / folder).glob("*")):
                if path.suffix.lower() in _EXTENSIONS:
                    rows.append((str(path.relative_to(shared)), labels, split == "val"))
    species = _pet_species(shared)
    pets = sorted(p for p in (shared / PETS / "images").glob("*.jpg") if p.name in species)
    chosen = set(random.Random(seed).sample(range(len(pets)), round(valid_pct * len(pets))))
    for i, path in enumerate(pets):
        breed = path.stem.rsplit("_", 1)[0].lower()
        rows.append((str(path.relative_to(shared)), f"{species[path.name]} {breed}",
                     i in chosen))
    if not rows:
        raise TrainingError(f"{shared}: no ants/bees or pet images found")
    return rows


def write_multilabel_csv(shared: Path | str, out_csv: Path | str, **split) -> Path:
    """Write ``fname,labels,is_valid`` for the set; train with ``--images <shared>``."""
    out_csv = Path(out_csv)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    rows = [[fname, labels, "1" if is_valid else "0"]
            for fname, labels, is_valid in multilabel_rows(shared, **split)]
    return write_csv(out_csv, ["fname", "labels", "is_valid"], rows)


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    """A CSV of ``header`` and ``rows`` at ``path``, as the CSV image readers take it."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path
