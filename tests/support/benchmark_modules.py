"""A benchmark script (``benchmarks/NAME.py``) imported as a module, for tests of its pure parts."""

import importlib.util
import sys

from paths import REPO


def load_benchmark(name: str):
    """``benchmarks/<name>.py`` as a module (cached in ``sys.modules``)."""
    key = f"benchmark_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, REPO / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]
