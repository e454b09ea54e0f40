"""Shared bits of the benchmark scripts: result writing and machine facts."""
from __future__ import annotations

import json
import os
import platform
import resource
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

RESULTS = Path(__file__).parent / "results"


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M"),
            "load_avg_1m": os.getloadavg()[0]}


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def markdown(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def command(script: str, argv: Sequence[str] | None = None) -> str:
    """The command line that made a result, for its Markdown and JSON: ``python3 benchmarks/<script> <args>``."""
    args = list(sys.argv[1:] if argv is None else argv)
    return shlex.join(["python3", f"benchmarks/{script}", *args])  # quoted: copy-paste reruns it


def write(name: str, data: dict[str, Any], table: str, command: str) -> None:
    """``results/<name>.json`` and ``results/<name>.md`` (the table plus the command that made it)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    data = {**data, "command": command, "machine": machine()}
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(f"{table}\n\nMade with `{command}` on {data['machine']['cpus']} CPUs "
                                        f"(load average {data['machine']['load_avg_1m']:.1f}), {data['machine']['date']}.\n")
    print(table)
