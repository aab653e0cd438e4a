"""The JSON summary that the overhead benchmarks write with `--out`."""

import json
from pathlib import Path
from typing import Any


def write_summary(
    path: str,
    benchmark: str,
    load_average: tuple[float, float],
    results: list[dict[str, Any]],
    **settings: Any,
) -> None:
    """Write the results, the settings and the 1-minute load averages before and after the run to `path` as JSON."""
    summary = {
        'benchmark': benchmark,
        **settings,
        'load_average': {'before': load_average[0], 'after': load_average[1]},
        'results': results,
    }
    Path(path).write_text(json.dumps(summary, indent=2))
