"""What the demo prints: each event as the subscriber hears it, the summary table, the JSON summary."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from core.files import atomic_write_bytes
from core.protocol.schemas import EventPayload
from demo.scene import Step
from device.liveness.base import LIVENESS_OFF

STYLES = {"granted": "green", "unknown": "yellow", "spoof": "red", "denied": "red"}


def event_line(event: EventPayload) -> str:
    """One received event as a rich-markup line."""
    kind = event.decision.value
    who = f" {event.name}" if event.name else ""
    checks = ", ".join(f"{c.name} {c.score:.3f}" for c in event.liveness.checks if c.score is not None)
    liveness = f"{event.liveness.verdict.value}" + (f" ({checks})" if checks else "")
    return (f"[dim]{event.ts:%H:%M:%S}[/] event from [bold]{event.device}[/]: "
            f"[{STYLES.get(kind, 'white')}]{kind.upper()}[/]{who}  score {event.score:.3f}  "
            f"margin {event.margin:.3f}  liveness {liveness}  {latency_ms(event):.0f} ms")


def latency_ms(event: EventPayload) -> float:
    """Time the door spent on the deciding frame: detect, align, embed, liveness, search, decide."""
    return sum(event.latencies_ms.values())


@dataclass(slots=True)
class Summary:
    """The run's outcome, printable and JSON-serialisable."""

    image_set: str
    notes: list[str]
    broker: str
    steps: list[Step] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (scene, why)
    error: str = ""
    live: bool = False  # a real camera: no scripted scenes to judge
    liveness: str = ""  # what the door ran: "passive (MiniFASNet)" or "liveness off (why)"
    kiosk: dict[str, Any] | None = None  # the door screen: url, states_seen, screenshots
    started: float = field(default_factory=time.monotonic)

    @property
    def passed(self) -> bool:
        """Every scripted step passed and nothing failed outside them."""
        return not self.error and (self.live or bool(self.steps)) and all(s.passed for s in self.steps)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready summary (ids, decisions, scores; never images or embeddings)."""
        steps = []
        for s in self.steps:
            first = s.first
            steps.append({
                "name": s.name, "shown": s.shown, "expected": s.expected.value,
                "expected_person_id": s.expected_person_id,
                "observed": first.decision.value if first else None,
                "person_id": first.person_id if first else None, "person": first.name if first else None,
                "score": round(first.score, 4) if first else None,
                "latency_ms": round(latency_ms(first), 1) if first else None,
                "events": [h.event.decision.value for h in s.heard], "door_opened": s.door_opened,
                "passed": s.passed, "note": s.note, "error": s.error,
            })
        return {"passed": self.passed, "image_set": self.image_set, "notes": self.notes,
                "broker": self.broker, "steps": steps,
                "skipped": [{"name": n, "reason": r} for n, r in self.skipped], "error": self.error,
                "live": self.live, "liveness": self.liveness, "kiosk": self.kiosk,
                "duration_s": round(time.monotonic() - self.started, 1)}

    def write_json(self, path: Path) -> None:
        """Write the JSON summary atomically."""
        atomic_write_bytes(Path(path), json.dumps(self.as_dict(), indent=2).encode("utf-8"))

    def print(self, console: Console) -> None:
        """The summary table, the skipped scenes and the one-line verdict."""
        if self.steps:
            console.print(self._table())
        for s in self.steps:
            for text in filter(None, (s.note, s.error)):
                console.print(f"  {s.name}: {text}")
        for name, why in self.skipped:
            console.print(f"  [yellow]skipped[/] {name}: {why}")
        if self.liveness.startswith(LIVENESS_OFF):
            console.print(f"  [bold yellow]{escape(self.liveness)}[/]: this door ran with "
                          f"{escape('[liveness] required = false')} and opened for faces without any "
                          "liveness check")
        elif self.liveness:
            console.print(f"  liveness: {escape(self.liveness)}")
        if self.kiosk is not None:
            shots = self.kiosk["screenshots"]
            where = f"{len(shots)} screenshots in {Path(shots[0]).parent}" if shots else escape(
                self.kiosk.get("screenshots_skipped", "no screenshots"))
            states = ", ".join(self.kiosk["states_seen"]) or "nothing"
            console.print(f"  door screen {self.kiosk['url']}: showed {states}; {where}")
        if self.error:
            console.print(f"[red]demo failed:[/] {self.error}")
        verdict = "PASS" if self.passed else "FAIL"
        elapsed = time.monotonic() - self.started
        if self.live and not self.steps:
            console.print(f"demo: {verdict} (live camera, no scripted scenes; up after {elapsed:.0f} s)")
            return
        passed = sum(s.passed for s in self.steps)
        console.print(f"demo: {verdict} ({passed} of {len(self.steps)} steps passed, "
                      f"{len(self.skipped)} skipped, {elapsed:.0f} s)")

    def _table(self) -> Table:
        table = Table(title="facegate demo", title_style="bold")
        for column in ("scene", "expected", "observed", "person", "score", "latency", "door", "result"):
            table.add_column(column, justify="right" if column in ("score", "latency") else "left",
                             no_wrap=True)
        for s in self.steps:
            first = s.first
            result = "[green]PASS[/]" if s.passed else "[red]FAIL[/]"
            person = (first.name or "-") if first else "-"
            score = f"{first.score:.3f}" if first else "-"
            latency = f"{latency_ms(first):.0f} ms" if first else "-"
            table.add_row(s.name, s.expected.value, s.observed, person, score, latency,
                          "opened" if s.door_opened else "locked", result)
        return table
