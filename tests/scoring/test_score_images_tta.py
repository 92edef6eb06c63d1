"""benchmarks/score_images.py's TTA figures: a TTA twin's images/s against its plain bundle's."""

import pytest
from benchmark_modules import load_benchmark

bench = load_benchmark("score_images")


def config(e2e: float, model: float) -> dict:
    return {"images": 100, "e2e_images_per_s": e2e, "model_only_images_per_s": model}


def test_tta_ratios_pair_each_twin_with_its_plain_configuration():
    configurations = {
        "0.2MP/onnx/pil": config(60.0, 120.0), "0.2MP/onnx+tta/pil": config(45.0, 60.0),
        "12MP/onnx/pil": config(10.0, 100.0), "12MP/onnx+tta/pil": config(9.0, 40.0),
        "0.2MP/torchscript/pil": config(50.0, 80.0)}
    assert bench.tta_ratios(configurations) == {
        "0.2MP/onnx/pil": pytest.approx({"e2e": 0.75, "model_only": 0.5}),
        "12MP/onnx/pil": pytest.approx({"e2e": 0.9, "model_only": 0.4})}
    assert bench.tta_ratios({"0.2MP/onnx/pil": config(1.0, 1.0)}) == {}
