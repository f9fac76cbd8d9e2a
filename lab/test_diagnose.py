"""lab/diagnose.py: the attention it shows is the attention the caches compute, and its figure."""
import pytest
import torch

from longheads import rope_inv_freq
from tiled import LongHeadsCache


@pytest.mark.parametrize("T", [37, 120])  # inside the budget, and past it
def test_diagnose_weights_are_the_attention_the_cache_computes(T):
    from lab.diagnose import final_weights
    from model import KVCache
    gen = torch.Generator().manual_seed(T)
    q = torch.randn(1, 4, T, 8, generator=gen)
    k, v = (torch.randn(1, 2, T, 8, generator=gen) for _ in range(2))
    for cache in [LongHeadsCache(1, 4, 2, T, 8, chunk_size=8, num_chunks=5),
                  KVCache(1, 4, 2, T, 8, inv_freq=rope_inv_freq(8), dtype=torch.float32,
                          device="cpu")]:
        out = cache(q, k, v)[0, :, -1]  # (H, D): the final query's output
        weights = final_weights(cache, q[0, :, -1], T - 1)  # (H, T)
        expected = (weights[:, None, :] @ v[0].repeat_interleave(2, dim=0)).squeeze(1)  # (H, D)
        torch.testing.assert_close(expected, out, atol=1e-5, rtol=1e-5)


def test_diagnose_selection_is_the_rule_of_select_chunks():
    """Past the first K chunks the final query reads chunk 0, K - 3 chunks by score, g - 1, g."""
    from lab.diagnose import query_scores, selection
    gen = torch.Generator().manual_seed(3)
    T, w, K = 100, 8, 5
    q = torch.randn(1, 4, T, 8, generator=gen)
    k, v = (torch.randn(1, 2, T, 8, generator=gen) for _ in range(2))
    cache = LongHeadsCache(1, 4, 2, T, 8, chunk_size=w, num_chunks=K)
    cache(q, k, v)
    t, g = T - 1, (T - 1) // w
    chunks = selection(cache, q[0, :, -1], t)  # (H, K)
    best = query_scores(cache, q[0, :, -1], t)[:, 0].topk(K - 3).indices + 1  # (H, K - 3)
    assert chunks.shape == (4, K) and (chunks[:, 0] == 0).all()
    assert (chunks[:, -2:] == torch.tensor([g - 1, g])).all()
    assert torch.equal(chunks[:, 1:-2], best.sort(-1).values)


def test_diagnose_plot_draws_each_layer_and_head(tmp_path):
    pytest.importorskip("matplotlib")
    from lab import diagnose
    gen = torch.Generator().manual_seed(0)
    picks = [torch.randperm(40, generator=gen)[:6].view(1, 6).expand(3, 6) for _ in range(4)]
    masses = [torch.rand(3, generator=gen) for _ in range(4)]  # (H,) per layer
    diagnose.plot(picks, masses, [130, 131], 16, 39, str(tmp_path / "chunks.png"))
    assert (tmp_path / "chunks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["chunks.png"]
