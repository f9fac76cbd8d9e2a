"""The CUDA checks: the same properties on the GPU, bfloat16, and no host-device sync per block.

Skipped where there is no CUDA device; gpu_check.sh runs them on a GPU machine.
"""
import pytest
import torch

from longheads import longheads_attention, longheads_reference
from tiled import LongHeadsCache, tiled_attention

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


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
def test_cuda_prefill_equals_decoding():
    q, k, v = random_qkv(90, dtype=torch.float32, device="cuda")
    opts = dict(chunk_size=8, num_chunks=4)
    cache = LongHeadsCache(1, 4, 2, 90, 16, dtype=torch.float32, device="cuda", **opts)
    steps = [cache(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1]) for t in range(90)]
    torch.testing.assert_close(torch.cat(steps, dim=2), longheads_attention(q, k, v, **opts),
                               atol=1e-5, rtol=1e-5)


@cuda
def test_cuda_bfloat16_stays_close_to_float32():
    q, k, v = random_qkv(512, D=64, dtype=torch.float32, device="cuda")
    opts = dict(chunk_size=32, num_chunks=5)
    exact = longheads_attention(q, k, v, **opts)
    low = tiled_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), **opts)
    assert low.dtype == torch.bfloat16
    assert (low.float() - exact).abs().max() < 0.05


@cuda
def test_cuda_prefill_never_waits_for_the_gpu():
    """No .item(), .tolist() or Python `if` on a GPU tensor in a prefill or a step (where the
    tile count's bound wastes little: pack counts exactly, and waits, only where it would not)."""
    q, k, v = random_qkv(1200, D=64, dtype=torch.bfloat16, device="cuda")
    cache = LongHeadsCache(1, 4, 2, 1201, 64, chunk_size=128, num_chunks=5, dtype=torch.bfloat16,
                           device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        cache(q, k, v)
        cache(q[:, :, :1], k[:, :, :1], v[:, :, :1])
    finally:
        torch.cuda.set_sync_debug_mode("default")


@cuda
def test_offloaded_cache_gives_the_same_output():
    q, k, v = random_qkv(700, D=64, dtype=torch.float32, device="cuda")
    opts = dict(chunk_size=32, num_chunks=5, dtype=torch.float32, device="cuda")
    on_gpu = LongHeadsCache(1, 4, 2, 701, 64, **opts)
    offloaded = LongHeadsCache(1, 4, 2, 701, 64, offload=True, **opts)
    assert offloaded.kv.k.device.type == "cpu" and offloaded.kv.k.is_pinned()
    torch.testing.assert_close(offloaded(q, k, v), on_gpu(q, k, v))
    step = [x[:, :, -1:] for x in (q, k, v)]
    torch.testing.assert_close(offloaded(*step), on_gpu(*step))
