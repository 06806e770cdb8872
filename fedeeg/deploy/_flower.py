"""Entry point of the Flower processes FedEEG starts: ``python -m fedeeg.deploy._flower {superlink,supernode} ARGS``.

Two additions to Flower's own ``flower-superlink``/``flower-supernode``:

- the process ends when the FedEEG daemon that started it dies (even by
  SIGKILL), so a crashed daemon never leaves a SuperLink or SuperNode behind
  (``$FEDEEG_PARENT_PID``);
- the SuperNode's waits are shortened: Flower's 0.5 s while its ClientApp
  works to ``$FEDEEG_SUPERNODE_ACTIVE_POLL`` (default 0.05), and its 3 s
  when no message is there to the same for a minute after it last handled a
  message (a run is under way, the next round's message is due), then to
  ``$FEDEEG_SUPERNODE_POLL`` seconds (default 0.25) while idle
  (:class:`ActivePoll`). With Flower's values a round spends up to ~7 s
  waiting. Only for flwr 1.42 (the version FedEEG pins); with another layout
  the SuperNode runs unchanged and a line on stderr says so;
- when the SuperNode starts handling a message it touches
  ``$FEDEEG_SUPERNODE_WAKE_FILE``: the site's long-lived ClientApp, which
  checks that file's time between its (idle) polls, then asks for the message
  at once instead of after its idle interval (:func:`wait_for_work`);
- log lines carry the time (millisecond resolution) and no colour codes;
- a message part that is not there yet is asked for again after 0.02 s
  (doubling up to 0.1 s), not Flower's 1 s doubling up to 10 s
  (:func:`shorter_object_pull_backoff`, ``$FEDEEG_PULL_BACKOFF``).
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time as _time
import types


def _watch_parent(pid: int) -> None:
    def loop() -> None:
        while True:
            if os.getppid() != pid:
                os._exit(0)
            _time.sleep(0.5)

    threading.Thread(target=loop, name="fedeeg-parent-watch", daemon=True).start()


class ActivePoll:
    """A polling interval that is short while a run is under way and longer while idle.

    Parameters
    ----------
    idle : float
        Seconds between polls when no message was handled for ``window`` seconds.
    active : float
        Seconds between polls for ``window`` seconds after the last message
        handled: the next round's message is due, and every poll interval on
        its way (SuperNode, ClientApp, reply) adds to the round's time.
    window : float
        Seconds a run counts as under way after a message was handled.
    wake_file : path-like | None
        A file whose modification time says when the SuperNode last started
        handling a message (see :func:`wait_for_work`).
    touch : bool
        Whether :meth:`busy` touches ``wake_file`` (the SuperNode's side);
        the ClientApp's side only reads it.
    """

    def __init__(self, idle: float, active: float, window: float = 60.0, wake_file: str | os.PathLike | None = None,
                 touch: bool = False) -> None:
        self.idle, self.active, self.window = float(idle), min(float(active), float(idle)), float(window)
        self.wake_file = os.fspath(wake_file) if wake_file else None
        self.touch = bool(touch)
        self._last = float("-inf")
        self._touched = float("-inf")

    def busy(self) -> None:
        """Note that a message is being (or was just) handled; with ``touch``, touch the wake file (at most every 0.2 s)."""
        self._last = _time.monotonic()
        if self.touch and self.wake_file is not None and self._last - self._touched >= 0.2:
            self._touched = self._last
            try:
                with open(self.wake_file, "ab"):
                    pass
                os.utime(self.wake_file)
            except OSError:  # a wake-up is an optimisation: the ClientApp still polls
                pass

    @property
    def interval(self) -> float:
        """Seconds to wait before the next poll."""
        return self.active if _time.monotonic() - self._last < self.window else self.idle


def _mtime_ns(path: str) -> int:
    """The file's modification time in ns; 0 while it does not exist (its creation then counts as a change)."""
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return 0


def wait_for_work(polls: ActivePoll, stop: threading.Event) -> None:
    """Wait ``polls.interval`` seconds before the next poll, ending early when the SuperNode signals a message.

    While idle the wait is cut into slices of ``polls.active`` seconds; between
    them the time of ``polls.wake_file`` is compared (a ``stat``, not a call to
    the SuperNode), and a change (the SuperNode started handling a message)
    ends the wait and marks ``polls`` busy. Without a wake file, or while a run
    is under way, this is ``stop.wait(polls.interval)``.
    """
    interval = polls.interval
    if polls.wake_file is None or interval <= polls.active:
        stop.wait(interval)
        return
    seen = _mtime_ns(polls.wake_file)
    deadline = _time.monotonic() + interval
    while not stop.is_set():
        left = deadline - _time.monotonic()
        if left <= 0:
            return
        stop.wait(min(polls.active, left))
        if _mtime_ns(polls.wake_file) != seen:
            polls.busy()
            return


def _shorter_supernode_poll(polls: ActivePoll) -> bool:
    try:
        from flwr.supernode import start_client_internal as sci
    except ImportError:
        return False
    if not isinstance(getattr(sci, "time", None), types.ModuleType):
        return False

    def sleep(seconds: float) -> None:
        if seconds < 1.0:  # Flower's 0.5-s waits while a message is handled (its reply, its parts): in memory
            polls.busy()
            _time.sleep(min(float(seconds), polls.active))
        else:  # its 3-s wait when the coordinator had no message
            _time.sleep(min(float(seconds), polls.interval))

    shim = types.ModuleType("time")
    shim.__dict__.update(_time.__dict__)
    shim.sleep = sleep
    sci.time = shim
    return True


#: First wait (s) before Flower asks again for a message part that is not there yet (Flower's own: 1 s, doubling).
PULL_BACKOFF = float(os.environ.get("FEDEEG_PULL_BACKOFF", "0.02"))


def shorter_object_pull_backoff(initial: float = PULL_BACKOFF, cap: float = 0.1, patience: float = 600.0) -> bool:
    """Make Flower retry a not-yet-available message part after ``initial`` seconds (doubling up to ``cap``), not 1 s.

    A message travels as objects, and a receiver often sees a message before
    its sender has uploaded all of its parts. Flower 1.42 then waits 1 s
    (±20 %) before asking again, doubling up to 10 s: on loopback that wait is
    most of a message's delivery time (measured: a SuperNode took 0.33-0.43 s
    to receive a 50-KB message with waits of 0.05 s doubling up to 2 s). This
    sets the first wait and the cap in this process, and as many tries per part
    as keep asking for ``patience`` seconds (Flower's own: 500 tries, about
    80 min at its cap), so that a slow upload is still waited for; Flower's
    overall time limit stays. Returns False (and changes nothing) on another
    flwr layout.
    """
    if initial <= 0:  # 0: Flower's own waits (benchmarks)
        return False
    try:
        from flwr.supercore.inflatable import inflatable_utils as utils
    except ImportError:
        return False
    functions = (utils.pull_objects, utils.pull_and_inflate_object_from_tree)
    keys = ("initial_backoff", "backoff_cap", "max_tries_per_object")
    if not all(set(keys) <= set(getattr(f, "__kwdefaults__", None) or {}) for f in functions):
        return False
    cap = max(float(cap), float(initial))
    for f in functions:
        f.__kwdefaults__["initial_backoff"] = float(initial)
        f.__kwdefaults__["backoff_cap"] = cap
        f.__kwdefaults__["max_tries_per_object"] = max(int(math.ceil(patience / cap)), 1)
    return True


def _timestamped_logs() -> None:
    """Flower's log lines with the time and without colour codes: they go to a log file an operator reads."""
    try:
        from flwr.supercore.logger import update_console_handler
    except ImportError:  # another flwr layout: its own format
        return
    update_console_handler(timestamps=True, colored=False)


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in ("superlink", "supernode"):
        sys.stderr.write("usage: python -m fedeeg.deploy._flower {superlink,supernode} [FLOWER ARGS]\n")
        sys.exit(2)
    which = sys.argv.pop(1)
    parent = os.environ.get("FEDEEG_PARENT_PID")
    if parent:
        _watch_parent(int(parent))
    poll = float(os.environ.get("FEDEEG_SUPERNODE_POLL", "0.25"))
    if which == "supernode" and poll > 0:  # 0: Flower's own waits (benchmarks)
        active = float(os.environ.get("FEDEEG_SUPERNODE_ACTIVE_POLL", "0.05"))
        wake = os.environ.get("FEDEEG_SUPERNODE_WAKE_FILE") or None
        if not _shorter_supernode_poll(ActivePoll(poll, active, wake_file=wake, touch=True)):
            sys.stderr.write("fedeeg: this flwr version's SuperNode could not be given a shorter poll; it runs unchanged.\n")
        shorter_object_pull_backoff()
    _timestamped_logs()
    if which == "supernode":
        from flwr.supernode.cli import flower_supernode as entry
    else:
        from flwr.superlink.cli import flower_superlink as entry
    sys.argv[0] = f"flower-{which}"
    sys.exit(entry())


if __name__ == "__main__":
    main()
