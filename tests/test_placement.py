"""Placement solver: budget respected, monotone, extremes, granule, expected share, bad input."""
from __future__ import annotations

import time

import numpy as np
import pytest

from hybrid_runtime.errors import UserError
from hybrid_runtime.placement import GiB, ModelShape, format_placement, parse_size, solve_placement

LLAMA2_7B = ModelShape(n_layers=32, dim=4096, ffn_dim=11008, n_heads=32, n_kv_heads=32, head_dim=128,
                       vocab_size=32000)


def sorted_freqs(rng: np.random.Generator, n_layers: int, f: int) -> list[np.ndarray]:
    """Skewed per-layer frequencies (power law with a per-layer exponent), sorted descending."""
    out = []
    for _ in range(n_layers):
        fr = rng.power(rng.uniform(0.1, 0.6), size=f) * rng.uniform(0.2, 1.0)
        out.append(np.sort(fr)[::-1].astype(np.float32))
    return out


def small_shape(f: int = 200, n_layers: int = 5) -> ModelShape:
    return ModelShape(n_layers=n_layers, dim=64, ffn_dim=f, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=100)


# ----------------------------------------------------------------------------- parse_size

@pytest.mark.parametrize("text,want", [
    ("8GiB", 8 * GiB), ("8 GiB", 8 * GiB), ("8gib", 8 * GiB), ("7.5GB", 7_500_000_000),
    ("512MiB", 512 * 1024 ** 2), ("512MB", 512_000_000), ("1073741824", 1073741824), ("0", 0),
    ("1.5GiB", 3 * GiB // 2), (".5GiB", GiB // 2), ("64KiB", 65536), (12345, 12345),
])
def test_parse_size(text, want):
    assert parse_size(text) == want


@pytest.mark.parametrize("text", ["", "abc", "8G", "GiB", "-1GiB", "1.5", "8 GiBs", "1e9", "8GiB 2", -5])
def test_parse_size_rejects_garbage(text):
    with pytest.raises(UserError, match="memory size"):
        parse_size(text)


# ----------------------------------------------------------------------------- solver

def test_llama2_7b_numbers_by_hand():
    """Non-FFN bytes of LLaMA-2-7B at context 4096 worked out by hand, and the hot count they leave."""
    fixed = (2 * 32000 * 4096 * 2            # embeddings + untied lm_head, bf16
             + 32 * 4 * 4096 * 4096 * 2      # q, k, v, o
             + 65 * 4096 * 2                 # 2 norms per layer + final
             + 2 * 32 * 4096 * 32 * 128 * 2)  # KV cache, context 4096
    assert fixed == 6_967_271_424
    freqs = sorted_freqs(np.random.default_rng(0), 32, 11008)
    with pytest.raises(UserError, match=r"at least 6\.49 GiB"):
        solve_placement(LLAMA2_7B, freqs, 6 * GiB, context=4096)
    p = solve_placement(LLAMA2_7B, freqs, parse_size("8GiB"), context=4096)
    neuron = 3 * 4096 * 2
    assert sum(p.fixed_bytes.values()) == fixed
    assert sum(p.hot_counts) == (8 * GiB - fixed) // (64 * neuron) * 64
    assert p.gpu_bytes == fixed + sum(p.hot_counts) * neuron <= 8 * GiB
    assert p.cpu_bytes == (32 * 11008 - sum(p.hot_counts)) * neuron
    solve_placement(LLAMA2_7B, freqs, parse_size("6.49GiB"), context=4096)   # the stated minimum fits


def test_budget_respected_and_tight():
    rng = np.random.default_rng(1)
    shape = small_shape()
    freqs = sorted_freqs(rng, shape.n_layers, shape.ffn_dim)
    base = solve_placement(shape, freqs, 10 ** 9, context=64, predictor_bytes=[100, 200, 300, 400, 500],
                           workspace_bytes=777)
    need = sum(base.fixed_bytes.values())
    assert base.fixed_bytes["predictors"] == 1500 and base.fixed_bytes["workspace"] == 777
    for budget in rng.integers(need, need + 5 * 200 * shape.neuron_bytes, size=200):
        p = solve_placement(shape, freqs, int(budget), context=64, predictor_bytes=[100, 200, 300, 400, 500],
                            workspace_bytes=777)
        assert p.gpu_bytes <= budget
        if sum(p.hot_counts) < 5 * 200:   # not all hot: no further block would have fit
            assert budget - p.gpu_bytes < 64 * shape.neuron_bytes


def test_monotone_in_budget():
    rng = np.random.default_rng(2)
    shape = small_shape(f=200, n_layers=7)
    freqs = sorted_freqs(rng, shape.n_layers, shape.ffn_dim)
    need = sum(solve_placement(shape, freqs, 10 ** 9, context=32).fixed_bytes.values())
    budgets = np.sort(rng.integers(need, need + 7 * 200 * shape.neuron_bytes + 10, size=300))
    prev = np.zeros(7, np.int64)
    shares = []
    for budget in budgets:
        p = solve_placement(shape, freqs, int(budget), context=32)
        hot = np.array(p.hot_counts)
        assert (hot >= prev).all()
        prev = hot
        shares.append(p.gpu_share)
    assert np.all(np.diff(shares) >= 0)


def test_extremes():
    rng = np.random.default_rng(3)
    shape = small_shape()
    freqs = sorted_freqs(rng, shape.n_layers, shape.ffn_dim)
    need = sum(solve_placement(shape, freqs, 10 ** 9, context=64).fixed_bytes.values())
    for budget in (need, need + 64 * shape.neuron_bytes - 1):   # nothing left for a whole block
        p = solve_placement(shape, freqs, budget, context=64)
        assert p.hot_counts == [0] * 5 and p.gpu_share == 0.0 and p.hot_bytes == 0
    p = solve_placement(shape, freqs, need + 64 * shape.neuron_bytes, context=64)
    assert sum(p.hot_counts) == 64
    p = solve_placement(shape, freqs, 10 ** 12, context=64)
    assert p.hot_counts == [200] * 5 and p.gpu_share == 1.0 and p.cpu_bytes == 0
    with pytest.raises(UserError, match="too small") as e:
        solve_placement(shape, freqs, need - 1, context=64)
    assert "at least 0.01 GiB" in str(e.value) and "KV cache for context 64" in str(e.value)


def test_hot_counts_are_granule_multiples_or_full():
    rng = np.random.default_rng(4)
    shape = small_shape(f=200)      # 200 = 3 * 64 + 8: the last block is partial
    freqs = sorted_freqs(rng, shape.n_layers, shape.ffn_dim)
    need = sum(solve_placement(shape, freqs, 10 ** 9, context=16).fixed_bytes.values())
    seen_full = False
    for granule in (1, 32, 64):
        for budget in np.linspace(need, need + 5 * 200 * shape.neuron_bytes, 60).astype(np.int64):
            p = solve_placement(shape, freqs, int(budget), context=16, granule=granule)
            for k in p.hot_counts:
                assert k % granule == 0 or k == 200
                seen_full |= k == 200 and granule == 64
    assert seen_full


def test_expected_share_by_hand():
    shape = ModelShape(n_layers=2, dim=8, ffn_dim=4, n_heads=1, n_kv_heads=1, head_dim=8, vocab_size=10)
    freqs = [np.array([0.9, 0.5, 0.1, 0.0]), np.array([0.8, 0.6, 0.2, 0.1])]
    need = sum(solve_placement(shape, freqs, 10 ** 9, context=4).fixed_bytes.values())
    nb = shape.neuron_bytes
    # granule 1, room for 3 neurons: the globally most frequent are 0.9 (layer 0), 0.8 and 0.6 (layer 1)
    p = solve_placement(shape, freqs, need + 3 * nb, context=4, granule=1)
    assert p.hot_counts == [1, 2]
    assert p.gpu_share == pytest.approx((0.9 + 0.8 + 0.6) / 3.2)
    assert p.layer_shares == pytest.approx([0.9 / 1.5, 1.4 / 1.7])
    # granule 2: blocks [0.9, 0.5] and [0.8, 0.6] tie at mean 0.7 (layer order breaks it)
    assert solve_placement(shape, freqs, need + 2 * nb, context=4, granule=2).hot_counts == [2, 0]
    assert solve_placement(shape, freqs, need + 4 * nb, context=4, granule=2).hot_counts == [2, 2]
    p = solve_placement(shape, freqs, need + 6 * nb, context=4, granule=2)   # next: layer 1's [0.2, 0.1]
    assert p.hot_counts == [2, 4] and p.gpu_share == pytest.approx((1.4 + 1.7) / 3.2)
    # no activations at all: the share is 0 unless everything is hot
    zero = [np.zeros(4), np.zeros(4)]
    assert solve_placement(shape, zero, need + 2 * nb, context=4, granule=1).gpu_share == 0.0
    assert solve_placement(shape, zero, need + 8 * nb, context=4, granule=1).gpu_share == 1.0


def test_greedy_takes_the_globally_most_frequent_neurons():
    """granule 1: the hot set's frequency mass equals the sum of the K largest frequencies overall."""
    rng = np.random.default_rng(5)
    shape = small_shape(f=50, n_layers=6)
    freqs = [np.sort(rng.random(50))[::-1] for _ in range(6)]
    need = sum(solve_placement(shape, freqs, 10 ** 9, context=8).fixed_bytes.values())
    everything = np.sort(np.concatenate(freqs))[::-1]
    for k in rng.integers(0, 300, size=20):
        p = solve_placement(shape, freqs, need + int(k) * shape.neuron_bytes, context=8, granule=1)
        assert sum(p.hot_counts) == k
        hot_mass = sum(fr[:h].sum() for fr, h in zip(freqs, p.hot_counts))
        assert hot_mass == pytest.approx(everything[:k].sum())


def test_fast_for_40_layers_of_13824():
    shape = ModelShape(n_layers=40, dim=5120, ffn_dim=13824, n_heads=40, n_kv_heads=40, head_dim=128,
                       vocab_size=32000)
    freqs = sorted_freqs(np.random.default_rng(6), 40, 13824)
    solve_placement(shape, freqs, 16 * GiB, context=2048)
    t0 = time.perf_counter()
    p = solve_placement(shape, freqs, 16 * GiB, context=2048)
    assert time.perf_counter() - t0 < 0.5   # typically ~50 ms on a loaded 2-core machine
    assert 0 < sum(p.hot_counts) < 40 * 13824


def test_shape_from_config_and_tied_embeddings():
    from hybrid_runtime.model import ModelConfig
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=100,
                      tie_embeddings=True, act="relu")
    shape = ModelShape.from_config(cfg, weight_bytes=4)
    assert (shape.head_dim, shape.kv_bytes, shape.neuron_bytes) == (16, 4, 3 * 64 * 4)
    freqs = [np.zeros(128)] * 2
    p = solve_placement(shape, freqs, 10 ** 9, context=10)
    assert p.fixed_bytes["lm_head"] == 0 and p.fixed_bytes["embeddings"] == 100 * 64 * 4
    assert p.fixed_bytes["kv_cache"] == 2 * 2 * 10 * 2 * 16 * 4
    assert p.fixed_bytes["attention"] == 2 * (64 * (64 + 2 * 32) + 64 * 64) * 4


def test_cpu_bytes_in_the_cpu_format():
    shape = small_shape()
    freqs = sorted_freqs(np.random.default_rng(7), 5, 200)
    need = sum(solve_placement(shape, freqs, 10 ** 9, context=8).fixed_bytes.values())
    p = solve_placement(shape, freqs, need + 128 * shape.neuron_bytes, context=8,
                        cpu_bytes_per_neuron=3 * (64 + 4))
    assert p.cpu_bytes == (1000 - 128) * 3 * 68


def test_bad_frequencies():
    shape = small_shape(f=8, n_layers=2)
    good = [np.linspace(1, 0, 8)] * 2
    with pytest.raises(UserError, match="sorted"):
        solve_placement(shape, [good[0], np.linspace(0, 1, 8)], GiB, context=8)
    with pytest.raises(UserError, match="2 layers|1 layers"):
        solve_placement(shape, good[:1], GiB, context=8)
    with pytest.raises(UserError, match="shape"):
        solve_placement(shape, [good[0], np.zeros(7)], GiB, context=8)
    with pytest.raises(UserError, match=">= 0"):
        solve_placement(shape, [good[0], -np.linspace(0, 1, 8)], GiB, context=8)
    with pytest.raises(UserError, match="predictor bytes"):
        solve_placement(shape, good, GiB, context=8, predictor_bytes=[1, 2, 3])


def test_format_placement():
    freqs = sorted_freqs(np.random.default_rng(8), 32, 11008)
    p = solve_placement(LLAMA2_7B, freqs, 8 * GiB, context=4096)
    text = format_placement(p)
    lines = text.splitlines()
    assert len(lines) == 3 + 32
    assert f"{100 * p.gpu_share:.1f}% of activations" in text
    assert lines[3].split()[:3] == ["0", str(p.hot_counts[0]), str(11008 - p.hot_counts[0])]
    assert "GPU budget 8.00 GiB" in lines[0] and "KV cache 2.00 GiB" in lines[0]
