"""The overlay on the installed real vLLM release (run once per matrix environment).

On every release: the declared status, exactly what is touched, exact revert.
With engines (slow): the reload bugs show without the overlay and are gone
with it, and a reload of changed weights equals a cold start. Observations
are compared with ``vllm_fp8_overlay/matrix.json`` (see ``vllm_fp8_overlay.compat``).

The engines start with the overlay's automatic activation switched off
(``FP8_OVERLAY_DISABLE=1``) so that vLLM records its reload metadata
unpatched, as a process without the overlay would; the tests then reload
once without and once with the overlay in the same engine.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
from packaging.version import Version

import vllm_fp8_overlay as overlay
from vllm_fp8_overlay import compat
from vllm_fp8_overlay.derived_state import declared_for
from vllm_fp8_overlay.overlay import State

pytestmark = pytest.mark.vllm

RELOAD_PKG = "vllm.model_executor.model_loader.reload"
PROBE = "vllm_fp8_overlay.testing.reload_probe.ReloadProbe"
PROMPTS = [[1, 17, 42, 99, 7], [1, 300, 5, 64]]


@pytest.fixture(scope="module")
def version(vllm_version) -> Version:
    return Version(Version(vllm_version).public)


@pytest.fixture(scope="module")
def has_reload(version) -> bool:
    return version >= Version("0.16.0")


@pytest.fixture
def fresh_overlay():
    overlay.deactivate()
    yield
    overlay.deactivate()
    overlay.activate()


def _touched() -> list[str]:
    from vllm_fp8_overlay.testing.reload_probe import ReloadProbe

    return ReloadProbe.probe_touched(None)


def _expected_states(version: Version) -> dict[str, str]:
    return {p.id: p.state_for(version)[0].value for p in compat.patches()}


# ------------------------------------------------------------------ no engine
def test_declared_status_and_exact_footprint(version, has_reload, fresh_overlay):
    if has_reload:
        importlib.import_module(RELOAD_PKG)
        # import the modules that re-export reload names *before* activating
        importlib.import_module("vllm.model_executor.model_loader.base_loader")
        importlib.import_module("vllm.model_executor.model_loader.utils")
    assert _touched() == []
    overlay.activate()
    states = {s.id: s.state.value for s in overlay.status()}
    assert states == _expected_states(version)

    touched = _touched()
    applied = [p for p in compat.patches() if states[p.id] == State.APPLIED.value]
    # every binding we hold is one of the declared target functions
    declared = set()
    for p in applied:
        for t in p.targets:
            declared.add(t.split(" ")[0].rsplit(".", 1)[1])
    for binding in touched:
        if binding.startswith("SKIP_TENSORS+"):
            assert "skip-e-score-correction-bias" in states and states["skip-e-score-correction-bias"] == "applied"
            continue
        assert binding.rsplit(".", 1)[1] in declared, binding
    if not applied:
        assert touched == []
    else:
        # the defining module and every alias made before activation see the patch
        layerwise = sys.modules[RELOAD_PKG + ".layerwise"]
        by_attr: dict[str, set[int]] = {}
        for binding in touched:
            if binding.startswith("SKIP_TENSORS+"):
                continue
            mod_name, attr = binding.rsplit(".", 1)
            by_attr.setdefault(attr, set()).add(id(getattr(sys.modules[mod_name], attr)))
        assert all(len(ids) == 1 for ids in by_attr.values()), by_attr
        if states.get("quiet-empty-modules") == "applied":
            base_loader = sys.modules["vllm.model_executor.model_loader.base_loader"]
            assert base_loader.finalize_layerwise_processing is layerwise.finalize_layerwise_processing
            assert f"{RELOAD_PKG}.finalize_layerwise_processing" in touched

    overlay.deactivate()
    assert _touched() == []
    if has_reload:
        meta = sys.modules[RELOAD_PKG + ".meta"]
        assert "e_score_correction_bias" not in meta.SKIP_TENSORS or version >= Version("0.20.0")

    compat.check_observation(
        str(version), "status", {"states": states, "touched": sorted(set(b.rsplit(".", 1)[-1] for b in touched))}
    )


def test_changed_target_is_skipped_with_reason(version, has_reload, fresh_overlay, caplog):
    in_range = [p for p in compat.patches() if p.state_for(version)[0] is State.APPLIED]
    if not in_range:
        pytest.skip(f"no patch serves vLLM {version}")
    layerwise = importlib.import_module(RELOAD_PKG + ".layerwise")
    utils = importlib.import_module(RELOAD_PKG + ".utils")
    saved = {}
    # A fork whose functions take other arguments than the ones we wrap.
    for mod in (layerwise, utils):
        for attr in ("finalize_layerwise_processing", "initialize_online_processing",
                     "initialize_layerwise_reload", "get_layer_size"):
            if attr in vars(mod):
                saved[(mod, attr)] = getattr(mod, attr)

                def changed(model, model_config, extra=None):  # noqa: ARG001
                    return None

                setattr(mod, attr, changed)
    try:
        with caplog.at_level("WARNING", logger="vllm.fp8_overlay"):
            overlay.activate()
        states = {s.id: (s.state, s.reason) for s in overlay.status()}
        for p in in_range:
            state, reason = states[p.id]
            assert state is State.SKIPPED, (p.id, state, reason)
            assert reason
        assert _touched() == []
        skipped_logs = [r for r in caplog.records if "skipped" in r.getMessage()]
        assert len(skipped_logs) == len(in_range)
    finally:
        overlay.deactivate()
        for (mod, attr), fn in saved.items():
            setattr(mod, attr, fn)


# ------------------------------------------------------------------ engines
@pytest.fixture(scope="module")
def engine_env():
    old = os.environ.get(overlay.DISABLE_ENV)
    os.environ[overlay.DISABLE_ENV] = "1"
    overlay.deactivate()
    yield
    if old is None:
        os.environ.pop(overlay.DISABLE_ENV, None)
    else:
        os.environ[overlay.DISABLE_ENV] = old
    overlay.activate()


def _start(model_dir, **kw):
    from vllm_fp8_overlay.testing import harness

    # vLLM records reload metadata while building the model: build it unpatched.
    overlay.deactivate()
    return harness.start_llm(model_dir, worker_extension_cls=PROBE, **kw)


def _rpc(llm, method, *args):
    return llm.collective_rpc(method, args=args)


def _reload_cycle(llm, d0, d1, version):
    """Without overlay, with overlay, then W1 and back to W0 (with overlay),
    then the derived-state refresh the weight sync runs after every load."""
    from vllm_fp8_overlay.testing.outputs import greedy_outputs

    cold = _rpc(llm, "probe_digest")[0]
    cold_tokens = greedy_outputs(llm, PROMPTS, 6)
    _rpc(llm, "probe_overlay", False)
    without = _rpc(llm, "probe_reload", str(d0))[0]
    after_without = _rpc(llm, "probe_digest")[0]
    states = _rpc(llm, "probe_overlay", True)[0]
    assert {s["id"]: s["state"] for s in states} == _expected_states(version)
    with_ = _rpc(llm, "probe_reload", str(d0))[0]
    after_with = _rpc(llm, "probe_digest")[0]
    _rpc(llm, "probe_reload", str(d1))
    changed = _rpc(llm, "probe_digest")[0]
    _rpc(llm, "probe_reload", str(d0))
    back_raw = _rpc(llm, "probe_digest")[0]
    refreshed = _rpc(llm, "probe_refresh")[0]
    back = _rpc(llm, "probe_digest")[0]
    back_tokens = greedy_outputs(llm, PROMPTS, 6)
    assert changed != cold, "reloading W1 changed nothing"
    return {
        "cold": cold,
        "cold_tokens": cold_tokens,
        "without": without,
        "after_without": after_without,
        "with": with_,
        "after_with": after_with,
        "back_raw": back_raw,
        "refreshed": refreshed,
        "back": back,
        "back_tokens": back_tokens,
    }


def _w0_w1(builder, root):
    """A tiny checkpoint W0, a perturbed copy W1, and W0's state dict."""
    from vllm_fp8_overlay.testing import tiny_models

    d0 = builder(root / "w0")
    sd = tiny_models.load_checkpoint(d0)
    d1 = tiny_models.save_checkpoint(root / "w1", tiny_models.perturb_state_dict(sd, 1), tiny_models.load_config(d0))
    return d0, d1, sd


def _assert_outputs_equal(back, cold, what):
    from vllm_fp8_overlay.testing.outputs import assert_outputs_equal

    assert_outputs_equal(back, cold, what)


@pytest.mark.slow
def test_llama_reload_warnings_and_warm_equals_cold(version, has_reload, engine_env, tiny_model_root):
    if not has_reload:
        pytest.skip(f"vLLM {version} has no layerwise reload")
    from vllm_fp8_overlay.testing import harness, tiny_models

    d0, d1, sd = _w0_w1(tiny_models.make_llama, tiny_model_root / "llama")
    llm = _start(d0)
    try:
        r = _reload_cycle(llm, d0, d1, version)
    finally:
        harness.shutdown_llm(llm)
    # identical weights reloaded with the overlay: bitwise the cold start
    assert r["after_with"] == r["cold"]
    assert r["back"] == r["cold"], [k for k in r["cold"] if r["cold"][k] != r["back"].get(k)]
    _assert_outputs_equal(r["back_tokens"], r["cold_tokens"], "Llama reloaded back to W0")
    assert r["refreshed"] == [], r["refreshed"]  # untied, dense: nothing derived goes stale
    observed = {
        "warnings_without_overlay": r["without"]["failed_to_load_warnings"],
        "warnings_with_overlay": r["with"]["failed_to_load_warnings"],
        "warm_equals_cold": r["back"] == r["cold"],
    }
    if any(p.id == "quiet-empty-modules" and p.state_for(version)[0] is State.APPLIED for p in compat.patches()):
        # the fix: only modules that own loadable tensors may still warn
        assert len(observed["warnings_with_overlay"]) < len(observed["warnings_without_overlay"])
        assert set(observed["warnings_with_overlay"]) <= {"RotaryEmbedding"}
    compat.check_observation(str(version), "llama", observed)


@pytest.mark.slow
def test_moe_shared_bias_reload(version, has_reload, engine_env, tiny_model_root):
    if not has_reload:
        pytest.skip(f"vLLM {version} has no layerwise reload")
    from vllm_fp8_overlay.testing import harness, tiny_models

    d0, d1, sd = _w0_w1(tiny_models.make_glm4_moe, tiny_model_root / "glm")
    bias_names = sorted(k for k in sd if k.endswith("e_score_correction_bias"))
    llm = _start(d0)
    try:
        r = _reload_cycle(llm, d0, d1, version)
        # the router's bias, compared with the checkpoint after the "with" reloads
        served_bias = {n: _rpc(llm, "probe_tensor", n)[0] for n in bias_names}
    finally:
        harness.shutdown_llm(llm)
    expected_bias = {n: sd[n].float().flatten().tolist() for n in bias_names}
    bias_keys = [k for k in r["cold"] if k.endswith("e_score_correction_bias")]
    observed = {
        "delayed_without_overlay": r["without"]["delayed_processing"],
        "delayed_with_overlay": r["with"]["delayed_processing"],
        "incomplete_without_overlay": r["without"]["incomplete_at_finalize"],
        "incomplete_with_overlay": r["with"]["incomplete_at_finalize"],
        "buffered_without_overlay": r["without"]["buffered_at_finalize"],
        "buffered_with_overlay": r["with"]["buffered_at_finalize"],
        "bias_exact_without_overlay": all(r["after_without"][k] == r["cold"][k] for k in bias_keys),
        "bias_exact_with_overlay": all(r["after_with"][k] == r["cold"][k] for k in bias_keys)
        and served_bias == expected_bias,
        "derived_refreshed": r["refreshed"],
        "warm_equals_cold": r["back"] == r["cold"],
    }
    # With the overlay (or upstream fix) every MoE layer is processed online.
    assert observed["delayed_with_overlay"] == []
    assert observed["buffered_with_overlay"] == 0
    assert observed["bias_exact_with_overlay"]
    raw_diff = sorted(k for k in r["cold"] if r["cold"][k] != r["back_raw"].get(k))
    if "cpu-moe-prepack" in declared_for(version):
        # vLLM CPU 0.28+: the reload itself leaves the experts (w13/w2) in
        # checkpoint layout while a cold start holds them prepacked; the
        # weight sync's refresh rebuilds them. Asserted both ways, so that
        # an upstream fix (or a refresh that stopped working) is noticed.
        assert raw_diff and all(k.endswith(("w13_weight", "w2_weight")) for k in raw_diff), raw_diff
        assert observed["derived_refreshed"] == ["cpu-moe-prepack"], observed["derived_refreshed"]
    else:
        assert raw_diff == [] and observed["derived_refreshed"] == [], (raw_diff, observed["derived_refreshed"])
    assert observed["warm_equals_cold"], [k for k in r["cold"] if r["cold"][k] != r["back"].get(k)]
    _assert_outputs_equal(r["back_tokens"], r["cold_tokens"], "GLM-4.5-MoE reloaded back to W0")
    compat.check_observation(str(version), "moe", observed)


#: releases where the expert-parallel reload is exercised: the last one with
#: the layer-size bug and the first one with the upstream fix.
EP_RELEASES = {Version("0.18.1"), Version("0.19.1")}


@pytest.mark.slow
def test_expert_parallel_layer_size(version, engine_env, tiny_model_root):
    """TP=2 + expert parallelism: each rank holds an int32 expert map that
    reload never loads. Only the reload is exercised (vLLM's CPU fused-MoE
    kernel does not support expert maps, so nothing is generated)."""
    if version not in EP_RELEASES:
        pytest.skip(f"expert-parallel reload is exercised on {sorted(map(str, EP_RELEASES))}")
    if os.cpu_count() < 2:
        pytest.skip("needs 2 CPU cores for 2 workers")
    from vllm_fp8_overlay.testing import harness, tiny_models

    d0 = tiny_models.make_qwen3_moe(tiny_model_root / "qwen3moe-w0")
    old_bind = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"
    # test-side shim so the CPU engine can start with expert maps (see reload_probe)
    os.environ["FP8_OVERLAY_TEST_EP_SHIM"] = "1"
    overlay.deactivate()
    llm = harness.start_llm(
        d0,
        in_process=False,
        tensor_parallel_size=2,
        enable_expert_parallel=True,
        distributed_executor_backend="mp",
        worker_extension_cls=PROBE,
    )
    try:
        _rpc(llm, "probe_overlay", False)
        without = _rpc(llm, "probe_reload", str(d0))
        states = _rpc(llm, "probe_overlay", True)
        with_ = _rpc(llm, "probe_reload", str(d0))
    finally:
        harness.shutdown_llm(llm)
        os.environ.pop("FP8_OVERLAY_TEST_EP_SHIM", None)
        if old_bind is None:
            os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
        else:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = old_bind
        harness.apply_cpu_env_defaults(True)
    for rank_states in states:
        assert {s["id"]: s["state"] for s in rank_states} == _expected_states(version)
    observed = {
        "incomplete_without_overlay": [r["incomplete_at_finalize"] for r in without],
        "incomplete_with_overlay": [r["incomplete_at_finalize"] for r in with_],
        "buffered_without_overlay": [r["buffered_at_finalize"] for r in without],
        "buffered_with_overlay": [r["buffered_at_finalize"] for r in with_],
    }
    assert all(not inc for inc in observed["incomplete_with_overlay"])
    assert all(b == 0 for b in observed["buffered_with_overlay"])
    compat.check_observation(str(version), "ep", observed)


@pytest.mark.slow
def test_harmless_without_reload_module(version, has_reload, tiny_model_root):
    """Below 0.16 there is nothing to patch: the overlay stays silent and vLLM
    starts and generates with it active."""
    if has_reload:
        pytest.skip("release has the reload module")
    from vllm_fp8_overlay.testing import harness, tiny_models

    overlay.activate()
    d0 = tiny_models.make_llama(tiny_model_root / "llama-old")
    llm = harness.start_llm(d0, worker_extension_cls=PROBE)
    try:
        tokens = harness.greedy(llm, PROMPTS, 4)
        states = _rpc(llm, "probe_overlay")[0]
        touched = _rpc(llm, "probe_touched")[0]
    finally:
        harness.shutdown_llm(llm)
    assert all(len(t) == 4 for t in tokens)
    assert touched == []
    assert {s["id"]: s["state"] for s in states} == _expected_states(version)
    compat.check_observation(
        str(version), "inert", {"generates_with_overlay_active": True, "touched": touched}
    )
