"""``sync.native.sending.materialized``: full tensors from every release's
``WeightSource`` shape. Stand-ins here; the real sources (vLLM 0.32.0's
iterable ``ModuleSource``, 0.33.0's ``iter_full()``) feed a real engine in
``tests/test_native_backend.py`` (6)."""

from __future__ import annotations

import pytest
import torch

from vllm_fp8_overlay.sync.native.sending import materialized

W = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4)}


class _Iterable:  # vLLM 0.28-0.32: the source itself is iterated
    def __iter__(self):
        return iter(W.items())


class _Modes:  # vLLM >= 0.33: not iterable; one mode or both
    def __init__(self, full: bool) -> None:
        self.full = full

    def implements_iter_full(self) -> bool:
        return self.full

    def iter_full(self):
        return iter(W.items())

    def iter_local(self):
        return iter((n, t[:1]) for n, t in W.items())


class _Sharded:
    """A DTensor's stand-in: ``full_tensor()`` gathers (here: returns the whole)."""

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t

    def full_tensor(self) -> torch.Tensor:
        return self.t


@pytest.mark.parametrize("source", [_Iterable(), _Modes(full=True)], ids=["iterable", "iter_full"])
def test_full_tensors_from_either_shape(source):
    got = dict(materialized(source))
    assert list(got) == list(W) and all(torch.equal(got[n], W[n]) for n in W)


def test_sharded_tensors_left_in_the_pairs_are_gathered():
    got = dict(materialized([("a", _Sharded(W["a"])), ("b", W["b"])]))
    assert torch.equal(got["a"], W["a"]) and got["b"] is W["b"]


def test_a_source_of_local_pieces_only_is_refused():
    with pytest.raises(TypeError, match="iter_full"):
        list(materialized(_Modes(full=False)))
