"""Atomic per-round checkpoints of the coordinator, with fall-back to the last good one.

After every round the server writes ``STATE/checkpoints/round-NNNN/`` holding
``arrays.safetensors`` (the global trainable tensors), ``state.json`` (the
round, the metrics history and any strategy state) and ``manifest.json``
(sha256 of both). The folder is written under a temporary name and renamed,
so a crash never leaves a half-written checkpoint under a valid name.

:meth:`RoundStateStore.load_latest` returns the newest checkpoint whose
files match their hashes; a damaged newer one is skipped with a warning. If
checkpoints exist but none verifies, it raises instead of silently starting
again at round 1.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._hashing import sha256_file

logger = logging.getLogger(__name__)

_ROUND_RE = re.compile(r"^round-(\d{4,})$")
ARRAYS, STATE, MANIFEST = "arrays.safetensors", "state.json", "manifest.json"


class CheckpointError(RuntimeError):
    """No usable checkpoint although some exist (every one is damaged)."""


@dataclass
class RoundState:
    """A verified checkpoint: the round it closes, the global arrays and the state."""

    round: int
    arrays: dict[str, np.ndarray]
    state: dict
    path: Path
    manifest: dict


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class RoundStateStore:
    """Round checkpoints under ``folder/checkpoints``.

    Parameters
    ----------
    folder : path-like
        The server's state folder.
    keep : int
        Checkpoints kept (older ones are deleted after a new one is written);
        at least 2, so that a damaged newest one has a predecessor.
    """

    def __init__(self, folder: str | os.PathLike, *, keep: int = 3) -> None:
        if not isinstance(keep, int) or keep < 2:
            raise ValueError(f"'keep' must be an integer >= 2 (a damaged checkpoint needs a predecessor), got {keep!r}.")
        self.root = Path(folder) / "checkpoints"
        self.keep = keep

    def rounds(self) -> list[int]:
        """Rounds with a checkpoint folder, newest first (not verified)."""
        if not self.root.is_dir():
            return []
        found = [int(m.group(1)) for p in self.root.iterdir() if p.is_dir() and (m := _ROUND_RE.match(p.name))]
        return sorted(found, reverse=True)

    def path(self, rnd: int) -> Path:
        return self.root / f"round-{rnd:04d}"

    def save(self, rnd: int, arrays: dict[str, np.ndarray], state: dict) -> dict:
        """Write round ``rnd``'s checkpoint atomically; returns its manifest (with the files' sha256)."""
        from safetensors.numpy import save_file

        if not isinstance(rnd, int) or rnd < 0:
            raise ValueError(f"'rnd' must be a non-negative integer, got {rnd!r}.")
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".round-{rnd:04d}.", dir=self.root))
        try:
            save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp / ARRAYS))
            (tmp / STATE).write_text(json.dumps({**state, "round": rnd}, sort_keys=True, default=_json_default))
            manifest = {"round": rnd, "files": {name: sha256_file(tmp / name) for name in (ARRAYS, STATE)}}
            (tmp / MANIFEST).write_text(json.dumps(manifest, sort_keys=True))
            for name in (ARRAYS, STATE, MANIFEST):
                with (tmp / name).open("rb") as f:
                    os.fsync(f.fileno())
            final = self.path(rnd)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for old in self.rounds()[self.keep:]:
            shutil.rmtree(self.path(old), ignore_errors=True)
        return manifest

    def verify(self, rnd: int) -> RoundState:
        """Load and verify one checkpoint; ValueError naming the problem if it is damaged."""
        from safetensors.numpy import load_file

        path = self.path(rnd)
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{path / MANIFEST} is missing or unreadable ({err}).") from None
        for name in (ARRAYS, STATE):
            want = manifest.get("files", {}).get(name)
            if not (path / name).is_file():
                raise ValueError(f"{path / name} is missing.")
            got = sha256_file(path / name)
            if got != want:
                raise ValueError(f"{path / name} does not match its sha256 in {MANIFEST} "
                                 f"(expected {str(want)[:12]}…, got {got[:12]}…).")
        state = json.loads((path / STATE).read_text())
        if state.get("round") != rnd or manifest.get("round") != rnd:
            raise ValueError(f"{path} names round {state.get('round')!r}, not {rnd}.")
        return RoundState(rnd, dict(load_file(str(path / ARRAYS))), state, path, manifest)

    def load_latest(self) -> RoundState | None:
        """The newest checkpoint that verifies, or None when there is none at all.

        A damaged newer checkpoint is skipped with a warning naming it and the
        round resumed from instead.

        Raises
        ------
        CheckpointError
            If checkpoints exist but none verifies.
        """
        rounds = self.rounds()
        problems = []
        for rnd in rounds:
            try:
                found = self.verify(rnd)
            except ValueError as err:
                problems.append(str(err))
                logger.warning("Checkpoint of round %d is damaged (%s); trying the one before it.", rnd, err)
                continue
            if problems:
                logger.warning("Resuming from the checkpoint of round %d instead of round %d (damaged).", rnd, rounds[0])
            return found
        if problems:
            raise CheckpointError(
                f"Every checkpoint under {self.root} is damaged: {problems}. Restore one from a backup, or move the "
                "folder away to start the run again from round 1 deliberately."
            )
        return None


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


__all__ = ["RoundStateStore", "RoundState", "CheckpointError"]
