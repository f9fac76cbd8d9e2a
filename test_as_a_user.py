"""The library as a user calls it from a notebook: autograd on, one conversation through one set of
caches, a wrong shape or dtype, a bad option at load time, torch.compile.

Each bad call asserts its one-line message, not just the exception type. The tiny checkpoints
are test_longheads.py's (transformers writes them).
"""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from longheads import longheads_attention, longheads_reference
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
@given(problems("small", full=True), st.sampled_from(["function", "cache", "cuda layout"]))
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
    (((1, 2, 10, 8),) * 3, None, dict(local_chunks=3), r"must lie in \[2, num_chunks - 1\]"),
    (((1, 2, 10, 8),) * 3, None, dict(layout="scores"), "layout must be one of position, score"),
    (((1, 2, 10, 8),) * 3, None, dict(select="max_key"), "select must be one of summary, maxkey"),
])
def test_the_copyable_function_refuses_what_it_cannot_compute(shapes, dtype, kwargs, message):
    q, k, v = (torch.ones(s, dtype=dtype) if dtype else torch.randn(s) for s in shapes)
    opts = {"chunk_size": 4, "num_chunks": 3, **kwargs}
    with pytest.raises(ValueError, match=message) as error:
        longheads_attention(q, k, v, **opts)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("opts, message", [
    (dict(num_chunks=2), "num_chunks must be an integer >= 3"),
    (dict(layout="bogus"), "layout must be one of position, score"),
    (dict(select="best"), "select must be one of summary, maxkey"),
    (dict(local_chunks=4), r"local_chunks must lie in \[2, num_chunks - 1\] = \[2, 3\]"),
    (dict(select_layers=(0, 2)), "select_layers must be"),
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
