"""What an update must match before anything of it is loaded.

The reference is what the served model was loaded from: the tensor names,
dtypes and shapes in the served checkpoint's safetensors headers, and the FP8
layout of its ``quantization_config`` (or the model's own parameters for
kernel-format updates). Checks run in two places:

* per bucket, on the manifest *before its payload is allocated*
  (:meth:`BucketChecks.check_manifest`: every bucket's layout, every name,
  dtype and shape), and on the tensors once they arrived
  (:meth:`BucketChecks.check_payload`: the value sentinels of
  :mod:`..values`);
* on the whole step once it is complete (:func:`validate_update`: the name
  set must equal the reference exactly, so missing tensors are caught too).

Every problem is a line naming the tensor; nothing here raises on a
malformed update (a layout that does not parse is a problem line too).
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from pathlib import Path
from typing import Any

import torch

from ..aliases import alias_hint
from ..values import payload_values_ok, value_problems

__all__ = [
    "TensorSpec",
    "read_checkpoint_specs",
    "resolve_model_dir",
    "layout_key",
    "spec_problems",
    "validate_update",
    "BucketChecks",
    "LAYOUT_KEYS",
]

TensorSpec = tuple[str, tuple[int, ...]]  # (dtype name, shape)

#: the layout fields that decide the bytes of a checkpoint (hidden_size and
#: kv_cache_scheme do not change how weights are stored)
LAYOUT_KEYS = ("method", "strategy", "block_size", "scale_name", "ignore", "targets", "activation_dynamic",
               "ct_format")

_ST_DTYPES = {
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu",
    "BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64",
    "I8": "int8", "U8": "uint8", "I16": "int16", "U16": "uint16", "I32": "int32",
    "U32": "uint32", "I64": "int64", "U64": "uint64", "BOOL": "bool",
}


def dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def _read_header(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > 512 << 20:
            raise ValueError(f"{path}: safetensors header of {n} bytes")
        return json.loads(f.read(n))


def read_checkpoint_specs(model_dir: str | os.PathLike[str]) -> dict[str, TensorSpec]:
    """``{name: (dtype, shape)}`` of every tensor in a checkpoint directory,
    from the safetensors headers only (no tensor data is read)."""
    d = Path(model_dir)
    index = d / "model.safetensors.index.json"
    if index.exists():
        files = sorted({d / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = sorted(d.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {d}")
    specs: dict[str, TensorSpec] = {}
    for f in files:
        for name, meta in _read_header(f).items():
            if name == "__metadata__":
                continue
            dt = _ST_DTYPES.get(meta["dtype"], meta["dtype"])
            specs[name] = (dt, tuple(int(x) for x in meta["shape"]))
    return specs


def resolve_model_dir(model_config: Any) -> Path | None:
    """Local directory of the served checkpoint (a path, or the HF cache snapshot)."""
    name = str(getattr(model_config, "model", "") or "")
    if name and Path(name).is_dir():
        return Path(name)
    with contextlib.suppress(Exception):
        from huggingface_hub import snapshot_download

        p = snapshot_download(name, revision=getattr(model_config, "revision", None),
                              allow_patterns=["*.json", "*.safetensors"], local_files_only=True)
        return Path(p)
    return None


def layout_key(layout: Any) -> tuple[dict | None, str | None]:
    """``(the fields of LAYOUT_KEYS, None)`` or ``(None, why it is not a layout)``.
    Never raises: a layout from the wire passed the wire schema, but its
    values (a strategy no FP8Layout knows, ...) are judged here."""
    if layout is None:
        return None, None
    try:
        from ...formats import FP8Layout

        if not isinstance(layout, FP8Layout):
            layout = FP8Layout.from_dict(layout)
        d = layout.to_dict()
        return {k: d[k] for k in LAYOUT_KEYS}, None
    except Exception as e:  # KeyError, ValueError, TypeError, UnsupportedQuantization, ...
        return None, f"invalid layout ({type(e).__name__}: {str(e)[:200]})"


def _listing(names: list[str], max_report: int) -> str:
    s = ", ".join(names[:max_report])
    return s + (f", ... ({len(names) - max_report} more)" if len(names) > max_report else "")


def spec_problems(
    got: dict[str, TensorSpec],
    expected: dict[str, TensorSpec],
    *,
    what: str,
    max_report: int = 20,
    check_missing: bool = True,
) -> list[str]:
    """Unknown names, missing names (optional) and dtype/shape mismatches."""
    problems: list[str] = []
    unknown = sorted(n for n in got if n not in expected)  # O(len(got)): a bucket is checked against a whole model
    if unknown:
        problems.append(f"{len(unknown)} unknown tensor(s) (not in {what}): {_listing(unknown, max_report)}")
        problems += [h for h in (alias_hint(n, expected) for n in unknown[:max_report]) if h]
    if check_missing:
        missing = sorted(set(expected) - set(got))
        if missing:
            problems.append(f"{len(missing)} missing tensor(s) (in {what}, not in the update): "
                            f"{_listing(missing, max_report)}")
    bad = [f"{n}: got {got[n][0]}{list(got[n][1])}, expected {expected[n][0]}{list(expected[n][1])}"
           for n in sorted(n for n in got if n in expected and got[n] != expected[n])]
    if bad:
        problems.append(f"{len(bad)} dtype/shape mismatch(es): " + "; ".join(bad[:max_report])
                        + (f"; ... ({len(bad) - max_report} more)" if len(bad) > max_report else ""))
    return problems


def tensor_specs(tensors: list[tuple[str, torch.Tensor]]) -> dict[str, TensorSpec]:
    return {n: (dtype_name(t.dtype), tuple(t.shape)) for n, t in tensors}


def validate_update(
    tensors: list[tuple[str, torch.Tensor]],
    expected: dict[str, TensorSpec],
    *,
    what: str = "the served checkpoint",
    max_report: int = 20,
) -> list[str]:
    """Problems (empty = valid): names must equal ``expected``'s exactly, each
    dtype and shape too."""
    return spec_problems(tensor_specs(tensors), expected, what=what, max_report=max_report)


class PassedManifests:
    """Manifests that passed a worker's checks, remembered across steps by
    their entries object (see :class:`BucketChecks`). Bounded by the entries
    it holds: a trainer whose manifests change every step (so the receiver's
    manifest cache no longer holds them) cannot make it grow without end."""

    def __init__(self, max_entries: int = 1 << 20) -> None:
        self.max_entries = max_entries
        self.entries = 0
        self._items: dict[int, tuple[tuple, dict]] = {}
        self._layouts: dict[int, tuple[Any, tuple]] = {}

    def __len__(self) -> int:
        return len(self._items)

    def values(self):
        return self._items.values()

    def layout_key(self, layout: Any) -> tuple[dict | None, str | None]:
        """:func:`layout_key`, remembered per layout object (the manifest
        cache hands out the same one for identical bytes)."""
        hit = self._layouts.get(id(layout))
        if hit is not None and hit[0] is layout:
            return hit[1]
        got = layout_key(layout)
        if len(self._layouts) >= 256:
            self._layouts.clear()
        self._layouts[id(layout)] = (layout, got)
        return got

    def specs_for(self, entries: tuple) -> dict | None:
        """The specs ``entries`` passed against, or ``None``."""
        hit = self._items.get(id(entries))
        return hit[1] if hit is not None and hit[0] is entries else None

    def remember(self, entries: tuple, specs: dict) -> None:
        if id(entries) not in self._items:
            if self.entries + len(entries) > self.max_entries:
                self._items.clear()
                self.entries = 0
            self.entries += len(entries)
        self._items[id(entries)] = (entries, specs)  # the entries object keeps its id


def _as_whole(got: dict[str, TensorSpec], specs: dict[str, TensorSpec]) -> dict[str, TensorSpec]:
    """``got`` with every plausible row shard of a served tensor (its dtype,
    its trailing dims, at most its rows) given the served shape."""
    out = {}
    for name, (dt, shape) in got.items():
        want = specs.get(name)
        if (want is not None and dt == want[0] and len(shape) == len(want[1]) and len(shape) >= 1
                and tuple(shape[1:]) == tuple(want[1][1:]) and 0 < shape[0] <= want[1][0]):
            shape = want[1]
        out[name] = (dt, shape)
    return out


class BucketChecks:
    """Per-bucket checks of one step, for ``WeightReceiver.receive_all``.

    ``references`` are ``(specs, description, layout key)`` triples a bucket
    may match: one for an explicit mode; checkpoint and parameters for
    ``auto``, which is decided on the whole step. A bucket passes if its
    layout and every tensor match one reference; every bucket must carry the
    same layout as the first.

    ``passed``: a :class:`PassedManifests` the caller keeps across steps
    (with the references it holds), in which manifests that passed are
    remembered by their entries object. A receiver's manifest cache hands out the same entries object
    for byte-identical manifests, so a trainer that sends the same manifests
    every step has each bucket's names, dtypes and shapes compared once, not
    every step (37k entries of a 30B MoE: about 200 ms of host time per
    update, spent before each payload is posted). The references' specs
    must not change while they are used as keys (the worker builds them once
    per served model)."""

    def __init__(self, references: list[tuple[dict[str, TensorSpec], str, Any]], scale_name: str | None = None,
                 max_report: int = 20, passed: PassedManifests | None = None, row_shards: bool = False) -> None:
        self.references = references
        self.scale_name = scale_name
        self.max_report = max_report
        #: a trainer rank's part (``sync/rank_parts.py``): a tensor may be some
        #: of its rows (shape[1:] and dtype as served, 0 < rows <= served rows);
        #: the step puts them together and compares the whole tensors after
        self.row_shards = row_shards
        self.first_layout: Any = ...
        self.passed = passed
        #: per bucket that passed, the specs it matched (see :meth:`matched_only`)
        self.matched: list[dict[str, TensorSpec]] = []

    def check_manifest(self, m: Any) -> list[str]:
        key, err = self.passed.layout_key(m.layout) if self.passed is not None else layout_key(m.layout)
        if err:
            return [f"bucket {m.index}: {err}"]
        if self.first_layout is ...:
            self.first_layout = key
        elif key != self.first_layout:
            return [f"bucket {m.index}: layout {key} differs from the step's first bucket's {self.first_layout}"]
        entries = m.tensors
        known = self.passed.specs_for(entries) if self.passed is not None else None
        if known is not None:
            for specs, _, want in self.references:
                if known is specs and key == want:
                    self.matched.append(specs)
                    return []
        got = {e.name: (dtype_name(e.dtype), e.shape) for e in entries}
        best = None
        for specs, what, want in self.references:
            bad = [] if key == want else [f"scheme mismatch: update layout {key} but the served model expects {want}"]
            mine = _as_whole(got, specs) if self.row_shards else got
            bad += spec_problems(mine, specs, what=what, max_report=self.max_report, check_missing=False)
            if not bad:
                if self.passed is not None:
                    self.passed.remember(entries, specs)
                self.matched.append(specs)
                return []
            if best is None or len(bad) < len(best):
                best = bad
        return [f"bucket {m.index}: {p}" for p in best or []]

    def matched_only(self, specs: dict[str, TensorSpec], num_buckets: int) -> bool:
        """Every one of ``num_buckets`` buckets passed against ``specs``: each
        received name is in it with its dtype and shape, and (the receiver
        refuses a name sent twice) the step misses a name exactly when it
        holds fewer tensors than ``specs``."""
        return len(self.matched) == num_buckets and all(s is specs for s in self.matched)

    def check_payload_deferred(self, bucket: Any) -> Any:
        """:meth:`check_payload` for ``WeightReceiver.receive_all``: on CUDA the
        one-launch check is queued and its verdict read after the step's END
        (no host sync per bucket: the receiver posts the next bucket at once);
        elsewhere the problems at once."""
        from ..received import DeferredProblems
        from ..values import payload_bad_count

        count = payload_bad_count(bucket.payload, bucket.manifest.tensors, self.scale_name)
        if count is None:  # the one-launch check does not apply here: tensor by tensor at once
            return value_problems(bucket.tensors, scale_name=self.scale_name, max_report=self.max_report)

        def resolve() -> list[str]:
            if int(count[0]) == 0:
                return []
            return value_problems(bucket.tensors, scale_name=self.scale_name, max_report=self.max_report)

        return DeferredProblems(resolve)

    def check_payload(self, bucket: Any) -> list[str]:
        # on CUDA one launch per dtype over the payload; tensor by tensor only
        # where it finds something (to name it) or does not apply
        if payload_values_ok(bucket.payload, bucket.manifest.tensors, self.scale_name):
            return []
        return value_problems(bucket.tensors, scale_name=self.scale_name, max_report=self.max_report)
