"""A checkpoint saved under one end of the supported transformers range loads and generates the same tokens under the
other end. CI sets `ENERGY_GPT_OTHER_PYTHON` to the interpreter of its second environment (the oldest
declared transformers release, see `.ci/run`); without it these tests skip."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import transformers
from conftest import tiny_config

from energy_gpt import EnergyGPTForCausalLM

OTHER_PYTHON = os.environ.get("ENERGY_GPT_OTHER_PYTHON")
pytestmark = pytest.mark.skipif(not OTHER_PYTHON, reason="set ENERGY_GPT_OTHER_PYTHON to a second environment")

SOLVERS = ["gd", "nag+newton_light", "newton", "dense"]
PROMPT = [[5, 17, 42, 99, 3, 60], [8, 1, 77, 23, 50, 11]]

# Runs in the other environment, through remote code only (the package is not importable there for this check).
REMOTE = """
import json, sys, torch, transformers
from transformers import AutoModelForCausalLM
folder, mode = sys.argv[1], sys.argv[2]
prompt = torch.tensor(json.loads(sys.argv[3]))
if mode == "save":
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(sys.argv[4], trust_remote_code=True)
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=True).eval()
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if name.endswith(("momentum_beta", "newton_lambda", "dense_weights")):
                tensor.fill_(0.4)
    model.save_pretrained(folder)
else:
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
with torch.no_grad():
    tokens = model.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=100)
print(json.dumps({"tokens": tokens.tolist(), "version": transformers.__version__}))
"""


def run_other(*args: str, cwd: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(cwd / "hf-home-other"), "PYTHONPATH": ""}
    result = subprocess.run([OTHER_PYTHON, "-c", REMOTE, *args], capture_output=True, text=True, cwd=cwd, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def greedy(model, prompt) -> list:
    with torch.no_grad():
        return model.generate(torch.tensor(prompt), max_new_tokens=10, do_sample=False, pad_token_id=100).tolist()


@pytest.mark.parametrize("solver", SOLVERS)
def test_checkpoints_cross_the_supported_range_both_ways(solver, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    model = EnergyGPTForCausalLM(tiny_config(attention_solver=solver, initializer_range=0.5, momentum_beta=0.4,
                                             newton_lambda=0.4, dense_init=0.4)).eval()
    model.save_pretrained(tmp_path / "here")
    expected = greedy(model, PROMPT)
    assert len(set(sum((row[6:] for row in expected), []))) >= 4  # a continuation that exposes a broken cache

    there = run_other(str(tmp_path / "here"), "load", json.dumps(PROMPT), cwd=tmp_path)
    assert there["version"] != transformers.__version__
    assert there["tokens"] == expected, (there["version"], transformers.__version__)

    made_there = run_other(str(tmp_path / "there"), "save", json.dumps(PROMPT), str(tmp_path / "here"), cwd=tmp_path)
    reloaded = EnergyGPTForCausalLM.from_pretrained(tmp_path / "there").eval()
    assert greedy(reloaded, PROMPT) == made_there["tokens"]
