"""The worker's per-bucket manifest checks remember manifests that passed.

``BucketChecks(passed=...)`` compares a bucket's names, dtypes and shapes
with the served specs once per manifest (by the entries object the
receiver's manifest cache hands out for identical bytes), not every step.
These tests pin down that a remembered pass never hides a change: another
manifest, other specs, another layout, a bucket that failed.
"""

from __future__ import annotations

import pytest
import torch

from vllm_fp8_overlay.sync import StepRejectedError, WeightReceiver, WeightSender
from vllm_fp8_overlay.sync.apply import validate
from vllm_fp8_overlay.sync.apply.validate import BucketChecks, PassedManifests, dtype_name
from vllm_fp8_overlay.sync.transport import RecordingTransport, ReplayTransport


def _sd(n=6):
    g = torch.Generator().manual_seed(0)
    return {f"m.l{i}.weight": torch.randn(32, 16, generator=g) for i in range(n)}


def _messages(steps):
    """Messages of several steps, one sender (small buckets: several per step)."""
    rec = RecordingTransport()
    snd = WeightSender(None, "", 0, 0, bucket_bytes=4096, transport=rec)
    for step, sd in enumerate(steps, start=1):
        snd.send(sd, step=step)
    return list(rec.messages)


def _specs(sd):
    return {n: (dtype_name(t.dtype), tuple(t.shape)) for n, t in sd.items()}


@pytest.fixture
def counted(monkeypatch):
    calls = []
    real = validate.spec_problems
    monkeypatch.setattr(validate, "spec_problems", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_identical_manifests_are_compared_once(counted):
    sd = _sd()
    specs = _specs(sd)
    rx = WeightReceiver("", 0, 0, 0, transport=ReplayTransport(_messages([sd, sd, sd])))
    passed = PassedManifests()
    per_step = []
    for _ in range(3):
        counted.clear()
        checks = BucketChecks([(specs, "the served checkpoint", None)], passed=passed)
        got = rx.receive_all(check_manifest=checks.check_manifest)
        per_step.append(len(counted))
        assert checks.matched_only(specs, len(got.manifests)) and len(got.tensors) == len(specs)
    assert per_step[0] == len(got.manifests) > 2 and per_step[1:] == [0, 0]


def test_a_remembered_pass_never_hides_a_change(counted):
    sd = _sd()
    specs = _specs(sd)
    changed = dict(sd)
    changed["m.l4.weight"] = sd["m.l4.weight"].double()  # one bucket's manifest differs
    rx = WeightReceiver("", 0, 0, 0, transport=ReplayTransport(_messages([sd, changed, sd])))
    passed = PassedManifests()
    rx.receive_all(check_manifest=BucketChecks([(specs, "x", None)], passed=passed).check_manifest)
    n_passed = len(passed)
    counted.clear()
    checks = BucketChecks([(specs, "x", None)], passed=passed)
    with pytest.raises(StepRejectedError, match=r"m\.l4\.weight: got float64"):
        rx.receive_all(check_manifest=checks.check_manifest)
    # only the buckets whose manifests changed (the double-size tensor moves the ones after it) are compared,
    # and the failed one is not remembered
    assert 1 <= len(counted) < n_passed
    assert all(e.dtype != torch.float64 for entries, _ in passed.values() for e in entries)
    # equal specs in another dict (another served model) are compared afresh
    counted.clear()
    other = dict(specs)
    got = rx.receive_all(check_manifest=BucketChecks([(other, "x", None)], passed=passed).check_manifest)
    assert len(counted) == len(got.manifests)


def test_a_layout_the_reference_does_not_expect_is_refused_after_a_pass(counted):
    sd = _sd()
    specs = _specs(sd)
    rx = WeightReceiver("", 0, 0, 0, transport=ReplayTransport(_messages([sd, sd])))
    passed = PassedManifests()
    rx.receive_all(check_manifest=BucketChecks([(specs, "x", None)], passed=passed).check_manifest)
    want = {"method": "fp8"}  # the same entries, but this reference wants another layout
    checks = BucketChecks([(specs, "x", want)], passed=passed)
    with pytest.raises(StepRejectedError, match="scheme mismatch"):
        rx.receive_all(check_manifest=checks.check_manifest)


def test_matched_only_needs_every_bucket_against_the_same_specs():
    sd = _sd()
    ckpt = _specs(sd)
    params = {n: s for n, s in ckpt.items() if n != "m.l5.weight"}  # the other reference of mode auto
    rx = WeightReceiver("", 0, 0, 0, transport=ReplayTransport(_messages([sd])))
    checks = BucketChecks([(params, "parameters", None), (ckpt, "checkpoint", None)], passed=PassedManifests())
    got = rx.receive_all(check_manifest=checks.check_manifest)
    # the buckets without l5 matched the parameters first, the one with l5 the checkpoint
    assert not checks.matched_only(ckpt, len(got.manifests)) and not checks.matched_only(params, len(got.manifests))
    assert validate.spec_problems(validate.tensor_specs(got.tensors), ckpt, what="x") == []


def test_remembered_manifests_are_bounded_by_their_entries():
    """A trainer whose manifests change every step cannot make the memory
    grow without end: past ``max_entries`` remembered entries it starts over."""
    passed = PassedManifests(max_entries=10)
    specs: dict = {}
    kept = [tuple(range(4)) for _ in range(3)]  # distinct objects of 4 "entries" each
    passed.remember(kept[0], specs)
    passed.remember(kept[1], specs)
    passed.remember(kept[1], specs)  # the same object again: counted once
    assert len(passed) == 2 and passed.entries == 8 and passed.specs_for(kept[1]) is specs
    passed.remember(kept[2], specs)  # 12 > 10: starts over with this one
    assert len(passed) == 1 and passed.entries == 4
    assert passed.specs_for(kept[0]) is None and passed.specs_for(kept[2]) is specs
    assert passed.specs_for(tuple(range(4))) is None  # equal but another object: not known
