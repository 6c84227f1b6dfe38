"""The sender's bucket replay (``sync.replay``) as plain data, on CPU.

The grouped send path that uses it runs on CUDA only (its bitwise tests are
in ``test_kernels_gpu.py``); these tests pin down the matching itself: a
step's caller items are reused list against list only when every name,
shape, dtype and device is the previous step's and every item is a plain
``(name, tensor)`` pair not requiring grad; anything else goes item by item.
"""

from __future__ import annotations

import torch

from vllm_fp8_overlay.sync import replay
from vllm_fp8_overlay.sync.wire import TensorEntry


def _items():
    g = torch.Generator().manual_seed(0)
    return [("a.q.weight", torch.randn(8, 4, generator=g), True), ("a.norm.weight", torch.randn(4, generator=g), False),
            ("b.q.weight", torch.randn(8, 4, generator=g).half(), True), ("b.bias", torch.randn(3, generator=g), False)]


def _bucket(items) -> replay.Bucket:
    """A bucket laid out the way the grouped path lays one out."""
    b = replay.Bucket()
    for pos, (name, x, quant) in enumerate(items):
        off = 64 * pos
        if quant:
            replay.jobs_for(b, x.dtype).add(x, off, off + 32, name, pos)
            b.plan.append((name, x.shape, x.dtype, True, x.get_device(), x.dtype, off, off + 32, None))
        else:
            e = TensorEntry(name=name, dtype=x.dtype, shape=tuple(x.shape), offset=off, nbytes=x.numel() * x.element_size())
            b.centries.append(e)
            b.csrcs.append(x)
            b.cidx.append(pos)
            b.plan.append((name, x.shape, x.dtype, False, x.get_device(), None, off, None, e))
    b.entries = [object()]
    return b


def test_plain_items_are_reused_list_against_list():
    items = _items()
    plan = replay.plan_of(_bucket(items))
    assert plan.fast is not None and plan.fast.names == [n for n, _, _ in items]
    new = [(n, torch.zeros_like(x)) for n, x, _ in items]  # next step: same specs, other tensors
    xs = replay.match_fast(new, plan.fast)
    assert xs is not None and all(a is b for a, (_, b) in zip(xs, new))
    cur = replay.Bucket()
    replay.fill_fast(cur, plan, xs)
    assert cur.token is plan.token and cur.plan is plan.items and cur.fast is plan.fast
    assert [x is new[0][1] for x in cur.qjobs[torch.float32].srcs] == [True]
    assert cur.qjobs[torch.float16].srcs[0] is new[2][1] and cur.qjobs[torch.float16].q_offsets == [128]
    assert [e.name for e in cur.centries] == ["a.norm.weight", "b.bias"]
    assert cur.csrcs[0] is new[1][1] and cur.csrcs[1] is new[3][1]
    # a Parameter is a plain tensor too
    params = [(n, torch.nn.Parameter(x, requires_grad=False)) for n, x in new]
    assert replay.match_fast(params, plan.fast) is not None


def test_anything_else_is_not_matched_list_against_list():
    items = _items()
    fast = replay.plan_of(_bucket(items)).fast
    base = [(n, x.clone()) for n, x, _ in items]

    class Sub(torch.Tensor):
        pass

    changes = {
        "name": lambda it: [("a.k.weight", it[0][1])] + it[1:],
        "shape": lambda it: [(it[0][0], torch.zeros(4, 8))] + it[1:],
        "dtype": lambda it: it[:1] + [(it[1][0], it[1][1].double())] + it[2:],
        "grad": lambda it: it[:3] + [(it[3][0], it[3][1].clone().requires_grad_(True))],
        "subclass": lambda it: it[:1] + [(it[1][0], it[1][1].as_subclass(Sub))] + it[2:],
        "fewer": lambda it: it[:3],
        "not a pair": lambda it: it[:3] + [(it[3][0], it[3][1], "extra")],
        "not a tuple": lambda it: it[:3] + [{0: it[3][0], 1: it[3][1]}],
        "not a tensor": lambda it: it[:3] + [(it[3][0], [1.0, 2.0, 3.0])],
    }
    for what, change in changes.items():
        assert replay.match_fast(change(list(base)), fast) is None, what
    assert replay.match_fast(list(base), fast) is not None


def test_item_by_item_replay_and_what_it_remembers():
    items = _items()
    plan = replay.plan_of(_bucket(items))
    planned = [(n, torch.ones_like(x), q, True) for n, x, q in items]
    cur = replay.Bucket()
    assert replay.replay_items(planned, plan, cur)
    assert cur.simple and cur.qjobs[torch.float32].srcs[0] is planned[0][1] and cur.csrcs[1] is planned[3][1]
    cur = replay.Bucket()
    prequantized = [p[:3] + (False,) for p in planned]  # e.g. pre-quantized pairs: not plain caller tensors
    assert replay.replay_items(prequantized, plan, cur) and not cur.simple
    assert replay.plan_of(cur).fast is None  # such a bucket is compared item by item next time too
    flipped = [planned[0][:2] + (False, True)] + planned[1:]  # quantized then, copied now
    assert not replay.replay_items(flipped, plan, replay.Bucket())
    assert not replay.replay_items(planned[:3], plan, replay.Bucket())
