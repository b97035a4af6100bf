"""The benchmarks' own machinery where a mistake would skew a number (the timings themselves
need the GPU: bench/)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import product_env


def test_product_environment_holds_ryla_closure_and_nothing_else(tmp_path):
    """The cold start is timed in it: packages the machine has beyond ryla's dependencies
    (diffusers imports peft when present) must not be importable there, and ryla's must be."""
    summary = product_env.make(tmp_path / "env")
    # pytest is a dev dependency: installed here, outside what `pip install ryla[gpu]` brings
    assert "pytest" in summary["left_out"] and importlib.util.find_spec("pytest") is not None
    assert summary["without_file_list"] == []
    probe = ("import importlib.util, importlib.metadata as m; import torch, diffusers, transformers, fastapi, ryla; "
             "print(importlib.util.find_spec('pytest') is None, m.version('transformers'), ryla.__file__)")
    out = subprocess.run([summary["python"], "-c", probe], capture_output=True, text=True, timeout=240, check=False,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert out.returncode == 0, out.stderr[-2000:]
    hidden, transformers_version, ryla_file = out.stdout.split()
    import transformers

    assert hidden == "True"
    assert transformers_version == transformers.__version__
    assert ryla_file == str(ROOT / "src" / "ryla" / "__init__.py")


def test_closure_follows_markers_and_extras():
    """A requirement behind an extra is followed only when that extra is asked for."""
    closure = product_env.dependency_closure(["httpx==0.28.1"])
    assert {"httpx", "httpcore", "anyio", "idna", "certifi"} <= set(closure)
    assert "h2" not in closure  # httpx[http2] only
    assert "pytest" not in closure
    if importlib.util.find_spec("h2") is not None:
        assert "h2" in product_env.dependency_closure(["httpx[http2]==0.28.1"])


def test_startup_phases_from_a_real_server_log():
    """The latest run's first warm start, phase by phase, from the log the H200's server wrote (its
    timestamps are UTC, this machine's zone here; the bench reads them where they were written)."""
    import json
    import time

    import cold_start

    if time.localtime().tm_gmtoff != 0:
        pytest.skip("the committed log's timestamps are UTC")
    results = ROOT / "bench" / "results"
    warm = json.loads((results / "cold_start_exact.json").read_text())["cold_start"]["warm_cache"]
    phases = cold_start.startup_phases(results / "serve_exact_warm_cache.log", warm["launched_at"])
    marks = [phase for phase, _ in cold_start.PHASE_MARKS]
    assert list(phases) == [phase for phase in marks if phase in phases]  # in the server's order
    assert set(marks) == set(phases)
    assert phases["imports and opening the store"] == 7.91
    assert phases["importing the model code (reads alongside)"] == 7.12
    assert phases["compiling from the cache"] == 7.55
    assert cold_start.part_reads(results / "serve_exact_warm_cache.log")["model.diffusion_model"] == 2.69
    assert abs(sum(phases.values()) - warm["health_s"]) < 0.05
    profiled = cold_start.import_profile(results / "serve_exact_import_profile.log")
    assert profiled == json.loads((results / "cold_start_exact.json").read_text())["cold_start"]["import_profile"]["imports"]
    assert profiled["by_package_s"]["torch"] > 5 and profiled["modules"] > 4000


@pytest.mark.slow
def test_adapters_bench_runs_every_arm_over_http_on_the_tiny_set(tmp_path):
    """bench/adapters.py's CPU dry run: it writes its LoRAs and the identity files into a tiny
    store, starts `ryla serve`, and measures every arm the GPU run reports, identity included."""
    import json
    import subprocess
    import sys

    result = subprocess.run([sys.executable, str(ROOT / "bench" / "adapters.py"), "--tiny", "--environment", "machine",
                             "--speed", "eager", "--out", str(tmp_path), "--work", str(tmp_path)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    eager = json.loads((tmp_path / "adapters.json").read_text())["eager"]
    for arm in ("same", "cycling", "stacked", "identity"):
        assert len(eager[arm]["generation_s"]) == 2 and eager[arm]["generation_ratio"] > 0
        assert eager[arm]["generation_ratio_vs_first_base"] > 0
    # base measured again after the other arms; ratios are to the mean of both medians
    assert len(eager["base_after"]["generation_s"]) == 2
    mean = (eager["base"]["generation_median_s"] + eager["base_after"]["generation_median_s"]) / 2
    assert abs(eager["same"]["generation_ratio"] - eager["same"]["generation_median_s"] / mean) < 1e-9
    assert "InfuseNet" in result.stdout and "switching_cost_ratio" in eager
    assert "POST /flux-instantid -> 200" in (tmp_path / "adapters_serve_eager.log").read_text()


def test_lora_kernels_check_runs_in_tritons_interpreter(tmp_path):
    """bench/lora_kernels_check.py on small shapes in Triton's CPU interpreter: the checks it
    reports on the GPU come out true here too (one and two LoRAs on the e4m3 grid, within one
    grid step of the float64 sum, the same bits again; WeightPatcher's switches and restore, on
    e4m3-valued layers and on fast mode's fp8 rows)."""
    pytest.importorskip("triton")
    import json

    result = subprocess.run([sys.executable, str(ROOT / "bench" / "lora_kernels_check.py"), "--tiny", "--out",
                             str(tmp_path)], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "lora_kernels_check.json").read_text())
    for case in (report["one_lora"], report["two_stacked"], report["weight_patcher"]["one"],
                 report["weight_patcher"]["two"]):
        assert case["on_e4m3_grid"] and case["max_abs_steps"] < 1 and abs(case["mean_steps"]) < 0.01
    assert report["one_lora"]["same_bits_again"] and report["two_stacked"]["same_bits_again"]
    assert report["weight_patcher"]["same_bits_after_switching"] and report["weight_patcher"]["restored_exactly"]
    fp8_rows = report["fp8_rows"]  # fast mode's storage: a bf16 product moves few values by a rounding step
    assert fp8_rows["one"]["share_differing"] < 0.02 and fp8_rows["two"]["share_differing"] < 0.02
    assert fp8_rows["one"]["max_error_in_row_scales"] <= 16.5 and fp8_rows["two"]["max_error_in_row_scales"] <= 17
    assert fp8_rows["same_bits_after_switching"] and fp8_rows["restored_exactly"]
    assert report["fp8_linear_8_rows_with_bias"]["relative_error"] < 0.05


@pytest.mark.slow
def test_aot_blocks_bench_loads_packaged_blocks_without_the_compile_stack(tmp_path):
    """bench/aot_blocks.py's CPU dry run: exact mode's two block types exported and packaged by
    AOTInductor, opened in a fresh process that imports no part of torch.compile's stack, equal
    to the eager blocks, and computing with weights patched in place after the hand-over."""
    import json
    import subprocess
    import sys

    result = subprocess.run([sys.executable, str(ROOT / "bench" / "aot_blocks.py"), "--tiny", "--out", str(tmp_path),
                             "--work", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    fresh = json.loads((tmp_path / "aot_blocks.json").read_text())["fresh_process"]
    assert not any(fresh["compile_stack_imported_by_opening"].values())
    assert set(fresh["block_types"]) == {"FluxTransformerBlock", "FluxSingleTransformerBlock"}
    for block in fresh["block_types"].values():
        assert block["max_abs_difference"] < 1e-5 and block["after_in_place_patch"] < 1e-5
        assert block["patch_changed_output_by"] > 1e-3


def test_startup_gc_bench_starts_both_kinds_of_server(tmp_path):
    """bench/startup_gc.py, one start of each kind: the held-back start runs far fewer
    collections before /health and has frozen its objects; the other has frozen none."""
    import json
    import subprocess
    import sys

    result = subprocess.run([sys.executable, str(ROOT / "bench" / "startup_gc.py"), "--runs", "1", "--out",
                             str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    summary = json.loads((tmp_path / "startup_gc.json").read_text())
    as_is, held_back = summary["collector_as_is"], summary["held_back"]
    assert held_back["frozen_objects"] > 100_000 and as_is["frozen_objects"] == 0
    assert held_back["gen0_collections_at_health"] * 5 < as_is["gen0_collections_at_health"]
