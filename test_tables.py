"""The generated tables of RESULTS.md and README.md agree with the committed records (cog)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import tables

HERE = Path(__file__).parent
DOCS = ["RESULTS.md", "README.md"]


def cog_check(cwd, env=None):
    return subprocess.run([sys.executable, "-m", "cogapp", "--check", *DOCS], cwd=cwd,
                          capture_output=True, text=True, env={**os.environ, **(env or {})})


def test_the_tables_are_those_of_the_records():
    out = cog_check(HERE)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("pattern", ["distractors-*.json", "passkey-*.json"])
def test_a_changed_record_fails_the_check(tmp_path, pattern):
    """The check reads the records: flip one trial's outcome and the tables no longer match."""
    results = tmp_path / "results"
    shutil.copytree(HERE / "results", results)
    file = sorted(results.glob(pattern))[0]
    trials = json.loads(file.read_text())
    trials[0]["correct"] = not trials[0]["correct"]
    trials[0]["outcome"] = "yes" if trials[0]["correct"] else "no key"
    file.write_text(json.dumps(trials))
    for doc in DOCS:
        shutil.copy(HERE / doc, tmp_path / doc)
    shutil.copy(HERE / "tables.py", tmp_path / "tables.py")
    out = cog_check(tmp_path, env={"LONGHEADS_RESULTS": str(results)})
    assert out.returncode != 0 and "changed" in out.stdout + out.stderr


@pytest.mark.parametrize("pattern, script", [("distractors-*.json", "passkey.py"),
                                             ("passkey-*.json", "passkey.py"),
                                             ("perplexity-*.json", "perplexity.py")])
def test_every_record_names_the_command_that_made_it(pattern, script):
    rs = tables.records(pattern)
    assert rs
    for r in rs:
        assert r["command"].startswith(f"python {script} ") and "--json" in r["command"]
    # the command writes the very file the record is in, so rerunning it remakes that file
    for file in tables.RESULTS.glob(pattern):
        assert all(f"--json results/{file.name}" in r["command"]
                   for r in json.loads(file.read_text()))


def test_the_benchmark_record_names_its_command():
    assert tables.bench()["command"].startswith("python bench.py ")


@pytest.mark.parametrize("pattern, command", [("diagnose-*.txt", "python passkey.py --diagnose "),
                                              ("estimate-*.txt", "python bench.py --estimate")])
def test_every_printout_names_its_command(pattern, command):
    """A diagnosis or an estimate is kept as printed, its command on its first line."""
    files = sorted(tables.RESULTS.glob(pattern))
    assert files
    for file in files:
        assert file.read_text().startswith("$ " + command)
