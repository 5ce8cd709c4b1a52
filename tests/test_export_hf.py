"""tools/export_hf.py: a Llama-style run saved at TP=2 exports to a LlamaForCausalLM whose logits are ours."""
import json
import subprocess
import sys

import pytest

from launcher import REPO, run_training

pytestmark = pytest.mark.slow  # every test here starts processes

LLAMA = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--num-query-groups", "2",
         "--seq-length", "32", "--max-position-embeddings", "32", "--position-embedding-type", "rope",
         "--normalization", "RMSNorm", "--swiglu", "--disable-bias-linear", "--untie-embeddings-and-output-weights",
         "--hidden-dropout", "0", "--attention-dropout", "0", "--lr", "1e-2", "--seed", "1234", "--mock-data",
         "--vocab-size", "511", "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "3",
         "--log-interval", "1", "--eval-interval", "1000", "--eval-iters", "1"]


def python(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_exported_llama_gives_our_logits(tmp_path):
    checkpoints, exported = tmp_path / "ckpt", tmp_path / "hf"
    run_training(2, LLAMA + ["--tensor-model-parallel-size", "2", "--ckpt-format", "torch_dist",
                             "--save", str(checkpoints)]).check()
    export = python("tools/export_hf.py", "--load", checkpoints, "--output", exported)
    assert export.returncode == 0, export.stderr[-3000:]
    assert (exported / "config.json").exists() and list(exported.glob("*.safetensors"))
    compared = python("tests/hf_logits_runner.py", checkpoints, exported)
    assert compared.returncode == 0, compared.stderr[-3000:]
    result = json.loads(compared.stdout.strip().splitlines()[-1])
    assert result["shape"] == [2, 32, 512] and result["logit_scale"] > 0.1
    assert result["max_abs_diff"] < 1e-4


def test_a_model_llama_cannot_express_is_refused_in_one_line(tmp_path):
    gelu = [a for a in LLAMA if a not in ("--swiglu",)]
    run_training(1, gelu + ["--ckpt-format", "torch_dist", "--save", str(tmp_path / "ckpt")]).check()
    export = python("tools/export_hf.py", "--load", tmp_path / "ckpt", "--output", tmp_path / "hf")
    assert export.returncode != 0
    assert "error: this checkpoint's model is not Llama-style, LlamaForCausalLM would need SwiGLU (--swiglu)" \
        in export.stderr
