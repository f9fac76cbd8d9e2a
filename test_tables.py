"""The generated tables of RESULTS.md and README.md agree with the committed records (cog)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import tables

HERE = Path(__file__).parent
DOCS = ["RESULTS.md", "README.md"]


def cog_check(cwd, env=None):
    return subprocess.run([sys.executable, "-m", "cogapp", "--check", *DOCS], cwd=cwd,
                          capture_output=True, text=True, env={**os.environ, **(env or {})})


def test_the_tables_are_those_of_the_records():
    out = cog_check(HERE)
    assert out.returncode == 0, out.stdout + out.stderr


def test_a_changed_record_fails_the_check(tmp_path):
    """The check reads the records: flip one trial's outcome and the tables no longer match."""
    results = tmp_path / "results"
    shutil.copytree(HERE / "results", results)
    file = sorted(results.glob("distractors-*.json"))[0]
    trials = json.loads(file.read_text())
    trials[0]["correct"] = not trials[0]["correct"]
    trials[0]["outcome"] = "yes" if trials[0]["correct"] else "no key"
    file.write_text(json.dumps(trials))
    for doc in DOCS:
        shutil.copy(HERE / doc, tmp_path / doc)
    shutil.copy(HERE / "tables.py", tmp_path / "tables.py")
    out = cog_check(tmp_path, env={"LONGHEADS_RESULTS": str(results)})
    assert out.returncode != 0 and "changed" in out.stdout + out.stderr


def test_every_record_names_the_command_that_made_it():
    for r in tables.records():
        assert r["command"].startswith("python passkey.py ") and "--json" in r["command"]
