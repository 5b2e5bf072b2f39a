"""pipeline.tune_collector (called by recover, beside gc.freeze): the collector's full passes at most
every COLLECTOR_MIDDLE_PASSES_PER_FULL_PASS passes of its middle generation, the younger generations'
thresholds kept as they were. No database."""

from __future__ import annotations

import gc

from processor import pipeline


def test_full_passes_are_rarer_and_the_younger_thresholds_are_kept():
    before = gc.get_threshold()
    try:
        gc.set_threshold(900, 12, 10)
        pipeline.tune_collector()
        assert gc.get_threshold() == (900, 12, pipeline.COLLECTOR_MIDDLE_PASSES_PER_FULL_PASS)
        assert pipeline.COLLECTOR_MIDDLE_PASSES_PER_FULL_PASS > 10  # rarer than Python's default
        pipeline.tune_collector()  # again (a resync recovers again): the same
        assert gc.get_threshold() == (900, 12, pipeline.COLLECTOR_MIDDLE_PASSES_PER_FULL_PASS)
    finally:
        gc.set_threshold(*before)
