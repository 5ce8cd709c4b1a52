"""The CPU compatibility layer: off unless asked for, and enough for megatron-core on CPU when on."""
import subprocess
import sys
import textwrap

import pytest

from launcher import REPO, TINY_GPT, run_training

pytestmark = pytest.mark.slow  # every test here starts processes


def run_python(code: str) -> str:
    """Run `code` in a fresh interpreter (the layer patches process-wide state) and return its stdout."""
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_layer_stays_off_when_a_cuda_device_is_used():
    out = run_python("""
        import torch
        from megatron_edit import platform
        torch.cuda.set_device = lambda index: None   # no GPU here: only the binding call is skipped,
        torch.cuda.device_count = lambda: 1          # on a machine with one device
        device = platform.setup_device("cuda", 0)
        print(device, platform.cpu_compat_enabled(), torch.Tensor.type is torch._C.TensorBase.type
              or torch.Tensor.type.__module__ == "torch._tensor")
    """)
    assert out.split() == ["cuda:0", "False", "True"]


def test_layer_redirects_megatron_cuda_requests_to_cpu():
    out = run_python("""
        import torch
        from megatron_edit import platform
        try:
            torch.zeros(1, device="cuda")
            print("cuda-worked-without-layer")
        except (RuntimeError, AssertionError):
            print("cuda-failed-without-layer")
        platform.setup_device("cpu", 0)
        x = torch.zeros(2, device="cuda")
        print(x.device, x.cuda() is x, torch.ones(1, device=torch.cuda.current_device()).device)
        print(torch.ones(1).type(), torch.ones(1).type(torch.float64).dtype)
        from megatron.core.tensor_parallel import random as megatron_random
        torch.manual_seed(7)
        state = megatron_random._get_cuda_rng_state()
        a = torch.rand(3)
        megatron_random._set_cuda_rng_state(state)
        print(torch.equal(a, torch.rand(3)))
    """)
    assert out.split("\n")[:4] == [
        "cuda-failed-without-layer",
        "cpu True cpu",
        "torch.cuda.FloatTensor torch.float64",
        "True",
    ]


def test_megatron_core_imports_without_torchs_compiler_on_a_machine_without_cuda():
    """megatron_edit's import leaves megatron-core's fused kernels plain functions (mcore_import.py), so no rank
    loads inductor, and imports nothing of megatron-core itself (tools that never use it pay nothing); if
    megatron-core stops taking `jit_fuser` from torch.compile at import, this says so."""
    out = run_python("""
        import sys
        import megatron_edit  # noqa: F401
        print("megatron.core" in sys.modules)
        import pretrain_gpt  # noqa: F401
        import torch
        from megatron.core import jit
        from megatron.core.fusions import fused_bias_swiglu
        from megatron_edit.platform import mcore_import
        assert not torch.cuda.is_available()
        print(jit.jit_fuser is mcore_import._eager, hasattr(fused_bias_swiglu.swiglu, "_torchdynamo_orig_callable"),
              any(name.startswith("torch._inductor") for name in sys.modules), torch.compile is not mcore_import._eager)
    """)
    assert out.split() == ["False", "True", "False", "False", "True"]


def test_resolve_device_auto_is_cpu_without_gpu():
    out = run_python("""
        from megatron_edit import platform
        print(platform.resolve_device_type("auto"), platform.distributed_backend("cpu"))
    """)
    assert out.split() == ["cpu", "gloo"]


def test_bf16_training_on_cpu_tracks_fp32_with_distributed_optimizer():
    """bf16 weights with fp32 main parameters in megatron's distributed optimizer, on two CPU ranks."""
    common = TINY_GPT + ["--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "5",
                         "--log-interval", "1", "--eval-interval", "100", "--eval-iters", "1",
                         "--use-distributed-optimizer"]
    fp32 = run_training(2, common).check().losses
    bf16 = run_training(2, common + ["--bf16"]).check().losses
    assert len(bf16) == 5 and bf16[-1] < bf16[0]
    for a, b in zip(fp32, bf16):
        assert abs(a - b) < 0.05, (fp32, bf16)
