"""The layer contracts of pyproject.toml hold for the tree and catch a new violation."""

import shutil
import subprocess
import sys
from pathlib import Path

from paths import REPO

LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def _lint(root: Path) -> subprocess.CompletedProcess:
    """lint-imports with the repository's contracts (pyproject.toml) over the tree at ``root``."""
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", "pyproject.toml"], cwd=root,
                          capture_output=True, text=True, env={"PYTHONPATH": str(root)})


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name in ("flows", "training", "scoring", "export"):
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / "__init__.py").write_text("")
    for name, text in files.items():
        (root / name).write_text(text)
    return root


def test_the_tree_keeps_its_layers(tmp_path):
    for name in ("flows", "training", "scoring", "export"):
        shutil.copytree(REPO / name, tmp_path / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    result = _lint(tmp_path)
    assert result.returncode == 0, result.stdout[-2000:]


def test_training_importing_scoring_breaks_the_build(tmp_path):
    root = _tree(tmp_path, {"scoring/run.py": "X = 1\n",
                            "training/fit.py": "from scoring.run import X\n"})
    result = _lint(root)
    assert result.returncode != 0
    assert "training.fit -> scoring.run" in result.stdout


def test_export_importing_prefect_breaks_the_build(tmp_path):
    root = _tree(tmp_path, {"export/bundle.py": "import prefect\n"})
    result = _lint(root)
    assert result.returncode != 0
    assert "export.bundle -> prefect" in result.stdout
