"""DeepSpeed ZeRO-3 on CPU (DS_ACCELERATOR=cpu, gloo, one process): `from_pretrained` and `from_config` under
`HfDeepSpeedConfig` (parameters partitioned as they are built, `deepspeed.zero.Init`) give every solver scalar and
energy gate its value (the checkpoint's, or the configured initial value), and training steps run. deepspeed is in the
test extra; the test skips where it is not installed."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT, tiny_config

from energy_gpt import EnergyGPTForCausalLM

pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")

DEEPSPEED_CHECK = r"""
import json, os, sys
import torch
import deepspeed
from transformers import AutoConfig
from transformers.integrations import HfDeepSpeedConfig
from energy_gpt import EnergyGPTForCausalLM

deepspeed.init_distributed(dist_backend="gloo")
ds_config = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
             "zero_allow_untested_optimizer": True}
keep_alive = HfDeepSpeedConfig(ds_config)  # from here on, transformers builds models under deepspeed.zero.Init

def solver_values(model):
    names = ("momentum_beta", "newton_lambda", "gate_weight", "gate_bias", "gate_logit")
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        return {key: value.detach().flatten().tolist() for key, value in model.named_parameters()
                if key.rsplit(".", 1)[-1] in names}

report, trained = {}, None
for folder in sys.argv[1:]:
    loaded = EnergyGPTForCausalLM.from_pretrained(folder)
    built = EnergyGPTForCausalLM._from_config(AutoConfig.from_pretrained(folder))
    report[folder] = {"partitioned": all(hasattr(p, "ds_id") for p in loaded.parameters()),
                      "from_pretrained": solver_values(loaded), "from_config": solver_values(built)}
    trained = trained or loaded  # the first folder's model (a solver with scalars and per-head parameters)
engine, *_ = deepspeed.initialize(model=trained, config=ds_config,
                                  optimizer=torch.optim.SGD(trained.parameters(), lr=0.1))
input_ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
losses = []
for _ in range(3):
    loss = engine(input_ids, labels=input_ids).loss
    engine.backward(loss)
    engine.step()
    losses.append(loss.item())
report["losses"] = losses
print("REPORT", json.dumps(report))
"""

CONFIGS = {
    "nag-newton_light": dict(attention_solver="nag+newton_light", momentum_beta=0.3, newton_lambda=0.2),
    "gated-data": dict(attention_energy="gated_linear"),
    "gated-constant": dict(attention_energy="gated_linear", gated_linear_gate="constant"),
}


def test_zero3_loads_and_builds_every_solver_value_and_trains(tmp_path):
    expected_loaded, expected_built = {}, {}
    for name, overrides in CONFIGS.items():
        model = EnergyGPTForCausalLM(tiny_config(**overrides))
        expected_built[name] = {key: value.detach().flatten().tolist() for key, value in model.named_parameters()}
        with torch.no_grad():  # values a trained checkpoint could hold, not the configured initial ones
            for key, value in model.named_parameters():
                if key.rsplit(".", 1)[-1] in ("momentum_beta", "newton_lambda", "gate_bias", "gate_logit"):
                    value.add_(torch.linspace(0.01, 0.02, value.numel()).view_as(value))
        expected_loaded[name] = {key: value.detach().flatten().tolist() for key, value in model.named_parameters()}
        model.save_pretrained(tmp_path / name)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29500 + os.getpid() % 1000), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", DEEPSPEED_CHECK, *CONFIGS], capture_output=True, text=True,
                            cwd=tmp_path, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    report = json.loads(result.stdout.split("REPORT ", 1)[1])
    for name in CONFIGS:
        assert report[name]["partitioned"], name
        for how, expected in (("from_pretrained", expected_loaded[name]), ("from_config", expected_built[name])):
            values = report[name][how]
            assert values, (name, how)
            for key, value in values.items():
                assert value == pytest.approx(expected[key], abs=1e-6), (name, how, key)
    losses = report["losses"]
    assert len(set(losses)) == 3 and losses[-1] < losses[0], losses
