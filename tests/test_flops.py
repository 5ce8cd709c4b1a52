"""The FLOPs behind TFLOP/s and MFU equal what PyTorch counts on a real forward and backward."""
import pytest

from test_platform import run_python


@pytest.mark.parametrize("style", ["gpt", "llama"])
def test_flops_formula_matches_torch_flop_counter(style):
    extra = ["--swiglu", "--group-query-attention", "--num-query-groups", "2", "--untie-embeddings-and-output-weights",
             "--normalization", "RMSNorm"] if style == "llama" else []
    out = run_python(f"""
        import megatron_edit, torch
        from torch.utils.flop_counter import FlopCounterMode
        import pretrain_gpt
        from megatron_edit.arguments import parse_args
        from megatron_edit.flops import flops_per_iteration
        from megatron_edit.initialize import initialize_megatron
        from megatron_edit.model import transformer_config_from_args
        args = parse_args("--num-layers 3 --hidden-size 64 --num-attention-heads 4 --ffn-hidden-size 160 "
                          "--seq-length 48 --micro-batch-size 2 --train-iters 1 --lr 1e-3 --mock-data "
                          "--vocab-size 300 --device cpu".split() + {extra!r}, world_size=1)
        initialize_megatron(args)
        model = pretrain_gpt.model_provider(args, transformer_config_from_args(args))
        tokens = torch.randint(0, 300, (2, 48))
        positions = torch.arange(48).expand(2, 48)
        with FlopCounterMode(display=False) as counter:
            model(tokens, positions, None, labels=tokens).sum().backward()
        print(counter.get_total_flops(), int(flops_per_iteration(args)))
    """)
    counted, formula = map(int, out.split())
    assert formula == counted
