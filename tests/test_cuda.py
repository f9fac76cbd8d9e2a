"""The CUDA checks: the same properties on the GPU, bfloat16, and no host-device sync per block.

Skipped where there is no CUDA device; lab/gpu_check.sh runs them on a GPU machine, with
LONGHEADS_EXAMPLES hypothesis examples for the property test here.
"""
import warnings
from unittest import mock

import pytest
import torch
from hypothesis import given, strategies as st

from lab.bench import SHAPES, LiveBytes, block_working_bytes, last_block
from longheads import longheads_attention, longheads_reference, rope_inv_freq
import tiled
from model import Llama, LlamaConfig
from test_longheads import PROPERTY, problems
from tiled import LongHeadsCache, attention_lse, causal_attention, tiled_attention

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture
def exact_float32():
    """Exact float32 matrix products, for a test whose float32 tolerance assumes them. Where
    TF32 is on (a float32 matmul precision of "high" or "medium", which some environments
    set), a float32 product keeps 10 bits of mantissa: errors near 1e-3, and tolerances of
    1e-4 or tighter fail on correct code. The tests in float64 or bfloat16 need no pin."""
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    # why check: an override (TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1) keeps TF32 on regardless
    assert not torch.backends.cuda.matmul.allow_tf32, "TF32 stays on: unset the override"
    yield
    torch.set_float32_matmul_precision(saved)


def random_qkv(T, H=4, Hkv=2, D=16, dtype=torch.float64, device="cpu"):
    gen = torch.Generator().manual_seed(T)
    q = torch.randn(1, H, T, D, generator=gen, dtype=dtype)
    k, v = (torch.randn(1, Hkv, T, D, generator=gen, dtype=dtype) for _ in range(2))
    return q.to(device), k.to(device), v.to(device)


@cuda
@pytest.mark.parametrize("attention", [longheads_attention, tiled_attention])
@pytest.mark.parametrize("T, w, K", [(40, 4, 5), (103, 8, 4), (300, 16, 6)])
def test_cuda_equals_the_reference(T, w, K, attention):
    q, k, v = random_qkv(T)
    expected = longheads_reference(q, k, v, chunk_size=w, num_chunks=K)
    got = attention(*(x.cuda() for x in (q, k, v)), chunk_size=w, num_chunks=K)
    torch.testing.assert_close(got.cpu(), expected)


@cuda
@PROPERTY
@given(problems("small"), st.integers(1, 7))
def test_cuda_tiled_path_equals_the_reference_for_any_setting(problem, block_size):
    """test_longheads' property on the GPU: any budget, grouped heads."""
    q, k, v, opts = problem
    got = tiled_attention(q.cuda(), k.cuda(), v.cuda(), block_size=block_size, **opts)
    torch.testing.assert_close(got.cpu(), longheads_reference(q, k, v, **opts))


@cuda
@pytest.mark.usefixtures("exact_float32")
def test_cuda_prefill_equals_decoding():
    q, k, v = random_qkv(90, dtype=torch.float32, device="cuda")
    opts = dict(chunk_size=8, num_chunks=4)
    cache = LongHeadsCache(1, 4, 2, 90, 16, dtype=torch.float32, device="cuda", **opts)
    steps = [cache(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1]) for t in range(90)]
    torch.testing.assert_close(torch.cat(steps, dim=2), longheads_attention(q, k, v, **opts),
                               atol=1e-5, rtol=1e-5)


@cuda
def test_cuda_bfloat16_stays_close_to_float32():
    assert_bfloat16_rows_close("cuda", None)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bfloat16_in_the_gpu_layout_stays_close_to_float32_on_the_cpu(seed):
    """The same check as on a GPU, in the GPU's layout on the CPU, where it can run anywhere."""
    assert_bfloat16_rows_close("cpu", "cuda", seed)


def assert_bfloat16_rows_close(device, for_device, seed=0):
    """bfloat16 rounds scores enough to flip a few queries' choice of chunk, and such a query's
    output moves by up to a third (0.34 seen): so not every row is close, but nearly all are
    (2 in 1000 over 0.05 seen) and the typical one closely (median 0.002 seen)."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = [torch.randn(1, h, 512, 64, generator=gen).to(device) for h in (4, 2, 2)]
    opts = dict(chunk_size=32, num_chunks=5)
    exact = longheads_attention(q, k, v, **opts)
    low = tiled_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), for_device=for_device,
                          **opts)
    assert low.dtype == torch.bfloat16
    rows = (low.float() - exact).abs().amax(-1)  # (B, H, T): each query's largest error
    assert (rows > 0.05).float().mean() < 0.01 and rows.median() < 0.005


@cuda
@pytest.mark.parametrize("H, Hkv", [(4, 2), (2, 2)])
def test_cuda_prefill_never_waits_for_the_gpu(H, Hkv):
    """No .item(), .tolist() or Python `if` on a GPU tensor in a prefill or a step, with
    grouped heads and with one head per group (Llama-2-7B's).

    This is the check of what the CPU's recorder (test_longheads.RecordOps, the GPU layout run
    on the CPU) cannot see: .tolist(), .cpu() and .numpy() of a CPU tensor dispatch no operation
    there, and torch.equal, torch.bincount and torch.allclose are operations it does not count
    as waits, though on a GPU each one reads a value back. Only CUDA's sync debug mode sees
    them all; keep them out of the GPU path."""
    q, k, v = random_qkv(1200, H=H, Hkv=Hkv, D=64, dtype=torch.bfloat16, device="cuda")
    cache = LongHeadsCache(1, H, Hkv, 1201, 64, chunk_size=128, num_chunks=5,
                           dtype=torch.bfloat16, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        cache(q, k, v)
        cache(q[:, :, :1], k[:, :, :1], v[:, :, :1])
    finally:
        torch.cuda.set_sync_debug_mode("default")


@cuda
@pytest.mark.usefixtures("exact_float32")
@pytest.mark.parametrize("H, Hkv, dtype", [(4, 2, torch.float32), (2, 2, torch.bfloat16)])
def test_offloaded_decoding_gives_the_same_steps(H, Hkv, dtype):
    """A prefill, then single-token steps, offloaded and not: the same outputs, with grouped
    heads in float32 and with one head per group in bfloat16 (Llama-2-7B's production case)."""
    q, k, v = random_qkv(420, H=H, Hkv=Hkv, D=64, dtype=dtype, device="cuda")
    opts = dict(chunk_size=32, num_chunks=5, dtype=dtype, device="cuda")
    on_gpu = LongHeadsCache(1, H, Hkv, 420, 64, **opts)
    offloaded = LongHeadsCache(1, H, Hkv, 420, 64, offload=True, **opts)
    for s, e in [(0, 400)] + [(t, t + 1) for t in range(400, 420)]:
        step = [x[:, :, s:e] for x in (q, k, v)]
        torch.testing.assert_close(offloaded(*step), on_gpu(*step))


@cuda
def test_offloaded_keys_and_values_are_plain_memory_and_only_staging_is_pinned():
    """Offloaded, keys and values stay in plain host memory: no copy to the GPU reads them (the
    CPU gathers what a block reads into pinned staging buffers, and sends those). So they are
    not page-locked (is_pinned also sees memory registered with cudaHostRegister, as they once
    were), every staging buffer is, and all of them together hold less than half the keys and
    values' 16 MiB. (Before issue 39 this test read a statistic under a key torch does not
    have, with a default of 0 on both sides: it could not fail.)"""
    q, k, v = random_qkv(16384, D=64, dtype=torch.float32, device="cuda")
    with mock.patch.object(tiled, "CUDA_PIECE_BYTES", 2**20):  # slices of rows under 1 MiB
        cache = LongHeadsCache(1, 4, 2, 16384, 64, chunk_size=32, num_chunks=5,
                               dtype=torch.float32, device="cuda", offload=True)
    assert not cache.kv.k.is_pinned() and not cache.kv.v.is_pinned()
    staged, real = {}, tiled.ChunkedKV._stage

    def spy(kv, name, shape, like):
        buf = real(kv, name, shape, like)
        staged[name] = kv.scratch[name]  # the whole buffer, reused from block to block
        return buf
    with mock.patch.object(tiled.ChunkedKV, "_stage", spy):
        cache(q, k, v)
    assert staged and all(buf.is_pinned() for buf in staged.values()), list(staged)
    total = sum(buf.nbytes for buf in staged.values())
    assert total < (cache.kv.k.nbytes + cache.kv.v.nbytes) / 2, total


@cuda
def test_offloaded_waits_are_the_ones_the_docstring_counts():
    """tiled.py: offloaded, the host waits for the GPU twice a call to store keys and values,
    once a block to learn its rows, and before each staged copy for the previous one. CUDA's
    sync debug mode warns at every wait that reads a value back; none other than the first two
    kinds may happen (the staged copies' waits are event waits, counted apart)."""
    q, k, v = random_qkv(1000, D=64, dtype=torch.float32, device="cuda")
    cache = LongHeadsCache(1, 4, 2, 1000, 64, chunk_size=32, num_chunks=5, block_size=200,
                           dtype=torch.float32, device="cuda", offload=True)
    events = []
    real = torch.cuda.Event.synchronize
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught, \
            mock.patch.object(torch.cuda.Event, "synchronize",
                              lambda e: events.append(1) or real(e)):
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            cache(q, k, v)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    reads_back = [w for w in caught if "synchroniz" in str(w.message)]
    blocks = -(-(1000 - 5 * 32) // 200)  # queries past the first K chunks, 200 a block
    assert len(reads_back) == 2 + blocks, [str(w.message) for w in reads_back]
    assert events, "the staged copies wait for the previous copy"


@cuda
def test_cuda_working_memory_is_what_the_meta_tensors_say():
    """bench's estimate runs the GPU layout on meta tensors and cannot see a kernel's own
    temporaries nor the allocator's rounding: the GPU's measured peak of one block at the 7B
    head shape (bfloat16, 8192 tokens) stays within a quarter (and 64 MiB) of it."""
    opts = dict(H=32, Hkv=32, D=128, chunk_size=256, num_chunks=16, length=8192,
                dtype=torch.bfloat16)
    cache, q, k = last_block(device="cuda", **opts)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with LiveBytes() as live, torch.no_grad():
        cache(q, k, k)
    measured = torch.cuda.max_memory_allocated() - base
    on_meta, _ = block_working_bytes(device="meta", **opts)
    assert live.peak == on_meta
    # the allocator holds at least the live tensors (its blocks are rounded up, never down)
    assert live.peak <= measured <= 1.25 * on_meta + 2**26, (measured, on_meta)


@cuda
@pytest.mark.parametrize("offload", [False, True])
def test_llama_on_cuda_equals_llama_on_the_cpu(offload):
    """The whole model, random small weights, LongHeads past its budget: the same logits and
    the same greedy tokens on the GPU (offloaded or not) as on the CPU. float64, so that no
    near tie flips a chunk's choice between the two devices."""
    torch.manual_seed(0)
    cfg = LlamaConfig(**dict(SHAPES["tiny"], num_hidden_layers=2, max_position_embeddings=64))
    opts = dict(attention="longheads", chunk_size=16, num_chunks=4)
    cpu = Llama(cfg, **opts).double().eval()  # PyTorch's default initialisation, seeded
    gpu = Llama(cfg, offload=offload, **opts).double().cuda().eval()
    gpu.load_state_dict(cpu.state_dict())
    ids = torch.randint(cfg.vocab_size, (1, 200), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(gpu(ids.cuda()).cpu(), cpu(ids))
    assert torch.equal(gpu.generate(ids.cuda(), 8).cpu(), cpu.generate(ids, 8))


@cuda
@pytest.mark.usefixtures("exact_float32")
def test_offloaded_cache_gives_the_same_output():
    q, k, v = random_qkv(700, D=64, dtype=torch.float32, device="cuda")
    opts = dict(chunk_size=32, num_chunks=5, dtype=torch.float32, device="cuda")
    on_gpu = LongHeadsCache(1, 4, 2, 701, 64, **opts)
    offloaded = LongHeadsCache(1, 4, 2, 701, 64, offload=True, **opts)
    assert offloaded.kv.k.device.type == "cpu" and not offloaded.kv.k.is_pinned()
    torch.testing.assert_close(offloaded(q, k, v), on_gpu(q, k, v))
    step = [x[:, :, -1:] for x in (q, k, v)]
    torch.testing.assert_close(offloaded(*step), on_gpu(*step))


@cuda
def test_cuda_rope_given_as_gpu_inverse_frequencies():
    """rope given on the GPU is used there: it equals its rope_theta's, and differs from the
    default theta's (so a rope ignored would fail)."""
    q, k, v = random_qkv(100, device="cuda")
    opts = dict(chunk_size=8, num_chunks=5)
    by_freq = longheads_attention(q, k, v, rope=rope_inv_freq(16, 500.0).cuda(), **opts)
    torch.testing.assert_close(by_freq, longheads_attention(q, k, v, rope_theta=500.0, **opts))
    assert not torch.allclose(by_freq, longheads_attention(q, k, v, **opts))


@cuda
@pytest.mark.usefixtures("exact_float32")
def test_cuda_pieces_keep_float32_logits_in_bfloat16():
    """Logits spread as a trained model's (std 24): the piece's log-sum-exp as in float64."""
    gen = torch.Generator().manual_seed(10)
    q = (torch.randn(8, 32, 64, generator=gen) * 3).bfloat16().cuda()
    k, v = (torch.randn(8, 48, 64, generator=gen).bfloat16().cuda() for _ in range(2))
    out, lse = attention_lse(q, k, v)
    logits = q.double() @ k.double().transpose(-1, -2)
    assert (lse.double() - logits.logsumexp(-1)).abs().max() < 1e-4


@cuda
@pytest.mark.usefixtures("exact_float32")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("G", [1, 4])
def test_cuda_causal_attention_after_a_prefix(G, dtype):
    """The lower-right causal bias on the GPU's kernels against the masked definition, in
    float32 and in bfloat16 (production's: the flash kernel), the definition computed in
    float32 from the same bfloat16 inputs."""
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(1, 2 * G, 300, 64, generator=gen).to("cuda", dtype)
    k, v = (torch.randn(1, 2, 1000, 64, generator=gen).to("cuda", dtype) for _ in range(2))
    qf, kf, vf = (x.float() for x in (q, k, v))
    scores = qf @ kf.repeat_interleave(G, 1).transpose(-1, -2) / 8  # (1, H, 300, 1000)
    future = torch.arange(1000, device="cuda") > torch.arange(700, 1000, device="cuda")[:, None]
    expected = scores.masked_fill(future, float("-inf")).softmax(-1) @ vf.repeat_interleave(G, 1)
    got = causal_attention(q, k, v)
    assert got.dtype == dtype
    tol = 2e-3 if dtype == torch.float32 else 1e-2  # bfloat16's output rounding: 2^-8 relative
    torch.testing.assert_close(got.float(), expected, atol=tol, rtol=tol)
