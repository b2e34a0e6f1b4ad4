"""Writing a benchmark's Markdown table and JSON figures side by side in ``benchmarks/results``."""

from __future__ import annotations

import json
from pathlib import Path


def write_table(out: Path, name: str, lines: list[str], data) -> None:
    """``out/NAME.md`` (the lines) and ``out/NAME.json`` (the figures behind them); prints the table."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    (out / f"{name}.json").write_text(json.dumps(data, indent=1))
    print("\n".join(lines))
