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


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_cap_grows_back_by_doubling_after_each_quiet_period() -> None:
    clock = Clock()
    book = MemoryBook(quiet=300, clock=clock)
    book.fit("b", "fake:0", 8)
    assert book.cap("b", "fake:0", 64) == 8
    clock.now += 299
    assert book.cap("b", "fake:0", 64) == 8, "not quiet long enough yet"
    clock.now += 1
    assert book.cap("b", "fake:0", 64) == 16
    clock.now += 300
    assert book.cap("b", "fake:0", 64) == 32
    book.fit("b", "fake:0", 24)  # another split: the cap is what fit, and the quiet period starts again
    clock.now += 299
    assert book.cap("b", "fake:0", 64) == 24
    clock.now += 301 + 300  # two more periods: 48, then 96 -> the whole batch, and the cap is gone
    assert book.cap("b", "fake:0", 64) == 64
    assert book.info()["batch_caps"] == {}
    clock.now += 1
    assert book.cap("b", "fake:0", 64) == 64


def test_without_a_quiet_period_a_cap_stays() -> None:
    clock = Clock()
    book = MemoryBook(quiet=0, clock=clock)
    book.fit("b", "fake:0", 8)
    clock.now += 10**6
    assert book.cap("b", "fake:0", 64) == 8
