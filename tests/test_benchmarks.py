"""The benchmark command runs end to end on a tiny shape and writes its report (timings are not asserted)."""

import json
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # `benchmarks/` is a folder of the repository, not part of the installed package

from benchmarks import run as bench


def test_quick_benchmark_writes_report(tmp_path, capsys):
    output_dir = tmp_path / "bench"
    # In-process (the memory probe still runs in its own process): `python -m benchmarks.run` calls this `main`.
    assert bench.main(["--quick", "--output_dir", str(output_dir)]) == 0
    assert "gd vs GPT-2 max |logit difference| = 0" in capsys.readouterr().out  # same weights, same logits

    for name in ("results.md", "results.json", "scaling.png", "ratios.png"):
        assert (output_dir / name).stat().st_size > 0, name
    assert (output_dir / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    results = json.loads((output_dir / "results.json").read_text())
    assert results["settings"] == {"device": "cpu", "dtype": "float32", "compile": False, "sdpa_backend": None,
                                   "newton_path": "auto"}
    # Every solver at its GPT-2-preserving settings generated GPT-2's greedy tokens (compared token by token).
    check = results["shapes"][0]["generation_check"]
    assert set(check) == set(bench.SOLVERS) and all(c["equal"] and c["matching_steps"] == c["steps"] == 4
                                                    for c in check.values())
    timings = results["shapes"][0]["timings"]
    for metric in ("train", "forward", "generate"):
        assert set(timings[metric]) == {bench.BASELINE, *bench.SOLVERS}, metric  # the default models
        for name, entry in timings[metric].items():
            assert len(entry["seconds"]) == 2 and all(s > 0 for s in entry["seconds"])
            assert entry["tokens_per_s"]["low"] <= entry["tokens_per_s"]["median"] <= entry["tokens_per_s"]["high"]
        assert timings[metric]["gpt2"]["ratio"]["median"] == 1.0
    assert sorted(map(int, results["scaling"]["forward"])) == [16, 32]
    # One memory probe per model and shape / sequence length, all non-negative.
    assert len(results["memory"]) == (1 + len(bench.SOLVERS)) * 3
    assert all(m["train_mib"] >= 0 and m["forward_mib"] >= 0 for m in results["memory"])

    # The report can be re-rendered from the JSON without measuring again.
    (output_dir / "results.md").unlink()
    assert bench.main(["--from_json", str(output_dir / "results.json"), "--output_dir", str(output_dir)]) == 0
    report = (output_dir / "results.md").read_text()
    assert "python -m benchmarks.run --quick" in report
    assert "## Targets" in report and "## Scaling" in report
    for name in bench.SOLVERS:
        assert f"| {name} |" in report
    assert "Generation check" in report and "device cpu, dtype float32" in report

    # The GPU report renders from the same kind of results (no GPU needed to render; nothing is measured here).
    from benchmarks import gpu

    data = {"command": "test", "machine": results["machine"], "stages": {"models_T1024": results}}
    gpu_report = gpu.render(data, elapsed=1.0)
    assert "## Targets (bf16, GPT-2 small width" in gpu_report
    for name in bench.TARGETS:
        assert f"| {name} | 32 |" in gpu_report  # one targets row per solver at the run's T


def test_half_precision_with_a_forced_sdpa_backend(tmp_path, capsys):
    """bf16 parameters and SDPA's math backend forced around every call, GPT-2 preserved in generation."""
    output_dir = tmp_path / "bench"
    argv = ["--quick", "--device", "cpu", "--dtype", "bfloat16", "--sdpa_backend", "math", "--models", "gpt2", "gd",
            "newton", "--seq_lens", "16", "--repeats", "1", "--scaling_repeats", "1", "--no_memory",
            "--output_dir", str(output_dir)]
    assert bench.main(argv) == 0
    results = json.loads((output_dir / "results.json").read_text())
    assert results["settings"]["dtype"] == "bfloat16" and results["settings"]["sdpa_backend"] == "math"
    shape = results["shapes"][0]
    assert set(shape["timings"]["train"]) == {"gpt2", "gd", "newton"} and not shape["errors"]
    assert shape["generation_check"]["gd"]["equal"]
    assert "(CPU, bfloat16)" in (output_dir / "results.md").read_text()


def test_pytorch_newton_path_hides_the_fused_kernels():
    """`--newton_path pytorch` makes every `fused_kernels_available` in energy_gpt.modeling answer False, and restores
    them afterwards."""
    import torch
    from energy_gpt.modeling import newton_kernels_energy_gpt as kernels

    original = kernels.fused_kernels_available
    with bench.Settings(newton_path="pytorch").attention():
        assert kernels.fused_kernels_available is not original
        assert kernels.fused_kernels_available(torch.zeros(1)) is False
    assert kernels.fused_kernels_available is original


def test_device_timer_counts_queued_work(monkeypatch):
    calls = []
    monkeypatch.setattr(bench, "synchronize", lambda device: calls.append(device.type))
    assert bench.timed(lambda: calls.append("work"), bench.torch.device("cuda")) >= 0
    assert calls == ["cuda", "work", "cuda"]  # synchronised before and after the timed call


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--repeats", "0"], "--repeats must be >= 1"),
        (["--seq_lens", "1"], "--seq_lens must all be >= 2"),
        (["--models", "gd", "newton"], "must include the baseline"),
        (["--shape", "huge"], "invalid choice"),
        (["--dtype", "float64"], "invalid choice"),
        (["--device", "cpu", "--sdpa_backend", "flash"], "exists on CUDA only"),
        (["--seq_len", "0"], "--seq_len must be >= 1"),
        (["--newton_path", "triton"], "invalid choice"),
    ],
)
def test_bad_arguments_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert message in capsys.readouterr().err


def test_cuda_is_refused_without_a_gpu(capsys):
    if bench.torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "cuda"])
    assert "torch sees no CUDA device" in capsys.readouterr().err
    assert bench.parse_args([]).device == "cpu"  # the default follows the machine


def test_gpu_script_fails_fast_without_cuda():
    if bench.torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the script would measure")
    import subprocess

    completed = subprocess.run(["bash", str(REPO_ROOT / "benchmarks" / "gpu.sh")], capture_output=True, text=True,
                               timeout=120, check=False)
    assert completed.returncode == 2 and "no CUDA device" in completed.stderr
    completed = subprocess.run([sys.executable, "-m", "benchmarks.gpu"], capture_output=True, text=True,
                               cwd=REPO_ROOT, timeout=120, check=False)
    assert completed.returncode != 0 and "no CUDA device" in completed.stderr
    assert not (REPO_ROOT / "benchmarks" / "results-gpu.md").exists()  # never a GPU table that was not measured
