"""bench/run.py smoke test: the suite's command prints one valid JSON object with the documented keys.

Never asserts timings (the machine may be busy); only the shape of the output and the table rendering.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.mark.slow
def test_run_quick_quantize_times_a_fresh_table_against_the_reference(tmp_path):
    """The quantize case's ratio is ours from an empty lookup table (never a second pass over the images that
    filled it), with the warm-on-unseen-images figure beside it; ids agree with the reference's."""
    r = _run("--quick", "--only", "quantize")
    assert r.returncode == 0, r.stderr
    case = json.loads(r.stdout)["quantize"]
    assert case["ratio"] > 0 and case["ratio_warm_unseen"] > 0 and case["ids_agree_with_reference"] > 0.999
    assert case["reference_images"] == case["images"] == 200  # the same images on both sides (same work)
    ratio = case["ours"]["images_s"] / case["reference"]["images_s"]  # both rounded for display; ratio is not
    assert case["ratio"] == pytest.approx(ratio, rel=0.01) and case["ratio"] != round(case["ratio"], 1)
    assert case["ours"]["images_s"] > 0 and case["ours"]["warm_unseen_images_s"] > 0
    assert "fresh" in case["ours"]["what"]
    saved = tmp_path / "bench.json"
    saved.write_text(r.stdout)
    md = _run("--markdown", str(saved))
    assert md.returncode == 0, md.stderr
    assert "fresh table" in md.stdout and "quantize: speed >= 50x" in md.stdout


def test_run_rejects_an_unknown_case():
    r = _run("--only", "nope")
    assert r.returncode != 0 and "unknown case" in r.stderr
    for empty in ("", ","):  # "" ran the whole suite, "," nothing
        r = _run("--only", empty)
        assert r.returncode != 0 and "--only: no case named" in r.stderr


def test_targets_are_judged_on_unrounded_values():
    """The cases stored ratios rounded (3 decimals, quantize 1): memory 0.33339 became 0.333 <= 1/3, speed 3.4996
    became 3.5, quantize 49.96 became 50.0, all "met". They are stored unrounded now; the table compares those."""
    sys.path.insert(0, str(BENCH))
    from README_table import targets

    res = {"train_s32": {"ratio": 3.4996, "mfu": 0.7995, "memory_ratio": 1548 / 4643.2},
           "quantize": {"ratio": 49.96}, "palette_fit": {"ratio": 0.9959, "inertia_ratio": 1.00003}}
    assert [met for *_, met in targets(res)] == [False] * 6
    src = (BENCH / "bench_model.py").read_text() + (BENCH / "bench_palette.py").read_text()
    assert '"ratio": round(' not in src and '"memory_ratio"] = round(' not in src and '"mfu"] = round(' not in src


def test_run_quick_probe_fit_has_the_single_fit_and_the_batched_sweep():
    r = _run("--quick", "--only", "probe_fit")
    assert r.returncode == 0, r.stderr
    case = json.loads(r.stdout)["probe_fit"]
    assert case["ratio"] > 0 and case["ours"]["seconds"] > 0 and case["reference"]["seconds"] > 0
    sweep = case["sweep"]
    assert len(sweep["Cs"]) == len(sweep["ours"]["test_accuracy"]) == len(sweep["reference"]["test_accuracy"]) == 5
    assert sweep["ratio"] > 0 and all(i > 0 for i in sweep["ours"]["iterations"])
    # the same problems: held-out accuracies agree per C
    assert max(abs(a - b) for a, b in zip(sweep["ours"]["test_accuracy"], sweep["reference"]["test_accuracy"])) < 0.01


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


@pytest.mark.parametrize("bf16_gflops, want", [(56.5, "n/a"), (2442.0, False)])
def test_the_bf16_target_applies_only_where_bf16_is_faster(bf16_gflops, want):
    """An MFU over an emulated bf16 peak (a CPU without avx512_bf16 / AMX: bf16 matmuls slower than fp32) says
    nothing: the target table marks it n/a instead of met; where bf16 is faster it is judged as usual."""
    sys.path.insert(0, str(BENCH))
    try:
        import README_table
    finally:
        sys.path.remove(str(BENCH))
    case = {"ours": {"tok_s": 900.0}, "reference": {"tok_s": 300.0}, "ratio": 3.0, "mfu": 0.3, "mfu_reference": 0.1}
    res = {"matmul_peak": {"threads": 2, "fp32": {"gflops": 221.0}, "bf16": {"gflops": bf16_gflops}},
           "train_s32_bf16": case, "train_s32": case}
    met = {(case, label.split(" ")[0]): m for case, label, _, m in README_table.targets(res)}
    assert met[("train_s32_bf16", "MFU")] == want
    assert met[("train_s32", "MFU")] is False  # the fp32 targets are judged either way
    table = README_table.markdown(res)
    assert ("n/a: bf16 is slower than fp32" in table) == (want == "n/a")


@pytest.mark.slow
def test_quality_script_records_recipe_baselines_and_targets(tmp_path):
    """bench/quality.py on 600 + 200 bundled images at 8x8 (a 3-step tiny model): stdout is one JSON object
    holding the recipe, the per-layer curve, both raw-pixel baselines, the low-data rows and each target."""
    import numpy as np

    from igpt.datasets import open_source

    x, y = next(open_source("fashion-mnist-mini").splits["train"].chunks(800))
    npz = tmp_path / "small.npz"
    np.savez(npz, x_train=x[:600, ..., 0], y_train=y[:600], x_test=x[600:800, ..., 0], y_test=y[600:800])
    r = subprocess.run([sys.executable, str(BENCH / "quality.py"), "--data", str(npz), "--out", str(tmp_path / "q"),
                        "--steps", "3", "--preset", "tiny", "--n-px", "8", "--palette-size", "8",
                        "--labels-per-class", "4", "--seeds", "2"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res == json.loads((tmp_path / "q" / "quality.json").read_text())
    assert res["recipe"]["steps"] == 3 and res["recipe"]["counts"] == {"train": 540, "val": 60, "test": 200}
    assert [row["layer"] for row in res["per_layer"]] == [0, 1, 2] and res["best_layer"] in (0, 1, 2)
    assert res["native_px"] == 28 and 0.2 < res["baseline_native_test_accuracy"] <= 1.0  # 10 classes
    assert "before quantization" in res["baseline_input"] and 0.2 < res["baseline_test_accuracy"] <= 1.0
    low = res["low_data"][0]
    assert low["labels_per_class"] == 4 and len(low["accuracies"]) == len(low["baseline_native_accuracies"]) == 2
    for t in res["targets"]:
        assert t["met"] == (t["measured"] is not None and t["measured"] >= t["target"])
    assert res["targets"][1]["measured"] is None  # no 10-per-class row was asked for
    bad = subprocess.run([sys.executable, str(BENCH / "quality.py"), "--data", str(tmp_path / "missing.npz"),
                          "--out", str(tmp_path / "bad")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1].startswith("error: ")


@pytest.mark.slow
def test_attention_bench_prints_every_case_and_implementation():
    r = subprocess.run([sys.executable, str(BENCH / "bench_attention.py"), "--quick", "--threads", "1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert {"t144_bf16", "t256_bf16", "t256_fp32", "t1024_bf16"} <= set(res)
    for case in ("t144_bf16", "t256_bf16", "t256_fp32", "t1024_bf16"):
        ms = res[case]["fwd_bwd_ms"]
        assert set(ms) == {"igpt", "flash", "matmul_masked_fill"} and all(v > 0 for v in ms.values())
        assert res[case]["igpt_over_flash"] == pytest.approx(ms["flash"] / ms["igpt"])


@pytest.mark.slow
def test_gpu_suite_runs_end_to_end(tmp_path):
    """bench/gpu.py's smoke mode (CPU, tiny model): every part reports both sides; the numbers on a GPU come
    from the same code."""
    out = tmp_path / "gpu.json"
    r = subprocess.run([sys.executable, str(BENCH / "gpu.py"), "--device", "cpu", "--preset", "tiny", "--quick",
                        "--steps", "2", "--repeats", "1", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res == json.loads(out.read_text())
    assert res["matmul_peak"]["bf16_tflops"] > 0 and res["matmul_peak"]["tf32_tflops"] > 0
    impls = {(row["impl"], row["batch"], row["dtype"]) for row in res["train"] if row.get("tokens_per_s", 0) > 0}
    assert {("igpt", 2, "bf16"), ("transformers", 2, "bf16"), ("igpt", 2, "fp32_tf32"), ("igpt", 4, "bf16")} <= impls
    assert res["train_ratio_bf16"]["ratio"] > 0 and 0 < res["best_mfu"]["mfu"]
    (s,) = res["sample"]
    assert s["sampled_tokens"] == s["known_tokens"] == 32 and s["ratio"] > 0
    assert s["igpt"]["images_s"] > 0 and s["transformers"]["images_s"] > 0
    assert "CUDA device" in s["cuda_graph_error"]  # the CUDA-graph row is recorded as failed, the rest kept


@pytest.mark.slow
def test_run_compile_runs_ours_compiled_and_the_reference_as_is():
    r = _run("--quick", "--only", "train_t16", "--compile")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    case = res["train_t16"]
    assert res["compile"] is True and case["ours_compiled"] is True
    assert case["ours"]["tok_s"] > 0 and case["reference"]["tok_s"] > 0 and case["ratio"] > 0
