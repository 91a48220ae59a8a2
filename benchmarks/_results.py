"""Where and how the benchmarks record their results: benchmarks/results/<benchmark>.json."""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def write_result(result: dict, out: str | Path | None = None) -> Path:
    path = Path(out) if out else RESULTS / f"{result['benchmark']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return path
