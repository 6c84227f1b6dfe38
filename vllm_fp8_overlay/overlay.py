"""The patch overlay: declarations, activation, status and exact reversal.

A :class:`Patch` declares which vLLM releases it serves, which upstream PR
made it unnecessary, and which functions it wraps. :func:`activate` installs a
post-import hook per patch (``wrapt``), so a patch attaches when vLLM imports
its target module, or at once if vLLM already did. Activation never imports
vLLM itself and never raises into vLLM: a patch whose target no longer looks
as written against is skipped with one warning, and ``status()`` says why.

Wrapping rebinds every module global in ``vllm.*`` that refers to the target
function (vLLM re-exports names such as ``finalize_layerwise_processing`` from
the reload package), so the patch is seen whatever the import order, the way a
fork would be. :func:`deactivate` puts every binding back.
"""

from __future__ import annotations

import enum
import functools
import logging
import os
import sys
import threading
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import Callable, Iterable

import wrapt
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from . import vllm_version as _vv

# A child of vLLM's own logger: when vLLM has configured logging, our lines
# appear in its output with its format.
logger = logging.getLogger("vllm.fp8_overlay")

DISABLE_ENV = "FP8_OVERLAY_DISABLE"
#: the name before 0.2 (vLLM warns about unknown ``VLLM_*`` variables); read
#: with a deprecation warning until 0.3
DEPRECATED_DISABLE_ENV = "VLLM_FP8_OVERLAY_DISABLE"

#: vLLM loads this entry-point group in every process it starts
PLUGIN_GROUP = "vllm.general_plugins"
#: our entry point's name, the name VLLM_PLUGINS must list
PLUGIN_NAME = "vllm_fp8_overlay"


def disabled_by_env() -> bool:
    value = os.environ.get(DISABLE_ENV)
    if value is None and DEPRECATED_DISABLE_ENV in os.environ:
        value = os.environ[DEPRECATED_DISABLE_ENV]
        _warn_deprecated_env()
    return (value or "").strip().lower() not in ("", "0", "false", "no")


@functools.lru_cache(maxsize=None)
def _warn_deprecated_env() -> None:
    logger.warning("%s is deprecated and will be ignored from 0.3; set %s instead",
                   DEPRECATED_DISABLE_ENV, DISABLE_ENV)


class State(str, enum.Enum):
    APPLIED = "applied"
    PENDING = "pending"  # in range; waits for vLLM to import the target module
    RETIRED = "retired upstream"
    NOT_NEEDED = "not needed"
    SKIPPED = "skipped: target changed"
    DISABLED = "disabled"
    INACTIVE = "inactive"  # in range, but the overlay is not active in this process
    NO_VLLM = "inactive: vLLM not installed"
    UNAVAILABLE = "unavailable"  # an adapter whose vLLM API this release lacks


class TargetMismatch(Exception):
    """The target does not look like the code the patch was written against."""


def _rebind_vllm_globals(old: object, new: object) -> None:
    """Point every ``vllm.*`` module global that is ``old`` at ``new``."""
    for mod_name, mod in list(sys.modules.items()):
        if mod is None or not (mod_name == "vllm" or mod_name.startswith("vllm.")):
            continue
        namespace = getattr(mod, "__dict__", None)
        if not namespace:
            continue
        for name, value in list(namespace.items()):
            if value is old:
                setattr(mod, name, new)


class Patch:
    """Base class of one back-ported fix. Subclasses set the metadata and
    implement :meth:`check` (cheap fingerprint), :meth:`apply` and, where
    they change more than wrapped functions, :meth:`revert_extra`."""

    id: str = ""
    title: str = ""
    #: vLLM releases the patch applies to (a ``packaging`` specifier).
    serves: SpecifierSet = SpecifierSet()
    #: first vLLM release that no longer needs it (the fix is upstream).
    fixed_in: Version = Version("0")
    upstream: str = ""
    #: what is wrong before the first release the patch serves, e.g. why the
    #: older releases do not need it.
    not_needed_before: str = ""
    #: module whose import triggers the patch.
    trigger_module: str = "vllm.model_executor.model_loader.reload"
    #: human-readable names of what the patch changes (for status / COMPAT).
    targets: tuple[str, ...] = ()
    #: ids of patches that must be applied for this one to be correct.
    requires: tuple[str, ...] = ()

    def __init__(self) -> None:
        self._proxies: list[tuple[object, object]] = []

    # -- to implement -----------------------------------------------------
    def check(self) -> None:
        """Raise :class:`TargetMismatch` if the target changed."""

    def apply(self) -> None:
        raise NotImplementedError

    def revert_extra(self) -> None:
        """Undo changes other than wrapped functions (default: none)."""

    # -- helpers ----------------------------------------------------------
    def wrap(self, module_name: str, attr: str, wrapper: Callable) -> None:
        """Wrap ``module.attr`` with ``wrapper(wrapped, instance, args, kwargs)``
        and rebind every ``vllm.*`` global that refers to the same function."""
        module = sys.modules[module_name]
        original = getattr(module, attr)
        proxy = wrapt.FunctionWrapper(original, wrapper)
        self._proxies.append((proxy, original))
        _rebind_vllm_globals(original, proxy)

    def revert(self) -> None:
        # Modules imported after wrapping bound the proxy themselves, so the
        # scan covers every vllm.* global, not only the ones rebound above.
        for proxy, original in reversed(self._proxies):
            _rebind_vllm_globals(proxy, original)
        self._proxies.clear()
        self.revert_extra()

    # -- declarations -----------------------------------------------------
    @property
    def serves_text(self) -> str:
        """The specifier, lower bound first (``>=0.16.0,<0.20.0``)."""
        return ",".join(sorted((str(s) for s in self.serves), key=lambda s: (not s.startswith(">"), s)))

    def state_for(self, version: Version | None) -> tuple[State, str]:
        """The state this patch takes on a vLLM release, from declarations only."""
        if version is None:
            return State.NO_VLLM, "vLLM is not installed"
        if version >= self.fixed_in:
            return State.RETIRED, f"fixed upstream in vLLM {self.fixed_in} ({self.upstream})"
        if self.serves.contains(version, prereleases=True):
            return State.APPLIED, self.title
        return State.NOT_NEEDED, self.not_needed_before


@dataclass
class PatchStatus:
    id: str
    state: State
    reason: str
    serves: str
    fixed_in: str
    upstream: str
    targets: tuple[str, ...] = field(default_factory=tuple)

    def as_dict(self) -> dict:
        return {
            "id": self.id,
            "state": self.state.value,
            "reason": self.reason,
            "serves": self.serves,
            "fixed_in": self.fixed_in,
            "upstream": self.upstream,
            "targets": list(self.targets),
        }


class Overlay:
    """Holds the runtime state of all patches in this process."""

    def __init__(self, patches: Iterable[Patch]):
        self.patches = list(patches)
        self._lock = threading.RLock()
        self._active = False
        self._hooks_registered: set[str] = set()
        self._runtime: dict[str, tuple[State, str]] = {}
        self._announced = False
        self.version: Version | None = None

    # -- activation -------------------------------------------------------
    def auto_activate(self) -> None:
        """Activation on import and from vLLM's plugin hook: honours DISABLE_ENV."""
        with self._lock:
            if disabled_by_env():
                if not self._active:
                    for p in self.patches:
                        self._runtime[p.id] = (State.DISABLED, f"{DISABLE_ENV} is set")
                return
            self.activate()

    def activate(self) -> None:
        """Explicit activation: always activates, whatever DISABLE_ENV says."""
        with self._lock:
            if self._active:
                return
            self._active = True
            self.version = _vv.installed_vllm_version()
            triggers: list[str] = []
            for patch in self.patches:
                state, reason = patch.state_for(self.version)
                if state is State.APPLIED:
                    self._runtime[patch.id] = (
                        State.PENDING,
                        f"applies when {patch.trigger_module} is imported",
                    )
                    if patch.trigger_module not in triggers:
                        triggers.append(patch.trigger_module)
                else:
                    self._runtime[patch.id] = (state, reason)
            # Register only once every state is known: a hook whose module is
            # already imported runs during registration.
            for module_name in triggers or ["vllm"]:
                # With nothing to attach, the "vllm" hook only announces.
                self._register(module_name)

    def deactivate(self) -> None:
        """Undo every applied patch; vLLM is left exactly as it was."""
        with self._lock:
            for patch in reversed(self.patches):
                state, _ = self._runtime.get(patch.id, (None, ""))
                if state is State.APPLIED:
                    patch.revert()
            self._runtime.clear()
            self._active = False
            self._announced = False

    def _register(self, module_name: str) -> None:
        # wrapt calls the hook at once if the module is already imported.
        # Hooks cannot be unregistered, so each is registered once per
        # process and does nothing while the overlay is inactive.
        if module_name in self._hooks_registered:
            if module_name in sys.modules:
                self._on_import(sys.modules[module_name])
            return
        self._hooks_registered.add(module_name)
        wrapt.register_post_import_hook(self._on_import, module_name)

    def _on_import(self, module) -> None:
        try:
            with self._lock:
                if not self._active:
                    return
                if self.version is None:
                    self.version = _vv.installed_vllm_version()
                name = getattr(module, "__name__", "")
                for patch in self.patches:
                    if patch.trigger_module != name:
                        continue
                    if self._runtime.get(patch.id, (None,))[0] is not State.PENDING:
                        continue
                    self._apply_one(patch)
                self._announce()
        except Exception:  # never break vLLM start-up
            logger.exception("vllm-fp8-overlay: unexpected error while patching; vLLM left unpatched")
            self._revert_all_quietly()

    def _apply_one(self, patch: Patch) -> None:
        for dep in patch.requires:
            if self._runtime.get(dep, (None,))[0] is not State.APPLIED:
                dep_state, dep_reason = self._runtime.get(dep, (State.NOT_NEEDED, ""))
                if dep_state is State.NOT_NEEDED or dep_state is State.RETIRED:
                    continue  # vLLM already behaves as the dependency would make it
                self._runtime[patch.id] = (
                    State.SKIPPED,
                    f"requires patch {dep!r}, which is {dep_state.value}",
                )
                logger.warning("vllm-fp8-overlay: patch %s skipped: requires %s", patch.id, dep)
                return
        try:
            patch.check()
        except TargetMismatch as exc:
            self._runtime[patch.id] = (State.SKIPPED, str(exc))
            logger.warning("vllm-fp8-overlay: patch %s skipped: %s", patch.id, exc)
            return
        except Exception as exc:
            # a target whose signature cannot even be inspected (a C function,
            # a wrapper of another tool): skip this patch, and let the loop go
            # on so that the next patches do not stay "pending" forever
            self._runtime[patch.id] = (State.SKIPPED, f"target cannot be inspected: {exc!r}")
            logger.warning("vllm-fp8-overlay: patch %s skipped: target cannot be inspected: %r",
                           patch.id, exc)
            return
        try:
            patch.apply()
        except Exception as exc:
            patch.revert()
            self._runtime[patch.id] = (State.SKIPPED, f"apply failed: {exc!r}")
            logger.warning("vllm-fp8-overlay: patch %s skipped: apply failed: %r", patch.id, exc)
            return
        self._runtime[patch.id] = (State.APPLIED, patch.title)

    def _announce(self) -> None:
        if self._announced:
            return
        if any(s is State.PENDING for s, _ in self._runtime.values()):
            return
        self._announced = True
        applied = [p.id for p in self.patches if self._runtime[p.id][0] is State.APPLIED]
        logger.info(
            "vllm-fp8-overlay active for vLLM %s: %s",
            self.version,
            ", ".join(applied) if applied else "no patch needed",
        )

    def _revert_all_quietly(self) -> None:
        for patch in self.patches:
            try:
                patch.revert()
            except Exception:
                pass
            if self._runtime.get(patch.id, (None,))[0] is State.APPLIED:
                self._runtime[patch.id] = (State.SKIPPED, "reverted after an unexpected error")

    # -- reporting --------------------------------------------------------
    @property
    def active(self) -> bool:
        return self._active

    def status(self) -> list[PatchStatus]:
        version = self.version or _vv.installed_vllm_version()
        out = []
        for patch in self.patches:
            state, reason = self._runtime.get(patch.id) or patch.state_for(version)
            if not self._active and patch.id not in self._runtime and state is State.APPLIED:
                state, reason = State.INACTIVE, "overlay not activated in this process"
            out.append(
                PatchStatus(
                    id=patch.id,
                    state=state,
                    reason=reason,
                    serves=patch.serves_text,
                    fixed_in=str(patch.fixed_in),
                    upstream=patch.upstream,
                    targets=patch.targets,
                )
            )
        return out


@dataclass
class PluginCoverage:
    """Whether the processes vLLM spawns (engine core, workers) run patched.

    ``import vllm_fp8_overlay`` reaches only the process that runs it; the
    spawned processes are reached only through vLLM's plugin loader, which
    looks up ``vllm.general_plugins`` entry points and filters them by
    ``VLLM_PLUGINS``. ``is_active()`` in the driver cannot tell the two apart.
    """

    entry_point: str | None  # what vLLM would call, None when not installed
    vllm_plugins: str | None  # VLLM_PLUGINS as set; None = unset, every plugin loads
    allowed: bool  # VLLM_PLUGINS lets vLLM load our entry point
    disabled_by_env: bool  # the plugin loads but auto-activation is off
    covered: bool
    reason: str

    def as_dict(self) -> dict:
        return asdict(self)


def plugin_coverage() -> PluginCoverage:
    """Apply vLLM's own plugin-selection rule to this environment (see
    ``vllm.plugins.load_plugins_by_group``): a plugin loads when VLLM_PLUGINS
    is unset or lists its name; vLLM splits on "," and does not strip
    spaces, so neither do we."""
    try:
        found = [ep.value for ep in metadata.entry_points(group=PLUGIN_GROUP) if ep.name == PLUGIN_NAME]
    except Exception:  # a broken distribution elsewhere must not break status
        found = []
    entry = found[0] if found else None
    raw = os.environ.get("VLLM_PLUGINS")
    names = None if raw is None else raw.split(",")
    allowed = names is None or PLUGIN_NAME in names
    disabled = disabled_by_env()
    covered = entry is not None and allowed and not disabled
    if entry is None:
        reason = (
            f"no {PLUGIN_GROUP} entry point {PLUGIN_NAME!r} is installed (package imported from a "
            "path, not pip-installed?): processes vLLM spawns run unpatched"
        )
    elif not allowed:
        reason = f"VLLM_PLUGINS={raw!r} excludes {PLUGIN_NAME!r}: processes vLLM spawns run unpatched"
        if PLUGIN_NAME in (n.strip() for n in names or ()):
            reason += " (vLLM matches names exactly: remove the spaces)"
    elif disabled:
        reason = (
            f"automatic activation is switched off ({DISABLE_ENV}): "
            "the plugin loads in each vLLM process but does nothing"
        )
    else:
        reason = f"vLLM loads {PLUGIN_GROUP} {PLUGIN_NAME!r} in every process it starts (" + (
            "VLLM_PLUGINS unset)" if raw is None else "listed in VLLM_PLUGINS)"
        )
    return PluginCoverage(entry, raw, allowed, disabled, covered, reason)
