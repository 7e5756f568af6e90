"""Failures: an exception on one rank ends the whole job quickly with one traceback, never a hang."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

FIXTURES = str(Path(__file__).parent / "fixtures")


@pytest.mark.distributed
@pytest.mark.timeout(200)
def test_exception_on_rank_1_at_step_5_ends_job_with_one_traceback(horovodrun):
    t0 = time.monotonic()
    res = horovodrun(["--model", "faulty_model:factory", "--gen-rows", "4000"], timeout=150,
                     env={"PYTHONPATH": FIXTURES, "FAULTY_RANK": "1", "FAULTY_STEP": "5"})
    elapsed = time.monotonic() - t0
    assert res.returncode != 0
    errors = [line for line in res.output.splitlines()
              if line.endswith("RuntimeError: injected failure in the user model at step 5")]
    assert len(errors) == 1 and errors[0].startswith("[1]"), res.output[-4000:]
    tracebacks = [line for line in res.output.splitlines() if line.endswith("Traceback (most recent call last):")]
    rank_tracebacks = [line for line in tracebacks if line.startswith("[")]
    assert len(rank_tracebacks) == 1 and rank_tracebacks[0].startswith("[1]"), res.output[-4000:]
    assert "rank 0 stopped because another rank failed: rank 1 on localhost exited with status 1; see its " \
           "traceback above" in res.ranks.get(0, "")
    assert elapsed < 90, f"took {elapsed:.0f}s: the job hung instead of stopping"


@pytest.mark.distributed
@pytest.mark.timeout(200)
def test_a_rank_killed_by_a_signal_is_named_with_its_host_and_signal(horovodrun):
    res = horovodrun(["--model", "faulty_model:factory", "--gen-rows", "4000"], timeout=150,
                     env={"PYTHONPATH": FIXTURES, "FAULTY_RANK": "1", "FAULTY_STEP": "5", "FAULTY_SIGNAL": "9"})
    assert res.returncode != 0
    assert "Process 1 exit with status code 137" in res.output  # horovodrun sees the rank end as it did
    rank_lines = [line for line in res.output.splitlines()
                  if line.startswith("[") and ("Traceback" in line or "WARNING" in line or "error:" in line)
                  # horovodrun stops the survivors with SIGTERM once a rank failed: noted, if in time
                  and "SIGTERM received" not in line]
    assert rank_lines == ["[0]<stderr>:dtrain: error: rank 0 stopped because another rank failed: rank 1 on "
                          "localhost was killed by SIGKILL; rerun the same command to resume from the last "
                          "checkpoint"], res.output[-4000:]
