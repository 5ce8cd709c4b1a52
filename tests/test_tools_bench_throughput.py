"""tools/bench_throughput.py runs pretrain_gpt.py's flags, the scale and memory ones included, and prints its table."""
import pytest

from launcher import TINY_GPT, run_training

pytestmark = pytest.mark.slow  # every test here starts processes


def test_throughput_table_names_the_flags_and_reports_mfu_and_peak_memory():
    run = run_training(2, TINY_GPT + ["--micro-batch-size", "2", "--train-iters", "2", "--bench-warmup-iters", "1",
                                      "--tensor-model-parallel-size", "2", "--sequence-parallel",
                                      "--recompute-activations", "--peak-tflops", "1.0"],
                       script="tools/bench_throughput.py").check()
    rows = {name.strip(): value.strip() for name, value in
            (line[1:].split("|", 1) for line in run.stdout.splitlines() if line.startswith("| "))}
    assert rows["memory and overlap"] == "recompute selective, sequence parallel, attention auto"
    assert rows["layout"].startswith("TP=2 PP=1 DP=1 on 2 x cpu, fp32, local layers")
    assert float(rows["tokens/s"].replace(",", "")) > 0
    assert rows["MFU"].endswith("% of 1.0 TFLOP/s (given)")
    assert rows["peak memory (peak RSS)"].endswith("GiB (max over ranks)")
