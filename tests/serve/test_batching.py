"""The micro-batcher groups concurrent items, keeps order, and hands errors to every waiting caller."""

from __future__ import annotations

import threading
import time

import pytest

from cxrnn.serve.batching import MicroBatcher, QueueFullError


def test_concurrent_items_are_grouped_and_answered_in_order():
    seen_sizes = []

    def double(items):
        seen_sizes.append(len(items))
        return [2 * x for x in items]

    batcher = MicroBatcher(double, max_batch=8, max_wait_ms=200)
    try:
        futures = [batcher.submit(i) for i in range(8)]
        assert [f.result(timeout=10) for f in futures] == [2 * i for i in range(8)]
    finally:
        batcher.close()
    assert max(seen_sizes) > 1, "items submitted together were not grouped"
    assert sum(seen_sizes) == 8
    assert batcher.stats.items == 8 and batcher.stats.largest_batch == max(seen_sizes)


def test_batch_of_one_disables_grouping():
    sizes = []
    batcher = MicroBatcher(lambda items: sizes.append(len(items)) or list(items), max_batch=1, max_wait_ms=50)
    try:
        assert [f.result(timeout=10) for f in [batcher.submit(i) for i in range(5)]] == list(range(5))
    finally:
        batcher.close()
    assert sizes == [1] * 5


def test_an_error_reaches_every_item_of_its_batch_and_the_worker_survives():
    def fail_on_negative(items):
        if any(x < 0 for x in items):
            raise ValueError("negative")
        return list(items)

    batcher = MicroBatcher(fail_on_negative, max_batch=4, max_wait_ms=100)
    try:
        bad = [batcher.submit(x) for x in (1, -1)]
        for f in bad:
            with pytest.raises(ValueError, match="negative"):
                f.result(timeout=10)
        assert batcher.submit(3).result(timeout=10) == 3
    finally:
        batcher.close()


def test_full_queue_is_refused():
    release = threading.Event()

    def slow(items):
        release.wait(10)
        return list(items)

    batcher = MicroBatcher(slow, max_batch=1, max_wait_ms=0, max_queue=2)
    try:
        first = batcher.submit(0)
        time.sleep(0.2)  # the worker holds the first item
        batcher.submit(1)
        batcher.submit(2)
        with pytest.raises(QueueFullError):
            batcher.submit(3)
        release.set()
        assert first.result(timeout=10) == 0
    finally:
        release.set()
        batcher.close()


def test_cancelled_items_are_skipped():
    ran = []
    gate = threading.Event()

    def record(items):
        gate.wait(10)
        ran.extend(items)
        return list(items)

    batcher = MicroBatcher(record, max_batch=1, max_wait_ms=0)
    try:
        first = batcher.submit("first")
        time.sleep(0.2)
        doomed = batcher.submit("doomed")
        assert doomed.cancel()
        gate.set()
        assert first.result(timeout=10) == "first"
        assert batcher.submit("after").result(timeout=10) == "after"
    finally:
        gate.set()
        batcher.close()
    assert "doomed" not in ran
