"""Export a Llama-style checkpoint to a Hugging Face model directory (config.json, safetensors, the tokenizer).

    python tools/export_hf.py --load runs/ckpt --output runs/hf
    python tools/export_hf.py --load runs/ckpt --output runs/hf --tokenizer-model data/pydocs/tokenizer.model

The newest complete checkpoint under --load is read in one process: a torch_dist checkpoint (it carries the run's
arguments) from any TP/PP/DP layout, which dist_checkpointing reshards to TP=PP=1. The model must be what LlamaForCausalLM
expresses: RoPE, RMSNorm, SwiGLU, no biases; anything else is refused in one line. Megatron's fused QKV weight
(per query group: its query heads, then one key and one value head) is split into q/k/v projections, and the SwiGLU
input projection ([gate; up]) into gate_proj and up_proj. The padded vocabulary is kept, so logits match position for
position.
"""
import argparse
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_edit.errors import UsageError  # noqa: E402

LLAMA_REQUIREMENTS = [  # (saved arg, value LlamaForCausalLM needs, what to say)
    ("position_embedding_type", "rope", "RoPE position embeddings (--position-embedding-type rope)"),
    ("normalization", "RMSNorm", "RMSNorm (--normalization RMSNorm)"),
    ("swiglu", True, "SwiGLU (--swiglu)"),
    ("disable_bias_linear", True, "no linear biases (--disable-bias-linear)"),
]


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load", required=True, help="checkpoint directory (its newest complete checkpoint)")
    parser.add_argument("--output", required=True, help="Hugging Face model directory to write")
    parser.add_argument("--tokenizer-model", default=None,
                        help="SentencePiece model to ship beside the weights (default: the one the run trained with)")
    return parser.parse_args(argv)


def check_llama(saved) -> None:
    missing = [say for key, value, say in LLAMA_REQUIREMENTS if getattr(saved, key, None) != value]
    if missing:
        raise UsageError(f"this checkpoint's model is not Llama-style, LlamaForCausalLM would need {', '.join(missing)}")


def newest_checkpoint(load: str) -> str:
    """The directory of the newest complete checkpoint under `load`."""
    from megatron_edit.checkpointing import find_checkpoint

    found = find_checkpoint(load)
    if found is None:
        raise UsageError(f"no complete checkpoint under {load}")
    return found[0]


def load_megatron_model(directory: str):
    """(saved args, GPTModel at TP=PP=1 on CPU holding the checkpoint's weights); starts a one-process group."""
    from megatron.core import dist_checkpointing

    from megatron_edit.checkpointing import RECORD
    from megatron_edit.initialize import initialize_megatron
    from megatron_edit.model import transformer_config_from_args, unwrap_model
    from pretrain_gpt import model_provider

    if not os.path.exists(os.path.join(directory, RECORD["torch_dist"])):
        raise UsageError(f"{directory} is a --ckpt-format torch checkpoint, which does not carry the run's "
                         "arguments; export reads --ckpt-format torch_dist checkpoints")
    saved = dist_checkpointing.load_common_state_dict(directory)["args"]
    check_llama(saved)
    args = argparse.Namespace(**vars(saved))
    args.tensor_model_parallel_size = args.pipeline_model_parallel_size = args.data_parallel_size = 1
    args.device_type, args.bf16, args.fp16 = "cpu", False, False  # weights exported in fp32
    args.transformer_impl, args.deterministic_mode = "local", False  # (checkpoints before the flag lack it)
    initialize_megatron(args)
    model = model_provider(args, transformer_config_from_args(args))
    state = dist_checkpointing.load({"model": model.sharded_state_dict()}, directory)
    unwrap_model(model).load_state_dict(state["model"])
    return saved, model.eval()


def llama_state_dict(model, saved) -> dict:
    """Hugging Face Llama parameter names and shapes from the GPTModel's state dict."""
    source = {name: value for name, value in model.state_dict().items() if not name.endswith("_extra_state")}
    heads, groups = saved.num_attention_heads, saved.num_query_groups or saved.num_attention_heads
    head_dim = saved.hidden_size // heads
    out = {"model.embed_tokens.weight": source["embedding.word_embeddings.weight"],
           "model.norm.weight": source["decoder.final_layernorm.weight"]}
    for layer in range(saved.num_layers):
        ours, theirs = f"decoder.layers.{layer}.", f"model.layers.{layer}."
        qkv = source[ours + "self_attention.linear_qkv.weight"].view(groups, (heads // groups + 2) * head_dim, -1)
        q, k, v = qkv.split([heads // groups * head_dim, head_dim, head_dim], dim=1)
        gate, up = source[ours + "mlp.linear_fc1.weight"].chunk(2, dim=0)
        out.update({
            theirs + "input_layernorm.weight": source[ours + "input_layernorm.weight"],
            theirs + "self_attn.q_proj.weight": q.reshape(heads * head_dim, -1),
            theirs + "self_attn.k_proj.weight": k.reshape(groups * head_dim, -1),
            theirs + "self_attn.v_proj.weight": v.reshape(groups * head_dim, -1),
            theirs + "self_attn.o_proj.weight": source[ours + "self_attention.linear_proj.weight"],
            theirs + "post_attention_layernorm.weight": source[ours + "pre_mlp_layernorm.weight"],
            theirs + "mlp.gate_proj.weight": gate,
            theirs + "mlp.up_proj.weight": up,
            theirs + "mlp.down_proj.weight": source[ours + "mlp.linear_fc2.weight"],
        })
    if saved.untie_embeddings_and_output_weights:
        out["lm_head.weight"] = source["output_layer.weight"]
    return {name: value.detach().float().contiguous() for name, value in out.items()}


def llama_config(saved):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=saved.padded_vocab_size, hidden_size=saved.hidden_size, intermediate_size=saved.ffn_hidden_size,
        num_hidden_layers=saved.num_layers, num_attention_heads=saved.num_attention_heads,
        num_key_value_heads=saved.num_query_groups or saved.num_attention_heads,
        head_dim=saved.hidden_size // saved.num_attention_heads, max_position_embeddings=saved.max_position_embeddings,
        rms_norm_eps=saved.norm_epsilon, rope_theta=saved.rotary_base, hidden_act="silu", attention_bias=False,
        mlp_bias=False, tie_word_embeddings=not saved.untie_embeddings_and_output_weights,
        torch_dtype="float32")


def main(argv=None):
    args = get_args(argv)
    try:
        from transformers import LlamaForCausalLM
    except ImportError:
        raise SystemExit("error: tools/export_hf.py needs transformers: pip install transformers")
    directory = newest_checkpoint(args.load)
    saved, model = load_megatron_model(directory)
    hf_model = LlamaForCausalLM(llama_config(saved))
    hf_model.load_state_dict(llama_state_dict(model, saved), strict=not hf_model.config.tie_word_embeddings)
    output = Path(args.output)
    hf_model.save_pretrained(output, safe_serialization=True)
    tokenizer = args.tokenizer_model or getattr(saved, "tokenizer_model", None)
    if tokenizer:
        shutil.copy(tokenizer, output / "tokenizer.model")
    print(f"exported {directory} to {output}/ (LlamaForCausalLM, {saved.num_layers} layers, vocabulary "
          f"{saved.padded_vocab_size}{', tokenizer.model' if tokenizer else ''})")


if __name__ == "__main__":
    main()
