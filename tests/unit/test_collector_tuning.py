"""pipeline.tune_collector (called by recover, beside gc.freeze): young passes after
COLLECTOR_YOUNG_PASS_OBJECTS new objects, full passes at most every COLLECTOR_MIDDLE_PASSES_PER_FULL_PASS
passes of the middle generation, whose threshold is kept; every pass timed into points_gc_pause_seconds
by its generation, with one callback however often it is called. No database."""

from __future__ import annotations

import gc

from processor import metrics, pipeline


def _passes(generation: int) -> float:
    return metrics.registry.get_sample_value("points_gc_pause_seconds_count", {"generation": str(generation)}) or 0.0


def test_young_passes_rarer_full_passes_rarer_and_the_middle_threshold_kept():
    before = gc.get_threshold()
    try:
        gc.set_threshold(900, 12, 10)
        pipeline.tune_collector()
        wanted = (pipeline.COLLECTOR_YOUNG_PASS_OBJECTS, 12, pipeline.COLLECTOR_MIDDLE_PASSES_PER_FULL_PASS)
        assert gc.get_threshold() == wanted
        assert pipeline.COLLECTOR_YOUNG_PASS_OBJECTS > 700  # rarer than Python's default
        assert pipeline.COLLECTOR_MIDDLE_PASSES_PER_FULL_PASS > 10
        pipeline.tune_collector()  # again (a resync recovers again): the same
        assert gc.get_threshold() == wanted
    finally:
        gc.set_threshold(*before)


def test_each_pass_is_timed_once_by_its_generation():
    before = gc.get_threshold()
    try:
        pipeline.tune_collector()
        pipeline.tune_collector()
        assert gc.callbacks.count(pipeline._time_collector_pass) == 1
        counts = [_passes(generation) for generation in range(3)]
        gc.collect(1)
        assert [_passes(generation) for generation in range(3)] == [counts[0], counts[1] + 1, counts[2]]
        gc.collect()
        assert _passes(2) == counts[2] + 1
    finally:
        gc.set_threshold(*before)
