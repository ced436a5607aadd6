"""Run every bench/bench_*.py in its own process and print one JSON object keyed by benchmark.

Usage: python bench/run_all.py [--quick]   (extra flags are passed to each benchmark)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def main() -> None:
    results = {}
    for script in sorted(Path(__file__).parent.glob("bench_*.py")):
        r = subprocess.run([sys.executable, str(script), *sys.argv[1:]], capture_output=True, text=True)
        if r.returncode != 0:
            results[script.stem] = {"error": r.stderr.strip().splitlines()[-1:] or ["failed"]}
            continue
        results[script.stem] = json.loads(r.stdout)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
