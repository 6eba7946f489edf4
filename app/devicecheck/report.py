"""The devicecheck report: pass/fail checks with their evidence, measurements, and a short table."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

REPORT_FORMAT = "sameseed.devicecheck/1"
Outcome = Literal["pass", "fail", "skipped", "error"]


@dataclass
class Check:
    """One promise checked: its outcome and the evidence a reader can judge it by."""

    name: str
    outcome: Outcome
    detail: str
    evidence: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class Measure:
    """One figure measured, with the goal it is judged against when it has one."""

    name: str
    value: float | None
    unit: str
    goal: str | None = None
    met: bool | None = None
    detail: str = ""


@dataclass
class Report:
    """Everything one devicecheck run found, written as JSON after every phase (a kill keeps the rest)."""

    params: dict[str, Any]
    device: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    measures: list[Measure] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    finished: float | None = None
    budget_exhausted: bool = False

    def add_check(self, check: Check) -> Check:
        """Record a check (replacing one of the same name)."""
        self.checks = [c for c in self.checks if c.name != check.name] + [check]
        return check

    def add_measure(self, measure: Measure) -> Measure:
        """Record a measurement (replacing one of the same name)."""
        self.measures = [m for m in self.measures if m.name != measure.name] + [measure]
        return measure

    @property
    def passed(self) -> bool:
        """True when no check failed or errored (skipped ones are listed, not failed)."""
        return all(c.outcome in ("pass", "skipped") for c in self.checks) and bool(self.checks)

    def as_dict(self) -> dict[str, Any]:
        """The JSON document."""
        return {
            "format": REPORT_FORMAT,
            "passed": self.passed,
            "lines": self.lines(),
            **{k: v for k, v in asdict(self).items()},
        }

    def write(self, path: Path) -> None:
        """Write the JSON report atomically (temporary file, then rename)."""
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.as_dict(), indent=2, sort_keys=True, default=str) + "\n")
        os.replace(tmp, path)

    def lines(self) -> list[str]:
        """One line per check: `PASS name: detail` (FAIL, SKIP, ERROR alike)."""
        labels = {"pass": "PASS", "fail": "FAIL", "skipped": "SKIP", "error": "ERROR"}
        return [f"{labels[c.outcome]:5} {c.name}: {c.detail}" for c in self.checks]

    def table(self) -> str:
        """The short stdout summary: checks, then measurements against their goals."""
        out = [f"devicecheck on {self.device.get('name', '?')} ({self.device.get('kind', '?')}), "
               f"model {self.model.get('variant', '?')} {self.model.get('dtype', '')}"]
        out += self.lines()
        if self.measures:
            width = max(len(m.name) for m in self.measures)
            for m in self.measures:
                value = "n/a" if m.value is None else f"{m.value:.4g} {m.unit}"
                goal = "" if m.goal is None else f"  goal {m.goal}: {'met' if m.met else 'MISSED'}"
                out.append(f"  {m.name:<{width}}  {value:>16}{goal}")
        out.append(f"overall: {'PASS' if self.passed else 'FAIL'}"
                   + ("  (budget ran out: some parts skipped)" if self.budget_exhausted else ""))
        return "\n".join(out)
