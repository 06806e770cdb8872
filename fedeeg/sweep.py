"""Grids of runs over a scenario, resumable: ``fedeeg sweep``.

A grid such as ``'strategy=ffa,fedit,full lora_rank=1,2,4,8,16 seed=0,1,2'``
is the Cartesian product of its settings (space-separated ``key=v1,v2,…``;
any :class:`fedeeg.config.RunConfig` field or scenario setting). Every cell is
one run in ``RUNS_DIR/CELL/`` with its own ``scenario.toml`` (the scenario
merged with the cell's values: ``fedeeg simulate --scenario
RUNS_DIR/CELL/scenario.toml`` reproduces it). A cell whose ``summary.json``
exists is finished and skipped, so a sweep killed mid-grid resumes where it
stopped (``summary.json`` is the last file a run writes, atomically).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .scenarios import PROPOSED_FIELDS, Scenario, known_settings, resolve, run_fields

logger = logging.getLogger(__name__)

SUMMARY = "summary.json"
CELL_SCENARIO = "scenario.toml"
SWEEP_LOG = "sweep.jsonl"


def _field_kind(name: str) -> str:
    if name in PROPOSED_FIELDS:
        return PROPOSED_FIELDS[name][1].__name__
    return str(run_fields()[name].type)


def _parse_value(name: str, text: str) -> Any:
    """One grid value, typed like its setting (int, float, bool or str)."""
    kind = _field_kind(name)
    try:
        if kind.startswith("bool"):
            low = text.lower()
            if low not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return low in ("true", "1", "yes")
        if kind.startswith("int"):
            return int(text)
        if kind.startswith("float"):
            return float(text)
    except ValueError:
        raise ValueError(f"Grid value {text!r} of {name!r} is not a {kind.split(' ')[0]}.") from None
    return text


def parse_grid(text: str) -> dict[str, list]:
    """Parse ``'key=v1,v2 key2=v3,...'`` into ``{key: [values]}`` (snake-case keys, typed values).

    Raises
    ------
    ValueError
        Naming the malformed item, an unknown setting (listing the known
        ones), a value of the wrong type or a setting given twice.
    """
    grid: dict[str, list] = {}
    known = known_settings()
    for item in str(text).split():
        if "=" not in item:
            raise ValueError(f"Grid item {item!r} must look like key=v1,v2,... (e.g. 'strategy=ffa,fedit seed=0,1,2').")
        key, _, values = item.partition("=")
        name = key.strip().replace("-", "_")
        if name not in known:
            raise ValueError(f"Grid key {key!r} is not a setting. Known settings: {', '.join(known)}.")
        if name in ("out",):
            raise ValueError("The grid cannot vary 'out': every cell's output folder is RUNS_DIR/CELL.")
        if name in grid:
            raise ValueError(f"Grid key {key!r} is given twice; list all its values once: {key}=a,b,c.")
        parts = [v.strip() for v in values.split(",") if v.strip()]
        if not parts:
            raise ValueError(f"Grid key {key!r} has no values.")
        typed = [_parse_value(name, v) for v in parts]
        if len(set(map(repr, typed))) != len(typed):
            raise ValueError(f"Grid key {key!r} lists a value twice: {parts}.")
        grid[name] = typed
    if not grid:
        raise ValueError("The grid is empty: give at least one key=v1,v2,... item.")
    return grid


def expand_grid(grid: Mapping[str, Sequence]) -> list[dict]:
    """The grid's cells (Cartesian product), the last key varying fastest."""
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def cell_name(cell: Mapping[str, Any]) -> str:
    """A folder name for a cell, e.g. ``strategy-ffa_lora_rank-2_seed-0``."""
    parts = []
    for k, v in cell.items():
        value = re.sub(r"[^A-Za-z0-9.+-]+", "-", str(v)).strip("-") or "empty"
        parts.append(f"{k}-{value}")
    return "_".join(parts)


@dataclass
class Cell:
    """One run of a sweep."""

    name: str
    values: dict
    out: Path
    settings: dict = field(default_factory=dict)

    @property
    def summary(self) -> Path:
        return self.out / SUMMARY

    @property
    def scenario_file(self) -> Path:
        return self.out / CELL_SCENARIO

    @property
    def done(self) -> bool:
        return self.summary.is_file()

    def command(self) -> list[str]:
        """The reproducing command (``fedeeg simulate --scenario CELL.toml --out CELL``)."""
        return ["fedeeg", "simulate", "--scenario", str(self.scenario_file), "--out", str(self.out)]


def plan_sweep(scenario: Scenario | None, grid: Mapping[str, Sequence], runs_dir: str | os.PathLike,
               overrides: Mapping[str, Any] | None = None) -> list[Cell]:
    """The cells of a sweep, each validated before anything runs.

    Parameters
    ----------
    scenario : Scenario | None
        The base scenario (None: RunConfig's defaults).
    grid : mapping
        From :func:`parse_grid`.
    runs_dir : path-like
        Cells go to ``runs_dir/CELL``.
    overrides : mapping | None
        Settings for every cell (they lose to the grid's values).

    Returns
    -------
    cells : list of Cell
        ``settings`` holds every cell's full flat settings.
    """
    runs_dir = Path(runs_dir)
    cells = []
    base = dict(scenario.settings) if scenario is not None else {}
    for values in expand_grid(grid):
        name = cell_name(values)
        out = runs_dir / name
        merged = {**base, **dict(overrides or {}), **values, "out": str(out)}
        try:
            resolve(Scenario(name=name, settings={}), merged)
        except (ValueError, TypeError) as err:
            raise ValueError(f"Sweep cell {name}: {err}") from err
        cells.append(Cell(name, dict(values), out, merged))
    return cells


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def write_cell_scenario(cell: Cell, scenario: Scenario | None = None) -> Path:
    """Write ``CELL/scenario.toml``: every setting of the cell under ``[run]``."""
    cell.out.mkdir(parents=True, exist_ok=True)
    base = scenario.name if scenario is not None else "defaults"
    lines = ["# Written by `fedeeg sweep`: one cell of a grid; reproduce with", f"#   {shlex.join(cell.command())}",
             "[scenario]", f"name = {_toml_value(cell.name)}",
             f"description = {_toml_value(f'{base} with ' + ', '.join(f'{k}={v}' for k, v in cell.values.items()))}",
             "", "[run]"]
    for key, value in cell.settings.items():
        if value is None or key == "out":
            continue
        lines.append(f"{key} = {_toml_value(value)}")
    tmp = cell.scenario_file.with_name(f".{CELL_SCENARIO}.tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, cell.scenario_file)
    return cell.scenario_file


def subprocess_runner(cell: Cell) -> int:
    """Run a cell as ``python -m fedeeg.cli simulate`` (isolates Ray and memory); its log goes to ``CELL/simulate.log``."""
    cmd = [sys.executable, "-m", "fedeeg.cli", *cell.command()[1:]]
    with open(cell.out / "simulate.log", "w", encoding="utf-8") as log:
        return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False).returncode


def inprocess_runner(cell: Cell) -> int:
    """Run a cell in this process (no subprocess start-up; Ray and memory are shared with the caller)."""
    from .cli import _run_simulate
    from .scenarios import load_scenario, require_applied

    cfg, pending = resolve(load_scenario(cell.scenario_file), {"out": str(cell.out)})
    require_applied(pending, f"Sweep cell {cell.name}")
    _run_simulate(cfg, False)
    return 0


@dataclass
class SweepReport:
    """What a sweep did: cell names by outcome."""

    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def run_sweep(cells: Sequence[Cell], *, scenario: Scenario | None = None,
              runner: Callable[[Cell], int] | str = "subprocess", on_cell: Callable[[Cell, str, float], None] | None = None,
              keep_going: bool = True, log_path: str | os.PathLike | None = None) -> SweepReport:
    """Run the cells that have no ``summary.json`` yet; skip the others.

    Parameters
    ----------
    cells : sequence of Cell
        From :func:`plan_sweep`.
    scenario : Scenario | None
        Named in each cell's ``scenario.toml`` description.
    runner : callable | {"subprocess", "inprocess"}
        Runs one cell and returns an exit status (0 = success).
    on_cell : callable | None
        Called as ``on_cell(cell, status, seconds)`` after every cell, status
        ``"ran"``, ``"skipped"`` or ``"failed"`` (progress display; it may
        raise to stop the sweep).
    keep_going : bool
        Continue after a failed cell (default) or stop at the first.
    log_path : path-like | None
        Append one JSON line per cell here (default ``RUNS_DIR/sweep.jsonl``
        beside the first cell).

    Returns
    -------
    report : SweepReport
    """
    if isinstance(runner, str):
        runner = {"subprocess": subprocess_runner, "inprocess": inprocess_runner}.get(runner) or _bad_runner(runner)
    report = SweepReport()
    log = Path(log_path) if log_path else (cells[0].out.parent / SWEEP_LOG if cells else None)
    durations: list[float] = []
    todo = sum(not c.done for c in cells)
    for k, cell in enumerate(cells, start=1):
        if cell.done:
            report.skipped.append(cell.name)
            logger.info("[%d/%d] %s: finished before, skipped", k, len(cells), cell.name)
            _log(log, cell, "skipped", 0.0, None)
            if on_cell:
                on_cell(cell, "skipped", 0.0)
            continue
        write_cell_scenario(cell, scenario)
        start = time.perf_counter()
        try:
            rc = runner(cell)
        except (ValueError, TypeError, RuntimeError, FileNotFoundError, OSError) as exc:
            logger.error("%s: %s", cell.name, exc)
            rc = 1
        seconds = time.perf_counter() - start
        status = "ran" if rc == 0 and cell.done else "failed"
        (report.ran if status == "ran" else report.failed).append(cell.name)
        durations.append(seconds)
        left = todo - len(durations)
        eta = left * sum(durations) / len(durations)
        logger.info("[%d/%d] %s: %s in %.0f s; %d to run, ETA %.0f min", k, len(cells), cell.name,
                    "done" if status == "ran" else f"FAILED (exit {rc}; see {cell.out / 'simulate.log'})", seconds,
                    left, eta / 60)
        _log(log, cell, status, seconds, rc)
        if on_cell:
            on_cell(cell, status, seconds)
        if status == "failed" and not keep_going:
            break
    return report


def _bad_runner(name: str):
    raise ValueError(f"Invalid value for the 'runner' parameter. Allowed values are 'subprocess', 'inprocess' or a "
                     f"callable, but got {name!r} instead.")


def _log(path: Path | None, cell: Cell, status: str, seconds: float, rc: int | None) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"cell": cell.name, "values": cell.values, "status": status, "seconds": round(seconds, 2),
                             "exit": rc, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")


__all__ = ["Cell", "SweepReport", "cell_name", "expand_grid", "inprocess_runner", "parse_grid", "plan_sweep",
           "run_sweep", "subprocess_runner", "write_cell_scenario"]
