"""The library as a user calls it from a notebook: autograd on, one conversation through one set of
caches, a wrong shape or dtype, a bad option at load time, generation that stops at the end token
(and its bad arguments), torch.compile.

Each bad call asserts its one-line message, not just the exception type. The tiny checkpoints
are test_longheads.py's (transformers writes them).
"""
import os

import pytest
import torch
from hypothesis import given, settings, strategies as st

from longheads import longheads_attention, longheads_reference, rope_cos_sin, rope_inv_freq
from test_longheads import problems, save_checkpoint
from tiled import LongHeadsCache, tiled_attention

GRAD_EXAMPLES = settings(max_examples=12, deadline=None)  # each runs the slow reference twice
SMALL = dict(chunk_size=8, num_chunks=4)  # a budget of 32 tokens: the prompts below pass it


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("gqa")
    save_checkpoint("gqa-sharded", path)
    return path


def llama(path, attention, **opts):
    from model import Llama
    return Llama.from_pretrained(path, attention=attention, **SMALL, **opts)


# ----------------------------------------------------------------------------- a conversation

@pytest.mark.parametrize("attention", ["full", "longheads"])
@pytest.mark.parametrize("first, second", [(10, 6), (30, 20)], ids=["inside", "past"])
def test_a_second_generate_through_the_caches_continues_the_conversation(tiny, attention, first,
                                                                         second):
    """generate(a, caches=c), then generate(b, caches=c) with the new ids b alone: the tokens of
    one generate on the whole history, inside the budget (32 tokens) and past it."""
    model = llama(tiny, attention)
    gen = torch.Generator().manual_seed(7)
    a, b = torch.randint(0, 101, (1, first), generator=gen), torch.randint(0, 101, (1, second),
                                                                            generator=gen)
    caches = model.new_caches(1, first + 5 + second + 8)
    out1 = model.generate(a, 5, caches=caches)
    out2 = model.generate(b, 8, caches=caches)
    whole = model.generate(torch.cat([out1, b], 1), 8)
    assert torch.equal(out2[:, second:], whole[:, -8:])
    assert all(cache.length == first + 5 + second + 8 for cache in caches)  # every token held


# ----------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("attention", ["full", "longheads"])
def test_a_prompt_in_pieces_is_the_prompt_in_one_call(tiny, attention):
    """Llama.prefill (what generate and passkey.py feed a prompt through): pieces of 5 and 11
    tokens, across chunk boundaries and past the budget, give one call's last hidden state, and
    leave the caches as one call does (the next token's output agrees)."""
    model = llama(tiny, attention, dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, model.config.vocab_size, (2, 45), generator=gen)
    outs = []
    for piece in (45, 11, 5):
        caches = model.new_caches(2, 46)
        with torch.no_grad():
            last = model.prefill(ids, caches, piece=piece)  # (B, C)
            outs.append((last, model.hidden(ids[:, -1:], caches)[:, -1]))
    for last, after in outs[1:]:
        torch.testing.assert_close(last, outs[0][0])
        torch.testing.assert_close(after, outs[0][1])


@GRAD_EXAMPLES
@given(problems("small"), st.sampled_from(["function", "cache", "cuda layout"]))
def test_gradients_through_the_fast_path_equal_the_references(problem, path):
    """tiled_attention and a fresh LongHeadsCache, past the budget, with grad on: the outputs of
    no_grad, and the q, k, v gradients of longheads_reference."""
    q, k, v, opts = problem
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    B, H, T, D = q.shape
    if path == "cache":
        out = LongHeadsCache(B, H, k.shape[1], T, D, dtype=q.dtype, **opts)(q, k, v)
    else:
        out = tiled_attention(q, k, v, for_device="cuda" if path == "cuda layout" else None,
                              **opts)
    with torch.no_grad():
        torch.testing.assert_close(out, tiled_attention(q, k, v, **opts))
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=q.dtype)
    got = torch.autograd.grad((out * weights).sum(), (q, k, v))
    expected = torch.autograd.grad((longheads_reference(q, k, v, **opts) * weights).sum(),
                                   (q, k, v))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


def test_model_gradients_equal_those_of_a_model_on_the_reference(tiny):
    """model(ids) with grad on, past the budget: the logits of no_grad, and every parameter's
    gradient equal to that of the same model with the slow reference as its attention."""
    model = llama(tiny, "longheads").double()
    ids = torch.randint(0, 101, (1, 45), generator=torch.Generator().manual_seed(8))
    inv_freq = model.config.inv_freq(32)
    reference = lambda q, k, v: longheads_reference(q, k, v, rope=inv_freq, **SMALL)
    logits = model(ids)
    with torch.no_grad():
        torch.testing.assert_close(logits, model(ids))
    params = [p for p in model.parameters()]
    got = torch.autograd.grad(logits.logsumexp(-1).sum(), params)
    ref_logits = model(ids, caches=[reference] * len(model.model.layers))
    expected = torch.autograd.grad(ref_logits.logsumexp(-1).sum(), params)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("attention", ["full", "longheads"])
def test_a_second_call_with_grad_is_refused_in_one_line(tiny, attention):
    """With autograd on, a cache takes the whole sequence in one call; under no_grad it goes on."""
    model = llama(tiny, attention)
    ids = torch.randint(0, 101, (1, 40), generator=torch.Generator().manual_seed(9))
    caches = model.new_caches(1, 40)
    model(ids[:, :30], caches=caches)
    with pytest.raises(ValueError, match=r"with autograd on a cache takes the whole sequence in "
                                         r"one call: feed later tokens under torch.no_grad\(\)"):
        model(ids[:, 30:], caches=caches)
    with torch.no_grad():
        torch.testing.assert_close(model(ids[:, 30:], caches=caches)[0, -1], model(ids)[0, -1])


# ----------------------------------------------------------------------------- bad calls

@pytest.mark.parametrize("shapes, dtype, kwargs, message", [
    (((1, 2, 10, 8),) * 3, torch.int64, {}, "one floating dtype"),
    (((1, 2, 10, 8), (1, 2, 10, 4), (1, 2, 10, 4)), None, {}, "must agree in batch B, tokens T"),
    (((2, 2, 10, 8), (1, 2, 10, 8), (1, 2, 10, 8)), None, {}, "must agree in batch B, tokens T"),
    (((1, 2, 10, 8), (1, 2, 10, 8), (1, 2, 9, 8)), None, {}, "must agree in batch B, tokens T"),
    (((2, 10, 8),) * 3, None, {}, r"q must be \(B, H, T, D\)"),
    (((1, 3, 10, 8), (1, 2, 10, 8), (1, 2, 10, 8)), None, {}, "multiple of the key/value heads"),
    (((1, 2, 10, 7),) * 3, None, {}, "the head dim must be even"),
    (((1, 2, 10, 8),) * 3, None, dict(chunk_size=0), "chunk_size must be a positive integer"),
    (((1, 2, 10, 8),) * 3, None, dict(chunk_size=2.5), "chunk_size must be a positive integer"),
    (((1, 2, 10, 8),) * 3, None, dict(num_chunks=2), "num_chunks must be an integer >= 3"),
])
def test_the_copyable_function_refuses_what_it_cannot_compute(shapes, dtype, kwargs, message):
    q, k, v = (torch.ones(s, dtype=dtype) if dtype else torch.randn(s) for s in shapes)
    opts = {"chunk_size": 4, "num_chunks": 3, **kwargs}
    with pytest.raises(ValueError, match=message) as error:
        longheads_attention(q, k, v, **opts)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("opts, message", [
    (dict(num_chunks=2), "num_chunks must be an integer >= 3"),
    (dict(chunk_size=1024, num_chunks=4), "exceeds the model's trained length 2048"),
])
def test_the_model_checks_its_options_when_it_is_built(tiny, opts, message):
    from model import Llama
    with pytest.raises(ValueError, match=message):
        Llama.from_pretrained(tiny, attention="longheads", **{**SMALL, **opts})


@pytest.mark.parametrize("device, message", [
    ("meta", "weights are read into 'cpu' or 'cuda'"),
    ("cuda", "this torch has no CUDA device"),
])
def test_devices_the_loader_cannot_read_into_are_one_line(tiny, device, message):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from model import Llama
    with pytest.raises(ValueError, match=message):
        Llama.from_pretrained(tiny, device=device)


def test_one_dimensional_ids_are_refused_in_one_line(tiny):
    model = llama(tiny, "longheads")
    for call in (model, lambda ids: model.generate(ids, 2)):
        with pytest.raises(ValueError, match=r"shape \(batch, tokens\), got torch.int64 \(7,\): "
                                             r"for one sequence, pass ids\[None\]"):
            call(torch.arange(7))


# ----------------------------------------------------------------------------- generation

def refused(call, message):
    """call() raises a ValueError whose whole message is this one line."""
    with pytest.raises(ValueError) as error:
        call()
    assert str(error.value) == message


def ended(free, T, ends):
    """What generate returns, from `free`, the tokens of the same call that never stops: each row
    up to its first end token, then that token again, until every row has ended."""
    steps = free.shape[1] - T
    made = [next((s + 1 for s in range(steps) if int(row[T + s]) in ends), steps) for row in free]
    out = free[:, :T + max(made)].clone()
    for row, n in zip(out, made):
        row[T + n:] = row[T + n - 1]
    return out


@pytest.mark.parametrize("attention", ["full", "longheads"])
def test_generate_stops_once_every_row_made_an_end_token(tiny, attention):
    """A row that made an end token gets it again while the others go on; generate returns once
    every row has. The end tokens are tokens the model makes when it never stops."""
    model = llama(tiny, attention)
    ids = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(11))
    free = model.generate(ids, 10, eos_token_id=[])  # (2, 22): never stops
    assert free.shape == (2, 22)
    first = int(free[0, 14])  # row 0's third new token
    model.config.eos_token_id = first  # eos_token_id=None: the checkpoint's, one id...
    out = model.generate(ids, 10)
    assert torch.equal(out, ended(free, 12, {first})) and out.shape[1] > 15  # row 1 went on
    both = [first, int(free[1, 17])]  # ...or a list: both rows end by their sixth new token
    model.config.eos_token_id = both
    out = model.generate(ids, 10)
    assert torch.equal(out, ended(free, 12, set(both))) and out.shape[1] <= 18
    assert torch.equal(model.generate(ids, 10, eos_token_id=both[::-1]), out)
    assert torch.equal(model.generate(ids, 10, eos_token_id=False), free)  # never stops


def test_a_conversation_that_stopped_early_goes_on_from_every_token_returned(tiny):
    """generate(a, caches=c) that stops at an end token leaves in c every token it returned, and
    the next generate through c gives the tokens of one generate on the whole history."""
    model = llama(tiny, "longheads")
    gen = torch.Generator().manual_seed(12)
    a, b = (torch.randint(0, 101, (1, T), generator=gen) for T in (20, 15))
    end = int(model.generate(a, 8, eos_token_id=[])[0, 23])  # the 4th new token
    caches = model.new_caches(1, 20 + 8 + 15 + 6)
    out1 = model.generate(a, 8, caches=caches, eos_token_id=end)
    assert out1.shape[1] <= 24 and out1[0, -1] == end
    assert all(cache.length == out1.shape[1] for cache in caches)
    out2 = model.generate(b, 6, caches=caches, eos_token_id=[])
    whole = model.generate(torch.cat([out1, b], 1), 6, eos_token_id=[])
    assert torch.equal(out2[:, 15:], whole[:, -6:])


@pytest.fixture(scope="module")
def smollm2():
    """The default model (float32) and its tokenizer."""
    if os.environ.get("LONGHEADS_OFFLINE") == "1":
        pytest.skip("LONGHEADS_OFFLINE=1: no network for the default model")
    from convert import default_model
    from model import Llama
    from tokenizer import Tokenizer
    return Llama.from_pretrained(default_model(), dtype=torch.float32), Tokenizer(default_model())


def test_a_chat_answer_ends_at_the_models_own_end_token(smollm2):
    """Greedy, 40 tokens at most: the answer and <|im_end|> (config.json's eos_token_id), and
    Tokenizer.decode reads generate's (1, T) output as it is."""
    model, tokenizer = smollm2
    chat = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    ids = torch.tensor([tokenizer.encode(chat)])  # (1, T)
    out = model.generate(ids, 40)
    assert tokenizer.decode(out) == chat + "The capital of France is Paris.<|im_end|>"
    refused(lambda: tokenizer.decode(model.generate(torch.cat([ids, ids]), 1)),
            f"decode takes one sequence, got ids of shape (2, {ids.shape[1] + 1}): decode each "
            f"row, [tokenizer.decode(row) for row in ids]")


def test_the_api_says_equal_length_prompts_only(tiny):
    """No attention mask, so no padding: the docstring says so, and a mask is not taken."""
    from model import Llama
    assert "equal-length prompts only (no attention mask, no padding)" in Llama.__doc__
    ids = torch.randint(0, 101, (2, 8), generator=torch.Generator().manual_seed(13))
    with pytest.raises(TypeError, match="attention_mask"):
        llama(tiny, "full").generate(ids, 3, attention_mask=torch.ones_like(ids))


@pytest.mark.parametrize("attention", ["full", "longheads"])
def test_prefill_with_autograd_on_refuses_pieces_before_computing_any(tiny, attention):
    """More than one piece with autograd recording: refused with nothing stored; one piece runs
    with gradients."""
    model = llama(tiny, attention)
    ids = torch.randint(0, 101, (1, 45), generator=torch.Generator().manual_seed(14))
    caches = model.new_caches(1, 45)
    refused(lambda: model.prefill(ids, caches, piece=16), "prefill: input_ids past one piece "
            "(16) with autograd on: call it under torch.no_grad()")
    assert all(cache.length == 0 for cache in caches)
    last = model.prefill(ids, caches)  # (1, C), one piece of the default size
    with torch.no_grad():
        torch.testing.assert_close(last, model.prefill(ids, model.new_caches(1, 45), piece=16))
    assert last.requires_grad


ONE_TOKEN = "max_new_tokens must be an integer >= 1, got "


@pytest.mark.parametrize("attention", ["full", "longheads"])
@pytest.mark.parametrize("call, message", [
    (lambda m, ids: m.generate(ids[:, :0], 3), "input_ids (1, 0) hold no tokens: give some"),
    (lambda m, ids: m.generate(ids, -1), ONE_TOKEN + "-1"),
    (lambda m, ids: m.generate(ids, 0), ONE_TOKEN + "0"),
    (lambda m, ids: m.generate(ids, 3.0), ONE_TOKEN + "3.0"),
    (lambda m, ids: m.generate(ids, 3, temperature=-1.0),
     "temperature must be >= 0 (0: greedy), got -1.0"),
    (lambda m, ids: m.generate(ids, 3, temperature=1.0, top_k=0),
     "top_k must be an integer >= 1, or None (no limit), got 0"),
    (lambda m, ids: m.generate(ids + 96, 3), "input_ids must be token ids in [0, vocab_size = "
     "101), got 97 ... 101"),
    (lambda m, ids: m(ids - 2), "input_ids must be token ids in [0, vocab_size = 101), got "
     "-1 ... 3"),
    (lambda m, ids: m.new_caches(0, 10), "batch and max_len must be >= 1, got 0, 10"),
    (lambda m, ids: m.new_caches(1, 0), "batch and max_len must be >= 1, got 1, 0"),
], ids=["empty prompt", "-1 tokens", "0 tokens", "3.0 tokens", "temperature", "top_k",
        "past the vocabulary", "negative id", "batch 0", "max_len 0"])
def test_generation_refuses_what_it_cannot_do_in_one_line(tiny, attention, call, message):
    refused(lambda: call(llama(tiny, attention), torch.tensor([[1, 5, 3, 5]])), message)


def test_bad_cache_and_attention_arguments_are_one_line():
    """LongHeadsCache's max_len; longheads_attention with no tokens, with both RoPE spellings."""
    refused(lambda: LongHeadsCache(1, 4, 2, -5, 8, chunk_size=4, num_chunks=3),
            "batch and max_len must be >= 1, got 1, -5")
    q = torch.randn(1, 2, 0, 8)
    refused(lambda: longheads_attention(q, q, q, num_chunks=3, chunk_size=4),
            "q, k, v hold no tokens (T = 0): give at least one")
    q = torch.randn(1, 2, 10, 8)
    tables = rope_cos_sin(rope_inv_freq(8, 10000.0), torch.arange(10))  # (cos, sin), (T, D) each
    refused(lambda: longheads_attention(q, q, q, num_chunks=3, chunk_size=4, rope_theta=5,
                                        rope=tables), "give rope or rope_theta, not both")


# ----------------------------------------------------------------------------- torch.compile

@pytest.mark.parametrize("attention", ["full", "longheads"])
def test_torch_compile_runs_past_the_budget(tiny, attention):
    """torch.compile(model) traces the whole model, graph breaks included, past the budget. The
    aot_eager backend: dynamo's tracing and AOT autograd without the C++ compile of the default
    backend (inductor), which takes a minute here; README: API."""
    model = llama(tiny, attention)
    ids = torch.randint(0, 101, (1, 70), generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        expected = model(ids)
        torch.testing.assert_close(torch.compile(model, backend="aot_eager")(ids), expected)
