"""Triton kernels under the CPU interpreter (TRITON_INTERPRET=1), small shapes.

The interpreter must be switched on before Triton decorates the kernels, so
the checks run in a fresh subprocess. Each check compares the fp8 bytes, the
scale (dtype, shape, bits) and the reported amax with the torch backend.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")

ROOT = Path(__file__).resolve().parents[1]

_SCRIPT = textwrap.dedent(
    r"""
    import json, numpy as np, torch
    from vllm_fp8_overlay.kernels import triton_fp8 as K
    from vllm_fp8_overlay.formats import quantize as R
    from vllm_fp8_overlay.formats.detect import FP8Layout

    g = torch.Generator().manual_seed(1234)
    fails = []
    count = 0

    def sample(shape, dtype, kind):
        if kind == "t":  # heavy tails: student-t, 3 dof
            n = torch.randn(shape, generator=g)
            chi = torch.randn((3,) + tuple(shape), generator=g).pow(2).sum(0) / 3
            x = n / chi.sqrt() * 0.02
        else:
            x = torch.randn(shape, generator=g) * 0.05
        return x.to(dtype)

    def same(a, b):
        qa, sa, ma = a
        qb, sb, mb = b
        return (torch.equal(qa.view(torch.uint8), qb.view(torch.uint8)) and sa.dtype == sb.dtype
                and sa.shape == sb.shape and torch.equal(sa.view(-1), sb.view(-1))
                and float(ma) == float(mb))

    REF = {"tensor": R._torch_tensorwise, "channel": R._torch_channelwise}
    KER = {"tensor": K.tensorwise, "channel": K.channelwise}

    def run(strat, w, recipe, blk):
        if strat == "block":
            return R._torch_blockwise(w, recipe, blk), K.blockwise(w, recipe, blk)
        return REF[strat](w, recipe), KER[strat](w, recipe)

    cases = [(torch.bfloat16, (130, 136), "t"), (torch.float32, (40, 72), "t")]
    for dtype, shape, kind in cases:
        w = sample(shape, dtype, kind)
        for recipe in ("ct", "hf"):
            for strat, blk in (("block", (128, 128)), ("channel", None), ("tensor", None)):
                count += 1
                if not same(*run(strat, w, recipe, blk)):
                    fails.append(f"{recipe}/{strat}/{dtype}/{shape}")
    w = sample((1, 17), torch.bfloat16, "n")
    count += 1
    if not same(*run("block", w, "ct", (128, 128))):
        fails.append("ct/block/1x17")
    # block 64x32 on a non-multiple shape; fp16 with the hf recipe
    w = sample((70, 40), torch.bfloat16, "t")
    count += 1
    if not same(*run("block", w, "ct", (64, 32))):
        fails.append("ct/block64x32")
    w = sample((40, 48), torch.float16, "n")
    count += 1
    if not same(*run("channel", w, "hf", None)):
        fails.append("hf/channel/fp16")
    # signed zeros and an all-zero group
    w = torch.zeros(40, 140, dtype=torch.bfloat16)
    w[0, 0] = -0.0; w[5, 5] = -1e-3; w[39, 139] = 3.0; w[7, 9] = -2e-6
    for recipe in ("ct", "hf"):
        for strat, blk in (("channel", None), ("tensor", None)):
            count += 1
            if not same(*run(strat, w, recipe, blk)):
                fails.append(f"zeros/{recipe}/{strat}")
    # many small matrices, one launch per strategy
    ws = [sample(s, torch.bfloat16, "t") for s in [(128, 136), (33, 130), (130, 40)]]
    for recipe in ("ct", "hf"):
        for strat, blk in (("block", (128, 128)), ("channel", None), ("tensor", None)):
            qs, ss, am = K.quantize_grouped(ws, recipe, strat, blk)
            for i, w in enumerate(ws):
                count += 1
                ref = run(strat, w, recipe, blk)[0]
                if not same(ref, (qs[i], ss[i].reshape(ref[1].shape), am[i])):
                    fails.append(f"grouped/{recipe}/{strat}/{i}")
    # the CUDA convention: amax * float32(1/448) for the scale
    w = sample((24, 160), torch.bfloat16, "n")
    q, s, _ = K.channelwise(w, "hf", division="recip")
    am = w.abs().amax(dim=1, keepdim=True).float()
    sr = am * torch.tensor(np.float32(1) / np.float32(448))
    qr = (w.float() / sr).clamp(-448, 448).to(torch.float8_e4m3fn)
    count += 1
    if not (torch.equal(s, sr) and torch.equal(q.view(torch.uint8), qr.view(torch.uint8))):
        fails.append("recip")
    # NaN shows up as a non-finite amax
    w = sample((64, 64), torch.bfloat16, "n"); w[3, 3] = float("nan")
    count += 1
    if bool(torch.isfinite(K.blockwise(w, "ct", (128, 128))[2])):
        fails.append("nan")
    print("RESULT " + json.dumps({"count": count, "fails": fails}))
    """
)


def test_kernels_bitwise_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    res = json.loads(line[len("RESULT "):])
    assert res["count"] > 30
    assert res["fails"] == []


def test_backend_registration_without_cuda():
    from vllm_fp8_overlay.formats.quantize import get_backend
    from vllm_fp8_overlay import kernels

    before = get_backend().name
    made_default = kernels.register()
    import torch

    if not torch.cuda.is_available():
        assert made_default is False
        assert get_backend().name == before
    assert get_backend("triton").name == "triton"


def test_bucket_value_check_counts_exactly_under_interpreter():
    """The one-launch bucket check (``kernels.value_check``) counts exactly
    the elements torch finds bad, tensor by tensor, for every poison of
    ``testing.value_check_cases`` (FP8 NaN bytes, NaN / Inf / zero /
    negative scales, NaN / Inf in bf16, fp16, float32 and float64 tensors,
    spans longer than one work item), and agrees with ``value_problems``."""
    script = ("from vllm_fp8_overlay.testing.value_check_cases import run_cases\n"
              "import json\nc, f = run_cases('cpu')\nprint('RESULT ' + json.dumps({'count': c, 'fails': f}))\n")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", script], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1][len("RESULT "):])
    assert res["count"] >= 100
    assert res["fails"] == []
