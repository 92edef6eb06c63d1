"""Where and in what precision a fit runs: the device, mixed precision, seeding, moving batches.

On CUDA the loop trains under autocast — bf16 where supported, else fp16 with a GradScaler
(Micikevicius et al., https://arxiv.org/abs/1710.03740); on CPU the same code runs in fp32. Image
batches are channels-last on both.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from training.errors import TrainingError


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` is CUDA when available, else CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"device={device!r} asked for CUDA but no GPU is available")
    return resolved


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) so shuffles, dropout and init repeat."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def amp_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
    """The autocast dtype on CUDA (bf16 where supported, else fp16); None for fp32."""
    if not amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def move_to_device(batch, device: torch.device, channels_last: bool):
    """A tensor (or nested tuple/list/dict of them) on ``device``, copied asynchronously;
    channels_last: image batches (4-d float) in that memory format."""
    if isinstance(batch, torch.Tensor):
        batch = batch.to(device, non_blocking=True)
        if channels_last and batch.dim() == 4 and batch.is_floating_point():
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(b, device, channels_last) for b in batch)
    if isinstance(batch, dict):
        return {k: move_to_device(v, device, channels_last) for k, v in batch.items()}
    return batch


def batch_size(y) -> int:
    """Samples in a batch's targets (a tensor, or nested sequences of them)."""
    if isinstance(y, torch.Tensor) and y.dim() > 0:
        return int(y.shape[0])
    if isinstance(y, (list, tuple)) and y:
        return batch_size(y[0])
    return 1
