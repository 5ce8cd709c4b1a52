"""Tracking: one rank writes an offline wandb run with the config, training, validation and EDiT sync series, and
with --tensorboard-dir the same series as TensorBoard scalars."""
import glob

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from launcher import TINY_GPT, run_training
from wandb_offline import history_and_config

pytestmark = pytest.mark.slow  # every test here starts processes


def test_offline_wandb_run_and_tensorboard_hold_training_validation_and_sync_series(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)  # a key set for other runs does not override WANDB_MODE
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = run_training(2, TINY_GPT + [
        "--micro-batch-size", "2", "--train-iters", "8", "--log-interval", "2", "--eval-interval", "4",
        "--eval-iters", "1", "--dp-mode", "edit", "--model-shard-group-size", "1", "--local-sgd-sync-interval", "2",
        "--edit-anomaly-elimination", "--wandb-project", "megatron-edit-test", "--wandb-exp-name", "tiny",
        "--wandb-save-dir", str(tmp_path), "--tensorboard-dir", str(tmp_path / "tensorboard")]).check()
    files = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1  # one rank logs
    history, config = history_and_config(files[0])
    assert config["num_layers"] == 4 and config["dp_mode"] == "edit"
    assert history["lm loss"] == pytest.approx(run.losses, rel=1e-6)
    for series in ("learning-rate", "grad-norm", "tokens/s", "TFLOP/s per device", "sync bytes/iter",
                   "shard bytes/iter", "exposed sync ms/iter"):
        assert len(history[series]) == 4, series
    syncs = run.stdout.count("edit sync at iteration")
    assert syncs >= 2
    for series in ("sync/pseudo-grad norm mean", "sync/pseudo-grad norm max", "sync/outliers", "sync/exposed ms",
                   "sync/weight replica 0", "sync/weight replica 1", "sync/bytes"):
        assert len(history[series]) == syncs, series
    assert len(set(history["sync/bytes"])) == 1 and history["sync/bytes"][0] > 0  # every sync moves the same bytes
    assert history["validation lm loss"] == pytest.approx([run.validation_losses[i] for i in (0, 4, 8)], rel=1e-6)
    assert "wandb run:" in run.stdout
    assert run.stdout.count(" ETA: ") == 4

    events = glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
    assert len(events) == 1  # one rank logs
    tensorboard = EventAccumulator(events[0], size_guidance={"scalars": 0}).Reload()
    series_logged = {name: values for name, values in history.items() if not name.startswith("_")}  # wandb's own
    assert set(tensorboard.Tags()["scalars"]) == set(series_logged)
    for series, values in series_logged.items():
        assert [event.value for event in tensorboard.Scalars(series)] == pytest.approx(values, rel=1e-6), series
    assert [event.step for event in tensorboard.Scalars("lm loss")] == [2, 4, 6, 8]
    assert f"tensorboard: {tmp_path / 'tensorboard'}" in run.stdout
