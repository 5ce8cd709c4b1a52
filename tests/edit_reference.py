"""A plain single-process re-implementation of EDiT's update, to check `--dp-mode edit` against.

M model copies, each trained on the samples its S data-parallel ranks would read. Iterations <= W average
the replicas' gradients (synchronous DP); later iterations are local. Every H local steps, at the start of
the next iteration, and once more after the last one: d = mean over replicas of (anchor - theta), SGD-Nesterov on
the anchor, theta <- anchor. With --sync-delay-steps tau, a sync only records each replica's d_r and the mean d;
tau iterations later, at the start of the iteration: anchor' = outer(anchor, d), theta_r <- anchor' + (theta_r -
(anchor - d_r)). The last sync is never delayed (an outstanding one is applied first). With --sync-fragments F, the
parameters of each fragment's modules (the plan of megatron_edit/dp/edit/fragments.py) do all of this on their own
schedule: fragment f's first sync after f x H / F local steps (f=0: H), then every H. With
--local-sgd-initial-sync-interval H0 the whole model first syncs after H0, 2 H0, 4 H0, ... more local steps while
that interval is below H, then every H.
Same model, initialization and data as pretrain_gpt.py; no process groups, no sharding, no megatron optimizer.

    python tests/edit_reference.py <pretrain flags> --replicas M --shard-size S --dump PATH
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import megatron_edit  # noqa: E402,F401
import torch  # noqa: E402

import pretrain_gpt  # noqa: E402
from megatron_edit.arguments import parse_args  # noqa: E402
from megatron_edit.data.tokenizers import build_tokenizer  # noqa: E402
from megatron_edit.initialize import initialize_megatron  # noqa: E402
from megatron_edit.dp.edit.fragments import plan_fragments  # noqa: E402
from megatron_edit.dp.edit.module_sync import sync_modules  # noqa: E402
from megatron_edit.model import initialize_weights, transformer_config_from_args  # noqa: E402


def add_reference_args(parser):
    parser.add_argument("--replicas", type=int, required=True)
    parser.add_argument("--shard-size", type=int, required=True)
    parser.add_argument("--dump", required=True)
    return parser


def replica_samples(iteration, replica, args):
    """Indices of the samples that replica `replica`'s ranks read in `iteration` (Megatron-LM's order)."""
    dp = args.replicas * args.shard_size
    round_size = args.micro_batch_size * dp
    first = (iteration - 1) * args.global_batch_size
    samples = []
    for round_start in range(first, first + args.global_batch_size, round_size):
        for rank in range(replica * args.shard_size, (replica + 1) * args.shard_size):
            start = round_start + rank * args.micro_batch_size
            samples += range(start, start + args.micro_batch_size)
    return samples


def main():
    args = parse_args(None, world_size=1, extra_args_provider=add_reference_args)
    tokenizer = build_tokenizer(args)
    initialize_megatron(args)
    train, _, _ = pretrain_gpt.train_valid_test_datasets_provider(args, tokenizer)
    config = transformer_config_from_args(args)
    replicas = []
    for _ in range(args.replicas):  # identical copies: the initialization depends only on the seed
        replicas.append(pretrain_gpt.model_provider(args, config))
        initialize_weights(replicas[-1], config, args.seed)
    base = replicas[0]
    optimizers = [torch.optim.SGD(m.parameters(), lr=args.lr, momentum=args.sgd_momentum) for m in replicas]
    anchor = [p.detach().clone() for p in base.parameters()]
    momentum = [torch.zeros_like(p) for p in anchor]
    warmup, interval = args.local_sgd_warmup_iters, args.local_sgd_sync_interval
    mu, outer_lr = args.outer_momentum, args.outer_lr

    fragments = args.sync_fragments
    modules = sync_modules(base)
    plan = plan_fragments([(name, sum(p.numel() for p in m.parameters()), None) for name, m in modules], fragments)
    position = {id(p): i for i, p in enumerate(base.parameters())}
    fragment_params = [[position[id(p)] for name, m in modules if plan[name] == f for p in m.parameters()]
                       for f in range(fragments)]
    delayed = []  # (apply at iteration, parameter indices, mean d per parameter, d of every replica per parameter)

    @torch.no_grad()
    def issue(indices):
        locals_ = [[anchor[i] - list(m.parameters())[i] for m in replicas] for i in indices]
        return indices, [sum(ds) / len(ds) for ds in locals_], locals_

    @torch.no_grad()
    def apply(indices, means, locals_, carry_progress):
        for i, d, d_replicas in zip(indices, means, locals_):
            a = anchor[i]
            params = [list(m.parameters())[i] for m in replicas]
            issued_at = [a - d_r for d_r in d_replicas]
            momentum[i] = mu * momentum[i] + d
            a -= outer_lr * (d + mu * momentum[i] if args.outer_nesterov else momentum[i])
            for p, theta_issued in zip(params, issued_at):
                p.copy_(a + (p - theta_issued) if carry_progress else a)

    ramp_syncs = set()  # with --local-sgd-initial-sync-interval H0: the whole model after H0, 2 H0, 4 H0, ... more
    done, step = 0, args.local_sgd_initial_sync_interval or interval
    while step < interval:
        done += step
        ramp_syncs.add(done)
        step *= 2
    ramp_end = done

    for iteration in range(1, args.train_iters + 1):
        local_steps_done = iteration - 1 - warmup
        for pending in [d for d in delayed if d[0] == iteration]:
            apply(*pending[1:], carry_progress=True)
            delayed.remove(pending)
        for fragment in range(fragments):
            since_first = local_steps_done - ramp_end - fragment * interval // fragments
            in_ramp = 0 < local_steps_done <= ramp_end
            if (local_steps_done in ramp_syncs) if in_ramp else (
                    local_steps_done > 0 and since_first >= 0 and since_first % interval == 0):
                if args.sync_delay_steps:
                    delayed.append((iteration + args.sync_delay_steps, *issue(fragment_params[fragment])))
                else:
                    apply(*issue(fragment_params[fragment]), carry_progress=False)
        for replica, (model, optimizer) in enumerate(zip(replicas, optimizers)):
            optimizer.param_groups[0]["lr"] = args.lr * (args.local_sgd_lr_scale if iteration > warmup else 1.0)
            optimizer.zero_grad()
            batch = [train[i] for i in replica_samples(iteration, replica, args)]
            tokens = torch.stack([b["tokens"] for b in batch])
            losses = model(tokens, torch.stack([b["position_ids"] for b in batch]), None,
                           labels=torch.stack([b["labels"] for b in batch]))
            losses.float().mean().backward()
        if iteration <= warmup:
            with torch.no_grad():
                for grads in zip(*[[p.grad for p in m.parameters()] for m in replicas]):
                    mean = sum(grads) / len(grads)
                    for g in grads:
                        g.copy_(mean)
        for optimizer in optimizers:
            optimizer.step()
        if iteration == warmup:
            anchor = [p.detach().clone() for p in replicas[0].parameters()]
    if args.train_iters > warmup:  # training ends with a sync: every replica on one model
        for pending in delayed:
            apply(*pending[1:], carry_progress=True)
        apply(*issue(list(range(len(anchor)))), carry_progress=False)
    names = [n for n, _ in base.named_parameters()]
    torch.save([{n: p.detach().clone() for n, p in zip(names, m.parameters())} for m in replicas], args.dump)


if __name__ == "__main__":
    main()
