"""Declared per vLLM release: weight-derived state an update must rebuild.

The declarations only (no torch, no vLLM), so that ``python -m
vllm_fp8_overlay compat`` can render them into COMPAT.md on a machine
without either; the code that rebuilds each kind of state, and why each one
goes stale, is in :mod:`vllm_fp8_overlay.sync.apply.derived`, which applies
exactly the declarations that match the installed release.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from packaging.specifiers import SpecifierSet
from packaging.version import Version

__all__ = ["Derived", "DECLARED", "declared_for", "render_section"]


@dataclass(frozen=True)
class Derived:
    """One kind of derived state and the releases that leave it stale after a reload."""

    id: str
    releases: str  # PEP 440 specifiers
    platform: str
    stale: str  # what an update leaves behind
    action: str  # what the refresh does
    verified: tuple[str, ...]  # releases whose tests saw it stale and then equal to a cold start
    on_kernel_mode: bool  # also after kernel-format copies (which bypass vLLM's processing)

    def applies_to(self, version: Any) -> bool:
        if version is None:
            return True
        return SpecifierSet(self.releases).contains(Version(str(version)), prereleases=True)


DECLARED: tuple[Derived, ...] = (
    Derived(
        id="tied-lm-head-cpu-gemm",
        releases=">=0.16",
        platform="cpu",
        stale="a tied head that is its own `ParallelLMHead` (Llama on every release; Qwen2/Qwen3/Granite from "
              "0.28) keeps the oneDNN-prepacked copy of the old embedding in `lm_head.cpu_linear`: the head "
              "receives no weights, so the reload never re-processes it",
        action="`dispatch_cpu_unquantized_gemm(layer, remove_weight=False)` again for every module whose weight is "
               "shared with another module",
        verified=("0.19.1", "0.28.0", "0.32.0"),
        on_kernel_mode=True,
    ),
    Derived(
        id="cpu-moe-prepack",
        releases=">=0.28",
        platform="cpu",
        stale="unquantized fused-MoE experts (`w13_weight`, `w2_weight`) stay in checkpoint layout: the method's "
              "weight-update path skips the CPU experts' prepack (tokens wrong)",
        action="`moe_kernel.fused_experts.process_weights_after_loading(layer)` again, copied into the existing "
               "parameters",
        verified=("0.28.0", "0.32.0"),
        on_kernel_mode=False,
    ),
)


def declared_for(version: Any, platform: str = "cpu") -> list[str]:
    """Ids of the refreshes declared for ``version`` on ``platform``."""
    return [d.id for d in DECLARED if d.platform == platform and d.applies_to(version)]


def render_section(versions: list[str], record: dict) -> str:
    """COMPAT.md: what is rebuilt after an update, per release; the MoE column
    is what ``tests/test_overlay_matrix.py`` observed (``moe.derived_refreshed``)."""
    lines = [
        "## Derived state rebuilt after every update",
        "",
        "vLLM keeps state derived from the weights outside the parameters; where a reload does not rebuild it,",
        "an updated engine has every parameter of a cold start but not its outputs. After each load the",
        "receiver rebuilds what the release leaves stale (`vllm_fp8_overlay/sync/apply/derived.py`) and",
        "fails the update (`WeightLoadFailed`) where it cannot. Outputs are then equal to a freshly started",
        "engine's, exactly (`tests/test_sync_tied_moe.py`, `tests/test_sync_e2e.py`, `docs/families.md`).",
        "",
        "| refresh | vLLM | platform | left stale by the update | rebuilt by | verified on |",
        "|---|---|---|---|---|---|",
    ]
    for d in DECLARED:
        lines.append(f"| `{d.id}` | `{d.releases}` | {d.platform} | {d.stale} | {d.action} | "
                     f"{', '.join(d.verified)} |")
    lines += ["", "| vLLM | declared (CPU) | MoE reload in the matrix test: rebuilt / then == cold start |",
              "|---|---|---|"]
    for v in versions:
        moe = record.get(v, {}).get("moe", {})
        seen = moe.get("derived_refreshed")
        seen_cell = "–" if seen is None else (
            f"{', '.join(f'`{x}`' for x in seen) or 'nothing'} / {'yes' if moe.get('warm_equals_cold') else 'no'}")
        lines.append(f"| {v} | {', '.join(f'`{x}`' for x in declared_for(v)) or '–'} | {seen_cell} |")
    return "\n".join(lines)
