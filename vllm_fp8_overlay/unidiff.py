"""Strict unified diffs: parse them, apply or revert them in memory, no fuzz.

What :mod:`.fork` needs of ``patch(1)`` and nothing more: context and removed
lines must match exactly; a hunk may sit at another line than its header
says only where its text occurs exactly once; a mismatch names the line that
differs. Files are never written here: callers get the new text back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["ForkError", "PatchMismatch", "Hunk", "FileDiff", "parse_diff", "patch_text", "apply_to_files",
           "split_lines", "EXIT_MISMATCH"]

EXIT_MISMATCH = 1


class ForkError(Exception):
    exit_code = EXIT_MISMATCH


class PatchMismatch(ForkError):
    """A diff does not apply exactly; nothing was written."""


@dataclass
class Hunk:
    old_start: int
    old_len: int
    new_start: int
    new_len: int
    #: (tag, text with its line ending), tag one of " ", "-", "+"
    lines: list[tuple[str, str]]

    @property
    def header(self) -> str:
        return f"@@ -{self.old_start},{self.old_len} +{self.new_start},{self.new_len} @@"

    def side(self, old: bool) -> list[str]:
        keep = " -" if old else " +"
        return [text for tag, text in self.lines if tag in keep]


@dataclass
class FileDiff:
    path: str  # relative to the tree root, e.g. vllm/.../meta.py
    hunks: list[Hunk]


_HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


def split_lines(text: str) -> list[str]:
    """Lines with their endings, split at "\\n" only (``str.splitlines``
    also splits at form feeds and other characters Python source may hold)."""
    return re.findall(r"[^\n]*\n|[^\n]+$", text)


def _strip_prefix(name: str) -> str:
    name = name.split("\t")[0].strip()
    if name == "/dev/null":
        raise ForkError("diffs that create or delete files are not supported")
    return name.split("/", 1)[1] if "/" in name else name  # -p1


def parse_diff(text: str) -> tuple[dict[str, str], list[FileDiff]]:
    """(header fields, file diffs) of a unified diff. Text before the first
    ``---`` line is the header; ``Key: value`` lines there become fields."""
    lines = split_lines(text)
    header: dict[str, str] = {}
    files: list[FileDiff] = []
    hunk, left = None, 0  # the hunk being read, and how many of its lines are still due
    for i, line in enumerate(lines):
        if line.startswith("\\") and hunk is not None and hunk.lines:
            tag, prev = hunk.lines[-1]  # "\ No newline at end of file": about the line before
            hunk.lines[-1] = (tag, prev.rstrip("\n"))
        elif left:
            tag, body = (" ", "\n") if line == "\n" else (line[0], line[1:])
            if tag not in " -+":
                raise ForkError(f"{files[-1].path}: {hunk.header}: unexpected line {line!r}")
            hunk.lines.append((tag, body))
            left -= (tag in " -") + (tag in " +")
        elif line.startswith("--- ") and i + 1 < len(lines) and lines[i + 1].startswith("+++ "):
            _strip_prefix(line[4:])  # rejects /dev/null
            files.append(FileDiff(_strip_prefix(lines[i + 1][4:]), []))
        elif files and (m := _HUNK.match(line)):
            hunk = Hunk(int(m[1]), int(m[2] or 1), int(m[3]), int(m[4] or 1), [])
            left = hunk.old_len + hunk.new_len
            files[-1].hunks.append(hunk)
        elif not files:
            key, sep, value = line.partition(":")
            if sep and key.strip() and " " not in key.strip():
                header[key.strip().lower()] = value.strip()
    if left:
        raise ForkError(f"{files[-1].path}: {hunk.header} ends early")
    if not files:
        raise ForkError("no file diff found")
    return header, files


def patch_text(text: str, fd: FileDiff, *, reverse: bool = False) -> tuple[str, list[int]]:
    """``text`` with ``fd`` applied (or reverted), and each hunk's offset.

    Raises :class:`PatchMismatch` if a hunk's context or removed lines are
    not in the text exactly.
    """
    cur = split_lines(text)
    out: list[str] = []
    pos = 0
    offsets: list[int] = []
    last_offset = 0
    for k, h in enumerate(fd.hunks, 1):
        old, new = h.side(old=not reverse), h.side(old=reverse)
        start, length = (h.new_start, h.new_len) if reverse else (h.old_start, h.old_len)
        expected = start - 1 if length else start

        def fits(idx: int) -> bool:
            return pos <= idx <= len(cur) - len(old) and cur[idx:idx + len(old)] == old

        if fits(expected + last_offset):
            at = expected + last_offset
        elif fits(expected):
            at = expected
        else:
            found = [idx for idx in range(pos, len(cur) - len(old) + 1) if fits(idx)] if old else []
            if len(found) != 1:
                raise PatchMismatch(_mismatch(fd.path, k, h, cur, pos, expected + last_offset, old, len(found)))
            at = found[0]
        offsets.append(at - expected)
        last_offset = at - expected
        out += cur[pos:at] + new
        pos = at + len(old)
    out += cur[pos:]
    return "".join(out), offsets


def _mismatch(path: str, k: int, h: Hunk, cur: list[str], pos: int, at: int, old: list[str],
              matches: int) -> str:
    """Why hunk ``k`` does not fit, shown at the place it fits best (most equal
    lines, nearest to where it was expected)."""
    if matches > 1:
        return f"{path}: hunk {k} ({h.header}) matches {matches} places; refusing to guess"
    span = range(pos, max(pos, len(cur) - len(old)) + 1)
    best = max(span, key=lambda i: (sum(a == b for a, b in zip(cur[i:i + len(old)], old)), -abs(i - at)),
               default=at)
    for n, want in enumerate(old):
        have = cur[best + n] if 0 <= best + n < len(cur) else "<end of file>"
        if have != want:
            return (f"{path}: hunk {k} ({h.header}) does not match: line {best + n + 1} reads "
                    f"{have.rstrip(chr(10))!r}, the diff expects {want.rstrip(chr(10))!r}")
    return f"{path}: hunk {k} ({h.header}) does not match"


def apply_to_files(files: dict[str, str], diff_files: list[FileDiff], *, reverse: bool = False,
                   label: str = "") -> tuple[dict[str, str], dict[str, list[int]]]:
    """Apply (or revert) a diff to an in-memory tree ``{path: text}``; returns the
    changed files and the hunk offsets per file. Raises on the first mismatch."""
    changed = dict(files)
    offsets: dict[str, list[int]] = {}
    for fd in diff_files:
        if fd.path not in changed:
            raise PatchMismatch(f"{label}{fd.path}: no such file in the tree")
        try:
            changed[fd.path], offsets[fd.path] = patch_text(changed[fd.path], fd, reverse=reverse)
        except PatchMismatch as exc:
            raise PatchMismatch(f"{label}{exc}") from None
    return changed, offsets
