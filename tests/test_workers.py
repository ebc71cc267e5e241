"""backends.workers: tasks on single-threaded workers, and block_sparse's groups run on them."""

from __future__ import annotations

import threading

import pytest
import torch
from _reference import masked_lse, softmax_attention

import sparse_linear_attn as sla
from sparse_linear_attn.backends import workers
from sparse_linear_attn.variants import block_sparse as bs_mod


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def fresh_pool(monkeypatch):
    """A pool started in the test (its thread setup is what some tests check), shut down after."""
    monkeypatch.setattr(workers, "_pool", None)
    yield
    if workers._pool is not None:
        workers._pool.shutdown()


def test_every_task_runs_once_with_its_worker_state(two_threads, fresh_pool):
    seen, states = [], set()
    lock = threading.Lock()

    def task(i, state):
        state.append(i)
        with lock:
            seen.append((i, torch.get_num_threads(), threading.get_ident()))
            states.add(id(state))

    workers.run_tasks(task, 50, list, workers=2)
    assert sorted(i for i, _, _ in seen) == list(range(50))
    # The tasks run on the pool's threads with one intra-op thread each, not on the caller.
    assert all(n == 1 for _, n, _ in seen)
    assert threading.get_ident() not in {t for _, _, t in seen}
    assert 1 <= len(states) <= 2


def test_caller_and_new_threads_keep_their_thread_count(two_threads, fresh_pool):
    workers.run_tasks(lambda i, s: None, 4, lambda: None, workers=2)
    assert torch.get_num_threads() == 2
    # A thread started afterwards gets the process's count, not the workers' one.
    got = []
    t = threading.Thread(target=lambda: got.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert got == [2]


def test_inline_for_one_worker_and_inside_a_worker(two_threads):
    idents = []
    workers.run_tasks(lambda i, s: idents.append(threading.get_ident()), 3, lambda: None, workers=1)
    assert set(idents) == {threading.get_ident()}
    inner = []

    def outer(i, state):
        # A call from a worker's task runs inline there (no waiting on the pool it occupies).
        assert workers.default_workers() == 1
        workers.run_tasks(lambda j, s: inner.append((i, j, threading.get_ident())), 2, lambda: None)

    workers.run_tasks(outer, 4, lambda: None, workers=2)
    assert sorted((i, j) for i, j, _ in inner) == [(i, j) for i in range(4) for j in range(2)]


def test_default_workers_follow_torch_threads_up_to_the_cap(monkeypatch):
    monkeypatch.setattr(workers, "MAX_WORKERS", 4)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        assert workers.default_workers() == 3
        torch.set_num_threads(5)  # above the cap: torch's own threads, inline
        assert workers.default_workers() == 1
    finally:
        torch.set_num_threads(before)


def test_an_error_in_a_task_is_raised_in_the_caller(two_threads):
    def task(i, state):
        if i == 3:
            raise ValueError("task 3 failed")

    with pytest.raises(ValueError, match="task 3 failed"):
        workers.run_tasks(task, 40, lambda: None, workers=2)


# block_sparse's groups on workers: the same results as one thread, and the float64 reference.


def dense_reference(q, k, v, layout, bs, causal, kpm, scale):
    """float64 (out, lse) of softmax attention over the layout's expanded tiles (per batch
    row and kv head for a 4-dim layout); rows seeing nothing: zeros and −inf."""
    B, H, nq, _ = q.shape
    nk = k.shape[2]
    lay = layout
    while lay.dim() < 4:
        lay = lay[None]
    lay = lay.repeat_interleave(H // lay.shape[1], 1) if lay.shape[1] != H else lay
    m = lay.repeat_interleave(bs, -2).repeat_interleave(bs, -1)[..., :nq, :nk]
    if causal:
        i, j = torch.arange(nq)[:, None], torch.arange(nk)[None, :]
        m = m & (j <= i + nk - nq)
    if kpm is not None:
        m = m & ~kpm[:, None, None, :]
    return softmax_attention(q, k, v, m, scale=scale)[0], masked_lse(q, k, m, scale)


CASES = [
    # B, H, Hkv, nq, nk, bs, causal, padding, layout kind
    (2, 4, 2, 96, 96, 16, True, False, "batch_kv"),  # topk_block / hybrid's selection layout
    (1, 2, 2, 100, 100, 16, False, True, "head"),  # ragged, padded keys
    (2, 2, 1, 70, 300, 32, True, True, "shared"),  # cross-attention
    (1, 3, 1, 130, 130, 8, True, False, "batch_kv"),  # rows of many widths, some seeing nothing
]


@pytest.mark.parametrize("B,H,Hkv,nq,nk,bs,causal,pad,kind", CASES)
def test_groups_on_workers_match_one_thread_and_the_reference(monkeypatch, two_threads, B, H, Hkv, nq, nk, bs, causal,
                                                              pad, kind):  # fmt: skip
    nqb, nkb = -(-nq // bs), -(-nk // bs)
    shape = {"shared": (nqb, nkb), "head": (H, nqb, nkb), "batch_kv": (B, Hkv, nqb, nkb)}[kind]
    layout = torch.rand(shape, generator=torch.Generator().manual_seed(5)) < 0.45
    if kind == "batch_kv":
        layout[..., 1, :] = False  # a query block that sees nothing: zeros and −inf
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(B, h, n, 16, generator=g) for h, n in ((H, nq), (Hkv, nk), (Hkv, nk)))
    kpm = (torch.rand(B, nk, generator=g) < 0.3) if pad else None
    scale = 0.3
    # Groups of a few key blocks each, so that every worker runs many.
    monkeypatch.setattr(bs_mod, "GROUP_ELEMENTS", 3 * bs * 16 * 2 * max(H, Hkv))

    def run(parallel_from):
        monkeypatch.setattr(bs_mod, "PARALLEL_ELEMENTS", parallel_from)
        with torch.no_grad():
            return bs_mod.block_attention(q, k, v, layout, block_size=bs, causal=causal, key_padding_mask=kpm,
                                          scale=scale, return_lse=True)  # fmt: skip

    ran_on = set()
    task = workers.run_tasks

    def spy(fn, n, make_state, workers=None):
        ran_on.add(workers)
        return task(fn, n, make_state, workers=workers)

    monkeypatch.setattr(bs_mod, "run_tasks", spy)
    out, lse = run(0)
    assert ran_on == {None}  # the default: one worker per torch thread
    out1, lse1 = run(1 << 60)
    assert ran_on == {None, 1}
    assert torch.equal(out, out1) and torch.equal(lse, lse1)
    ref, ref_lse = dense_reference(q, k, v, layout, bs, causal, kpm, scale)
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=1e-5)
    if kind == "batch_kv":
        assert bool((out[:, :, bs : 2 * bs] == 0).all()) and bool(torch.isneginf(lse[:, :, bs : 2 * bs]).all())


@pytest.mark.parametrize("causal", [True, False])
def test_compressed_part_on_workers_matches_the_naive_loops(monkeypatch, two_threads, causal):
    # hybrid's pseudo-key part, its query blocks in chunks spread over two workers, against the
    # float64 loops over group key ranges; padded keys and a selection from a real call.
    from sparse_linear_attn.variants import hybrid as hy

    B, H, Hkv, n, bs, r, near = 2, 4, 2, 72, 8, 2, 2
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(B, h, n, 8, generator=g) for h in (H, Hkv, Hkv))
    kpm = torch.rand(B, n, generator=g) < 0.2
    kw = dict(causal=causal, block_size=bs, density=0.3, remainder_block=r, remainder_near=near, local_blocks=1)
    sel = sla.selection(q, k, "topk_block", causal=causal, key_padding_mask=kpm, block_size=bs, density=0.3)
    groups = hy.remainder_groups(n, n, bs, causal=causal, local_blocks=1, chunk=r, near=near)
    ranges = hy.remainder_groups_naive(n, n, bs, causal=causal, local_blocks=1, chunk=r, near=near)
    monkeypatch.setattr(hy, "COMPRESSED_ELEMENTS", 2 * H * n)  # a few query blocks per chunk
    used = []
    task = workers.run_tasks

    def spy(fn, count, make_state, workers=None):
        used.append((count, workers))
        return task(fn, count, make_state, workers=workers)

    monkeypatch.setattr(hy, "run_tasks", spy)
    with torch.no_grad():
        out, lse = hy.compressed_part(q, k, v, kpm, sel.block_mask, groups, scale=0.35, block_size=bs)
    assert used and used[0][0] > 2 and used[0][1] == 2
    ref, ref_lse = hy.compressed_part_naive(q, k, v, kpm, sel.block_mask, ranges, scale=0.35, block_size=bs)
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=1e-5)
    # The whole hybrid call: the same on two workers as on one thread.
    whole = sla.attention(q, k, v, "hybrid", key_padding_mask=kpm, **kw)
    torch.set_num_threads(1)
    one = sla.attention(q, k, v, "hybrid", key_padding_mask=kpm, **kw)
    assert torch.equal(whole, one)
