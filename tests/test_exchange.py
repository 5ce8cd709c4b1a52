"""The sync exchange's codecs (megatron_edit/dp/local_sgd/exchange.py) on real gloo ranks: fp32 is a plain
all-reduce, bf16, int8, int4 and int2 land within their quantization error of the exact sum while sending 1/2, about
1/4, 1/8 and 1/16 of fp32's bytes, top-k sends its share of values with their indices and carries the rest, error
feedback carries what quantization dropped into the next exchange, and elements every tensor rank holds alike come
out alike."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_edit.dp import comm_stats
from megatron_edit.dp.local_sgd.exchange import INT8_BLOCK, QUANTIZERS, ProcessGroupTransport, SyncExchange

pytestmark = pytest.mark.slow  # every test here starts processes

NUMEL = 64 * INT8_BLOCK + 37  # not a multiple of the block or of the replica count: padding is exercised


def rank_values(rank: int) -> torch.Tensor:
    """A pseudo-gradient-like vector, different on every rank, with magnitudes spread over blocks."""
    generator = torch.Generator().manual_seed(100 + rank)
    return torch.randn(NUMEL, generator=generator) * torch.logspace(-3, 0, NUMEL)


def _exchange_twice(exchange: SyncExchange, values: torch.Tensor, replicated=()):
    first = exchange.start("module", values.clone(), replicated).wait()
    second = exchange.start("module", values.clone(), replicated).wait()
    return first, second


def _worker(rank: int, replicas: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=replicas)
    group = dist.new_group(list(range(replicas)))
    counter = comm_stats.install()
    counter.name_group(group, "sync")
    values = rank_values(rank)
    results = {}
    for dtype, feedback in [("fp32", False), ("bf16", False), ("int8", False), ("bf16", True), ("int8", True),
                            ("int4", False), ("int4", True), ("int2", True), ("topk", True)]:
        exchange = SyncExchange(ProcessGroupTransport(group), dtype, error_feedback=feedback)
        before = counter.snapshot()["sync"]
        first, second = _exchange_twice(exchange, values)
        results[dtype, feedback] = {"first": first, "second": second,
                                    "bytes": (counter.snapshot()["sync"] - before) / 2}
    replicated = [slice(0, 1000), slice(5000, 5100)]  # what every tensor rank holds alike; the rest differs
    for dtype in ("int8", "int4", "topk"):
        for tensor_rank in range(2):
            mixed = values.clone()
            mixed[1000:5000] *= 100 ** tensor_rank  # enough to change which values top-k picks
            exchange = SyncExchange(ProcessGroupTransport(group), dtype, error_feedback=True)
            results["tensor rank", dtype, tensor_rank] = _exchange_twice(exchange, mixed, replicated)
    plain = values.clone()
    dist.all_reduce(plain, group=group)
    results["all_reduce"] = plain
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 3], ids=lambda m: f"M={m}")
def exchanged(request, tmp_path_factory):
    replicas = request.param
    out_dir = tmp_path_factory.mktemp(f"exchange{replicas}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(replicas, port, str(out_dir)), nprocs=replicas, join=True)
    results = [torch.load(out_dir / f"rank{r}.pt") for r in range(replicas)]
    exact = sum(rank_values(r).double() for r in range(replicas))
    return replicas, results, exact


def block_max(vector: torch.Tensor) -> torch.Tensor:
    """Largest magnitude of each int8 block, per element (blocks as the exchange pads them)."""
    padded = torch.zeros(-(-vector.numel() // INT8_BLOCK) * INT8_BLOCK, dtype=torch.float64)
    padded[:vector.numel()] = vector.abs()
    return padded.view(-1, INT8_BLOCK).amax(dim=1).repeat_interleave(INT8_BLOCK)[:vector.numel()]


def int8_error_bound(replicas: int, exact: torch.Tensor, levels: int = 127) -> torch.Tensor:
    """Half a quantization step of every rank's block and of the summed block, per element (1% slack: a block that
    carries a residual, or a sum of quantized values, may reach a hair beyond the exact values' largest magnitude).
    levels: 127 for int8, 7 for int4."""
    steps = sum(block_max(rank_values(r).double()) for r in range(replicas)) + block_max(exact)
    return steps / (2 * levels) * 1.01


def plain_int4(vector: torch.Tensor) -> torch.Tensor:
    """Symmetric int4 rounding of each padded block, written out plainly: every value to the nearest of -7..7 steps
    of the block's largest magnitude / 7."""
    padded = torch.zeros(-(-vector.numel() // INT8_BLOCK) * INT8_BLOCK, dtype=torch.float32)
    padded[:vector.numel()] = vector
    out = torch.empty_like(padded)
    for start in range(0, padded.numel(), INT8_BLOCK):
        block = padded[start:start + INT8_BLOCK]
        step = block.abs().max() / 7.0
        out[start:start + INT8_BLOCK] = block if step == 0 else torch.round(block / step).clamp(-7, 7) * step
    return out[:vector.numel()]


def test_fp32_is_a_plain_all_reduce(exchanged):
    _, results, _ = exchanged
    for result in results:
        assert torch.equal(result["fp32", False]["first"], result["all_reduce"])


def test_every_rank_gets_the_same_sum(exchanged):
    replicas, results, _ = exchanged
    for key in [("bf16", False), ("int8", False), ("int8", True), ("int4", False), ("int4", True), ("int2", True),
                ("topk", True)]:
        for result in results[1:]:
            assert torch.equal(result[key]["first"], results[0][key]["first"]), key


def test_bf16_and_int8_are_within_their_quantization_error(exchanged):
    replicas, results, exact = exchanged
    bf16_error = (results[0]["bf16", False]["first"].double() - exact).abs()
    magnitudes = sum(rank_values(r).double().abs() for r in range(replicas)) + exact.abs()
    assert (bf16_error <= magnitudes * 2 ** -8).all()
    int8_error = (results[0]["int8", False]["first"].double() - exact).abs()
    assert (int8_error <= int8_error_bound(replicas, exact)).all()
    assert int8_error.max() > 0  # int8 is lossy here: the bound is not met trivially


def test_bf16_and_int8_send_a_half_and_about_a_quarter_of_fp32s_bytes(exchanged):
    replicas, results, _ = exchanged
    fp32 = results[0]["fp32", False]["bytes"]
    assert fp32 == pytest.approx(4 * NUMEL * 2 * (replicas - 1) / replicas)  # a ring all-reduce
    padded = -(-NUMEL // replicas) * replicas
    assert results[0]["bf16", False]["bytes"] == pytest.approx(fp32 / 2 * padded / NUMEL)
    assert 0.25 <= results[0]["int8", False]["bytes"] / fp32 <= 0.27  # int8 values + one fp32 scale per block


def test_int4_is_a_plain_blockwise_rounding_and_int2_within_its_error(exchanged):
    """Each rank's vector rounds as plain_int4 does, and the delivered sum is within half a step of every block."""
    int4 = QUANTIZERS["int4"]
    replicas, results, exact = exchanged
    values = rank_values(0)
    padded = torch.zeros(-(-NUMEL // INT8_BLOCK) * INT8_BLOCK)
    padded[:NUMEL] = values
    torch.testing.assert_close(int4.decode(int4.encode(padded))[:NUMEL], plain_int4(values),
                               rtol=0, atol=1e-6)
    int4_error = (results[0]["int4", False]["first"].double() - exact).abs()
    assert (int4_error <= int8_error_bound(replicas, exact, levels=7)).all()
    assert int4_error.max() > (results[0]["int8", False]["first"].double() - exact).abs().max()  # coarser
    # int2's step is a whole block maximum, so the re-quantized sum's block maximum (at most the sum of the ranks')
    # bounds its step rather than the exact sum's: half each rank's step, plus half their sum.
    int2_error = (results[0]["int2", True]["first"].double() - exact).abs()
    assert (int2_error <= sum(block_max(rank_values(r).double()) for r in range(replicas)) * 1.01).all()
    int2 = QUANTIZERS["int2"]  # three levels: -, 0 and + the block's largest magnitude
    assert set(int2.decode(int2.encode(padded)).view(-1, INT8_BLOCK)[0].div(padded[:INT8_BLOCK].abs().max())
               .round().tolist()) <= {-1.0, 0.0, 1.0}


def test_int4_and_int2_send_an_eighth_and_a_sixteenth_and_topk_its_fraction_with_indices(exchanged):
    replicas, results, _ = exchanged
    fp32 = results[0]["fp32", False]["bytes"]
    assert 0.125 <= results[0]["int4", False]["bytes"] / fp32 <= 0.14  # 4 bits + one fp32 scale per 256 values
    assert 0.0625 <= results[0]["int2", True]["bytes"] / fp32 <= 0.075  # 2 bits + the scales
    k = -(-NUMEL // 100)  # 1% of the values, each 2 bytes of bf16 and 4 of index, to the M-1 others
    assert results[0]["topk", True]["bytes"] == pytest.approx((replicas - 1) * k * 6)


def test_topk_sums_the_ranks_largest_values_and_carries_the_rest(exchanged):
    """The first exchange holds each rank's top 1% by magnitude (in bf16) summed, and nothing else; the second
    sends the largest of what remains plus the values again, so two exchanges together deliver more of the sum."""
    replicas, results, exact = exchanged
    expected = torch.zeros(NUMEL, dtype=torch.float64)
    k = -(-NUMEL // 100)
    for rank in range(replicas):
        values = rank_values(rank)
        top = values.abs().topk(k).indices
        expected[top] += values[top].to(torch.bfloat16).double()
    torch.testing.assert_close(results[0]["topk", True]["first"].double(), expected, rtol=0, atol=1e-6)
    both = results[0]["topk", True]["first"].double() + results[0]["topk", True]["second"].double()
    assert (both - 2 * exact).norm() < (2 * results[0]["topk", True]["first"].double() - 2 * exact).norm()


def test_error_feedback_carries_the_residual_into_the_next_exchange(exchanged):
    """Two exchanges of the same vectors: without feedback the error repeats (it doubles); with it the two sums
    together miss twice the exact sum by no more than one exchange's quantization error."""
    replicas, results, exact = exchanged
    without = results[0]["int8", False]
    assert torch.equal(without["first"], without["second"])
    with_feedback = results[0]["int8", True]
    twice_error = (with_feedback["first"].double() + with_feedback["second"].double() - 2 * exact).abs()
    assert (twice_error <= int8_error_bound(replicas, exact)).all()
    repeated_error = (2 * without["first"].double() - 2 * exact).abs()
    assert twice_error.sum() < 0.75 * repeated_error.sum()


def test_replicated_ranges_come_out_alike_whatever_the_tensor_slices_beside_them(exchanged):
    """Two tensor ranks' vectors share the replicated ranges and differ elsewhere (by 100x): quantized in blocks of
    their own, the replicated elements' sums are bit-identical on both, error feedback included."""
    _, results, _ = exchanged
    for result in results:
        for dtype in ("int8", "int4", "topk"):
            for sync in range(2):
                first, second = result["tensor rank", dtype, 0][sync], result["tensor rank", dtype, 1][sync]
                for part in (slice(0, 1000), slice(5000, 5100)):
                    assert torch.equal(first[part], second[part]), dtype
                assert not torch.equal(first[1000:5000], second[1000:5000]), dtype
