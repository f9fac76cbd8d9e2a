"""lab/gpu_check.sh, whose one run on a GPU machine may be the only one: its dry run (toy sizes, the
CPU) writes every record the moment it exists, and a run killed halfway keeps what it finished."""
import json
import os
import re
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
    assert "float32 matmul precision" in (tmp_path / "versions.txt").read_text()  # first of all
    assert len(list((tmp_path / "logs").glob("prefill-*.log"))) >= 2  # each child's stderr
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


def gpu_plan(gib):
    """gpu_check.sh --plan against a card of `gib` GiB: its time plan's total, and one record per
    measurement the GPU run would start, with its estimate on paper."""
    env = dict(os.environ, PYTHON=sys.executable, GPU_MEMORY_GIB=str(gib))
    done = subprocess.run(["./gpu_check.sh", "--plan"], cwd=HERE, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    total = int(re.search(r"= (\d+) s of 480", done.stdout).group(1))
    return total, [json.loads(x) for x in done.stdout.splitlines() if x.startswith("{")]


def test_the_gpu_run_fits_an_h100_on_paper_and_leaves_a_minute():
    """The real plan of gpu_check.sh's GPU run (its own bench arguments), on a 78 GiB card: every
    measurement it starts is estimated (lab.bench --estimate-memory's arithmetic) under 90 % of
    the card, whole or in pieces; the one that fits neither way, LongHeads at 131072 tokens not
    offloaded (keys and values 68.7 GB + weights 13.5 GB), is skipped with those numbers. Its
    steps' limits leave at least 60 s of its 8 minutes. And the report's record of the plan is
    this plan."""
    total, planned = gpu_plan(78)
    assert total <= 420, total
    fit = 0.9 * 78 * 2**30
    assert len(planned) == 10 and all(r["fit_bytes"] <= fit for r in planned), planned
    for r in planned:
        assert (r["estimate_bytes"] <= fit) == (r["skip"] is None), r
    skipped = [r for r in planned if r["skip"]]
    assert [(r["attention"], r["length"]) for r in skipped] == [("longheads", 131072)]
    assert "kv 68.7" in skipped[0]["skip"] and "weights 13.5" in skipped[0]["skip"]
    record = (HERE / "results" / "plan-gpu-check-78gib.txt").read_text().splitlines()
    assert planned == [json.loads(x) for x in record if x.startswith("{")], (
        "lab/RESULTS.md's plan is stale: GPU_MEMORY_GIB=78 ./lab/gpu_check.sh --plan > "
        "lab/results/plan-gpu-check-78gib.txt, then cog")


def test_on_an_h200_the_128k_prefill_runs_whole():
    """The same 128k prefill planned for a 139 GiB card: it runs whole, 95.6 GB on paper."""
    from lab import bench
    args = bench.parse_args(["--plan", "--device", "cuda", "--gpu-memory", "139", "--shape",
                             "llama2-7b", "--chunk-size", "256", "--num-chunks", "16"])
    fits = bench.plan(args, "prefill", "longheads", 131072, (256, 16))
    assert fits["skip"] is None and fits["piece"] is None, fits
    assert 95e9 < fits["estimate_bytes"] < 96e9, fits


CUDA_FAILURE = (  # how torch reports a CUDA error: the cause, then three lines of advice
    'Traceback (most recent call last):\n  File "lab/bench.py", line 250, in measure\n'
    "torch.AcceleratorError: CUDA error: an illegal memory access was encountered\n"
    "CUDA kernel errors might be asynchronously reported at some other API call, so the "
    "stacktrace below might be incorrect.\n"
    "For debugging consider passing CUDA_LAUNCH_BLOCKING=1\n"
    "Compile with `TORCH_USE_CUDA_DSA` to enable device-side assertions.\n")


def test_a_failed_measurement_keeps_its_cause_and_its_whole_stderr(tmp_path):
    """A child that dies of a CUDA error: its record names the error's line, not the advice CUDA
    prints after it, and --logs keeps its whole stderr (written as it came)."""
    from lab import bench
    args = bench.parse_args(["--logs", str(tmp_path / "logs")])
    argv = [sys.executable, "-c", f"import sys; sys.stderr.write({CUDA_FAILURE!r}); sys.exit(1)"]
    record = bench.run_child(args, argv, 60, dict(kind="prefill"), "prefill-longheads-8192")
    assert record["error"].startswith("torch.AcceleratorError: CUDA error: an illegal memory")
    log = tmp_path / "logs" / "prefill-longheads-8192.log"
    assert str(log) in record["error"] and log.read_text() == CUDA_FAILURE
    assert bench.error_line("no traceback, one line\n") == "no traceback, one line"


def test_an_unknown_option_is_refused_in_one_line(tmp_path):
    """./lab/gpu_check.sh --bogus must not start a GPU run: one line, exit 2, nothing written."""
    env = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=sys.executable)
    done = subprocess.run(["./gpu_check.sh", "--bogus"], cwd=HERE, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == "", done.stdout
    assert done.stderr.count("\n") == 1 and "--dry-run, --plan" in done.stderr
    assert not (tmp_path / "out").exists()
