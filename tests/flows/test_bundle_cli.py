"""``lensflow export / verify / promote / keygen`` on pinned bundles: refusals are one line."""

from __future__ import annotations

import json
import shutil
import stat

import pytest
import torch
from bundle_tampering import edited_manifest, reseal
from cli_runs import assert_one_line, lensflow
from tiny_export_models import TinyCNN, image_manifest, trained_like

from export.convert import export_bundle
from export.signing import REQUIRE_SIGNED_ENV, SIGNING_KEY_ENV, VERIFY_KEY_ENV


@pytest.fixture(autouse=True)
def _no_keys(monkeypatch):
    for name in (SIGNING_KEY_ENV, VERIFY_KEY_ENV, REQUIRE_SIGNED_ENV):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    return export_bundle(trained_like(TinyCNN(n_out=4)), image_manifest(),
                         tmp_path_factory.mktemp("reg"), "pets", pt2=False)


@pytest.fixture
def registry(exported, tmp_path):
    """A private copy of the exported model folder (bundle and digest record)."""
    copy = tmp_path / "reg" / "pets"
    shutil.copytree(exported.bundle_path.parent, copy)
    return copy


def swap_classes(bundle) -> None:
    manifest_path = bundle / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["classes"] = list(reversed(manifest["classes"]))
    manifest_path.chmod(stat.S_IRUSR | stat.S_IWUSR)
    manifest_path.write_text(json.dumps(manifest, indent=2))


def test_verify_checks_onnx_only_unless_torchscript_is_asked(monkeypatch, capsys, registry,
                                                             exported):
    loads = []
    real_load = torch.jit.load
    monkeypatch.setattr(torch.jit, "load", lambda *a, **kw: loads.append(a) or real_load(*a, **kw))
    code, out, _ = lensflow(monkeypatch, capsys, "verify", registry / exported.version)
    assert code == 0 and loads == []
    assert f"hashes ok, parity passed (onnx); sha256 {exported.sha256}; signature unsigned" in out
    code, out, _ = lensflow(monkeypatch, capsys, "verify", registry / exported.version,
                            "--torchscript")
    assert code == 0 and len(loads) == 1 and "(onnx, torchscript)" in out


def test_a_copy_with_swapped_classes_is_refused_by_verify_and_promote(monkeypatch, capsys,
                                                                      registry, exported):
    bundle = registry / exported.version
    code, out, _ = lensflow(monkeypatch, capsys, "promote", bundle)
    assert code == 0 and "promoted" in out
    swap_classes(bundle)
    for command in (["verify", registry], ["verify", bundle], ["promote", bundle]):
        code, _, err = lensflow(monkeypatch, capsys, *command)
        assert code == 2
        assert_one_line(err, str(bundle))
    code, _, err = lensflow(monkeypatch, capsys, "verify", registry)
    assert_one_line(err, "current pins sha256", "changed after promotion")


def test_verify_names_a_manifest_input_size_other_than_the_graphs(monkeypatch, capsys,
                                                                  registry, exported):
    bundle = registry / exported.version
    with edited_manifest(bundle) as manifest:
        manifest["preprocessing"]["input_size"] = 64
    reseal(bundle)
    code, _, err = lensflow(monkeypatch, capsys, "verify", bundle)
    assert code == 2
    assert_one_line(err, f"bundle {bundle}", "preprocessing.input_size 64",
                    "model.onnx's input shape ['N', 32, 32, 3]")


def test_export_to_a_registry_that_is_a_file_is_one_line(monkeypatch, capsys, tmp_path):
    registry = tmp_path / "registry"
    registry.write_text("a file")
    code, _, err = lensflow(monkeypatch, capsys, "export", tmp_path / "train", "--registry",
                            registry, "--name", "x")
    assert code == 2
    assert_one_line(err, f"registry {registry}: exists and is not a directory")


def test_keygen_then_export_signs_and_verify_requires_it(monkeypatch, capsys, tmp_path):
    import training.recipes.publish as publish

    code, out, _ = lensflow(monkeypatch, capsys, "keygen", tmp_path / "keys")
    assert code == 0 and VERIFY_KEY_ENV in out
    private, public = tmp_path / "keys" / "lensflow-signing.pem", tmp_path / "keys" / \
        "lensflow-verify.pem"
    code, _, err = lensflow(monkeypatch, capsys, "keygen", tmp_path / "keys")
    assert code == 2
    assert_one_line(err, "already exists")

    def fake_export(train_out, registry, name, options=None):  # a tiny model, no training
        return export_bundle(trained_like(TinyCNN(n_out=4)), image_manifest(), registry, name,
                             pt2=False)

    monkeypatch.setattr(publish, "export_training_output", fake_export)
    monkeypatch.setenv(SIGNING_KEY_ENV, "")  # --sign-key sets it; restored after the test
    code, _, err = lensflow(monkeypatch, capsys, "export", tmp_path / "train", "--registry",
                            tmp_path / "reg", "--name", "pets", "--sign-key", public)
    assert code == 2
    assert_one_line(err, f"signing key {public}: not an unencrypted PEM private key")
    assert not (tmp_path / "reg").exists(), "a bad key fails before the export starts"

    code, out, _ = lensflow(monkeypatch, capsys, "export", tmp_path / "train", "--registry",
                            tmp_path / "reg", "--name", "pets", "--sign-key", private)
    assert code == 0
    bundle = out.split("bundle: ")[1].splitlines()[0]
    monkeypatch.setenv(VERIFY_KEY_ENV, str(public))
    monkeypatch.setenv(REQUIRE_SIGNED_ENV, "1")
    code, out, _ = lensflow(monkeypatch, capsys, "verify", bundle)
    assert code == 0 and "signature verified" in out
