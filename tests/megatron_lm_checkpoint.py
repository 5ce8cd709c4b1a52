"""Writes a checkpoint the way Megatron-LM's pretrain_gpt.py does with --ckpt-format torch_dist and --transformer-impl
local (or transformer_engine: see TE_LAYER_KEYS), from megatron-core alone (of megatron_edit only the layer that lets megatron-core run on a CPU): a GPTModel trained a few Adam steps through megatron-core's DDP
and optimizer, its sharded state dict and the optimizer's under Megatron-LM's top-level keys (args with Megatron-LM's
names, checkpoint_version, iteration, model, optimizer, opt_param_scheduler counting samples, rng_state in
Megatron-LM's per-DP-rank list, num_floating_point_operations_so_far), iter_XXXXXXX/ and
latest_checkpointed_iteration.txt. It also dumps the parameters it saved, by name, for the test to compare.

    torchrun --nproc-per-node 1 tests/megatron_lm_checkpoint.py --save DIR --dump FILE [--transformer-impl IMPL]
"""
import argparse
import os
import pickle
import random

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer import TransformerConfig

from megatron_edit.platform import enable_cpu_compat

# tests/launcher.py's TINY_GPT, as Megatron-LM's arguments name it.
ARCHITECTURE = dict(num_layers=4, hidden_size=64, ffn_hidden_size=256, num_attention_heads=4,
                    group_query_attention=False, num_query_groups=1, max_position_embeddings=32, seq_length=32,
                    padded_vocab_size=512, swiglu=False, normalization="LayerNorm",
                    position_embedding_type="learned_absolute", untie_embeddings_and_output_weights=False,
                    add_bias_linear=True)
GLOBAL_BATCH, ITERATIONS, LR = 8, 3, 1e-3
# A transformer layer's state as megatron-core's Transformer Engine spec saves it (get_gpt_layer_with_transformer_engine_
# spec: TELayerNormColumnParallelLinear holds the layer norm before it as layer_norm_*, TERowParallelLinear, and
# TEDotProductAttention saves nothing without a learnable softmax offset), each TE module with its _extra_state.
TE_LAYER_KEYS = sorted(f"{module}.{name}" for module, names in [
    ("self_attention.linear_qkv", ["layer_norm_weight", "layer_norm_bias", "weight", "bias", "_extra_state"]),
    ("self_attention.linear_proj", ["weight", "bias", "_extra_state"]),
    ("mlp.linear_fc1", ["layer_norm_weight", "layer_norm_bias", "weight", "bias", "_extra_state"]),
    ("mlp.linear_fc2", ["weight", "bias", "_extra_state"])] for name in names)


def as_transformer_engine_saves_it(model_state: dict) -> dict:
    """The model's sharded state as written with --transformer-impl transformer_engine: the same keys (megatron-core's
    local layers save under TE's names), each _extra_state holding what TE's modules hold (its FP8 scaling state,
    pickled into a uint8 tensor; an empty one without FP8)."""
    saved_as = {entry.key for entry in model_state.values()}  # the checkpoint's keys, layers stacked under one
    layer_keys = sorted(key[len("decoder.layers."):] for key in saved_as if key.startswith("decoder.layers."))
    assert layer_keys == TE_LAYER_KEYS, layer_keys
    fp8_state = {"scale_fwd": torch.ones(3), "amax_history_fwd": torch.zeros(16, 3),
                 "extra_fp8_variables": {"num_gemms": 1, "fp8_checkpoint": True}}
    for key, entry in model_state.items():
        if key.endswith("._extra_state"):
            entry.data = torch.frombuffer(bytearray(pickle.dumps(fp8_state)), dtype=torch.uint8)
    return model_state


def megatron_lm_args(world_size: int) -> argparse.Namespace:
    """What Megatron-LM pickles as `args` (the fields a loader reads; Megatron-LM keeps many more)."""
    return argparse.Namespace(**ARCHITECTURE, tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                              data_parallel_size=world_size, world_size=world_size, bf16=False, fp16=False,
                              use_distributed_optimizer=False, transformer_impl="local", ckpt_format="torch_dist",
                              micro_batch_size=GLOBAL_BATCH // world_size, global_batch_size=GLOBAL_BATCH,
                              train_iters=10, lr=LR, min_lr=0.0, iteration=ITERATIONS, no_save_optim=False,
                              no_save_rng=False, vocab_size=511, make_vocab_size_divisible_by=128)


def megatron_lm_rng_state() -> dict:
    return {"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
            "torch_rng_state": torch.get_rng_state(), "cuda_rng_state": None,
            "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--save", required=True)
    parser.add_argument("--dump", required=True)
    parser.add_argument("--transformer-impl", choices=["local", "transformer_engine"], default="local")
    options = parser.parse_args()
    enable_cpu_compat()
    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    config = TransformerConfig(num_layers=4, hidden_size=64, num_attention_heads=4, hidden_dropout=0.0,
                               attention_dropout=0.0, use_cpu_initialization=True, activation_func=F.gelu,
                               masked_softmax_fusion=False, bias_activation_fusion=False, bias_dropout_fusion=False,
                               gradient_accumulation_fusion=False)
    model = GPTModel(config, get_gpt_layer_local_spec(), vocab_size=512, max_sequence_length=32,
                     share_embeddings_and_output_weights=True, position_embedding_type="learned_absolute")
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(), model)
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=LR, min_lr=0.0, weight_decay=0.01), [ddp])
    scheduler = OptimizerParamScheduler(optimizer, init_lr=0.0, max_lr=LR, min_lr=0.0, lr_warmup_steps=0,
                                        lr_decay_steps=10 * GLOBAL_BATCH, lr_decay_style="linear", start_wd=0.01,
                                        end_wd=0.01, wd_incr_steps=10 * GLOBAL_BATCH, wd_incr_style="constant")
    generator = torch.Generator().manual_seed(dist.get_rank())
    micro_batch = GLOBAL_BATCH // dist.get_world_size()
    for _ in range(ITERATIONS):
        tokens = torch.randint(0, 511, (micro_batch, 33), generator=generator)
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        position_ids = torch.arange(32).expand(micro_batch, 32)
        losses = ddp(tokens[:, :-1], position_ids, None, labels=tokens[:, 1:])
        losses.float().mean().backward()
        finalize_model_grads([ddp])
        optimizer.step()
        scheduler.step(increment=GLOBAL_BATCH)  # Megatron-LM counts the schedule in samples
    args = megatron_lm_args(dist.get_world_size())
    args.transformer_impl = options.transformer_impl
    rng = [None] * dist.get_world_size()
    dist.all_gather_object(rng, megatron_lm_rng_state())
    model_state = model.sharded_state_dict()
    if options.transformer_impl == "transformer_engine":
        model_state = as_transformer_engine_saves_it(model_state)
    state = {"args": args, "checkpoint_version": 3.0, "iteration": ITERATIONS, "model": model_state}
    state["optimizer"] = optimizer.sharded_state_dict(state)
    state["opt_param_scheduler"] = scheduler.state_dict()
    state["rng_state"] = ShardedObject("rng_state", rng, (1, 1), (0, 0), replica_id=dist.get_rank())
    state["num_floating_point_operations_so_far"] = 0.0
    directory = os.path.join(options.save, f"iter_{ITERATIONS:07d}")
    if dist.get_rank() == 0:
        os.makedirs(directory, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(state, directory)
    if dist.get_rank() == 0:
        with open(os.path.join(options.save, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write(str(ITERATIONS))
        torch.save({name: p.detach().clone() for name, p in model.named_parameters()}, options.dump)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
