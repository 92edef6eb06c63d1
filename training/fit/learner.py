"""A task-generic training loop: one-cycle or SGDR fits over layer-grouped models, CUDA or CPU.

Batches are ``(x, y)`` tuples, the loss and the metrics are passed in, so the same loop trains an
image classifier and a collaborative-filtering model. Recipe after fastai (Howard & Gugger,
https://arxiv.org/abs/2002.04688): ``fit_one_cycle`` with AdamW, discriminative LRs per layer
group, ``freeze``/``unfreeze`` of the body with BatchNorm kept trainable. Image tensors are
channels-last; on CUDA it trains under autocast, on CPU in fp32 (:mod:`training.fit.device`).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from training.errors import TrainingError
from training.fit.device import (
    amp_dtype,
    batch_size,
    move_to_device,
    resolve_device,
    seed_everything,
)
from training.fit.early_stopping import EarlyStopping, TimeBudget
from training.fit.schedule import (
    LrSpec,
    Sgdr,
    layer_group_lrs,
    layer_groups_of,
    lrs_per_group,
    make_optimizer,
    norm_param_ids,
    one_cycle,
    sgdr,
)

Metric = Callable[[torch.Tensor, torch.Tensor], float]
Progress = Callable[[dict], None]


class NonFiniteLossError(TrainingError):
    """The training loss became NaN or infinite."""


@dataclass(frozen=True)
class EpochRecord:
    """One finished epoch. ``epoch`` counts across stages; ``lrs`` are per layer group.

    cycle: the SGDR cycle (0, 1, ...) of its stage the epoch belongs to; None under one-cycle.
    """

    epoch: int
    stage: str
    lrs: tuple[float, ...]
    train_loss: float
    valid_loss: float
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    cycle: int | None = None

    def to_dict(self) -> dict:
        record = asdict(self)
        record["lrs"] = list(self.lrs)
        return record


class Learner:
    """Model + loaders + loss + metrics, and the loop that fits them.

    metrics: ``{name: fn(preds, targets) -> float}`` computed on the whole validation set.
    progress: called with an event dict per batch and per epoch (see README); no printing here.
    """

    def __init__(
        self,
        model: nn.Module,
        train_loader,
        valid_loader,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        metrics: dict[str, Metric] | None = None,
        *,
        device: str | torch.device = "auto",
        amp: bool = True,
        seed: int | None = None,
        wd: float = 0.01,
        progress: Progress | None = None,
    ) -> None:
        self.device = resolve_device(device)
        if seed is not None:
            seed_everything(seed)
        self.seed = seed
        self.amp_dtype = amp_dtype(self.device, amp)
        # Channels-last on CPU too: oneDNN's convolutions run faster on it, lite0's train step
        # 1.6x (benchmarks/memory_format.py). Models without 4-d weights are unaffected.
        self.channels_last = True
        self.model = model.to(self.device).to(memory_format=torch.channels_last)
        self.train_loader = train_loader
        self.valid_loader = valid_loader
        self.loss_fn = loss_fn
        self.metrics = dict(metrics or {})
        self.wd = wd
        self.progress = progress
        #: Normalise with the pretrained running statistics while training, instead of each
        #: batch's (which also moves the running statistics toward the new data).
        self.keep_bn_stats = False
        # bf16 has fp32's exponent range, so only fp16 needs loss scaling.
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=self.amp_dtype == torch.float16
        )
        self.history: list[EpochRecord] = []
        #: Every applied step of every fit: (stage, SGDR cycle or None, LR per layer group).
        self.lr_log: list[tuple[str, int | None, list[float]]] = []
        self.opt: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        self.skipped_steps = 0
        self.frozen_groups = 0
        self.train_bn = True
        self._substitute: nn.Module | None = None
        self._model_valid_loader = valid_loader

    # ---- freezing -------------------------------------------------------------------------

    @property
    def train_module(self) -> nn.Module:
        """The module being fitted: the model, or a stand-in such as a head on cached features."""
        return self._substitute if self._substitute is not None else self.model

    def freeze_to(self, n: int, train_bn: bool = True) -> None:
        """Freeze the first ``n`` layer groups (negative counts from the end).

        train_bn: keep normalisation-layer parameters of frozen groups trainable (fastai's
        default); False freezes them too and keeps frozen groups in eval mode while training.
        """
        groups = layer_groups_of(self.model)
        n = n % len(groups) if n < 0 else min(n, len(groups))
        norm_ids = norm_param_ids(self.model) if train_bn else set()
        for i, group in enumerate(groups):
            for param in group.parameters():
                param.requires_grad_(i >= n or id(param) in norm_ids)
        self.frozen_groups, self.train_bn = n, train_bn

    def freeze(self, train_bn: bool = True) -> None:
        """Freeze every layer group but the last (the head)."""
        self.freeze_to(-1, train_bn=train_bn)

    def unfreeze(self) -> None:
        self.freeze_to(0)

    def set_train_mode(self, training: bool) -> None:
        """Train/eval mode; frozen groups stay in eval mode when their BatchNorms are frozen,
        and every BatchNorm does with ``keep_bn_stats`` (its affine weights still train)."""
        self.train_module.train(training)
        if training and not self.train_bn:
            for group in layer_groups_of(self.model)[: self.frozen_groups]:
                group.eval()
        if training and self.keep_bn_stats:
            for module in self.train_module.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()

    @contextlib.contextmanager
    def substitute(self, module: nn.Module, train_loader, valid_loader) -> Iterator[Learner]:
        """Fit ``module`` on other loaders for a while; history and snapshots stay the model's."""
        saved = self._substitute, self.train_loader, self.valid_loader
        self._model_valid_loader = self.valid_loader
        self._substitute, self.train_loader, self.valid_loader = module, train_loader, valid_loader
        try:
            yield self
        finally:
            self._substitute, self.train_loader, self.valid_loader = saved

    # ---- one step -------------------------------------------------------------------------

    def to_device(self, batch):
        """Move a tensor (or nested tuple/list/dict of them) to the device, asynchronously."""
        return move_to_device(batch, self.device, self.channels_last)

    def autocast(self):
        """Mixed-precision context on CUDA, a no-op on CPU."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def train_step(self, x, y, optimizer: torch.optim.Optimizer) -> tuple[float, bool]:
        """Forward, backward and optimizer step on one batch: (loss, whether the step ran).

        A non-finite loss returns before backward; the caller decides what that means. The step
        is skipped when the GradScaler found inf/NaN gradients — it then lowers its scale.
        """
        with self.autocast():
            loss = self.loss_fn(self.train_module(x), y)
        value = float(loss.detach())
        if not math.isfinite(value):
            return value, False
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        scale_before = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        stepped = self.scaler.get_scale() >= scale_before
        return value, stepped

    # ---- fitting --------------------------------------------------------------------------

    def fit_one_cycle(
        self,
        epochs: int,
        lr_max: LrSpec,
        *,
        wd: float | None = None,
        pct_start: float = 0.25,
        div: float = 25.0,
        div_final: float = 1e5,
        moms: tuple[float, float, float] = (0.95, 0.85, 0.95),
        early_stopping: EarlyStopping | None = None,
        stage: str = "",
        budget: TimeBudget | None = None,
    ) -> list[EpochRecord]:
        """Train ``epochs`` epochs under the 1cycle policy; append to and return the history.

        lr_max: a float for every layer group, ``slice(lo, hi)`` spread geometrically from the
        first group to the head, or one value per group. budget: stop after the epoch past which
        another would overrun it.
        """
        if epochs < 1:
            raise TrainingError(f"epochs must be >= 1, got {epochs}")
        module = self.train_module
        lrs = lrs_per_group(lr_max, len(layer_groups_of(module)))
        self.opt = make_optimizer(module, lrs, self.wd if wd is None else wd, beta1=moms[0])
        total = epochs * len(self.train_loader)
        self.scheduler = one_cycle(
            self.opt, total, pct_start=pct_start, div=div, div_final=div_final, moms=moms
        )
        return self._fit(epochs, lrs, [None] * epochs, early_stopping, stage, budget)

    def fit_sgdr(
        self,
        epochs: int,
        lr_max: LrSpec,
        schedule: Sgdr = Sgdr(),
        *,
        wd: float | None = None,
        early_stopping: EarlyStopping | None = None,
        stage: str = "",
        budget: TimeBudget | None = None,
    ) -> list[EpochRecord]:
        """Train ``epochs`` epochs (a whole number of cycles) under SGDR; append to and return
        the history, each record naming its cycle.

        Early stopping keeps the best epoch's weights as ever, but judges patience only at the
        end of a cycle, where the LR has annealed: the loss jump after a restart is the
        schedule's doing, not a sign training has stalled. ``patience`` then counts cycles.
        """
        if epochs < 1:
            raise TrainingError(f"epochs must be >= 1, got {epochs}")
        cycles = schedule.cycle_of_epoch(epochs)
        module = self.train_module
        lrs = lrs_per_group(lr_max, len(layer_groups_of(module)))
        self.opt = make_optimizer(module, lrs, self.wd if wd is None else wd)
        self.scheduler = sgdr(self.opt, len(self.train_loader), schedule)
        return self._fit(epochs, lrs, cycles, early_stopping, stage, budget)

    def _fit(self, epochs: int, lrs: list[float], cycles: list[int | None],
             early_stopping: EarlyStopping | None, stage: str,
             budget: TimeBudget | None = None) -> list[EpochRecord]:
        """The epochs of one scheduled fit; ``cycles``: each epoch's SGDR cycle or None."""
        self.emit(event="fit_start", stage=stage, epochs=epochs,
                  batches=len(self.train_loader), lr_max=lrs)
        records = []
        try:
            for i, cycle in enumerate(cycles):
                if budget is not None:
                    budget.epoch_began()
                record = self._fit_epoch(len(self.history), stage, cycle)
                if budget is not None:
                    budget.epoch_ended()
                self.history.append(record)
                records.append(record)
                self.emit(event="epoch_end", **record.to_dict())
                # Under SGDR only a cycle's last epoch is judged (see fit_sgdr).
                judged = cycle is None or i + 1 == len(cycles) or cycles[i + 1] != cycle
                if early_stopping is not None and early_stopping.update(record, self.model,
                                                                        judge=judged):
                    self.emit(event="early_stop", epoch=record.epoch,
                              best_epoch=early_stopping.best_epoch)
                    break
                if budget is not None and i + 1 < len(cycles) and not budget.allows_another():
                    budget.stop(record.epoch)
                    self.emit(event="time_budget", epoch=record.epoch, **budget.to_dict(),
                              best_epoch=None if early_stopping is None
                              else early_stopping.best_epoch)
                    break
        except NonFiniteLossError as err:
            restored = early_stopping.restore_best(self.model) if early_stopping else None
            if restored is None:
                raise
            message = f"{err} (restored the best weights, epoch {restored})"
            raise NonFiniteLossError(message) from err
        if early_stopping is not None:
            early_stopping.restore_best(self.model)
        return records

    def _fit_epoch(self, epoch: int, stage: str, cycle: int | None = None) -> EpochRecord:
        start = time.perf_counter()
        train_loss, lrs = self._train_epoch(epoch, stage, cycle)
        valid_loss, metrics = self.validate()
        return EpochRecord(
            epoch=epoch,
            stage=stage,
            lrs=tuple(lrs),
            train_loss=train_loss,
            valid_loss=valid_loss,
            metrics=metrics,
            seconds=time.perf_counter() - start,
            cycle=cycle,
        )

    def _train_epoch(self, epoch: int, stage: str,
                     cycle: int | None = None) -> tuple[float, list[float]]:
        self.set_train_mode(True)
        total, count, lrs = 0.0, 0, layer_group_lrs(self.opt)
        n_batches = len(self.train_loader)
        for i, (x, y) in enumerate(self.train_loader):
            lrs = layer_group_lrs(self.opt)
            beta1 = float(self.opt.param_groups[-1]["betas"][0])
            x, y = self.to_device(x), self.to_device(y)
            loss, stepped = self.train_step(x, y, self.opt)
            if not math.isfinite(loss):
                raise NonFiniteLossError(
                    f"training loss became {loss} at epoch {epoch}, batch {i}; lower the "
                    f"learning rate (now {max(lrs):.3g}) or check the data for NaN/inf values"
                )
            # Only an applied step advances the schedule: a step the GradScaler skipped for
            # inf gradients must not eat into the warm-up or anneal.
            if stepped:
                self.lr_log.append((stage, cycle, lrs))
                self.scheduler.step()
            else:
                self.skipped_steps += 1
            bs = batch_size(y)
            total, count = total + loss * bs, count + bs
            self.emit(event="batch", stage=stage, epoch=epoch, batch=i, batches=n_batches,
                       loss=loss, lrs=lrs, beta1=beta1, skipped=not stepped)
        return total / max(count, 1), lrs

    # ---- evaluation -----------------------------------------------------------------------

    @torch.no_grad()
    def _outputs(self, loader, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Predictions and targets on the CPU (float32) and the size-weighted mean loss."""
        module.eval()
        preds, targets, total, count = [], [], 0.0, 0
        for x, y in loader:
            x, y = self.to_device(x), self.to_device(y)
            with self.autocast():
                out = module(x)
                loss = self.loss_fn(out, y)
            bs = batch_size(y)
            total, count = total + float(loss) * bs, count + bs
            preds.append(out.float().cpu())
            targets.append(y.cpu())
        if not preds:
            return torch.empty(0), torch.empty(0), float("nan")
        return torch.cat(preds), torch.cat(targets), total / count

    def validate(self) -> tuple[float, dict[str, float]]:
        """Validation loss and metrics of the module being fitted."""
        if self.valid_loader is None:
            return float("nan"), {}
        preds, targets, loss = self._outputs(self.valid_loader, self.train_module)
        return loss, self._metrics_of(preds, targets)

    def _metrics_of(self, preds: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        if preds.numel() == 0:
            return {}
        return {name: float(fn(preds, targets)) for name, fn in self.metrics.items()}

    def record_start(self, stage: str, train_loss: float | None = None,
                     valid_outputs: tuple[torch.Tensor, torch.Tensor] | None = None
                     ) -> EpochRecord:
        """Validate the model as it starts, before any training step, as an epoch of ``stage``
        in the history (``train_loss``: what the start's own fit measured, else NaN).
        ``valid_outputs``: the model's validation outputs and targets when the caller has them
        already (a head applied to cached validation features), instead of a validation pass."""
        start = time.perf_counter()
        if valid_outputs is None:
            valid_loss, metrics = self.validate()
        else:
            preds, targets = valid_outputs
            with torch.no_grad():
                valid_loss = float(self.loss_fn(preds, targets)) if len(targets) \
                    else float("nan")
            metrics = self._metrics_of(preds, targets)
        record = EpochRecord(epoch=len(self.history), stage=stage, lrs=(),
                             train_loss=float("nan") if train_loss is None else train_loss,
                             valid_loss=valid_loss, metrics=metrics,
                             seconds=time.perf_counter() - start)
        self.history.append(record)
        self.emit(event="epoch_end", **record.to_dict())
        return record

    def predict(self, loader=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's outputs (float32, CPU) and targets over ``loader`` (default: valid)."""
        if loader is None:
            # While a stand-in is being fitted valid_loader feeds the stand-in, not the model.
            loader = self._model_valid_loader if self._substitute is not None \
                else self.valid_loader
        preds, targets, _ = self._outputs(loader, self.model)
        return preds, targets

    def emit(self, **event) -> None:
        if self.progress is not None:
            self.progress(event)
