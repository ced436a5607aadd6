"""bench/run.py smoke test: the suite's command prints one valid JSON object with the documented keys.

Never asserts timings (the machine may be busy); only the shape of the output and the table rendering.
"""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / "run.py"), *args], capture_output=True, text=True,
                          timeout=300)


def test_run_quick_matmul_peak_prints_json_with_the_case(tmp_path):
    r = _run("--quick", "--only", "matmul_peak")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert {"machine", "matmul_peak", "seconds"} <= set(res)
    peak = res["matmul_peak"]
    for dtype in ("fp32", "bf16"):
        assert peak[dtype]["gflops"] > 0 and peak[dtype]["by_size"]
    assert "others_cores" in peak
    saved = tmp_path / "bench.json"
    saved.write_text(r.stdout)
    md = _run("--markdown", str(saved))
    assert md.returncode == 0, md.stderr
    assert "Matmul peak" in md.stdout


def test_run_rejects_an_unknown_case():
    r = _run("--only", "nope")
    assert r.returncode != 0 and "unknown case" in r.stderr


def test_every_case_is_documented_and_rendered():
    sys.path.insert(0, str(BENCH))
    try:
        import README_table
        import run
    finally:
        sys.path.remove(str(BENCH))
    assert set(run.CASES) == {"train_s32", "train_t16", "train_s32_bf16", "sample_t16_b8", "sample_t16_b64",
                              "sample_s32_b8", "quantize", "palette_fit", "probe_fit", "matmul_peak"}
    assert set(README_table.ROWS) | {"matmul_peak"} == set(run.CASES)
    for case in run.CASES:
        assert case in run.__doc__
