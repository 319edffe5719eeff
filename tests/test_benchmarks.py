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
    timings = results["shapes"][0]["timings"]
    for metric in ("train", "forward", "generate"):
        assert set(timings[metric]) == set(bench.MODEL_NAMES), metric
        for name, entry in timings[metric].items():
            assert len(entry["seconds"]) == 2 and all(s > 0 for s in entry["seconds"])
            assert entry["tokens_per_s"]["low"] <= entry["tokens_per_s"]["median"] <= entry["tokens_per_s"]["high"]
        assert timings[metric]["gpt2"]["ratio"]["median"] == 1.0
    assert sorted(map(int, results["scaling"]["forward"])) == [16, 32]
    # One memory probe per model and shape / sequence length, all non-negative.
    assert len(results["memory"]) == len(bench.MODEL_NAMES) * 3
    assert all(m["train_mib"] >= 0 and m["forward_mib"] >= 0 for m in results["memory"])

    # The report can be re-rendered from the JSON without measuring again.
    (output_dir / "results.md").unlink()
    assert bench.main(["--from_json", str(output_dir / "results.json"), "--output_dir", str(output_dir)]) == 0
    report = (output_dir / "results.md").read_text()
    assert "python -m benchmarks.run --quick" in report
    assert "## Targets" in report and "## Scaling" in report
    for name in bench.SOLVERS:
        assert f"| {name} |" in report


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--repeats", "0"], "--repeats must be >= 1"),
        (["--seq_lens", "1"], "--seq_lens must all be >= 2"),
        (["--models", "gd", "newton"], "must include the baseline"),
        (["--shape", "huge"], "invalid choice"),
    ],
)
def test_bad_arguments_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert message in capsys.readouterr().err
