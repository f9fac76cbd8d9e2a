"""lab/gpu_check.sh, whose one run on a GPU machine may be the only one: its dry run (toy sizes, the
CPU) writes every record the moment it exists, and a run killed halfway keeps what it finished."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent  # lab/: the script runs from the repository root wherever it is


def test_the_dry_run_streams_records_and_a_kill_keeps_them(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    run = subprocess.Popen(["./gpu_check.sh", "--dry-run"], cwd=HERE, env=env,  # called in lab/
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)  # its own process group, to kill it whole
    records, seen = tmp_path / "bench.jsonl", []
    try:
        deadline = time.monotonic() + 300
        while len(seen) < 2 and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
            seen = records.read_text().splitlines() if records.exists() else []
        assert run.poll() is None, "the run ended before two records were on disk"
        assert len(seen) >= 2, "no records while the run went on"
    finally:
        os.killpg(run.pid, signal.SIGKILL)  # as a machine's time running out would
        run.wait()
    kept = [json.loads(line) for line in records.read_text().splitlines()]  # every line whole
    assert len(kept) >= 2 and kept[0]["kind"] == "prefill" and "seconds" in kept[0]
    assert all(r["gpu_seconds"] is None for r in kept if r["kind"] == "prefill")  # no CUDA here
    assert "passed" in (tmp_path / "tests.log").read_text()  # the tests' log came first
    assert not (tmp_path / "bench.json").exists()  # the summary is written at the end only


def test_bench_refuses_a_time_limit_that_is_not_positive(capsys):
    import pytest
    from lab import bench
    for flag in ("--timeout", "--deadline"):
        with pytest.raises(SystemExit) as stop:
            bench.parse_args([flag, "0"])
        assert stop.value.code == 2
        assert "must be positive seconds" in capsys.readouterr().err


def test_the_bench_warm_up_reaches_the_blocks_that_select():
    """A LongHeads warm-up longer than the budget (chunk_size x num_chunks), so that the timed
    prefill pays none of the selecting blocks' one-time costs; full attention's stays short."""
    from lab import bench
    assert bench.warmup_tokens("longheads", 32768, 256, 16) > 256 * 16
    assert bench.warmup_tokens("longheads", 2048, 256, 16) == 2048  # never past the prompt
    assert bench.warmup_tokens("full", 32768, 256, 16) == bench.WARMUP_TOKENS


def test_the_gpu_check_times_offload_at_8k_only(monkeypatch):
    """gpu_check.sh's GPU run passes --offload --offload-max 8192; bench then measures the
    offloaded prefill at 8192 tokens and at no longer length (the dry run cannot: no CUDA)."""
    from lab import bench
    script = (HERE / "gpu_check.sh").read_text()
    assert 'offload="--offload --offload-max 8192"' in script and "$offload" in script
    args = bench.parse_args(["--lengths", "8192", "32768", "--decode-lengths",
                             "--attention-lengths", "--offload-max", "8192"])
    args.offload = True  # as --offload --device cuda would set it
    calls = []
    monkeypatch.setattr(bench, "child", lambda args, kind, attention, length, setting=None:
                        calls.append((kind, attention, length)) or {})
    bench.run(args)
    assert [c for c in calls if c[1] == "offload"] == [("prefill", "offload", 8192)]
    assert ("prefill", "longheads", 32768) in calls
