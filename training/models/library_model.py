"""A torchvision or timm architecture with its own classifier, and a state dict trained elsewhere.

For a checkpoint a team trained in its own loop: ``read_state_dict`` reads a safetensors file or a
``torch.save`` state dict (``weights_only=True``: no pickle of Python objects, ever), unwrapping
the usual training-checkpoint layouts and the ``module.`` / ``_orig_mod.`` prefixes that
DataParallel and ``torch.compile`` add. ``library_model`` builds the architecture by name as its
library does (``torchvision.models.get_model(num_classes=n)``, ``timm.create_model(num_classes=n)``)
with the input recipe of its pretrained weights, and ``load_checkpoint`` fills it strictly. Every
way a checkpoint can fail to fit is one line: the keys that do not fit, a classifier whose outputs
differ from the class names, a file that is not a state dict.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch
from torch import nn

from export.pixels import Preprocessing
from training.errors import TrainingError
from training.models.backbones import (
    _timm_preprocessing,
    _torchvision_kwargs,
    _torchvision_preprocessing,
    check_weights_fit,
    resolve_arch,
)

#: Dicts a training checkpoint keeps its weights under, beside the optimizer and the epoch.
_CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model", "net")
#: Prefixes wrappers add to every key: DataParallel/DDP, torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file or a ``torch.save`` state dict, keys as the bare model
    names them; a TrainingError naming the file for anything else."""
    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"checkpoint {path}: no such file")
    if _is_safetensors(path):
        from safetensors.torch import load_file

        try:
            return _bare_keys(load_file(path, device="cpu"))
        except Exception as e:  # safetensors raises its own error type for a bad header
            raise TrainingError(f"checkpoint {path}: not a readable safetensors file "
                                f"({_first_line(e)})") from None
    if not _is_torch_save(path):
        raise TrainingError(f"checkpoint {path}: not a safetensors or torch.save file")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        what = f" ({found.group(1)})" if found else ""
        raise TrainingError(
            f"checkpoint {path}: not a state dict — it pickles Python objects{what}, which "
            "lensflow does not unpickle (weights_only=True); save model.state_dict() or a "
            "safetensors file") from None
    except Exception as e:  # truncated, corrupt: torch raises several types
        raise TrainingError(f"checkpoint {path}: not a readable torch.save file "
                            f"({_first_line(e)})") from None
    for key in _CHECKPOINT_KEYS:
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
            break
    if not isinstance(loaded, dict) or not loaded:
        raise TrainingError(f"checkpoint {path}: holds a {type(loaded).__name__}, not a state "
                            "dict of tensors")
    odd = [k for k, v in loaded.items() if not isinstance(v, torch.Tensor)]
    if odd:
        raise TrainingError(f"checkpoint {path}: not a state dict of tensors ({odd[0]!r} is a "
                            f"{type(loaded[odd[0]]).__name__})")
    return _bare_keys(loaded)


def _is_safetensors(path: Path) -> bool:
    """safetensors files start with an 8-byte header length, then the JSON header."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _is_torch_save(path: Path) -> bool:
    """A zip archive (torch.save since 1.6) or a legacy pickle (protocol byte 0x80)."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _bare_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in _WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def library_model(arch: str, n_out: int, *, device: str | torch.device | None = None
                  ) -> tuple[nn.Module, Preprocessing]:
    """``arch`` as its library builds it, with a classifier of ``n_out`` outputs (random
    weights), and the input recipe of the library's pretrained weights for it."""
    library, name = resolve_arch(arch)
    with torch.device(device or "cpu"):
        if library == "torchvision":
            import torchvision

            default = torchvision.models.get_model_weights(name).DEFAULT
            model = torchvision.models.get_model(name, weights=None, num_classes=n_out,
                                                 **_torchvision_kwargs(name, default))
        else:
            import timm

            model = timm.create_model(name, pretrained=False, num_classes=n_out)
    if device is not None and torch.device(device).type == "meta":
        return model, Preprocessing()
    prep = _torchvision_preprocessing(name) if library == "torchvision" \
        else _timm_preprocessing(model)
    return model.eval(), prep


def classifier_keys(arch: str) -> list[str]:
    """State-dict keys whose first dimension is the number of outputs (weight and bias of the
    classifier, and of an auxiliary one), found by building the model twice on the meta device."""
    try:
        small, _ = library_model(arch, 3, device="meta")
        large, _ = library_model(arch, 4, device="meta")
    except Exception:  # an arch that cannot build on meta: the key check still catches misfits
        return []
    other = large.state_dict()
    return [k for k, v in small.state_dict().items() if k in other and v.shape != other[k].shape]


def checkpoint_outputs(state: dict[str, torch.Tensor], keys: list[str]) -> tuple[str, int] | None:
    """``(key, outputs)`` of the checkpoint's classifier, or None when it has none of ``keys``."""
    for key in keys:
        if key in state and state[key].dim() >= 1:
            return key, int(state[key].shape[0])
    return None


def load_checkpoint(arch: str, n_out: int, state: dict[str, torch.Tensor],
                    origin: str) -> tuple[nn.Module, Preprocessing]:
    """``library_model(arch, n_out)`` with ``state`` loaded strictly, in eval mode."""
    model, prep = library_model(arch, n_out)
    try:
        check_weights_fit(model.state_dict(), state, f"{origin} and --arch {arch}")
    except TrainingError as err:
        other = _other_library_fits(arch, n_out, state)
        hint = f"; it fits --arch {other}" if other else ""
        raise TrainingError(f"{err}{hint}") from None
    model.load_state_dict(state, strict=True)
    return model.eval(), prep


def _other_library_fits(arch: str, n_out: int, state: dict[str, torch.Tensor]) -> str | None:
    """The same name in the other library, when its keys are the checkpoint's."""
    library, name = resolve_arch(arch)
    other = f"{'timm' if library == 'torchvision' else 'torchvision'}/{name}"
    try:
        model, _ = library_model(other, n_out, device="meta")
    except Exception:  # not a model name there, or not buildable on meta
        return None
    return other if set(model.state_dict()) == set(state) else None

