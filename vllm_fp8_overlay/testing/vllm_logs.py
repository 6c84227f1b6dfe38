"""The log records vLLM emits inside a block (its loggers do not propagate to
the root logger, so pytest's ``caplog`` misses them)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

__all__ = ["LogCapture", "capture_vllm_logs"]


@dataclass
class LogCapture:
    records: list[logging.LogRecord] = field(default_factory=list)

    @property
    def messages(self) -> list[str]:
        return [r.getMessage() for r in self.records]

    def matching(self, substring: str, level: int | None = None) -> list[str]:
        """Messages containing ``substring`` (at ``level`` or above if given)."""
        return [
            r.getMessage()
            for r in self.records
            if substring in r.getMessage() and (level is None or r.levelno >= level)
        ]

    def warnings(self) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno >= logging.WARNING]

    def clear(self) -> None:
        self.records.clear()


class _ListHandler(logging.Handler):
    def __init__(self, sink: LogCapture) -> None:
        super().__init__(logging.DEBUG)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.records.append(record)


@contextlib.contextmanager
def capture_vllm_logs(level: int = logging.INFO, logger_name: str = "vllm") -> Iterator[LogCapture]:
    """Collect the records of the ``vllm`` logger tree emitted inside the block.

    vLLM's loggers do not propagate to the root logger (pytest's ``caplog``
    misses them), so a handler is attached to ``logger_name`` directly and its
    level is lowered to ``level`` for the block (``logging.DEBUG`` to see e.g.
    the reload module's "Delayed processing" lines). Console output keeps
    vLLM's own handler level. Note that ``logger.warning_once`` /
    ``info_once`` messages appear only once per process.
    """
    with contextlib.suppress(ImportError):
        import vllm.logger  # noqa: F401  (configures the vllm logger first)
    lg = logging.getLogger(logger_name)
    cap = LogCapture()
    handler = _ListHandler(cap)
    old_level = lg.level
    # child loggers with an explicit level would filter before reaching us
    children = [
        logging.getLogger(n)
        for n in list(logging.root.manager.loggerDict)
        if n.startswith(logger_name + ".")
        and isinstance(logging.root.manager.loggerDict[n], logging.Logger)
    ]
    old_child = {c.name: c.level for c in children}
    for c in children:
        if c.level and c.level > level:
            c.setLevel(level)
    lg.addHandler(handler)
    if lg.getEffectiveLevel() > level or old_level == logging.NOTSET:
        lg.setLevel(level)
    try:
        yield cap
    finally:
        lg.removeHandler(handler)
        lg.setLevel(old_level)
        for c in children:
            c.setLevel(old_child[c.name])
