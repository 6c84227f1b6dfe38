"""COMPAT.md: generated from the patches' declarations plus the matrix record.

The record, ``vllm_fp8_overlay/matrix.json``, holds what the
compatibility-matrix tests observed on each real vLLM release. Each matrix
test compares its live observation with that record and fails on any
difference, so the record (and the COMPAT.md rendered from it) is what the
tests prove, not what somebody typed.

The record ships as package data and is read with ``importlib.resources``,
so ``python -m vllm_fp8_overlay compat`` works from an installed wheel too.
Changing it -- ``compat --merge DIR`` folds newly recorded observations in,
``--write`` rewrites COMPAT.md, ``--check`` fails when it is stale -- needs
a source checkout: COMPAT.md lives at its root and the record must be written
into the source tree, not into site-packages.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

from packaging.version import Version

from .derived_state import render_section as render_derived_section
from .load_shortcuts import render_section as render_shortcuts_section
from .patches import PATCH_CLASSES

PACKAGE = __package__ or "vllm_fp8_overlay"
RECORD_NAME = "matrix.json"
#: the record's path in the source tree (what --merge writes)
RECORD = Path(__file__).resolve().parent / RECORD_NAME
#: how the record is named in messages and in COMPAT.md
RECORD_LABEL = f"vllm_fp8_overlay/{RECORD_NAME}"
ROOT = Path(__file__).resolve().parent.parent
COMPAT_MD = ROOT / "COMPAT.md"
#: where matrix tests write observations (per release, per section)
OBS_DIR_ENV = "FP8_OVERLAY_MATRIX_OUT"
#: set to 1 to record observations instead of comparing them with the record
RECORD_ENV = "FP8_OVERLAY_RECORD"

#: observation keys that are reported but not compared (not deterministic)
INFORMATIONAL = {"bias_exact_without_overlay"}


def source_checkout() -> Path | None:
    """The repository root when the package runs from a source checkout
    (plain or editable install), None when it runs from an installed wheel."""
    if (ROOT / "pyproject.toml").is_file() and (ROOT / PACKAGE / "__init__.py").is_file():
        return ROOT
    return None


def tested_releases(record: dict | None = None) -> list[str]:
    """The vLLM releases the matrix tests ran as engines, oldest first."""
    return sorted(load_record() if record is None else record, key=Version)


def tested_verdict(version: str | Version | None) -> str | None:
    """How ``version`` stands against the tested releases: ``"tested"``, or
    a sentence a user on another release should read (``None`` without vLLM)."""
    releases = tested_releases()
    if version is None or not releases:
        return None
    v = Version(str(version))
    if str(v) in releases:
        return "tested"
    if v > Version(releases[-1]):
        return (f"newer than every release tested as an engine (newest: {releases[-1]}): the overlay's "
                "adapters and the worker extension assume the newest's APIs; COMPAT.md says what was checked")
    if v < Version(releases[0]):
        return f"older than every tested release (oldest: {releases[0]})"
    below = max(r for r in releases if Version(r) < v)
    above = min(r for r in releases if Version(r) > v)
    return f"not tested itself; tested releases around it: {below} and {above}"


def patches():
    return [cls() for cls in PATCH_CLASSES]


def load_record(path: Path | None = None) -> dict:
    """The matrix record: the packaged one unless ``path`` is given."""
    if path is not None:
        return json.loads(path.read_text()) if path.exists() else {}
    resource = resources.files(PACKAGE).joinpath(RECORD_NAME)
    if not resource.is_file():
        return {}
    return json.loads(resource.read_text(encoding="utf-8"))


def save_record(record: dict, path: Path = RECORD) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ordered = {k: record[k] for k in sorted(record, key=Version)}
    path.write_text(json.dumps(ordered, indent=2, sort_keys=True) + "\n")


def observation_dir() -> Path:
    default = (source_checkout() or Path.cwd()) / ".artifacts" / "matrix"
    return Path(os.environ.get(OBS_DIR_ENV, default))


def write_observation(version: str, section: str, data: dict) -> Path:
    out = observation_dir() / version
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{section}.json"
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path


def merge_observations(src: Path, record: dict) -> dict:
    """Fold ``src/<version>/<section>.json`` files into ``record``."""
    merged = json.loads(json.dumps(record))
    for vdir in sorted(Path(src).iterdir()):
        if not vdir.is_dir():
            continue
        for f in sorted(vdir.glob("*.json")):
            merged.setdefault(vdir.name, {})[f.stem] = json.loads(f.read_text())
    return merged


def comparable(data: dict) -> dict:
    return {k: v for k, v in data.items() if k not in INFORMATIONAL}


def check_observation(version: str, section: str, observed: dict) -> None:
    """Record (in record mode) or compare with the packaged record."""
    write_observation(version, section, observed)
    if os.environ.get(RECORD_ENV) == "1":
        return
    recorded = load_record().get(version, {}).get(section)
    if recorded is None:
        raise AssertionError(
            f"{RECORD_LABEL} has no '{section}' record for vLLM {version}; "
            f"run the matrix with {RECORD_ENV}=1, then "
            "`python -m vllm_fp8_overlay compat --merge .artifacts/matrix`"
        )
    if comparable(recorded) != comparable(observed):
        raise AssertionError(
            f"vLLM {version} '{section}' differs from {RECORD_LABEL}:\n"
            f"recorded: {json.dumps(comparable(recorded), sort_keys=True)}\n"
            f"observed: {json.dumps(comparable(observed), sort_keys=True)}"
        )


# ---------------------------------------------------------------- rendering
def _yes(v) -> str:
    return {True: "yes", False: "no", None: "–"}.get(v, str(v))


def _count(items) -> str:
    if items is None:
        return "–"
    return str(len(items))


def _ranks(per_rank) -> str:
    """``[[["SharedFusedMoE", 393216, 393224], ...], ...]`` as readable text."""
    if per_rank is None:
        return "–"
    parts = []
    for rank, layers in enumerate(per_rank):
        if not layers:
            parts.append(f"rank {rank}: none")
        else:
            cls, loaded, total = layers[0]
            parts.append(f"rank {rank}: {len(layers)}x {cls} at {loaded}/{total}")
    return "; ".join(parts)


def render(record: dict | None = None) -> str:
    record = load_record() if record is None else record
    ps = patches()
    lines = [
        "# vLLM compatibility",
        "",
        "Generated by `python -m vllm_fp8_overlay compat` from the patch declarations",
        f"(`vllm_fp8_overlay/patches/`) and the matrix record (`{RECORD_LABEL}`),",
        "which the matrix tests compare with what they observe on each real vLLM release.",
        "Do not edit by hand; a test fails when this file is stale.",
        "",
        "## Patches",
        "",
        "| patch | serves vLLM | upstream fix | retired from | what it changes |",
        "|---|---|---|---|---|",
    ]
    for p in ps:
        lines.append(
            f"| `{p.id}` | `{p.serves_text}` | {p.upstream} | {p.fixed_in} | {p.title}; "
            f"targets {', '.join(f'`{t}`' for t in p.targets)} |"
        )
    lines += [
        "",
        "## What the overlay does on each release",
        "",
        "State per patch as declared (the same answer as `python -m vllm_fp8_overlay status`",
        "on that release, which the matrix tests assert); each applied patch links to the",
        "same back-port as a source diff against that release (see the fork patches below).",
        "",
        "| vLLM | " + " | ".join(f"`{p.id}`" for p in ps) + " |",
        "|---|" + "---|" * len(ps),
    ]
    versions = tested_releases(record)
    diffs = _fork_diffs()
    for v in versions:
        cells = []
        for p in ps:
            state = p.state_for(Version(v))[0].value
            link = diffs.get(v, {}).get(p.id)
            cells.append(f"[{state}]({link})" if link and state == "applied" else state)
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## How it was verified (real vLLM CPU releases)",
        "",
        "Each release runs in its own environment with its own torch (`nox -s matrix`).",
        "Tiny models are generated locally: a 2-layer Llama and a 3-layer GLM-4.5-MoE",
        "(noaux_tc router with `e_score_correction_bias`, 8 experts, layer 0 dense).",
        "Without/with = a layerwise reload of the same weights with the overlay",
        "deactivated / activated in the same engine.",
        "",
        "| vLLM | 'Failed to load weights' per Llama reload (without → with) |"
        " MoE layers delayed to finalize (without → with) |"
        " weights buffered at finalize (without → with) | router bias exact after reload"
        " (without → with) | reload of changed weights == cold start (Llama / MoE) |",
        "|---|---|---|---|---|---|",
    ]
    for v in versions:
        r = record[v]
        ll, moe = r.get("llama", {}), r.get("moe", {})
        if not ll and not moe:
            continue
        warn = f"{_count(ll.get('warnings_without_overlay'))} → {_count(ll.get('warnings_with_overlay'))}"
        delayed = (
            f"{_count(moe.get('delayed_without_overlay'))} → {_count(moe.get('delayed_with_overlay'))}"
            if moe
            else "–"
        )
        buffered = (
            f"{moe.get('buffered_without_overlay', '–')} → {moe.get('buffered_with_overlay', '–')}"
            if moe
            else "–"
        )
        bias = (
            f"{_yes(moe.get('bias_exact_without_overlay'))} → {_yes(moe.get('bias_exact_with_overlay'))}"
            if moe
            else "–"
        )
        wc = f"{_yes(ll.get('warm_equals_cold'))} / {_yes(moe.get('warm_equals_cold')) if moe else '–'}"
        if moe.get("note"):
            wc += f" ({moe['note']})"
        lines.append(f"| {v} | {warn} | {delayed} | {buffered} | {bias} | {wc} |")

    ep_rows = [(v, record[v]["ep"]) for v in versions if "ep" in record[v]]
    if ep_rows:
        lines += [
            "",
            "### Expert parallelism (layer size without skipped tensors)",
            "",
            "Tiny Qwen3-MoE, tensor parallel 2 with `enable_expert_parallel=True`, one reload",
            "per rank observed inside each worker. Only the reload is exercised: vLLM's CPU",
            "fused-MoE kernel does not support expert maps, so no tokens are generated in",
            "this configuration. So that the engine can start at all, the test replaces vLLM's",
            "CPU fused-MoE forward by one returning zeros (a test-side shim in",
            "`vllm_fp8_overlay/testing/reload_probe.py`, not vLLM behaviour); the reload path",
            "observed is vLLM's own.",
            "",
            "| vLLM | MoE layers incomplete at finalize, per rank (without → with) |",
            "|---|---|",
        ]
        for v, ep in ep_rows:
            lines.append(
                f"| {v} | {_ranks(ep.get('incomplete_without_overlay'))} → "
                f"{_ranks(ep.get('incomplete_with_overlay'))} |"
            )
    serve_rows = [(v, record[v]["serve"]) for v in versions if "serve" in record[v]]
    if serve_rows:
        lines += [
            "",
            "### `vllm serve` through the plugin entry point",
            "",
            "| vLLM | overlay announced by the engine-core/worker process | patch states reported by the worker |",
            "|---|---|---|",
        ]
        for v, s in serve_rows:
            states = ", ".join(f"{k}: {val}" for k, val in sorted(s.get("worker_states", {}).items()))
            lines.append(f"| {v} | {_yes(s.get('announced_in_worker'))} | {states} |")
    inert = [(v, record[v]["inert"]) for v in versions if "inert" in record[v]]
    if inert:
        lines += [
            "",
            "### Releases without the reload module",
            "",
            "| vLLM | starts and generates with the overlay active | vLLM globals touched |",
            "|---|---|---|",
        ]
        for v, r in inert:
            lines.append(f"| {v} | {_yes(r.get('generates_with_overlay_active'))} | {len(r.get('touched', []))} |")
    notes = [(v, record[v]["notes"]) for v in versions if record[v].get("notes")]
    if notes:
        lines += ["", "### Notes", ""]
        for v, n in notes:
            lines.append(f"- {v}: {n}")
    lines += ["", _native_section(record, versions)]
    lines += ["", render_derived_section(versions, record)]
    lines += ["", render_shortcuts_section(versions)]
    fork_section = _fork_section()
    if fork_section:
        lines += ["", fork_section]
    formats = _formats_section()
    if formats:
        lines += ["", formats]
    return "\n".join(lines) + "\n"


def _native_section(record: dict, versions: list[str]) -> str:
    """Which path serves ``backend="fp8"`` per release (from the adapters'
    declarations) and what tests/test_native_backend.py verified there."""
    from .adapters import ADAPTER_CLASSES

    adapters = {cls.id: cls() for cls in ADAPTER_CLASSES}
    lines = [
        "## vLLM's native weight-transfer API (`backend=\"fp8\"`)",
        "",
        "Adapters (`vllm_fp8_overlay/adapters/`, features kept apart from the back-ports) register",
        "our engine as `fp8` where vLLM's `WeightTransferConfig.backend` accepts a registered name;",
        "elsewhere the worker extension (`--worker-extension-cls`) is the path. Verified columns come",
        "from `tests/test_native_backend.py` on that release: updates through the API, each equal to a",
        "freshly started engine in parameters, greedy tokens and logprobs.",
        "",
        "| vLLM | path | adapters applied | offline `LLM` API: updates == cold |"
        " `vllm serve` routes: updates == cold | bad update rejected, model unchanged |",
        "|---|---|---|---|---|---|",
    ]
    for v in versions:
        ver = Version(v)
        applied = [a.id for a in adapters.values() if a.state_for(ver)[0].value == "applied"]
        if "native-fp8-engine" in applied:
            path = "native `fp8` backend" + (" (worker + trainer factory)" if "native-fp8-trainer" in applied
                                            else " (worker; trainer calls `trainer_send_weights`)")
        elif ver >= Version("0.16"):
            path = "worker extension (config is a closed `Literal`)"
        else:
            path = "worker extension (no weight-transfer API)"
        r = record.get(v, {})
        offline = [f"{r[k]['updates_equal_cold']} ({k.rsplit('_', 1)[1]}, {r[k]['trainer_api']})"
                   for k in ("native_offline_fp8", "native_offline_bf16") if k in r]
        serve = r.get("native_serve")
        serve_cell = f"{serve['updates_equal_cold']} ({serve['format']})" if serve else "–"
        rej = r.get("native_rejects")
        rej_cell = f"yes ({rej['format']})" if rej else "–"
        adapters_cell = ", ".join(f"`{a}`" for a in applied) or "–"
        lines.append(f"| {v} | {path} | {adapters_cell} | {'; '.join(offline) or '–'} | {serve_cell} | {rej_cell} |")
    return "\n".join(lines)


def _fork_diffs() -> dict[str, dict[str, str]]:
    """``{release: {patch id: diff path relative to the repo}}``."""
    from . import fork

    where = fork.patch_dir()
    if not where.is_relative_to(ROOT):
        return {}
    return {release: {pid: path.relative_to(ROOT).as_posix() for pid, path in d.items()}
            for release, d in fork.available().items()}


def _fork_section() -> str:
    """The fork-patch diffs per release (same source as patches/README.md)."""
    from . import fork

    table = fork.available()
    if not table:
        return ""
    where = fork.patch_dir()
    where = where.relative_to(ROOT).as_posix() if where.is_relative_to(ROOT) else where.name
    lines = [
        "## Carrying the fixes in source (fork patches)",
        "",
        f"The same back-ports as diffs against each release's pristine source, in `{where}/`",
        f"(index: `{where}/README.md`; apply with `python -m vllm_fp8_overlay fork --vllm-source DIR`).",
        "A vLLM carrying them, with the overlay off, behaves as the pristine release with the",
        "overlay (`tests/test_fork_patches.py`).",
        "",
        "| vLLM | diffs, in application order |",
        "|---|---|",
    ]
    for release, diffs in table.items():
        links = [f"[`{pid}`]({where}/{release}/{diffs[pid].name})" for pid in fork.patch_order() if pid in diffs]
        lines.append(f"| {release} | " + " → ".join(links) + " |")
    return "\n".join(lines)


FORMATS_DOC = ROOT / "docs" / "formats.md"
FORMATS_HEADING = "## Formats and how each one is verified"


def _formats_section() -> str:
    """The formats x verification table, taken from docs/formats.md (one source)."""
    if not FORMATS_DOC.exists():
        return ""
    text = FORMATS_DOC.read_text()
    if FORMATS_HEADING not in text:
        return ""
    body = text.split(FORMATS_HEADING, 1)[1]
    table = []
    for line in body.lstrip("\n").splitlines():
        if not line.startswith("|"):
            if table:
                break
            continue
        table.append(line)
    return "\n".join(
        ["## FP8 checkpoint formats (trainer-side quantizer)", "", "From `docs/formats.md`.", "", *table]
    )


def is_stale() -> bool:
    return not COMPAT_MD.exists() or COMPAT_MD.read_text() != render()
