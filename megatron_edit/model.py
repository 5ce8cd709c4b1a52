"""GPT/Llama-style model settings for megatron-core's GPTModel, and a weight initialization that ignores the layout.

megatron-core initializes each rank from its own RNG stream, so the same seed gives different
models under different TP/PP layouts. `initialize_weights` instead draws every parameter at full
size from a generator keyed by the parameter's global name and keeps this rank's tensor-parallel
slice: one seed, one model, whatever the layout. That is what lets a TP=2/PP=2/DP=2 run be
checked number-for-number against a single process, and a resumed run against another layout.
"""
import re
import zlib

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.enums import AttnBackend
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer import TransformerConfig


def unwrap_model(chunk: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP and Float16Module wrappers (what Megatron-LM checkpoints hold)."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def params_dtype(args) -> torch.dtype:
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32


def transformer_config_from_args(args) -> TransformerConfig:
    fused = args.transformer_impl == "transformer_engine"
    dtype = params_dtype(args)
    return TransformerConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups,
        ffn_hidden_size=args.ffn_hidden_size,
        hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout,
        init_method_std=args.init_method_std,
        normalization=args.normalization,
        layernorm_epsilon=args.norm_epsilon,
        gated_linear_unit=args.swiglu,
        activation_func=F.silu if args.swiglu else F.gelu,
        add_bias_linear=not args.disable_bias_linear,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        bf16=args.bf16,
        fp16=args.fp16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        # megatron's own initialization must run: it is what marks parameters with their tensor-parallel
        # attributes (partition_dim, ...), which grad clipping and initialize_weights rely on.
        perform_initialization=True,
        use_cpu_initialization=args.device_type == "cpu",
        # Fused kernels exist only with Transformer Engine on a GPU, each unless its --no-*-fusion flag is given.
        masked_softmax_fusion=fused and args.masked_softmax_fusion,
        bias_activation_fusion=fused and (args.bias_swiglu_fusion if args.swiglu else args.bias_gelu_fusion),
        bias_dropout_fusion=fused and args.bias_dropout_fusion,
        apply_rope_fusion=fused and args.apply_rope_fusion,
        gradient_accumulation_fusion=False,
        deterministic_mode=args.deterministic_mode,
        deallocate_pipeline_outputs=True,
        sequence_parallel=args.sequence_parallel,
        recompute_granularity=args.recompute_granularity,
        recompute_method=args.recompute_method,
        recompute_num_layers=args.recompute_num_layers if args.recompute_granularity == "full" else None,
        attention_backend=AttnBackend[args.attention_backend],
    )


def layer_spec(args, config: TransformerConfig):
    """Transformer Engine layers when chosen, else megatron-core's local (pure torch) layers; those with
    --sequence-parallel as a block spec whose norms are SequenceParallelNorm (megatron-core's own refuse it)."""
    if args.transformer_impl == "transformer_engine":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec()
    spec = get_gpt_layer_local_spec(normalization=args.normalization)
    if not args.sequence_parallel:
        return spec
    spec.submodules.input_layernorm = spec.submodules.pre_mlp_layernorm = SequenceParallelNorm
    return TransformerBlockSubmodules(layer_specs=[spec] * get_num_layers_to_build(config),
                                      layer_norm=SequenceParallelNorm)


class SequenceParallelNorm:
    """torch's LayerNorm or RMSNorm for sequence-parallel layers without Apex or Transformer Engine: each tensor rank
    normalizes its part of the sequence, so its weight gradients are partial sums, which megatron-core's
    finalize_model_grads adds up over the tensor group for parameters marked `sequence_parallel` (as Apex's
    FusedLayerNorm marks them)."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_):
        norm_class = torch.nn.RMSNorm if config.normalization == "RMSNorm" else torch.nn.LayerNorm
        norm = norm_class(hidden_size, eps=eps)
        for param in norm.parameters():
            param.sequence_parallel = True
        return norm


_OUTPUT_PROJECTIONS = ("linear_proj.weight", "linear_fc2.weight")
_LAYER_INDEX = re.compile(r"^decoder\.layers\.(\d+)\.")


def global_parameter_name(name: str, model: GPTModel) -> str:
    """The parameter's name in the unsplit model: global layer number, tied output weight = embedding."""
    match = _LAYER_INDEX.match(name)
    if match:
        global_index = model.decoder.layers[int(match.group(1))].layer_number - 1
        return f"decoder.layers.{global_index}.{name[match.end():]}"
    if name == "output_layer.weight" and model.share_embeddings_and_output_weights:
        return "embedding.word_embeddings.weight"
    return name


def _full_value(global_name: str, shape, config: TransformerConfig, seed: int) -> torch.Tensor:
    """Megatron's initialization scheme, drawn from a generator keyed by (seed, name)."""
    if len(shape) == 1:
        return torch.zeros(shape) if global_name.endswith("bias") else torch.ones(shape)
    std = config.init_method_std
    if global_name.endswith(_OUTPUT_PROJECTIONS):
        std = std / (2.0 * config.num_layers) ** 0.5
    generator = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(global_name.encode())) % 2**63)
    return torch.empty(shape).normal_(0.0, std, generator=generator)


def _tensor_parallel_slice(full: torch.Tensor, param, tp_rank: int, tp_size: int, gated: bool) -> torch.Tensor:
    dim = param.partition_dim
    if gated:  # a SwiGLU fc1 shard holds [gate_r; up_r], not a contiguous block of [gate; up]
        return torch.cat([half.chunk(tp_size, dim)[tp_rank] for half in full.chunk(2, dim)], dim)
    return full.chunk(tp_size, dim)[tp_rank]


@torch.no_grad()
def initialize_weights(model: GPTModel, config: TransformerConfig, seed: int) -> None:
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    for name, param in model.named_parameters():
        global_name = global_parameter_name(name, model)
        split = getattr(param, "tensor_model_parallel", False) and tp_size > 1
        shape = list(param.shape)
        if split:
            shape[param.partition_dim] *= tp_size
        value = _full_value(global_name, shape, config, seed)
        if split:
            gated = config.gated_linear_unit and ".linear_fc1." in global_name
            value = _tensor_parallel_slice(value, param, tp_rank, tp_size, gated)
        param.copy_(value)



def params_norm(model_chunks, device: torch.device) -> float:
    """The L2 norm of the model's parameters as Megatron-LM's --log-params-norm reports it: each parameter counted
    once over the tensor-parallel ranks and pipeline stages (the last stage's copy of a tied embedding left out).
    A collective over the model-parallel group."""
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
    from megatron.core.transformer.module import param_is_not_shared

    squares = torch.zeros(1, dtype=torch.float32, device=device)
    for chunk in model_chunks:
        for param in chunk.parameters():
            if param_is_not_shared(param) and param_is_not_tensor_parallel_duplicate(param):
                squares += torch.linalg.vector_norm(param.detach(), dtype=torch.float32).square().to(device)
    torch.distributed.all_reduce(squares, group=parallel_state.get_model_parallel_group())
    return squares.sqrt().item()
