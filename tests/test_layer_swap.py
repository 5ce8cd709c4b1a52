"""--swap-layers on CPU, where host and device are one memory: the tests check the logic, not the savings. A swapped
run trains exactly as the unswapped one; the swapper's own accounting never holds more layers on the device than
its bound, and every layer computes on its device copy."""
import tempfile
from pathlib import Path

import pytest
import torch

from launcher import TINY_GPT, run_training

pytestmark = pytest.mark.slow  # every test here starts processes

COMMON = TINY_GPT + ["--micro-batch-size", "2", "--train-iters", "6", "--log-interval", "1", "--eval-iters", "1",
                     "--eval-interval", "3"]
MODES = {
    "ddp": (1, ["--dp-mode", "ddp", "--global-batch-size", "4"]),  # two micro-batches: gradients accumulate
    "ddp-bf16": (1, ["--dp-mode", "ddp", "--global-batch-size", "4", "--bf16"]),  # fp32 main params on the host
    # EDiT's default warm-up (a quarter of the run, W=1): the swapped layers' host gradients are averaged too
    "edit-penalty": (2, ["--dp-mode", "edit", "--model-shard-group-size", "1",
                         "--local-sgd-sync-interval", "2", "--edit-weighted-average", "--edit-pseudo-grad-clip", "1"]),
    "diloco": (2, ["--dp-mode", "diloco", "--model-shard-group-size", "1", "--local-sgd-warmup-iters", "0",
                   "--local-sgd-sync-interval", "2"]),
}


def dumped(tmp_path, ranks: int, flags: list) -> list:
    out = tempfile.mkdtemp(dir=tmp_path)
    run = run_training(ranks, flags + ["--dump-dir", out], script="tests/edit_runner.py").check()
    return run, [torch.load(Path(out) / f"rank{rank}.pt") for rank in range(ranks)]


@pytest.mark.parametrize("mode", MODES)
def test_a_swapped_run_trains_as_the_unswapped_one(tmp_path, mode):
    ranks, flags = MODES[mode]
    plain_run, plain = dumped(tmp_path, ranks, COMMON + flags)
    swapped_run, swapped = dumped(tmp_path, ranks, COMMON + flags + ["--swap-layers", "--swap-resident-layers", "2"])
    assert " swap plan: " in swapped_run.stdout and " swap plan: " not in plain_run.stdout
    assert swapped_run.validation_losses == pytest.approx(plain_run.validation_losses, rel=1e-6)
    for before, after in zip(plain, swapped):
        assert after["losses"] == pytest.approx(before["losses"], rel=1e-6)
        for name, value in before["params"].items():
            torch.testing.assert_close(after["params"][name], value, rtol=1e-6, atol=1e-7, msg=name)
        assert any(event["event"] == "evict" for event in after["swap_events"])  # layers did leave the device


def test_residency_stays_within_the_bound_and_each_layer_computes_on_its_copy(tmp_path):
    flags = COMMON + MODES["ddp"][1] + ["--swap-layers", "--swap-resident-layers", "3", "--eval-iters", "0"]
    _, (dump,) = dumped(tmp_path, 1, flags)
    events, layer_bytes = dump["swap_events"], dump["swap_layer_bytes"]
    layers = len(layer_bytes)
    assert layers == 4
    for event in events:  # at every layer boundary
        assert len(event["resident"]) <= event["limit"] <= 3
        assert event["resident_bytes"] == sum(layer_bytes[i] for i in event["resident"])
        assert event["resident_bytes"] <= 3 * max(layer_bytes)
        assert set(event["bound"]) <= set(event["resident"])
        if event["event"] in ("forward_end", "backward_end"):  # it computed on the device copy
            assert event["layer"] in event["bound"] and event["on_copy"]
    ends = [(e["event"], e["layer"]) for e in events if e["event"] in ("forward_end", "backward_end")]
    one_pass = [("forward_end", i) for i in range(layers)] + [("backward_end", i) for i in reversed(range(layers))]
    assert ends == one_pass * 2 * 6  # two micro-batches in each of six iterations
    fetches = [e["layer"] for e in events if e["event"] == "fetch"]
    assert len(fetches) > layers * 6  # every forward fetches every layer again (the optimizer changed them)


@pytest.mark.parametrize("ckpt_format", ["torch", "torch_dist"])
def test_a_swapped_run_resumes_exactly(tmp_path, ckpt_format):
    """8 iterations straight vs 4, save, load, 4 more, in bf16: the host-held layers' weights, fp32 main parameters
    and Adam state go into the checkpoint and come back."""
    args = COMMON + MODES["ddp"][1] + ["--bf16", "--swap-layers", "--ckpt-format", ckpt_format, "--train-iters", "8"]
    straight = run_training(1, args).check().losses
    run_training(1, args + ["--save", str(tmp_path), "--exit-interval", "4"]).check()
    resumed = run_training(1, args + ["--load", str(tmp_path)]).check()
    assert "at iteration 4" in resumed.stdout
    assert resumed.losses == straight[4:]
