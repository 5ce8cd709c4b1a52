"""Would a model's transformer layers, kept in host memory and streamed to the GPU layer by layer (ATOM-style
swapping), train without waiting on the link? Prints the planner's choice (megatron_edit/swap/planner.py) and,
per number of resident layers, the transfer time an iteration would expose.

    python tools/plan_layer_swap.py --num-layers 32 --hidden-size 4096 --num-attention-heads 32 \\
        --num-query-groups 8 --seq-length 4096 --micro-batch-size 1 --sustained-tflops 400 \\
        --host-to-device-gbps 25 --layer-memory-gib 8

Costs are estimated, not measured: a layer's weights and gradients in 16-bit, its forward matmul FLOPs
(megatron_edit/flops.py) at --sustained-tflops and its backward at twice that, and the link's bandwidth.
Swapping pays when a layer's compute outlasts its transfer: then a couple of slots hide every transfer.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_edit.arguments import default_ffn_hidden_size  # noqa: E402
from megatron_edit.flops import layer_flops_per_token  # noqa: E402
from megatron_edit.swap.planner import LayerCosts, plan, simulate  # noqa: E402
from tools.experiment import write_table  # noqa: E402

BYTES_16BIT = 2


def layer_parameters(args) -> int:
    """A Llama-style layer without biases: attention (QKV with grouped KV, output projection), MLP, two norms."""
    h, kv = args.hidden_size, args.num_query_groups / args.num_attention_heads
    attention = h * (h + 2 * h * kv) + h * h
    mlp = (3 if args.swiglu else 2) * h * args.ffn_hidden_size
    return int(attention + mlp + 2 * h)


def estimated_costs(args) -> LayerCosts:
    tokens = args.seq_length * args.micro_batch_size
    forward = layer_flops_per_token(args) * tokens / (args.sustained_tflops * 1e12)
    layer_bytes = layer_parameters(args) * BYTES_16BIT
    layers = args.num_layers
    return LayerCosts([layer_bytes] * layers, [layer_bytes] * layers, [forward] * layers, [2 * forward] * layers,
                      args.host_to_device_gbps * 1e9, args.device_to_host_gbps * 1e9)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-layers", type=int, required=True)
    parser.add_argument("--hidden-size", type=int, required=True)
    parser.add_argument("--ffn-hidden-size", type=int, default=None, help="default: as pretrain_gpt.py's")
    parser.add_argument("--num-attention-heads", type=int, required=True)
    parser.add_argument("--num-query-groups", type=int, default=None)
    parser.add_argument("--seq-length", type=int, required=True)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--no-swiglu", dest="swiglu", action="store_false")
    parser.add_argument("--sustained-tflops", type=float, default=400.0, help="per GPU, what the layers reach")
    parser.add_argument("--host-to-device-gbps", type=float, default=25.0, help="GB/s (PCIe 4.0 x16: about 25)")
    parser.add_argument("--device-to-host-gbps", type=float, default=None, help="default: --host-to-device-gbps")
    parser.add_argument("--layer-memory-gib", type=float, required=True,
                        help="device memory left for layer weights (after activations and everything else)")
    parser.add_argument("--swap-resident-layers", type=int, default=None, help="cap on resident layers")
    parser.add_argument("--output-dir", default="runs/plan_layer_swap")
    args = parser.parse_args(argv)
    if args.ffn_hidden_size is None:
        args.ffn_hidden_size = default_ffn_hidden_size(args.hidden_size, args.swiglu)
    args.num_query_groups = args.num_query_groups or args.num_attention_heads
    args.device_to_host_gbps = args.device_to_host_gbps or args.host_to_device_gbps
    costs = estimated_costs(args)
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    budget = args.layer_memory_gib * 2**30
    cap = args.swap_resident_layers or args.num_layers
    chosen = plan(costs, budget, cap)
    layer_bytes = costs.weight_bytes[0]
    rows = []
    for resident in range(1, min(cap, args.num_layers, int(budget // layer_bytes)) + 1):
        rows.append({"resident layers": resident, "layer weights on GPU (GiB)": f"{resident * layer_bytes / 2**30:.2f}",
                     "exposed transfer ms/iter": f"{1000 * simulate(costs, resident, resident - 1):.2f}"})
    transfer = layer_bytes / costs.host_to_device_bytes_per_s
    print(f"per layer: {layer_bytes / 2**20:.1f} MiB of 16-bit weights, forward {1000 * costs.forward_seconds[0]:.2f} "
          f"ms, backward {1000 * costs.backward_seconds[0]:.2f} ms, transfer {1000 * transfer:.2f} ms")
    print(write_table(rows, output, "plan_layer_swap"))
    print(chosen.describe(costs))


if __name__ == "__main__":
    main()
