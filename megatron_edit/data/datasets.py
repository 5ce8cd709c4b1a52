"""Train/validation/test datasets built by megatron-core's BlendedMegatronDatasetBuilder."""
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDatasetConfig, MockGPTDataset


def dataset_sizes(args):
    """Samples each split must provide, as Megatron-LM computes them for --train-iters."""
    evaluations = args.train_iters // args.eval_interval + 1
    return [
        args.train_iters * args.global_batch_size,
        evaluations * args.eval_iters * args.global_batch_size,
        args.eval_iters * args.global_batch_size,
    ]


def build_datasets(args, tokenizer):
    """(train, valid, test) datasets; every rank builds them (rank 0 first, so index caches are shared)."""
    config = GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        split=args.split,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    return BlendedMegatronDatasetBuilder(MockGPTDataset, dataset_sizes(args), lambda: True, config).build()
