"""Pretrain a GPT model, in Megatron-LM's shape: model provider, forward step, loss function, datasets provider.

    torchrun --nproc-per-node 4 pretrain_gpt.py --tensor-model-parallel-size 2 --num-layers 2 ... --mock-data
"""
from functools import partial

import megatron_edit  # noqa: F401  (first: it quiets megatron-core's import-time warnings)
import torch
from megatron.core.models.gpt import GPTModel

from megatron_edit.data.datasets import build_datasets
from megatron_edit.model import layer_spec
from megatron_edit.training import pretrain


def model_provider(args, config, pre_process=True, post_process=True) -> GPTModel:
    """The GPT piece of one pipeline stage: the embedding on the first stage, the output layer on the last."""
    return GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(args, config),
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_base=args.rotary_base,
    )


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Sum of masked token losses and the token count; the schedule divides, the log reports their ratio."""
    losses = output_tensor.float().view(-1)
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss.detach(), num_tokens.detach().float()])
    return loss, num_tokens, {"lm loss": report}


def forward_step(data_iterator, model: GPTModel):
    batch = next(data_iterator)
    output_tensor = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output_tensor, partial(loss_func, batch["loss_mask"])


def train_valid_test_datasets_provider(args, tokenizer):
    return build_datasets(args, tokenizer)


if __name__ == "__main__":
    pretrain(train_valid_test_datasets_provider, model_provider, forward_step)
