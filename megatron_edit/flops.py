"""Model FLOPs of a training iteration, the numerator of TFLOP/s and MFU.

Counts matmul FLOPs (2 per multiply-add) of forward + backward (x3), without activation
recomputation, for the dense GPT of arguments.py. Per token and layer, forward:
  QKV 2h(h + 2h*g/a), attention scores and context 4sh, output projection 2h^2,
  MLP 4h*ffn (6h*ffn with SwiGLU); once per token the logits 2h*V.
This equals Megatron-LM's `num_floating_point_operations` for dense models.
"""


def layer_flops_per_token(args) -> float:
    """Forward matmul FLOPs of one transformer layer for one token."""
    h, s = args.hidden_size, args.seq_length
    kv_ratio = args.num_query_groups / args.num_attention_heads
    mlp = (6 if args.swiglu else 4) * h * args.ffn_hidden_size
    return 2 * h * (h + 2 * h * kv_ratio) + 4 * s * h + 2 * h * h + mlp


def flops_per_iteration(args) -> float:
    per_token = args.num_layers * layer_flops_per_token(args) + 2 * args.hidden_size * args.padded_vocab_size
    return 3.0 * per_token * args.seq_length * args.global_batch_size
