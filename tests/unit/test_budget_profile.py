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
                # a collector pass due when the committer allocated after the apply: the collector's
                f"{loop};Pipeline._prepare (processor/pipeline.py:691);balances_after (processor/events.py:370);"
                "gc_collect_main (libpython3.11.so.1.0) 4",
                # and one due inside SubmitBatch's own lines
                f"{loop};PointsServicer.SubmitBatch (processor/servicer.py:737);"
                "gc_collect_main (libpython3.11.so.1.0) 6",
            ],
        )
    )
    assert counts == {
        "cyclic garbage collector (gc passes)": 10,
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


def test_the_projector_and_the_batch_log_have_steps_of_their_own(tmp_path):
    # every task's stack holds uvloop's Handle__run: it names no step (it once put all of these in
    # "pipeline queueing")
    task = (
        "run (uvloop/__init__.py:92);Handle__run (loop.c:70935);task_step (_asynciomodule.c:2990);"
        "task_step_impl (_asynciomodule.c:2704)"
    )
    counts = budget.classify(
        _raw(
            tmp_path,
            [
                # the in-process projector's transaction, a task of its own (Store.bounded)
                f"{task};Store._as_writer.<locals>.work (processor/store.py:1250);"
                "Store.project_batches.<locals>.write (processor/store.py:1217);Store._write_many (processor/store.py:1417);"
                "Connection.copy_records_to_table (asyncpg/connection.py:1150);__Pyx_GetItemInt_Fast (protocol.c:1) 6",
                f"{task};Store._as_writer.<locals>.work (processor/store.py:1250);"
                "Store.project_batches.<locals>.write (processor/store.py:1217);Connection.fetchval (asyncpg/connection.py:1) 2",
                f"{task};Projector._run (processor/projector.py:175);Projector._project (processor/projector.py:200) 1",
                # the projector feeding the checkpoint: the checkpoint's
                f"{task};Projector._run (processor/projector.py:175);Projector._project (processor/projector.py:210);"
                "Pipeline._on_projected (processor/pipeline.py:456);Pipeline._committed (processor/pipeline.py:757) 3",
                # the answer path's payload, then its append
                f"{task};Pipeline._append (processor/pipeline.py:702);encode (processor/batch_log.py:101);"
                "_pickle_Pickler_dump (_pickle.c:4624);save (_pickle.c:4515) 4",
                f"{task};Pipeline._append.<locals>.<lambda> (processor/pipeline.py:705);append (processor/batch_log.py:166);"
                "Connection.fetchrow (asyncpg/connection.py:775) 5",
                # the committer's own frames stay the pipeline's
                f"{task};Pipeline._run (processor/pipeline.py:577);Pipeline._finish (processor/pipeline.py:740) 7",
            ],
        )
    )
    assert counts == {
        "projection (in-process): rows + asyncpg encoding": 9,
        "balance checkpoint": 3,
        "batch-log payload encoding (batch_log.encode)": 4,
        "batch-log append (fence + one row)": 5,
        "pipeline queueing / futures / answers": 7,
    }
