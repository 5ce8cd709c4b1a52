"""Log lines and tracker entries leave in iteration order, each once its numbers are in (training.OrderedReports)."""
from megatron_edit.training import OrderedReports


def test_a_line_whose_loss_is_still_being_reduced_holds_back_the_later_ones_until_it_is_in():
    emitted, reduced = [], {"iteration 10": False}
    reports = OrderedReports()
    reports.add(lambda: emitted.append("iteration 10"), lambda: reduced["iteration 10"])
    reports.add(lambda: emitted.append("sync at 11"))
    assert emitted == []  # the collective for iteration 10's loss is in flight
    reduced["iteration 10"] = True
    reports.flush()
    assert emitted == ["iteration 10", "sync at 11"]


def test_flush_with_wait_emits_everything_in_order():
    emitted = []
    reports = OrderedReports()
    for name in ("a", "b", "c"):
        reports.add(lambda name=name: emitted.append(name), lambda: False)
    reports.flush(wait=True)
    assert emitted == ["a", "b", "c"] and not reports.queue
