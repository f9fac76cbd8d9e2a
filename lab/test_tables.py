"""The generated tables of lab/RESULTS.md and README.md agree with the committed records (cog), and
every record names the command that made it and the commit it ran at."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lab import tables

ROOT = Path(__file__).resolve().parent.parent
DOCS = ["lab/RESULTS.md", "README.md"]
COMMIT = re.compile(r"[0-9a-f]{7,40}(\+changes)?")
OLD_SCRIPTS = {"passkey": "python passkey.py ", "distractors": "python passkey.py ",
               "perplexity": "python perplexity.py ", "bench": "python bench.py "}
NEW_SCRIPTS = ("python passkey.py ", "python -m lab.")


def cog_check(docs, results=None):
    """cog --check from the repository root, on the records of `results` (default: lab/results)."""
    env = {**os.environ, "LONGHEADS_RESULTS": str(results)} if results else None
    return subprocess.run([sys.executable, "-m", "cogapp", "--check", *docs], cwd=ROOT,
                          capture_output=True, text=True, env=env)


def test_the_tables_are_those_of_the_records():
    out = cog_check(DOCS)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("pattern", ["distractors-*.json", "passkey-*.json"])
def test_a_changed_record_fails_the_check(tmp_path, pattern):
    """The check reads the records: a copy of them passes, and with one trial's outcome flipped
    the tables no longer match."""
    results = tmp_path / "results"
    shutil.copytree(tables.RESULTS, results)
    assert cog_check(["lab/RESULTS.md"], results).returncode == 0
    file = sorted(results.glob(pattern))[0]
    trials = json.loads(file.read_text())
    trials[0]["correct"] = not trials[0]["correct"]
    trials[0]["outcome"] = "yes" if trials[0]["correct"] else "no key"
    file.write_text(json.dumps(trials))
    out = cog_check(["lab/RESULTS.md"], results)
    assert out.returncode != 0 and "lab/RESULTS.md  (changed)" in out.stdout, out.stdout


def record_files():
    files = sorted(tables.RESULTS.glob("*.json"))
    assert {f.name.split("-")[0] for f in files} == set(OLD_SCRIPTS)  # every kind is checked
    return files


@pytest.mark.parametrize("file", record_files(), ids=lambda f: f.name)
def test_every_record_names_its_command_and_commit(file):
    """A record's command writes the very file the record is in, so that rerunning it remakes the
    file: from the repository root (lab/results/, a record made from now on, by passkey.py or a
    lab module), or, an older one, from the old top level (results/) at its commit."""
    data = json.loads(file.read_text())
    for r in data if isinstance(data, list) else [data]:
        assert COMMIT.fullmatch(r["commit"]), r["commit"]
        if f"--json lab/results/{file.name}" in r["command"]:
            assert r["command"].startswith(NEW_SCRIPTS)
        else:
            assert f"--json results/{file.name}" in r["command"]
            assert r["command"].startswith(OLD_SCRIPTS[file.name.split("-")[0]])
            assert "+changes" not in r["commit"]  # a committed record file's own commit


def test_commands_run_as_written_or_name_their_commit():
    new = dict(command="python -m lab.needles --len 8192 --json lab/results/d.json", commit="1")
    old = dict(command="python passkey.py --len 8192 --json results/d.json", commit="0704b15")
    assert tables.command_line(new) == new["command"]
    assert tables.command_line(old) == old["command"] + "  # (at 0704b15)"
    assert tables.bench_command().endswith(f"  # (at {tables.bench()['commit']})")


@pytest.mark.parametrize("pattern, commands", [
    ("diagnose-*.txt", ("python passkey.py --diagnose ", "python -m lab.needles --diagnose ")),
    ("estimate-*.txt", ("python bench.py --estimate", "python -m lab.bench --estimate")),
    ("plan-*.txt", ("GPU_MEMORY_GIB=78 ./lab/gpu_check.sh --plan",))])
def test_every_printout_names_its_command_and_commit(pattern, commands):
    """A diagnosis, an estimate or a plan is kept as printed, "$ command  # (at commit)" its first
    line (lab.needles --diagnose, lab.bench --estimate-memory and gpu_check.sh --plan print that
    line themselves)."""
    files = sorted(tables.RESULTS.glob(pattern))
    assert files
    for file in files:
        first = file.read_text().split("\n")[0]
        assert first.startswith(tuple("$ " + c for c in commands)), first
        assert re.search(r"  # \(at [0-9a-f]{7,40}(\+changes)?\)$", first), first


def test_a_record_of_the_demo_fills_a_passkey_table(tmp_path, monkeypatch):
    """passkey.py's records leave out the prompt's fields (the paper's prompt, one key): they
    count in the paper's-prompt tables as lab/needles.py's records do."""
    demo = dict(length=32768, depth=0.5, key=12345, output=" 12345.", correct=True, seconds=9.0,
                attention="longheads", command="python passkey.py --len 32768 --json "
                "lab/results/passkey-demo.json", commit="abc1234", model="SmolLM2-135M-Instruct",
                chunk_size=128, num_chunks=8)
    (tmp_path / "passkey-demo.json").write_text(json.dumps([demo, dict(demo, correct=False)]))
    monkeypatch.setattr(tables, "RESULTS", tmp_path)
    last = tables.passkey_table("filler").splitlines()[-1]
    assert last == "| 128 × 8 position (the retrieval setting) | 1/2 |"
    assert tables.commands("passkey-*.json") == demo["command"]
