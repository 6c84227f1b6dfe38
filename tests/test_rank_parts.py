"""Expert parts on the worker: a step is its main stream plus one stream per
trainer rank that sends this worker experts (``sync/rank_parts.py``),
checked and loaded as one (``apply.steps.StepJob(parts=...)``).

Streams are recorded from real ``WeightSender``s and replayed into real
``WeightReceiver``s; real groups (gloo) and real vLLM are in
``tests/test_sync_sharded_vllm.py`` (e) and (f)."""

from __future__ import annotations

import pytest
import torch

from vllm_fp8_overlay.sync import WeightReceiver, WeightSender
from vllm_fp8_overlay.sync.apply.errors import WeightUpdateRejected
from vllm_fp8_overlay.sync.apply.steps import Served, StepJob
from vllm_fp8_overlay.sync.apply.validate import dtype_name
from vllm_fp8_overlay.sync.rank_parts import fused_expert_range, rows_travel_alone
from vllm_fp8_overlay.sync.transport import RecordingTransport, ReplayTransport

E = 4


@pytest.fixture(autouse=True, params=["threads", "in-turn"])
def receive_mode(request, monkeypatch):
    """Parts received in threads beside the main stream (releases where a
    background receive is verified) and one after the other (the others)."""
    monkeypatch.setenv("FP8_OVERLAY_BACKGROUND_RECEIVE", "1" if request.param == "threads" else "0")
    return request.param


def _weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {"model.embed_tokens.weight": torch.randn(32, 8, generator=g).bfloat16(),
           "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8, generator=g).bfloat16()}
    for e in range(E):
        for proj, shape in (("gate_proj", (6, 8)), ("up_proj", (6, 8)), ("down_proj", (8, 6))):
            out[f"model.layers.0.mlp.experts.{e}.{proj}.weight"] = torch.randn(*shape, generator=g).bfloat16()
    return out


def _is_expert(name: str) -> bool:
    return ".experts." in name


def _expert_id(name: str) -> int:
    return int(name.split(".experts.")[1].split(".")[0])


def _stream(weights: dict[str, torch.Tensor], step: int = 1) -> list[bytes]:
    rec = RecordingTransport()
    WeightSender(None, "", 0, 0, bucket_bytes=1 << 10, transport=rec).send(weights, step=step)
    return rec.messages


def _aborted_stream(weights: dict[str, torch.Tensor], step: int = 1) -> list[bytes]:
    def failing():
        yield from weights.items()
        raise RuntimeError("the part's sender failed")

    rec = RecordingTransport()
    with pytest.raises(RuntimeError, match="part's sender failed"):
        WeightSender(None, "", 0, 0, bucket_bytes=1 << 10, transport=rec).send(failing(), step=step)
    return rec.messages


def _served(weights: dict[str, torch.Tensor]) -> Served:
    specs = {n: (dtype_name(t.dtype), tuple(t.shape)) for n, t in weights.items()}
    return Served(dir="", specs=specs, layout=None, layout_full=None, layout_error=None, param_specs={})


class _Loader:
    def __init__(self) -> None:
        self.calls: list[dict[str, torch.Tensor]] = []

    def __call__(self, mode: str, tensors, before_finalize=None) -> dict:
        self.calls.append({n: t.clone() for n, t in tensors})
        return {}


def _job(main: list[bytes], parts: list[list[bytes]], served: Served, expected=None):
    rx = WeightReceiver("", 0, 0, 0, transport=ReplayTransport(main))
    prx = [WeightReceiver("", 0, 0, 0, transport=ReplayTransport(p)) for p in parts]
    load = _Loader()
    job = StepJob(rx, 1, "load_weights", served, load, parts=prx, expected=expected)
    return job, load, [rx, *prx]


def _split(weights, owners: list[range]):
    main = {n: t for n, t in weights.items() if not _is_expert(n)}
    parts = [{n: t for n, t in weights.items() if _is_expert(n) and _expert_id(n) in r} for r in owners]
    return main, parts


@pytest.mark.parametrize("experts,world", [(8, 2), (128, 8), (6, 4), (3, 4), (1, 2)])
def test_expert_range_is_where_shard0_puts_the_experts(experts, world):
    rows = torch.arange(experts)
    for rank, chunk in enumerate(torch.chunk(rows, world)):
        assert fused_expert_range(experts, world, rank) == (int(chunk[0]), int(chunk[-1]) + 1)
    for rank in range(len(torch.chunk(rows, world)), world):  # ranks torch.chunk leaves empty
        start, stop = fused_expert_range(experts, world, rank)
        assert start == stop


def test_main_stream_and_parts_load_as_one_update():
    w = _weights(0)
    main, parts = _split(w, [range(0, 2), range(2, 4)])
    job, load, rxs = _job(_stream(main), [_stream(p) for p in parts], _served(w))
    result = job.collect(None)
    assert result["ok"] and result["parts"] == 2 and result["num_tensors"] == len(w)
    assert len(load.calls) == 1, "one load for the whole step"
    got = load.calls[0]
    assert sorted(got) == sorted(w)
    for n, t in w.items():
        assert torch.equal(got[n], t), n
    assert all(r.transport.remaining == 0 for r in rxs)


def test_an_expert_in_two_parts_rejects_the_step_and_every_stream_is_drained():
    w = _weights(1)
    main, parts = _split(w, [range(0, 3), range(2, 4)])  # expert 2 in both parts
    job, load, rxs = _job(_stream(main), [_stream(p) for p in parts], _served(w))
    with pytest.raises(WeightUpdateRejected, match=r"experts\.2\.down_proj\.weight: row shards from 2 parts add up "
                                                   r"to 16 rows, the served tensor has 8"):
        job.collect(None)
    assert load.calls == []
    assert all(r.transport.remaining == 0 and r.broken is None for r in rxs)


def test_a_tensor_in_the_main_stream_and_a_part_rejects_the_step():
    w = _weights(6)
    main, parts = _split(w, [range(0, 4)])
    main["model.layers.0.mlp.experts.1.up_proj.weight"] = w["model.layers.0.mlp.experts.1.up_proj.weight"]
    job, load, rxs = _job(_stream(main), [_stream(parts[0])], _served(w))
    with pytest.raises(WeightUpdateRejected, match=r"1 tensor\(s\) sent in two streams: .*experts\.1\.up_proj"):
        job.collect(None)
    assert load.calls == []
    assert all(r.transport.remaining == 0 for r in rxs)


def test_a_missing_part_rejects_the_step():
    w = _weights(2)
    main, parts = _split(w, [range(0, 2), range(2, 4)])
    job, load, _ = _job(_stream(main), [_stream(parts[0])], _served(w))
    with pytest.raises(WeightUpdateRejected, match=r"missing.*experts\.[23]\."):
        job.collect(None)
    assert load.calls == []


def test_an_aborted_part_rejects_the_step_and_the_others_finish():
    w = _weights(3)
    main, parts = _split(w, [range(0, 2), range(2, 4)])
    job, load, rxs = _job(_stream(main), [_stream(parts[0]), _aborted_stream(parts[1])], _served(w))
    with pytest.raises(WeightUpdateRejected, match="part's sender failed"):
        job.collect(None)
    assert load.calls == []
    assert all(r.transport.remaining == 0 and r.broken is None for r in rxs)
    # the next step is received normally on every group
    w2 = _weights(4)
    main2, parts2 = _split(w2, [range(0, 2), range(2, 4)])
    for r, msgs in zip(rxs, [_stream(main2, 2), *[_stream(p, 2) for p in parts2]]):
        r.transport._queue.extend(msgs)
    job2 = StepJob(rxs[0], 2, "load_weights", _served(w2), load, parts=rxs[1:])
    assert job2.collect(None)["ok"] and sorted(load.calls[0]) == sorted(w2)


def test_an_expert_parallel_worker_expects_only_its_own_experts():
    """``expected`` (the worker's ownership filter): experts 0-1 here, 2-3 on
    another worker. Its own part completes the step; another rank's expert is
    not loaded here, it rejects the step."""
    w = _weights(5)
    mine = lambda n: not _is_expert(n) or _expert_id(n) < 2  # noqa: E731
    main, parts = _split(w, [range(0, 2)])
    job, load, _ = _job(_stream(main), [_stream(parts[0])], _served(w), expected=mine)
    assert job.collect(None)["num_tensors"] == sum(map(mine, w))
    assert sorted(load.calls[0]) == sorted(n for n in w if mine(n))
    _, wrong = _split(w, [range(0, 3)])
    job, load, _ = _job(_stream(main), [_stream(wrong[0])], _served(w), expected=mine)
    with pytest.raises(WeightUpdateRejected, match=r"not in this worker's experts of the served checkpoint.*experts\.2\."):
        job.collect(None)
    assert load.calls == []


def _layouts():
    from vllm_fp8_overlay.formats import FP8Layout

    return {"bf16": None,
            "ct-channel": FP8Layout(method="compressed-tensors", strategy="channel", ignore=("lm_head",)),
            "hf-block": FP8Layout(method="fp8", strategy="block", block_size=(128, 128),
                                  scale_name="weight_scale_inv", ignore=("lm_head",))}


def _dense(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"model.embed_tokens.weight": (torch.randn(96, 128, generator=g) * 0.03).bfloat16(),
            "model.layers.0.self_attn.q_proj.weight": (torch.randn(256, 128, generator=g) * 0.03).bfloat16(),
            "model.layers.0.mlp.down_proj.weight": (torch.randn(128, 256, generator=g) * 0.03).bfloat16(),
            "model.layers.0.input_layernorm.weight": torch.rand(128, generator=g).bfloat16()}


@pytest.mark.parametrize("fmt", ["bf16", "ct-channel", "hf-block"])
def test_row_shards_from_the_parts_equal_the_whole_tensors_served(fmt, monkeypatch):
    """Two ranks' row shards (``Shard(0)``: 128 rows each of the 256-row
    weight), each quantized by its own part's sender: the worker puts them
    back together and gets, bitwise, the served form of the whole tensors
    (``quantize_weights`` on the full weights); the main stream brings
    what the layout cannot take in rows (``rows_travel_alone``) whole."""
    from vllm_fp8_overlay.formats import quantize_weights
    from vllm_fp8_overlay.sync.apply import steps
    from vllm_fp8_overlay.sync.apply.validate import layout_key

    monkeypatch.setattr(steps, "has_layerwise_reload", lambda: True)  # the load is a stand-in
    layout = _layouts()[fmt]
    w = _dense(7)
    want = dict(quantize_weights(iter(w.items()), layout, backend="torch")) if layout is not None else w
    alone = {n for n, t in w.items() if rows_travel_alone(n, tuple(t.shape), t.dtype, 2, layout)}
    # channel scales: every weight; 128x128 blocks: q_proj (two whole blocks of rows), not down_proj (64 rows each)
    assert ("model.layers.0.mlp.down_proj.weight" in alone) == (fmt != "hf-block"), alone
    assert "model.layers.0.self_attn.q_proj.weight" in alone
    shards = [{n: torch.chunk(t, 2)[r].clone() for n, t in w.items() if n in alone} for r in range(2)]
    whole = {n: t for n, t in w.items() if n not in alone}

    def record(weights):
        rec = RecordingTransport()
        WeightSender(layout, "", 0, 0, bucket_bytes=1 << 14, transport=rec).send(weights, step=1)
        return rec.messages

    served = Served(dir="", specs={n: (dtype_name(t.dtype), tuple(t.shape)) for n, t in want.items()},
                    layout=layout_key(None if layout is None else layout.to_dict())[0],
                    layout_full=None if layout is None else layout.to_dict(), layout_error=None, param_specs={})
    rx = WeightReceiver("", 0, 0, 0, transport=ReplayTransport(record(whole)))
    prx = [WeightReceiver("", 0, 0, 0, transport=ReplayTransport(record(s))) for s in shards]
    load = _Loader()
    result = StepJob(rx, 1, "layerwise", served, load, parts=prx).collect(None)
    assert result["num_tensors"] == len(want)
    got = load.calls[0]
    assert sorted(got) == sorted(want)
    for n, t in want.items():
        a, b = (x.view(torch.uint8) if x.dtype == torch.float8_e4m3fn else x for x in (got[n], t))
        assert got[n].dtype == t.dtype and torch.equal(a, b), n
    # the same shards with one rank's q_proj rows missing: rejected, nothing loaded
    shards[1].pop("model.layers.0.self_attn.q_proj.weight")
    prx = [WeightReceiver("", 0, 0, 0, transport=ReplayTransport(record(s))) for s in shards]
    load = _Loader()
    job = StepJob(WeightReceiver("", 0, 0, 0, transport=ReplayTransport(record(whole))), 1, "layerwise", served,
                  load, parts=prx)
    with pytest.raises(WeightUpdateRejected, match=r"q_proj\.weight: got .*\[128, 128\], expected .*\[256, 128\]"):
        job.collect(None)
    assert load.calls == []


def test_main_stream_and_two_parts_over_real_gloo(tmp_path):
    """The same step shapes as the 2-GPU check (``testing/parts_gpu_check``),
    over real gloo groups between two processes: a trainer sends the main
    stream and two parts (experts, row shards) at once from three threads; the
    worker's tensors (rows put back together) equal the torch quantization of
    the whole weights bitwise, block and channel layouts, four steps each; the
    step whose main stream repeats an expert is rejected and the next arrives
    whole on every group."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from vllm_fp8_overlay.sync.transport import free_port

    out = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "vllm_fp8_overlay.testing.parts_gpu_check", "--cpu", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=600)
    assert r.returncode == 0, r.stderr[-6000:]
    from vllm_fp8_overlay.testing.parts_gpu_check import problems

    assert problems(json.loads(out.read_text())) == []


def test_per_expert_rows_go_only_to_workers_that_load_the_expert():
    """A MoE whose experts are per-expert 2-D parameters (sharded by rows, not
    over experts): their rows go to a worker only if it loads that expert (an
    expert-parallel worker would reject another rank's expert)."""
    from vllm_fp8_overlay.sync.rank_parts import RankParts, Split

    class Held:  # what a DTensor gives: this rank's rows
        def __init__(self, t):
            self.t = t

        def to_local(self):
            return self.t

    parts = object.__new__(RankParts)  # routing only: no groups
    parts.start = parts.stop = 0
    rows = Split([], [("model.layers.0.mlp.experts.3.up_proj.weight", Held(torch.ones(2, 4))),
                      ("model.layers.0.self_attn.q_proj.weight", Held(torch.ones(2, 4))),
                      ("model.layers.0.mlp.experts.5.up_proj.weight", Held(torch.ones(0, 4)))])  # no rows here

    def sent(owned):
        return [n for n, _ in parts._tensors(rows, [], owned)]

    both = ["model.layers.0.mlp.experts.3.up_proj.weight", "model.layers.0.self_attn.q_proj.weight"]
    assert sent(None) == both
    assert sent(frozenset({2, 3})) == both
    assert sent(frozenset({0, 1})) == ["model.layers.0.self_attn.q_proj.weight"]
