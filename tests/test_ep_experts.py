"""An expert-parallel worker leaves other ranks' experts out of vLLM's loader
(``sync/apply/ep_experts.py``, declared as ``skip-other-ranks-experts``).

Here on stand-in layers with vLLM's mapping method; the proof on real vLLM
(TP = 2 + EP engines equal to a cold start, parameters and outputs, with
every worker dropping the other rank's experts) is
``tests/test_sync_sharded_vllm.py`` (c), full tier, 0.19.1 and 0.32.0.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from packaging.version import Version

from vllm_fp8_overlay.sync.apply import ep_experts


class _Experts(torch.nn.Module):
    """Stands in for a fused-MoE layer: 8 global experts, this rank holds ``local``."""

    def __init__(self, local: range, use_ep: bool = True, eplb: bool = False, logical: int = 8) -> None:
        super().__init__()
        self.global_num_experts = 8
        self._local = list(local)
        self.moe_config = SimpleNamespace(moe_parallel_config=SimpleNamespace(use_ep=use_ep, enable_eplb=eplb),
                                          num_logical_experts=logical)

    def _map_global_expert_id_to_local_expert_id(self, e: int) -> int:
        return self._local.index(e) if e in self._local else -1


def _model(**kw) -> torch.nn.Module:
    m = torch.nn.Module()
    m.layers = torch.nn.ModuleList()
    for _ in range(2):
        layer = torch.nn.Module()
        layer.mlp = torch.nn.Module()
        layer.mlp.experts = _Experts(range(4, 8), **kw)
        m.layers.append(layer)
    return m


def _names() -> list[str]:
    out = []
    for i in range(2):
        p = f"layers.{i}.mlp."
        out += [p + "gate.weight", f"layers.{i}.input_layernorm.weight"]
        out += [p + f"experts.{e}.{proj}.{what}" for e in range(8) for proj in ("gate_proj", "up_proj", "down_proj")
                for what in ("weight", "weight_scale")]
    return out


@pytest.fixture
def release(monkeypatch):
    import vllm_fp8_overlay.vllm_version as vv

    def use(version: str | None) -> None:
        monkeypatch.setattr(vv, "installed_vllm_version", lambda: None if version is None else Version(version))

    use("0.32.0")
    return use


def test_other_ranks_experts_are_left_out(release):
    f = ep_experts.other_ranks_experts(_model())
    assert f is not None
    names = _names()
    kept = [n for n, _ in f.only_mine((n, torch.zeros(1)) for n in names)]
    dropped = set(names) - set(kept)
    # experts 0-3 of both layers, every projection, weight and scale; nothing else
    assert dropped == {n for n in names if ".experts." in n and int(n.split(".experts.")[1].split(".")[0]) < 4}
    assert f.dropped == len(dropped) == 2 * 4 * 3 * 2
    assert all(".experts." not in n or int(n.split(".experts.")[1].split(".")[0]) >= 4 for n in kept)


def test_ownership_is_read_once_per_model(release):
    """A step fed by rank parts asks for the expected names and then for the
    loader's filter: the layers' expert maps are walked for the first ask
    only, and a new model is walked again."""
    m = _model()
    calls = []
    for layer in m.layers:
        experts = layer.mlp.experts
        mapping = experts._map_global_expert_id_to_local_expert_id
        experts._map_global_expert_id_to_local_expert_id = lambda e, f=mapping: calls.append(e) or f(e)
    mine = ep_experts.ownership_filter(m)
    walked = len(calls)
    assert walked == 2 * 8
    f = ep_experts.other_ranks_experts(m)
    assert len(calls) == walked and ep_experts.ownership_filter(m) is not None and len(calls) == walked
    assert [mine(n) for n in _names()] == [f.mine(n) for n in _names()]
    assert ep_experts.other_ranks_experts(_model()).remote == f.remote


def test_off_without_expert_parallelism_or_release_or_switch(release, monkeypatch):
    assert ep_experts.other_ranks_experts(_model(use_ep=False)) is None  # TP-sharded experts: every rank needs all
    # checkpoint experts with replicas on several ranks: vLLM's loader places them
    assert ep_experts.other_ranks_experts(_model(eplb=True)) is None
    assert ep_experts.other_ranks_experts(_model(logical=6)) is None  # 2 redundant experts
    release("0.18.1")
    assert ep_experts.other_ranks_experts(_model()) is None  # not declared there
    release("0.32.0")
    monkeypatch.setenv(ep_experts.DISABLE_ENV, "0")
    assert ep_experts.other_ranks_experts(_model()) is None


def test_a_layer_whose_mapping_fails_loads_in_full(release):
    m = _model()

    def broken(e):
        raise RuntimeError("no expert map here")

    m.layers[0].mlp.experts._map_global_expert_id_to_local_expert_id = broken
    f = ep_experts.other_ranks_experts(m)
    assert set(f.remote) == {"layers.1.mlp.experts"}
    assert f.mine("layers.0.mlp.experts.0.gate_proj.weight") and not f.mine("layers.1.mlp.experts.0.gate_proj.weight")
