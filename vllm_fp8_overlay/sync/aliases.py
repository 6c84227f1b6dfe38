"""Tied-weight aliases: names a trainer's state dict has that the served checkpoint stores once.

Why this exists: ``model.state_dict()`` of a Hugging Face model with tied
embeddings (``tie_word_embeddings``: Qwen2 / Qwen2.5 small sizes, Llama-3.2
1B/3B, Qwen3-0.6B, Gemma2, Granite ...) lists the shared tensor twice, as
``model.embed_tokens.weight`` and as ``lm_head.weight``. The served
checkpoint, and vLLM's loader, have only the embedding, so the receiver
rejects ``lm_head.weight`` as unknown. A trainer should be able to push
``model.state_dict()`` unchanged; so the client drops such aliases itself,
says so in the push report (``StepReport.dropped_aliases``) and logs it
once.

Dropping is safe only if the alias really is the same tensor: the client
checks that the head equals the embedding (same storage, else ``torch.equal``)
and refuses the step otherwise (an untied head cannot be served by a tied
model). A name is an alias when it ends in ``lm_head.weight``, the served
checkpoint lacks it and has the embedding under the same prefix, and the
served config does not say ``tie_word_embeddings: false``.

The rule comes from the worker's ``weight_sync_describe``, which lists the
served model's aliases (``tied_aliases``: alias -> served tensor, see
:func:`served_aliases`), else from the safetensors headers of the
served checkpoint directory when the trainer can read it (same host or a
shared file system). Without either, nothing is dropped and the receiver's
rejection carries the hint of :func:`alias_hint`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

__all__ = ["HEAD", "EMBEDDINGS", "alias_target", "alias_hint", "served_aliases", "TiedAliases", "tied_aliases",
           "per_expert"]

HEAD = "lm_head.weight"
#: where the input embedding lives, relative to the head's prefix
EMBEDDINGS = ("model.embed_tokens.weight", "embed_tokens.weight", "model.language_model.embed_tokens.weight",
              "language_model.model.embed_tokens.weight", "transformer.wte.weight")


def alias_target(name: str, served: Iterable[str] | set[str]) -> str | None:
    """The served tensor ``name`` is a tied alias of, or ``None``."""
    served = served if isinstance(served, (set, frozenset, dict)) else set(served)
    if not name.endswith(HEAD) or name in served:
        return None
    prefix = name[: -len(HEAD)]
    if prefix and not prefix.endswith("."):
        return None
    for emb in EMBEDDINGS:
        if prefix + emb in served:
            return prefix + emb
    return None


def served_aliases(served: Iterable[str], tie_word_embeddings: bool | None = None) -> dict[str, str]:
    """Every trainer-side name that is a tied alias of a served tensor:
    ``{alias: served embedding}`` (empty when the config says untied). Small
    enough for a worker to send in its description, unlike all the names."""
    if tie_word_embeddings is False:
        return {}
    served = served if isinstance(served, (set, frozenset, dict)) else set(served)
    out: dict[str, str] = {}
    for name in served:
        for emb in EMBEDDINGS:
            if name == emb or name.endswith("." + emb):
                alias = name[: len(name) - len(emb)] + HEAD
                if alias not in served:
                    out.setdefault(alias, name)
    return out


def alias_hint(name: str, served: Iterable[str] | set[str]) -> str | None:
    """One line for a rejection naming ``name``, if it is a known tied alias."""
    target = alias_target(name, served)
    if target is None:
        return None
    return (f"{name} is tied to {target} in the served model (tie_word_embeddings: the served checkpoint "
            f"stores the tensor once as {target}); drop {name} from the update, or let WeightSyncClient "
            "drop it (it does when it can read the served checkpoint's names)")


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a is b:
        return True
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.device == b.device and a.data_ptr() == b.data_ptr() and a.stride() == b.stride():
        return True
    return bool(torch.equal(a, b.to(a.device)))


class TiedAliases:
    """Per-client alias rule: which trainer names to drop, checked as they stream by."""

    def __init__(self, served_names: Iterable[str] | None, tie_word_embeddings: bool | None = None,
                 source: str = "", aliases: Mapping[str, str] | None = None) -> None:
        self.served = set(served_names) if served_names is not None else None
        self.tie = tie_word_embeddings
        self.source = source
        if aliases is None:
            aliases = served_aliases(self.served, tie_word_embeddings) if self.served else {}
        self.aliases = dict(aliases)  # alias -> served tensor
        self.dropped: list[str] = []  # the last filtered step's dropped aliases
        self._announced = False

    @property
    def active(self) -> bool:
        return bool(self.aliases)

    def target(self, name: str) -> str | None:
        return self.aliases.get(name)

    def filter(self, weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]
               ) -> Iterator[tuple[str, torch.Tensor]]:
        """``weights`` without tied aliases, lazily (an error raised here goes
        through the sender, which aborts the step on every receiver)."""
        self.dropped = []
        items = weights.items() if isinstance(weights, Mapping) else weights
        if not self.active:
            yield from items
            return
        lookup = weights if isinstance(weights, Mapping) else None
        seen: dict[str, torch.Tensor] = {}  # embeddings already passed (streams only)
        waiting: dict[str, tuple[str, torch.Tensor]] = {}  # target -> (alias, tensor) seen before its target
        for name, t in items:
            target = self.target(name)
            if target is None:
                if lookup is None and name.endswith(EMBEDDINGS):
                    seen[name] = t
                    if name in waiting:
                        self._check(*waiting.pop(name), name, t)
                yield name, t
                continue
            other = lookup.get(target) if lookup is not None else seen.get(target)
            if other is not None:
                self._check(name, t, target, other)
            else:  # streams: checked when the embedding comes; a mapping without it: refused below
                waiting[target] = (name, t)
            self.dropped.append(name)
        if waiting:  # an alias whose tensor never came: dropping it would lose the head's update
            alias, target = next((a, t) for t, (a, _) in waiting.items())
            raise ValueError(f"{alias} was sent without {target}, which it is tied to in the served model "
                             f"(tie_word_embeddings): send {target} (the served model has no separate head)")
        if self.dropped and not self._announced:
            self._announced = True
            logger.info("weight sync: not sending %s: tied to the embedding in the served model "
                        "(tie_word_embeddings; served names from %s)", ", ".join(self.dropped), self.source)

    def _check(self, alias: str, t: torch.Tensor, target: str, emb: torch.Tensor) -> None:
        if not _same_tensor(t, emb):
            raise ValueError(
                f"{alias} differs from {target}, but the served model ties them (tie_word_embeddings): it "
                f"holds one tensor for both and cannot serve a separate head. Train with tied weights, or "
                f"serve a checkpoint with its own {alias}")


def _local_description(checkpoint_dir: str | None) -> tuple[set[str] | None, bool | None, str]:
    if not checkpoint_dir or not Path(checkpoint_dir).is_dir():
        return None, None, ""
    from .apply.validate import read_checkpoint_specs

    d = Path(checkpoint_dir)
    try:
        names = set(read_checkpoint_specs(d))
    except (OSError, ValueError):
        return None, None, ""
    return names, _tie_from_config(d / "config.json"), f"{d} (read by the trainer)"


def _tie_from_config(path: Path) -> bool | None:
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    for c in (cfg, cfg.get("text_config") or {}):
        if isinstance(c, dict) and isinstance(c.get("tie_word_embeddings"), bool):
            return c["tie_word_embeddings"]
    return None


def tied_aliases(client: Any) -> TiedAliases:
    """The alias rule of a ``WeightSyncClient`` (built once, from its servers' descriptions)."""
    cached = client.__dict__.get("_tied_aliases")
    if cached is not None:
        return cached
    names: set[str] | None = None
    tie: bool | None = None
    source = ""
    for per_target in getattr(client, "descriptions", None) or []:
        d = per_target[0] if per_target else {}
        if not isinstance(d, dict):
            continue
        if isinstance(d.get("tied_aliases"), dict):
            rule = TiedAliases(None, None, "weight_sync_describe", aliases=d["tied_aliases"])
            client.__dict__["_tied_aliases"] = rule
            return rule
        if isinstance(d.get("tensor_names"), list):
            names, source = set(d["tensor_names"]), "weight_sync_describe"
            tie = d.get("tie_word_embeddings") if isinstance(d.get("tie_word_embeddings"), bool) else None
        else:
            names, tie, source = _local_description(d.get("checkpoint_dir"))
        if names is not None:
            break
    rule = TiedAliases(names, tie, source)
    client.__dict__["_tied_aliases"] = rule
    return rule


def per_expert(weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]
               ) -> Iterator[tuple[str, torch.Tensor]]:
    """``weights`` with transformers-5 fused expert tensors (``experts.gate_up_proj``
    ``(E, 2I, H)``, ``experts.down_proj`` ``(E, H, I)``) split into the
    per-expert 2-D weights checkpoints store and vLLM loads
    (``experts.{e}.gate_proj.weight`` ...), as views. The FP8 path splits
    them in the quantizer; this is the same for a BF16 target, so that
    ``model.state_dict()`` of a transformers-5 MoE model can be pushed as is."""
    from ..formats.quantize import expand_fused_experts

    for name, t in (weights.items() if isinstance(weights, Mapping) else weights):
        expanded = expand_fused_experts(name, t) if isinstance(t, torch.Tensor) else None
        if expanded is None:
            yield name, t
        else:
            yield from expanded
