"""Bad arguments of `energy-gpt compare` and `energy-gpt pretrain` stop at once: exit status 2 and one line on stderr
that names the argument and what it allows, no traceback. Checked in a fresh process, on the process's real stderr
(file descriptor 2, so log handlers and warnings would show too)."""

import json
import subprocess
import sys


# Every case in one process (importing torch and transformers once): file descriptor 2 goes to a file per case.
CASES_SCRIPT = r"""
import json, os, sys, tempfile
from energy_gpt.cli import main

results = []
for argv in json.loads(sys.argv[1]):
    with tempfile.TemporaryFile(mode="w+") as captured:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        try:
            code = main(argv)
        except SystemExit as stop:
            code = stop.code
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        captured.seek(0)
        results.append({"argv": argv, "code": code, "stderr": captured.read()})
print(json.dumps(results))
"""


def run_cases(cases: list[list[str]], cwd) -> list[dict]:
    result = subprocess.run([sys.executable, "-c", CASES_SCRIPT, json.dumps(cases)], capture_output=True, text=True,
                            timeout=300, cwd=cwd, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_bad_arguments_stop_with_one_line_and_status_2(tmp_path):
    output = str(tmp_path / "out")
    text_file = tmp_path / "train.txt"
    text_file.write_text("some text\n")
    compare = ["compare", "--output_dir", output]
    pretrain = ["pretrain", "--output_dir", output, "--do_train", "--tokenizer_name", str(tmp_path)]
    expected = [
        ([*compare, "--max_steps", "-5"], ["--max_steps", "positive integer", "-5"]),
        ([*compare, "--max_steps", "0"], ["--max_steps", "positive integer"]),
        ([*compare, "--train_file", str(tmp_path / "missing.txt")], ["--train_file", "no such file", ".txt", ".jsonl"]),
        ([*compare, "--solvers", "gd,adam"], ["--solvers entry 'adam'", "must be one of", "'gd'", "'nag'"]),
        ([*compare, "--max_steps", "abc"], ["--max_steps", "invalid int value: 'abc'"]),
        ([*compare, "--lr_scheduler_type", "bogus"], ["--lr_scheduler_type", "invalid choice: 'bogus'", "'cosine'"]),
        ([*compare, "--num_seeds", "0"], ["--num_seeds", "positive integer"]),
        ([*compare, "--task", "sudoku"], ["--task", "'sudoku'", "'lis'", "'mqar'", "'induction'"]),
        ([*pretrain, "--train_file", str(tmp_path / "missing.txt")], ["--train_file", "no such file", ".txt"]),
        ([*pretrain, "--train_file", str(text_file), "--max_steps", "-5"],
         ["--max_steps", "positive integer, or -1"]),
        (["pretrain", "--output_dir", output], ["Nothing to do", "--do_train", "--do_eval"]),
    ]
    for result, (argv, fragments) in zip(run_cases([argv for argv, _ in expected], tmp_path), expected):
        lines = result["stderr"].splitlines()
        assert result["code"] == 2, result
        assert len(lines) == 1 and "Traceback" not in result["stderr"], result
        assert lines[0].startswith(f"energy-gpt {argv[0]}: error: "), result
        for fragment in fragments:
            assert fragment in lines[0], (fragment, result)
    assert not (tmp_path / "out").exists()  # nothing was written
