"""End to end with real parts: ``prefect server``, ``prefect deploy --all``, a process worker.

What a user does after reading the README: start a server, create the ``lensflow-process`` pool,
deploy ``prefect.yaml``, start a worker, ``prefect deployment run ... --watch``. Each server
and worker runs in its own process group so one signal stops it and everything it spawned; the
module fixture stops both (SIGTERM, then SIGKILL after a timeout) however the tests end.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import NamedTuple
from zoneinfo import ZoneInfo

import pytest
from flow_test_data import artifacts_by_key, make_images, partition_rows_and_run_ids
from paths import REPO
from PIL import Image
from plain_torch_model import (
    ARCH,
    CLASSES,
    assert_scored_like_eager,
    make_tinted_images,
    train_plain_model,
)
from tiny_image_bundle import make_image_bundle

from export.bundle import current_version
from flows.demo_data import make_planted_ratings, make_shapes_dataset
from training.recipes.collab import train_recommender
from training.recipes.options import RecommenderOptions
from training.recipes.publish import publish

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PREFECT = Path(sys.executable).parent / "prefect"
TIMEZONE = "Asia/Tokyo"  # far from UTC, so a wrong timezone shows up as a wrong run date
RUN_TIMEOUT_S = 240
# resnet18 from scratch at 32 px, 1 + 1 epochs; a fixed lr skips the LR finder, whose 100 steps
# cost minutes on a shared 2-core runner (the in-process flow tests cover its plot). Each option
# goes as its own flat ``--param``, as a user types it; epochs and patience are not defaults.
TRAINING_PARAMS = {"name": "shapes-e2e", "arch": "resnet18", "weights": "none", "size": 32,
                   "bs": 8, "freeze_epochs": 1, "epochs": 1, "lr": 0.001, "patience": 0,
                   "workers": 0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM the process group, SIGKILL it if it has not exited after ``timeout`` seconds."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)
    except ProcessLookupError:
        pass


class RunOutcome(NamedTuple):
    returncode: int
    output: str
    run_id: str


@dataclass
class DeploymentRun:
    """A ``prefect deployment run --watch`` in flight, its output going to ``log``."""

    proc: subprocess.Popen
    log: Path

    def finish(self, timeout: float = RUN_TIMEOUT_S + 30) -> RunOutcome:
        try:
            self.proc.wait(timeout=timeout)
        finally:
            _stop(self.proc)
        output = self.log.read_text()
        match = re.search(r"UUID: ([0-9a-f-]{36})", output)
        return RunOutcome(self.proc.returncode, output, match.group(1) if match else "")


@dataclass
class PrefectStack:
    """A running server and worker, the environment they share, and where outputs land."""

    root: Path
    env: dict
    api_url: str
    processes: list = field(default_factory=list)
    training: DeploymentRun | None = None
    #: The import-model run in flight, the plain PyTorch model it imports, images to score.
    imported: tuple | None = None

    @property
    def registry(self) -> Path:
        return self.root / "registry"

    @property
    def out(self) -> Path:
        return self.root / "out"

    @property
    def inbox(self) -> Path:
        return self.root / "inbox"

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen([str(PREFECT), *args], cwd=REPO, env=self.env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.processes.append(proc)
        return proc

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.root / f"{name}.log"
        return "\n".join(path.read_text().splitlines()[-lines:]) if path.exists() else ""

    def cli(self, *args: str, timeout: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess:
        return subprocess.run([str(PREFECT), *args], cwd=REPO, env=self.env, text=True,
                              capture_output=True, timeout=timeout)

    def launch(self, deployment: str, /, **params) -> DeploymentRun:
        """Start ``prefect deployment run FLOW/NAME --param k=v ... --watch`` in the background."""
        args = ["deployment", "run", deployment, "--watch", "--watch-timeout", str(RUN_TIMEOUT_S)]
        for key, value in params.items():
            text = value if isinstance(value, str) else json.dumps(value)
            args += ["--param", f"{key}={text}"]
        name = f"run-{len(self.processes)}"
        return DeploymentRun(self.start(name, *args), self.root / f"{name}.log")

    def run_deployment(self, deployment: str, /, **params) -> RunOutcome:
        return self.launch(deployment, **params).finish()

    def client(self):
        from prefect.client.orchestration import SyncPrefectClient

        return SyncPrefectClient(self.api_url)

    def wait_for_health(self, server: subprocess.Popen, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if server.poll() is not None:
                pytest.fail(f"prefect server exited:\n{self.log_tail('server')}")
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.25)
        pytest.fail(f"prefect server not healthy after {timeout}s:\n{self.log_tail('server')}")


def _environment(root: Path, port: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "LENSFLOW_"))}
    env.update({
        "PREFECT_HOME": str(root / "prefect-home"),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_CLI_PROMPT": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "LENSFLOW_REGISTRY": str(root / "registry"),
        "LENSFLOW_OUT": str(root / "out"),
        "LENSFLOW_INBOX": str(root / "inbox"),
        "LENSFLOW_CACHE_DIR": str(root / "cache"),
        "LENSFLOW_TIMEZONE": TIMEZONE,
        "OMP_NUM_THREADS": "2",
        "COLUMNS": "200",  # keep Rich from wrapping the messages the tests read
    })
    return env


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefect-e2e")
    port = _free_port()
    stack = PrefectStack(root, _environment(root, port), f"http://127.0.0.1:{port}/api")
    started = time.monotonic()
    try:
        server = stack.start("server", "server", "start", "--host", "127.0.0.1",
                             "--port", str(port))
        make_image_bundle(stack.registry, name="image-classifier")
        make_images(stack.inbox, 4)
        ratings = make_planted_ratings(root / "ratings", n_users=30, n_items=20)
        rec = train_recommender(ratings, root / "recommender-train",
                                RecommenderOptions(factors=4, epochs=1))
        publish(rec.out_dir, stack.registry, "recommender")
        stack.wait_for_health(server)
        for args in (("work-pool", "create", "lensflow-process", "--type", "process"),
                     ("deploy", "--all")):
            done = stack.cli(*args)
            assert done.returncode == 0, f"prefect {' '.join(args)}:\n{done.stdout}{done.stderr}"
        stack.start("worker", "worker", "start", "--pool", "lensflow-process")
        # The longest run goes first and in the background; the other tests run beside it.
        stack.training = stack.launch("train-image-model/on-demand", **TRAINING_PARAMS,
                                      train_dir=str(root / "train"),
                                      data=str(make_shapes_dataset(root / "shapes", n_train=8,
                                                                   n_valid=4, size=40)))
        stack.imported = _launch_import(stack)
        print(f"prefect stack ready in {time.monotonic() - started:.1f}s")
        yield stack
    finally:
        for proc in reversed(stack.processes):
            _stop(proc)
        print(f"prefect stack up for {time.monotonic() - started:.1f}s")


def _launch_import(stack: PrefectStack) -> tuple:
    """Train a tiny model with plain PyTorch, save its state dict, start the import-model
    deployment on it in the background (beside the training run)."""
    import torch

    root = stack.root / "byo"
    make_tinted_images(root / "train", 4)
    model = train_plain_model(root / "train", steps=10)
    torch.save(model.state_dict(), root / "model.pt")
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    inbox = make_tinted_images(root / "inbox", 3, seed=1, by_class=False)
    run = stack.launch("import-model/on-demand", checkpoint=str(root / "model.pt"),
                       arch=f"timm/{ARCH}", classes=str(root / "classes.txt"),
                       sample_images=str(root / "train"), input_size=32, pt2=False,
                       name="byo-e2e")
    return run, model, inbox


def _state_of(stack: PrefectStack, flow_run_id: str):
    with stack.client() as client:
        return client.read_flow_run(flow_run_id).state


def test_score_deployment_commits_the_partition_and_its_artifacts(stack, tmp_path):
    images = make_images(tmp_path / "images", 6, seed=1)
    # Decoding workers in a flow process started by the worker, as a nightly run on a real folder
    # has: workers forked from that process died as they exited (Prefect's service threads).
    done, output, run_id = stack.run_deployment("score-image-folder/on-demand",
                                                folder=str(images), run_date="2026-01-15",
                                                batch_size=4, workers=2)
    assert done == 0, output + stack.log_tail("worker")
    assert _state_of(stack, run_id).is_completed()

    partition = stack.out / "image_predictions" / "run_date=2026-01-15"
    assert (partition / "_SUCCESS").is_file()
    assert partition_rows_and_run_ids(partition) == (6, {run_id})
    with stack.client() as client:
        artifacts = artifacts_by_key(client, run_id)
    assert str(partition) in artifacts["score-image-folder-summary"].data
    assert float(artifacts["score-image-folder-progress"].data) == pytest.approx(100.0)


def test_nightly_run_writes_the_partition_of_the_night_it_was_scheduled_for(stack):
    from prefect.states import Scheduled

    # Two days ago at 16:00 UTC is 01:00 the next day in Tokyo: a late run of that night.
    day = datetime.now(timezone.utc).replace(hour=16, minute=0, second=0, microsecond=0)
    scheduled = day - timedelta(days=2)
    expected = scheduled.astimezone(ZoneInfo(TIMEZONE)).date()
    with stack.client() as client:
        deployment = client.read_deployment_by_name("nightly/nightly")
        assert [s.schedule.timezone for s in deployment.schedules] == [TIMEZONE]
        run = client.create_flow_run_from_deployment(  # every parameter from prefect.yaml
            deployment.id, state=Scheduled(scheduled_time=scheduled))
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not (state := client.read_flow_run(run.id).state).is_final():
            assert time.monotonic() < deadline, f"nightly still {state.name}"
            time.sleep(1)
    assert state.is_completed(), f"{state.message}\n{stack.log_tail('worker')}"
    # The defaults: the inbox with registry/image-classifier, top-k of registry/recommender.
    images = stack.out / "image_predictions" / f"run_date={expected}"
    assert partition_rows_and_run_ids(images)[0] == 4
    topk = stack.out / "recommendations_topk" / f"run_date={expected}"
    assert partition_rows_and_run_ids(topk)[0] == 30 * 10
    # Each job's subflow shows its run health: the recommender's first night has no baseline;
    # the image model's is the on-demand run above, if it ran first.
    with stack.client() as client:
        health = {key: artifact for job in _subflow_runs(client, run.id)
                  for key, artifact in artifacts_by_key(client, job).items()
                  if key.endswith("-health")}
    assert set(health) == {"score-image-folder-health", "score-recommendations-health"}
    assert all("## Run health" in a.data for a in health.values())
    assert "no baseline yet" in health["score-recommendations-health"].data
    assert re.search(r"(no_baseline|ok|warned) \(warn\), (no baseline yet|against the last 1 run)",
                     health["score-image-folder-health"].data)


def _subflow_runs(client, parent_id) -> list:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    return [r.id for r in client.read_flow_runs(flow_run_filter=FlowRunFilter(
        parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_id])))]


def test_a_constant_colour_night_fails_its_deployment_run_before_commit(stack, tmp_path):
    good = make_images(tmp_path / "good", 40, seed=3)
    constant = tmp_path / "constant"
    constant.mkdir()
    for src in sorted(good.glob("*.png")):
        Image.new("RGB", (40, 40), (20, 20, 20)).save(constant / src.name)
    params = {"out": str(tmp_path / "out"), "on_drift": "fail", "workers": 0}
    done, output, _ = stack.run_deployment("score-image-folder/on-demand", folder=str(good),
                                           run_date="2026-02-01", **params)
    assert done == 0, output + stack.log_tail("worker")

    done, output, run_id = stack.run_deployment("score-image-folder/on-demand",
                                                folder=str(constant), run_date="2026-02-02",
                                                **params)
    assert done != 0
    state = _state_of(stack, run_id)
    assert state.is_failed()
    assert "\n" not in state.message and "not committed" in state.message
    assert "inputs.content" in state.message and "--accept-drift" in state.message
    assert not (tmp_path / "out" / "image_predictions" / "run_date=2026-02-02").exists()
    with stack.client() as client:
        text = artifacts_by_key(client, run_id)["score-image-folder-health"].data
    assert "refused (fail)" in text and "near_constant" in text


def test_bad_parameters_end_the_run_with_a_readable_message(stack, tmp_path):
    done, output, _ = stack.run_deployment("score-image-folder/on-demand",
                                           folder=str(stack.inbox), batch_size=0)
    assert done != 0
    assert "Validation failed for field 'batch_size'" in " ".join(output.split())

    missing = tmp_path / "no-such-folder"
    done, _, run_id = stack.run_deployment("score-image-folder/on-demand", folder=str(missing))
    assert done == 1
    state = _state_of(stack, run_id)
    assert state.is_failed()
    assert state.message == f"folder {missing}: no such directory"


def test_import_deployment_promotes_a_plain_pytorch_model_that_scores_as_it_predicts(stack):
    # Before the training test: the import finishes first, and its scoring run overlaps the
    # training run still in flight.
    run, model, inbox = stack.imported
    outcome = run.finish()
    assert outcome.returncode == 0, outcome.output + stack.log_tail("worker", 80)
    assert current_version(stack.registry, "byo-e2e")
    with stack.client() as client:
        parity = artifacts_by_key(client, outcome.run_id)["import-model-parity"].data
    assert "Parity passed" in parity and "| validation |" in parity

    done, output, _ = stack.run_deployment("score-image-folder/on-demand",
                                           folder=str(inbox[0].parent), run_date="2026-02-01",
                                           model=str(stack.registry / "byo-e2e"), workers=0)
    assert done == 0, output + stack.log_tail("worker")
    assert_scored_like_eager(stack.out / "image_predictions" / "run_date=2026-02-01", model,
                             inbox)


def test_training_deployment_promotes_a_checked_bundle_with_its_artifacts(stack):
    outcome = stack.training.finish()
    assert outcome.returncode == 0, outcome.output + stack.log_tail("worker", 80)

    current = current_version(stack.registry, "shapes-e2e")
    assert (stack.registry / "shapes-e2e" / current / "manifest.json").is_file()
    # The flat --param values reached the recipe: one frozen epoch, then one (not 3) unfrozen.
    history = json.loads((stack.root / "train" / "history.json").read_text())["history"]
    assert [r["stage"] for r in history] == ["start", "frozen", "unfrozen"]
    with stack.client() as client:
        artifacts = artifacts_by_key(client, outcome.run_id)
    plots = artifacts["train-image-model-plots"].data
    assert "learning_curve" in plots and "confusion_matrix" in plots
    assert "data:image/png;base64," in plots
    assert "accuracy" in artifacts["train-image-model-metrics"].data
    assert artifacts["train-image-model-parity"].data.strip()
