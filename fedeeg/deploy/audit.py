"""Append-only, hash-chained audit log (JSON lines).

Every entry holds ``seq`` (0, 1, ...), ``time`` (UTC ISO), ``event``, ``data``,
``prev`` (the previous entry's ``hash``; 64 zeros for the first) and ``hash``,
the sha256 of the entry's canonical JSON without ``hash``. Changing, removing
or reordering any entry breaks the chain from that entry on, and
:func:`verify_audit_log` names the first entry that does not verify.

What is logged (by :mod:`fedeeg.federation.deployment`): the run config's
hash, per round the sites asked and answered, update sizes and norms (never
contents), rejects with reasons, stragglers, and checkpoint hashes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from datetime import datetime, timezone
from pathlib import Path

logger = logging.getLogger(__name__)

AUDIT_FILE = "audit.jsonl"
GENESIS = "0" * 64


class AuditError(ValueError):
    """The audit log does not verify; ``line`` and ``seq`` name the first bad entry."""

    def __init__(self, message: str, *, line: int, seq: int | None = None) -> None:
        super().__init__(message)
        self.line = line
        self.seq = seq


def _canonical(entry: dict) -> bytes:
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def entry_hash(entry: dict) -> str:
    """sha256 of an entry's canonical JSON without its ``hash`` field."""
    return hashlib.sha256(_canonical({k: v for k, v in entry.items() if k != "hash"})).hexdigest()


def _resolve(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path / AUDIT_FILE if path.is_dir() else path


def verify_audit_log(path: str | os.PathLike) -> int:
    """Check the whole chain of an audit log.

    Parameters
    ----------
    path : path-like
        The log file, or a folder holding ``audit.jsonl``.

    Returns
    -------
    n_entries : int

    Raises
    ------
    FileNotFoundError
        If there is no log.
    AuditError
        At the first entry that is not valid JSON, is out of sequence, does not
        point to its predecessor's hash or whose own hash does not match.
    """
    path = _resolve(path)
    if not path.is_file():
        raise FileNotFoundError(f"No audit log at {str(path)!r} (the server writes OUT/{AUDIT_FILE}).")
    prev = GENESIS
    n = 0
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                raise AuditError(f"{path}: line {lineno} is empty; entries were removed or the file was edited.",
                                 line=lineno)
            try:
                entry = json.loads(raw)
            except json.JSONDecodeError as err:
                raise AuditError(f"{path}: line {lineno} is not valid JSON ({err.msg}); the entry was altered or "
                                 "truncated.", line=lineno) from None
            seq = entry.get("seq") if isinstance(entry, dict) else None
            if not isinstance(entry, dict) or seq != n:
                raise AuditError(f"{path}: entry at line {lineno} has seq {seq!r}, expected {n}: entries were removed, "
                                 "inserted or reordered.", line=lineno, seq=seq)
            if entry.get("prev") != prev:
                raise AuditError(f"{path}: entry seq {seq} (line {lineno}, event {entry.get('event')!r}) does not "
                                 "chain to the entry before it: that entry or this one was altered.",
                                 line=lineno, seq=seq)
            got = entry_hash(entry)
            if entry.get("hash") != got:
                raise AuditError(f"{path}: entry seq {seq} (line {lineno}, event {entry.get('event')!r}) was altered: "
                                 f"its content hashes to {got[:12]}…, not the recorded {str(entry.get('hash'))[:12]}….",
                                 line=lineno, seq=seq)
            prev = entry["hash"]
            n += 1
    return n


class AuditLog:
    """Append entries to a hash-chained JSONL file (created if missing).

    Opening an existing log verifies it first: a server never extends a chain
    that was tampered with.

    Parameters
    ----------
    path : path-like
        The log file, or a folder (``audit.jsonl`` in it).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        path = Path(path)
        if path.is_dir() or not path.suffix:
            path.mkdir(parents=True, exist_ok=True)
            path = path / AUDIT_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._seq = 0
        self._prev = GENESIS
        if path.is_file() and path.stat().st_size:
            self._seq = verify_audit_log(path)
            last = path.read_bytes().rstrip(b"\n").rsplit(b"\n", 1)[-1]
            self._prev = json.loads(last)["hash"]

    def append(self, event: str, **data) -> dict:
        """Append one entry (flushed and fsynced) and return it."""
        entry = {"seq": self._seq, "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                 "event": str(event), "data": data, "prev": self._prev}
        entry["hash"] = entry_hash(entry)
        line = _canonical(entry) + b"\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        self._seq += 1
        self._prev = entry["hash"]
        return entry

    def __len__(self) -> int:
        return self._seq


def config_hash(mapping: dict) -> str:
    """sha256 of a config's canonical JSON (recorded at the start of a run)."""
    return hashlib.sha256(json.dumps(mapping, sort_keys=True, default=str).encode()).hexdigest()


__all__ = ["AUDIT_FILE", "AuditError", "AuditLog", "verify_audit_log", "entry_hash", "config_hash"]
