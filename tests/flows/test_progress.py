"""Live progress of `lensflow train`: bars for LR sweeps and epochs on a terminal, lines always."""

import io

import torch
from rich.console import Console
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from flows.cli_output import TrainingProgress
from training.fit.learner import Learner
from training.fit.lr_finder import lr_find


def _learner(progress) -> Learner:
    torch.manual_seed(0)
    x, y = torch.randn(64, 4), torch.randint(0, 2, (64,))
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    return Learner(nn.Linear(4, 2), loader, loader, nn.CrossEntropyLoss(), {}, device="cpu",
                   progress=progress)


class Recorded(TrainingProgress):
    """Keeps what each bar was asked to show."""

    def __init__(self, live):
        super().__init__(live=live, to=Console(file=io.StringIO(), force_terminal=live,
                                               width=100, highlight=False, color_system=None))
        self.bars: list[tuple[str, int, int]] = []

    def _start(self, description, total):
        super()._start(description, total)
        self.bars.append([description, total, 0])

    def _update(self, completed):
        super()._update(completed)
        if self.bars:
            self.bars[-1][2] = completed


def test_a_terminal_sees_a_bar_per_sweep_and_per_epoch_and_the_epoch_lines():
    progress = Recorded(live=True)
    learner = _learner(progress)
    with progress:
        lr_find(learner, num_it=20)
        learner.fit_one_cycle(2, 1e-2, stage="frozen")
    assert [b[0] for b in progress.bars] == ["LR finder (20 steps)", "frozen epoch 0",
                                             "frozen epoch 1"]
    assert progress.bars[1][1:] == [8, 8] and progress.bars[2][1:] == [8, 8]  # every batch
    assert 1 <= progress.bars[0][2] <= 20
    assert progress.bar is None  # nothing left running after the run
    text = progress.console.file.getvalue()
    assert "frozen epoch 0: train_loss=" in text and "frozen epoch 1: train_loss=" in text


def test_not_a_terminal_gets_the_lines_and_no_bars():
    progress = TrainingProgress(live=False, to=Console(file=io.StringIO(), width=100))
    learner = _learner(progress)
    with progress:
        learner.fit_one_cycle(1, 1e-2, stage="unfrozen")
    assert progress.bar is None
    text = progress.console.file.getvalue()
    assert text.count("unfrozen epoch 0: train_loss=") == 1 and "━" not in text


def test_a_failed_run_leaves_no_live_bar():
    progress = Recorded(live=True)
    try:
        with progress:
            progress({"event": "batch", "stage": "frozen", "epoch": 0, "batch": 0, "batches": 9})
            assert progress.bar is not None
            raise RuntimeError("training died")
    except RuntimeError:
        pass
    assert progress.bar is None


class _BodyAndHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Linear(4, 3), nn.Linear(3, 2)

    def forward(self, x):
        return self.head(self.body(x))


def test_the_body_pass_a_head_start_reads_has_a_bar_and_the_start_a_line():
    from training.fit.precompute import compute_features

    progress = Recorded(live=True)
    torch.manual_seed(0)
    loader = DataLoader(TensorDataset(torch.randn(40, 4), torch.randint(0, 2, (40,))),
                        batch_size=8, shuffle=True)
    learner = Learner(_BodyAndHead(), loader, loader, nn.CrossEntropyLoss(), {}, device="cpu",
                      progress=progress)
    with progress:
        features, _ = compute_features(learner, loader)
        progress({"event": "head_init", "why": "started from the pretrained 5-class classifier"})
    assert features.shape == (40, 3)
    assert progress.bars == [["body features (5 batches)", 5, 5]]
    assert progress.bar is None
    text = progress.console.file.getvalue()
    assert "head: started from the pretrained 5-class classifier" in text


def test_the_flow_progress_counts_trained_epochs_not_the_validated_start():
    import logging

    from flows.artifacts import TrainingProgress as FlowProgress

    class Unsent(FlowProgress):
        def _send(self, *, force: bool) -> None:  # no Prefect API in this test
            pass

    progress = Unsent(key="k", description="d", total_epochs=2, log=logging.getLogger("t"))
    epoch = {"event": "epoch_end", "train_loss": 0.1, "valid_loss": 0.2, "metrics": {}}
    progress(epoch | {"stage": "start", "epoch": 0, "lrs": []})
    assert progress.percent == 0
    progress(epoch | {"stage": "unfrozen", "epoch": 1, "lrs": [1e-5, 1e-4, 1e-3]})
    assert progress.percent == 50
