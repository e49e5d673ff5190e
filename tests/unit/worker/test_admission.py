"""What the pool learns: memory="auto" peaks and the batch sizes that fit after an OOM split."""

from __future__ import annotations

from celery_gpu.worker.admission import HEADROOM, MemoryBook


def test_auto_reserves_a_whole_device_until_a_peak_is_seen() -> None:
    book = MemoryBook()
    assert book.reserve("t", None, 16 * 2**30) == 16 * 2**30
    book.learn("t", 100 * 2**20)
    assert book.reserve("t", None, 16 * 2**30) == int(100 * 2**20 * HEADROOM)
    book.learn("t", 50 * 2**20)  # the largest peak is kept
    assert book.reserve("t", None, 16 * 2**30) == int(100 * 2**20 * HEADROOM)


def test_batched_peaks_are_per_item_scaled_to_the_batch() -> None:
    book = MemoryBook()
    book.learn("b", 10 * 2**20)
    assert book.reserve("b", 64, 80 * 2**30) == int(64 * 10 * 2**20 * HEADROOM)


def test_a_device_that_cannot_measure_reserves_nothing_after_the_first_run() -> None:
    book = MemoryBook()
    book.learn("t", None)
    assert book.reserve("t", None, 2**30) == 0


def test_caps_are_per_task_and_device() -> None:
    book = MemoryBook()
    assert book.cap("b", "fake:0", 64) == 64
    book.fit("b", "fake:0", 8)
    book.fit("b", "fake:1", 0)  # nothing fit: no cap (single items fail on their own)
    assert book.cap("b", "fake:0", 64) == 8
    assert book.cap("b", "fake:1", 64) == 64
    assert book.cap("other", "fake:0", 64) == 64
    assert book.cap("b", "fake:0", 4) == 4
    assert book.info()["batch_caps"] == {"b@fake:0": 8}
