"""The benchmark's result table: each figure beside its baseline, the ratio, and the target."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class Row:
    section: str
    what: str
    value: str
    baseline: str = ""
    ratio: float | None = None
    target: str = ""
    # PASS, MISS, ERROR or empty when the row has no target.
    verdict: str = ""
    note: str = ""

    def ratio_text(self) -> str:
        if self.ratio is None or math.isnan(self.ratio):
            return ""
        return f"{self.ratio:.2f}x"


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    machine: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        print(
            f"  {row.what}: {row.value}"
            + (f"  (baseline {row.baseline}, {row.ratio_text()})" if row.baseline else "")
            + (f"  target {row.target}: {row.verdict}" if row.target else "")
            + (f"  [{row.note}]" if row.note else ""),
            flush=True,
        )
        return row

    def check(self, row: Row, passed: bool) -> Row:
        row.verdict = "PASS" if passed else "MISS"
        return self.add(row)

    def text_table(self) -> str:
        headers = ("section", "measurement", "value", "baseline", "ratio", "target", "result")
        body = [
            (r.section, r.what, r.value, r.baseline, r.ratio_text(), r.target, r.verdict)
            for r in self.rows
        ]
        widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(headers)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths, strict=True)) for b in body]
        return "\n".join(line.rstrip() for line in lines)

    def markdown_table(self) -> str:
        lines = [
            "| Section | Measurement | Value | Baseline | Ratio | Target | Result |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            what = r.what + (f" ({r.note})" if r.note else "")
            verdict = f"**{r.verdict}**" if r.verdict else ""
            cells = (r.section, what, r.value, r.baseline, r.ratio_text(), r.target, verdict)
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        return "\n".join(lines)

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "results.md").write_text(self.markdown_table() + "\n")
        (directory / "results.json").write_text(
            json.dumps(
                {
                    "machine": self.machine,
                    "rows": [asdict(r) for r in self.rows],
                    "errors": self.errors,
                },
                indent=2,
            )
            + "\n"
        )
