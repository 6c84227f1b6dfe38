"""Declared per vLLM release: where an update bypasses part of vLLM's loader.

The declarations only (no torch, no vLLM), so that ``python -m
vllm_fp8_overlay compat`` can render them into COMPAT.md anywhere; the code
is in :mod:`vllm_fp8_overlay.sync.apply.experts`, which runs only where the
installed release and platform match.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from packaging.specifiers import SpecifierSet
from packaging.version import Version

__all__ = ["Shortcut", "DECLARED", "render_section"]


@dataclass(frozen=True)
class Shortcut:
    """One bypass of vLLM's per-tensor loader and where it is proven."""

    id: str
    releases: str  # PEP 440 specifiers
    platform: str
    applies: str  # which layers
    does: str  # what it does instead of vLLM's loader
    off: str  # how to turn it off
    verified: tuple[str, ...]  # releases whose tests show warm == cold by outputs with it
    test: str

    def applies_to(self, version: Any) -> bool:
        if version is None:
            return False
        return SpecifierSet(self.releases).contains(Version(str(version)), prereleases=True)


DECLARED: tuple[Shortcut, ...] = (
    Shortcut(
        id="direct-expert-writes",
        releases=">=0.28",
        platform="cpu",
        applies="unquantized (BF16) fused-MoE layers without tensor or expert parallelism, gated activation, "
                "unpadded `w13_weight` [E, 2I, H] / `w2_weight` [E, H, I] and no other parameter (GLM-4.5's "
                "experts also hold the router's correction bias: loader), per-expert checkpoint tensors",
        does="copies each expert tensor into its slot of `w13_weight` / `w2_weight` (the parameter objects vLLM "
             "keeps) instead of one weight-loader call per tensor inside the layerwise reload; the experts' "
             "prepack then runs once per layer (`cpu-moe-prepack`)",
        off="`FP8_OVERLAY_DIRECT_EXPERTS=0` in the worker's environment",
        verified=("0.28.0", "0.32.0"),
        test="tests/test_sync_moe_load.py",
    ),
    Shortcut(
        id="skip-other-ranks-experts",
        releases=">=0.19",
        platform="any",
        applies="expert-parallel fused-MoE layers without the expert load balancer or redundant experts: "
                "checkpoint tensors of experts that vLLM maps to no local expert of the worker "
                "(`_map_global_expert_id_to_local_expert_id` < 0)",
        does="leaves them out of the update before vLLM's loader (which loads nothing from them, but binds, "
             "sizes, buffers and replays each one inside the layerwise reload)",
        off="`FP8_OVERLAY_SKIP_OTHER_RANKS_EXPERTS=0` in the worker's environment",
        verified=("0.19.1", "0.32.0"),
        test="tests/test_sync_sharded_vllm.py (c)",
    ),
)


def render_section(versions: list[str]) -> str:
    """COMPAT.md: the loader bypasses, per release."""
    lines = [
        "## Loader shortcuts",
        "",
        "Where vLLM's per-tensor loader is the cost of an update, the receiver writes some tensors itself",
        "(`vllm_fp8_overlay/sync/apply/experts.py`) or leaves some out (`ep_experts.py`); each shortcut is",
        "declared with its releases and proven equal to a cold start by outputs. Everything else goes through",
        "vLLM's loader.",
        "",
        "| shortcut | releases | platform | applies to | instead of vLLM's loader | off switch | verified on |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in DECLARED:
        lines.append(f"| `{s.id}` | `{s.releases}` | {s.platform} | {s.applies} | {s.does} | {s.off} | "
                     f"{', '.join(s.verified)} (`{s.test}`) |")
    lines += ["", "| vLLM | " + " | ".join(f"`{s.id}`" for s in DECLARED) + " |",
              "|---|" + "---|" * len(DECLARED)]
    for v in versions:
        lines.append(f"| {v} | " + " | ".join("on" if s.applies_to(v) else "off" for s in DECLARED) + " |")
    return "\n".join(lines)
