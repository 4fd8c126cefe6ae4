"""Where a benchmark's figures go: a JSON file under benchmarks/results/ (BENCHMARKS.md quotes it)."""
from __future__ import annotations

import json
from pathlib import Path


def save(result: dict, out: Path, shown: dict | None = None) -> dict:
    """Write ``result`` to ``out`` and print ``shown`` (default: all of it); returns ``result``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result if shown is None else shown, indent=1))
    return result
