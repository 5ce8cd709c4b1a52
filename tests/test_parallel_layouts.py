"""The parallel layout changes nothing but speed: every layout reproduces the single-process loss curve."""
import functools
import re

import pytest

from launcher import TINY_GPT, run_training

pytestmark = pytest.mark.slow  # every test here starts processes

STEPS = ["--train-iters", "6", "--log-interval", "1", "--eval-interval", "100", "--eval-iters", "1",
         "--log-params-norm", "--log-num-zeros-in-grad"]
# Megatron-LM's runtime flags that must change no number (on CPU: no cache to empty; the collector runs between steps)
RUNTIME = ["--manual-gc", "--manual-gc-interval", "2", "--deterministic-mode", "--empty-unused-memory-level", "2"]
LLAMA = ["--swiglu", "--normalization", "RMSNorm", "--position-embedding-type", "rope",
         "--untie-embeddings-and-output-weights", "--group-query-attention", "--num-query-groups", "2",
         "--disable-bias-linear"]

# name -> (processes, arguments); all see global batch 8, made of micro-batches of 2 unless the name says otherwise.
LAYOUTS = {
    "reference": (1, ["--micro-batch-size", "8", "--global-batch-size", "8"]),
    "dp1_grad_accumulation": (1, ["--micro-batch-size", "2", "--global-batch-size", "8"]),
    "tp2_dp2": (4, ["--micro-batch-size", "2", "--global-batch-size", "8", "--tensor-model-parallel-size", "2"]),
    "pp2_dp2": (4, ["--micro-batch-size", "2", "--global-batch-size", "8", "--pipeline-model-parallel-size", "2"]),
    "tp2_pp2": (4, ["--micro-batch-size", "2", "--global-batch-size", "8", "--tensor-model-parallel-size", "2",
                    "--pipeline-model-parallel-size", "2", *RUNTIME]),
    "dp2_distributed_optimizer": (2, ["--micro-batch-size", "2", "--global-batch-size", "8",
                                      "--use-distributed-optimizer"]),
    "llama_reference": (1, ["--micro-batch-size", "8", "--global-batch-size", "8", *LLAMA]),
    "llama_tp2_pp2": (4, ["--micro-batch-size", "2", "--global-batch-size", "8", "--tensor-model-parallel-size", "2",
                          "--pipeline-model-parallel-size", "2", *LLAMA]),
}


@functools.lru_cache(maxsize=None)
def run_of(layout: str):
    nproc, args = LAYOUTS[layout]
    return run_training(nproc, TINY_GPT + STEPS + args).check()


def losses_of(layout: str):
    losses = run_of(layout).losses
    assert len(losses) == 6
    return losses


def logged(layout: str, field: str) -> list:
    """A field of every iteration line (--log-params-norm's "params norm", --log-num-zeros-in-grad's "num zeros")."""
    return [float(value) for value in re.findall(rf"\| {field}: (\S+) \|", run_of(layout).stdout)]


@pytest.mark.parametrize("layout", ["tp2_dp2", "pp2_dp2"])
def test_four_rank_layouts_lower_the_loss(layout):
    losses = losses_of(layout)
    assert losses[-1] < losses[0] - 0.1, losses


@pytest.mark.parametrize("layout", ["dp1_grad_accumulation", "tp2_dp2", "pp2_dp2", "tp2_pp2",
                                    "dp2_distributed_optimizer"])
def test_layout_reproduces_single_process_loss_curve(layout):
    assert losses_of(layout) == pytest.approx(losses_of("reference"), rel=2e-5, abs=0)


def test_llama_style_tp2_pp2_reproduces_single_process_loss_curve():
    assert losses_of("llama_tp2_pp2") == pytest.approx(losses_of("llama_reference"), rel=2e-5, abs=0)


@pytest.mark.parametrize("layout,reference", [("tp2_pp2", "reference"), ("dp2_distributed_optimizer", "reference"),
                                              ("llama_tp2_pp2", "llama_reference")])
def test_params_norm_and_zeros_in_the_gradient_are_the_single_process_ones(layout, reference):
    """Megatron-LM's --log-params-norm and --log-num-zeros-in-grad count each parameter once, however it is split.
    With untied embeddings (Llama) the input embedding's rows of ids absent from a batch get no gradient: thousands
    of zeros, the same in every layout (a few more or fewer where a sum happens to cancel exactly)."""
    assert logged(layout, "params norm") == pytest.approx(logged(reference, "params norm"), abs=1.5e-3)  # as printed
    zeros = logged(layout, "num zeros")
    assert zeros == pytest.approx(logged(reference, "num zeros"), abs=16) and len(zeros) == 6
    if reference == "llama_reference":
        assert min(zeros) > 1000
