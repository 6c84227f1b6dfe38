"""Which checkpoint tensors an FP8 layout quantizes, or why that cannot be decided.

Why a module of its own: the trainer must write exactly the tensors the
served checkpoint holds in FP8. A name rule that quietly answers "not
quantized" for a tensor the layout targets sends BF16 where vLLM expects
FP8; the worker then rejects the step far from the cause, or, for a module
it does not check, serves something other than what was trained. So each
answer given here is one vLLM gives the same way for every architecture it
serves, and every other case raises ``ValueError`` naming the tensor and the
reason:

* a ``.weight`` whose module name is neither a known linear projection nor a
  known never-quantized module (embedding, router, norm), and which a target
  reaches: whether vLLM builds it as a quantized ``LinearBase`` depends on
  the model class (:func:`register_module_names` teaches the tables);
* an explicit (exact or ``re:``) target naming a module vLLM builds
  unquantized in some models and quantized in others (an MoE router, an
  embedding);
* shards vLLM fuses (``q/k/v_proj`` -> ``qkv_proj``, ``gate/up_proj`` ->
  ``gate_up_proj``) that the ignore list or the targets split: vLLM refuses
  mixed shards, and a half-quantized fused module cannot be served;
* experts of one MoE module decided differently: vLLM decides a whole
  experts module from expert 0's projections.

Unknown layout fields, target kinds and malformed patterns are refused where
the layout is built (:func:`check_patterns`, used by ``FP8Layout``).

How vLLM matches (``compressed_tensors/utils.py``, ``config_utils.py``,
0.32.0): an entry matches a layer name exactly or, with ``re:``, by
``re.match``; a fused layer matches only if all its shards do; a class
target matches a ``LinearBase`` whose class name contains it (``Linear``),
and ``Linear`` also covers the fused experts; ``ParallelLMHead`` is matched
by name only. HF ``fp8`` (``Fp8Config``) quantizes ``LinearBase`` layers
(never the head) unless ignored.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any, Iterable

__all__ = ["check_patterns", "decide", "register_module_names", "CLASS_TARGETS"]

# Last name components that are linear projections in the architectures vLLM
# serves; any component ending in ``_proj`` counts too.
_LINEAR = {
    "kv_a_proj_with_mqa", "dense", "fc1", "fc2", "w1", "w2", "w3", "wq", "wk", "wv", "wo",
    "query_key_value", "dense_h_to_4h", "dense_4h_to_h", "c_attn", "c_proj", "c_fc",
}
# 2-D ``.weight``s vLLM builds unquantized under class targets (embeddings,
# routers, classifier heads).
_NEVER = {
    "embed_tokens", "wte", "wpe", "embed_in", "embed_out", "word_embeddings", "gate", "router",
    "shared_expert_gate", "score", "classifier",
}
_NORM_RE = re.compile(r"norm|^ln(_\w+)?$")

#: class targets we can map onto checkpoint names, and what they cover
CLASS_TARGETS = {"Linear": "all", "LinearBase": "all", "FusedMoE": "experts", "RoutedExperts": "experts"}

_FUSED_SHARDS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
_SHARD_OF = {s: (f, shards) for f, shards in _FUSED_SHARDS.items() for s in shards}
_EXPERT_RE = re.compile(r"^(?P<parent>.*\.experts)\.(?P<idx>\d+)\.(?P<proj>[^.]+)$")
_EXPERT_TRIPLES = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))


def register_module_names(*, linear: Iterable[str] = (), never: Iterable[str] = ()) -> None:
    """Teach the tables a module name (last dotted component) of an
    architecture they do not know: ``linear`` ones are quantized when the
    layout targets them, ``never`` ones stay unquantized (as vLLM builds them
    in that architecture). Without this such a 2-D weight raises."""
    lin, nev = set(linear), set(never)
    if lin & nev:
        raise ValueError(f"names both linear and never quantized: {sorted(lin & nev)}")
    _LINEAR.update(lin)
    _NEVER.update(nev)
    _LINEAR.difference_update(nev)
    _NEVER.difference_update(lin)
    _base.cache_clear()


# ------------------------------------------------------------ layout checks
def check_patterns(items: Any, what: str, *, targets: bool) -> tuple[str, ...]:
    """Validate an ignore list or a target list; ``ValueError`` says what is wrong.

    A bare string is refused (``tuple("lm_head")`` would be its letters), so
    are empty entries, regexes that do not compile and, for targets, a class
    name other than :data:`CLASS_TARGETS` (vLLM matches such a class against
    its own module classes, which the trainer cannot see)."""
    if isinstance(items, (str, bytes)) or not isinstance(items, (list, tuple)):
        raise ValueError(f"{what} must be a list of strings, got {type(items).__name__} {items!r}")
    out = []
    for p in items:
        if not isinstance(p, str) or not p:
            raise ValueError(f"{what} entry {p!r} is not a non-empty string")
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as e:
                raise ValueError(f"{what} entry {p!r} is not a valid regular expression: {e}") from None
        elif targets and p[0].isupper() and "." not in p and p not in CLASS_TARGETS:
            raise ValueError(
                f"target {p!r} names a module class the quantizer cannot map to checkpoint names "
                f"(known: {sorted(CLASS_TARGETS)}; or name modules exactly or with 're:')")
        out.append(p)
    if targets and not out:
        raise ValueError("the layout has no targets: it would quantize nothing")
    return tuple(out)


@lru_cache(maxsize=256)
def _matcher(patterns: tuple[str, ...]) -> tuple[frozenset, tuple[tuple[str, re.Pattern], ...]]:
    exact = frozenset(p for p in patterns if not p.startswith("re:") and p not in CLASS_TARGETS)
    regex = tuple((p, re.compile(p[3:])) for p in patterns if p.startswith("re:"))
    return exact, regex


def _hits(patterns: tuple[str, ...], candidates: Iterable[str]) -> list[str]:
    exact, regex = _matcher(patterns)
    out = []
    for c in candidates:
        if c in exact:
            out.append(c)
        out.extend(p for p, rx in regex if rx.match(c))
    return out


# --------------------------------------------------------------- decisions
def _kind(last: str) -> str:
    if last == "lm_head":
        return "head"
    if _NORM_RE.search(last):
        return "norm"
    if last in _NEVER or ("embed" in last and last not in _LINEAR):
        return "never"
    if last in _LINEAR or last.endswith("_proj"):
        return "linear"
    return "unknown"


def _candidates(module: str, *, parent: bool) -> list[str]:
    """Names an entry may match for ``module``: itself, the fused module it is
    a shard of and (ignore lists, as before) the experts module it belongs to."""
    out = [module]
    m = _EXPERT_RE.match(module)
    if m and parent:
        out.append(m.group("parent"))
    head, _, last = module.rpartition(".")
    if last in _SHARD_OF:
        fused = _SHARD_OF[last][0]
        out.append(f"{head}.{fused}" if head else fused)
    return out


@lru_cache(maxsize=1 << 17)
def _base(layout: Any, module: str) -> tuple[bool, tuple[str, ...], tuple[str, ...]]:
    """``(quantized by the tables, explicit targets hit, ignore entries hit)``
    for one module, without the consistency checks."""
    last = module.rpartition(".")[2]
    explicit = tuple(_hits(tuple(t for t in layout.targets if t not in CLASS_TARGETS),
                           _candidates(module, parent=False)))
    ignored = tuple(_hits(layout.ignore, _candidates(module, parent=True)))
    cover = {CLASS_TARGETS[t] for t in layout.targets if t in CLASS_TARGETS}
    expert = _EXPERT_RE.match(module) is not None
    by_class = "all" in cover or (expert and "experts" in cover)
    kind = _kind(last)
    if kind == "head":
        q = layout.method != "fp8" and (bool(explicit) or "all" in cover)
    else:
        q = kind in ("linear", "unknown") and (bool(explicit) or by_class)
    return q and not ignored, explicit, ignored


def decide(layout: Any, name: str, ndim: int | None = None) -> bool:
    """True iff the served checkpoint stores ``name`` as FP8 plus a scale.

    ``ndim``: the tensor's rank when known (a module name the tables do not
    know is decided for non-2-D tensors: only 2-D weights are linear
    weights). Raises ``ValueError`` naming ``name`` where the layout targets
    the tensor but the decision depends on what the quantizer cannot see."""
    if not name.endswith(".weight"):
        return False  # biases, scales, e_score_correction_bias, buffers
    module = name[: -len(".weight")]
    last = module.rpartition(".")[2]
    kind = _kind(last)
    if kind == "norm" or (kind == "unknown" and ndim is not None and ndim != 2):
        return False
    q, explicit, ignored = _base(layout, module)
    if kind == "never":
        if explicit and not ignored:
            raise ValueError(
                f"{name}: the layout's target(s) {list(explicit)} name this module, but vLLM builds "
                f"'{last}' modules (embeddings, MoE routers, classifier heads) unquantized in some "
                "models and quantized in others; cannot decide which the served checkpoint holds")
        return False
    if kind == "unknown":
        if q:
            raise ValueError(
                f"{name}: the layout targets it ({list(explicit) or list(layout.targets)}) but '{last}' is "
                "not a module name the quantizer knows as a linear projection (*_proj, fc1, dense, ...) or "
                "as never quantized (embeddings, routers, norms); whether vLLM quantizes it depends on "
                "the model class. Add it to the checkpoint's ignore list, or call "
                "formats.register_module_names(linear=[...] or never=[...])")
        return False
    _check_consistent(layout, name, module, q)
    return q


def _check_consistent(layout: Any, name: str, module: str, q: bool) -> None:
    """Fused shards and experts of one module must be decided alike."""
    m = _EXPERT_RE.match(module)
    if m is not None:
        parent, proj = m.group("parent"), m.group("proj")
        triple = next((t for t in _EXPERT_TRIPLES if proj in t), (proj,))
        for p in triple:
            other = f"{parent}.0.{p}"
            if other != module and _base(layout, other)[0] != q:
                raise ValueError(
                    f"{name}: decided {'quantized' if q else 'unquantized'} but {other} the other way "
                    f"(targets {list(layout.targets)}, ignore {list(layout.ignore)}); vLLM quantizes the "
                    f"experts of {parent} all alike, as expert 0's projections say")
        return
    head, _, last = module.rpartition(".")
    if last in _SHARD_OF:
        fused, shards = _SHARD_OF[last]
        for s in shards:
            other = f"{head}.{s}" if head else s
            if other != module and _base(layout, other)[0] != q:
                raise ValueError(
                    f"{name}: decided {'quantized' if q else 'unquantized'} but {other} the other way "
                    f"(targets {list(layout.targets)}, ignore {list(layout.ignore)}); vLLM fuses "
                    f"{'/'.join(shards)} into {fused} and refuses shards quantized differently")
