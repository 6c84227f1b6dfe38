"""Cases for the one-launch bucket check (``kernels.value_check``), shared by
the CUDA test and the CPU run under Triton's interpreter.

Real buckets are made by the sender and taken apart by the receiver (FP8
weights, float32 scales, bf16 / fp16 / float32 / float64 tensors, an int
tensor, spans longer than one work item); then single elements are poisoned
at the first, last and a middle element of a tensor. For every case the
kernel's count of offending elements must equal the count computed tensor
by tensor with torch, and its verdict must equal ``values.value_problems``'.
"""

from __future__ import annotations

import torch

_FP8 = torch.float8_e4m3fn


def _expected_bad(name: str, t: torch.Tensor, scale_name: str) -> int:
    from vllm_fp8_overlay.sync.values import FP8_NAN_BYTES, kind_of

    kind = kind_of(name, t.dtype, scale_name)
    if kind is None:
        return 0
    if kind == "fp8":
        mask, value = FP8_NAN_BYTES[t.dtype]
        return int(((t.view(torch.uint8).to(torch.int32) & mask) == value).sum())
    x = t.double()
    finite = torch.isfinite(x)
    return int((~(finite & (x > 0))).sum() if kind == "scale" else (~finite).sum())


def _buckets(device: torch.device):
    from vllm_fp8_overlay.formats import FP8Layout
    from vllm_fp8_overlay.sync import WeightReceiver, WeightSender
    from vllm_fp8_overlay.sync.transport import RecordingTransport, ReplayTransport

    layout = FP8Layout(method="fp8", strategy="block", block_size=(128, 128), scale_name="weight_scale_inv")
    g = torch.Generator().manual_seed(3)
    sd = {
        "model.layers.0.self_attn.q_proj.weight": torch.randn(256, 384, generator=g).bfloat16(),
        "model.layers.0.mlp.down_proj.weight": torch.randn(200, 300, generator=g).bfloat16(),
        "model.layers.0.input_layernorm.weight": torch.randn(9000, generator=g).bfloat16(),  # > one work item
        "model.layers.0.mlp.gate.weight": torch.randn(16, 64, generator=g).half(),
        "model.layers.0.extra.bias": torch.randn(33, generator=g),
        "model.layers.0.wide.bias": torch.randn(17, generator=g).double(),
        "model.layers.0.pos_ids": torch.arange(40),
        "model.layers.0.self_attn.k_scale": torch.tensor(0.5),
    }
    sd = {k: v.to(device) for k, v in sd.items()}
    rec = RecordingTransport(device=device)
    WeightSender(layout, "", 0, 0, bucket_bytes=256 << 10, transport=rec).send(sd, step=1)
    rcv = WeightReceiver("", 0, 0, 0, transport=ReplayTransport(list(rec.messages), device=device))
    return layout.scale_name, list(rcv.iter_fresh_buckets())


def run_cases(device: torch.device | str) -> tuple[int, list[str]]:
    """``(cases checked, failures)``."""
    from vllm_fp8_overlay.kernels.value_check import BLOCK, plan_payload_check
    from vllm_fp8_overlay.sync.values import kind_of, value_problems

    device = torch.device(device)
    scale_name, buckets = _buckets(device)
    count, fails = 0, []

    def check(b, what: str) -> None:
        nonlocal count
        plan = plan_payload_check(b.manifest.tensors, scale_name, device, kind_of)
        got = int(plan.count_bad(b.payload)[0])
        want = sum(_expected_bad(n, t, scale_name) for n, t in b.tensors)
        verdict = value_problems(b.tensors, scale_name=scale_name) == []
        count += 1
        if got != want or (got == 0) != verdict:
            fails.append(f"{what}: kernel counts {got}, torch {want}, value_problems clean={verdict}")

    for b in buckets:
        check(b, f"bucket {b.index} clean")
    for b in buckets:
        for name, t in b.tensors:
            n = t.numel()
            flat = t.view(-1) if t.dim() else t.view(1)
            spots = sorted({0, n - 1, n // 2, min(n - 1, BLOCK + 3)})
            if t.dtype == _FP8:
                poisons = [("byte", 0x7F), ("byte", 0xFF)]
            elif t.is_floating_point():
                poisons = [("val", float("nan")), ("val", float("inf")), ("val", float("-inf")), ("val", 0.0),
                           ("val", -1.0)]
            else:
                poisons = [("val", -7)]
            for how, v in poisons:
                for i in spots:
                    keep = flat[i].clone()
                    if how == "byte":
                        flat.view(torch.uint8)[i] = v
                    else:
                        flat[i] = v
                    check(b, f"{name}[{i}] = {v}")
                    flat[i] = keep
    return count, fails
