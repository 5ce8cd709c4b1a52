"""The parallel layout changes nothing but speed: every layout reproduces the single-process loss curve."""
import functools

import pytest

from launcher import TINY_GPT, run_training

pytestmark = pytest.mark.slow  # every test here starts processes

STEPS = ["--train-iters", "6", "--log-interval", "1", "--eval-interval", "100", "--eval-iters", "1"]
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
                    "--pipeline-model-parallel-size", "2"]),
    "dp2_distributed_optimizer": (2, ["--micro-batch-size", "2", "--global-batch-size", "8",
                                      "--use-distributed-optimizer"]),
    "llama_reference": (1, ["--micro-batch-size", "8", "--global-batch-size", "8", *LLAMA]),
    "llama_tp2_pp2": (4, ["--micro-batch-size", "2", "--global-batch-size", "8", "--tensor-model-parallel-size", "2",
                          "--pipeline-model-parallel-size", "2", *LLAMA]),
}


@functools.lru_cache(maxsize=None)
def losses_of(layout: str):
    nproc, args = LAYOUTS[layout]
    losses = run_training(nproc, TINY_GPT + STEPS + args).check().losses
    assert len(losses) == 6
    return losses


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
