"""Model FLOPs of a training iteration, the numerator of TFLOP/s and MFU.

Counts matmul FLOPs (2 per multiply-add) of forward + backward (x3), without activation
recomputation, for the dense GPT of arguments.py. Per token and layer, forward:
  QKV 2h(h + 2h*g/a), attention scores and context 4sh, output projection 2h^2,
  MLP 4h*ffn (6h*ffn with SwiGLU); once per token the logits 2h*V.
This equals Megatron-LM's `num_floating_point_operations` for dense models.
"""


def flops_per_iteration(args) -> float:
    h, s, layers = args.hidden_size, args.seq_length, args.num_layers
    kv_ratio = args.num_query_groups / args.num_attention_heads
    mlp = (6 if args.swiglu else 4) * h * args.ffn_hidden_size
    per_layer = 2 * h * (h + 2 * h * kv_ratio) + 4 * s * h + 2 * h * h + mlp
    per_token = layers * per_layer + 2 * h * args.padded_vocab_size
    return 3.0 * per_token * s * args.global_batch_size
