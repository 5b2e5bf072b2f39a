"""loadtest/budget.py puts py-spy's samples in the steps of docs/DESIGN.md's budget table: each sample in
the step of its innermost frame that names one, idle threads left out, SubmitBatch's own lines split
into request side and response side."""

from __future__ import annotations

import pathlib

from loadtest import budget


def _raw(tmp_path: pathlib.Path, lines: list[str]) -> pathlib.Path:
    path = tmp_path / "profile.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_sample_goes_to_the_step_of_its_innermost_named_frame(tmp_path):
    loop = "run (asyncio/runners.py:118);run_until_complete (uvloop/loop.pyx:1511)"
    counts = budget.classify(
        _raw(
            tmp_path,
            [
                # the rules called from the apply loop: counted as rules, not as the loop around them
                f"{loop};Pipeline._prepare (processor/pipeline.py:540);Pipeline._apply_batch (processor/pipeline.py:850);"
                "Pipeline._apply_with_rules (processor/pipeline.py:1020);consume (processor/rules.py:776);"
                "_checked (processor/rules.py:742) 7",
                # the JSON of an idempotency record inside _prepare: JSON, not the apply loop
                f"{loop};Pipeline._prepare (processor/pipeline.py:530);to_json (processor/domain.py:50);"
                "encode (json/encoder.py:200) 3",
                # asyncpg encoding rows inside the batch's write
                f"{loop};Store.write_batch (processor/store.py:823);Store._write (processor/store.py:890);"
                "copy_records_to_table (asyncpg/connection.py:1000) 5",
                # upb decoding, seen only with --native
                f"{loop};0x7f00 (grpc/_cython/cygrpc.cpython-311-x86_64-linux-gnu.so);upb_Decode (message.so) 2",
                # nothing named: other
                "PyEval_EvalFrameDefault (libpython3.11.so.1.0) 1",
            ],
        )
    )
    assert counts == {
        "program rules in Python (rules.py, program.py)": 7,
        "JSON idempotency records": 3,
        "asyncpg: encode + COPY/execute (write_batch)": 5,
        "protobuf decode/encode (upb)": 2,
        budget.OTHER: 1,
    }


def test_idle_threads_are_not_counted(tmp_path):
    counts = budget.classify(
        _raw(
            tmp_path,
            [
                "0x7f98 (grpc/_cython/cygrpc.cpython-311-x86_64-linux-gnu.so);epoll_wait (libc.so.6) 554",
                "Thread.run (threading.py:975);PyThread_acquire_lock_timed (libpython3.11.so.1.0);"
                "0x7f98 (libc.so.6);0x7f97 (libc.so.6) 453",
                "Pipeline.enqueue (processor/pipeline.py:335);Pipeline._enqueue (processor/pipeline.py:349) 4",
            ],
        )
    )
    assert counts == {"pipeline queueing / futures / answers": 4}


def test_submit_batch_lines_after_its_answers_are_awaited_are_response_building(tmp_path):
    respond = budget._respond_line()
    counts = budget.classify(
        _raw(
            tmp_path,
            [
                f"PointsServicer.SubmitBatch (processor/servicer.py:{respond - 5}) 2",
                f"PointsServicer.SubmitBatch (processor/servicer.py:{respond + 2}) 3",
            ],
        )
    )
    assert counts == {
        "servicer validation + Operation objects": 2,
        "response building (results, SubmitBatchResponse)": 3,
    }
    source = (budget.ROOT / "processor" / "servicer.py").read_text().splitlines()
    assert budget._RESPOND_MARK in source[respond - 1] and "await" in source[respond - 1]
