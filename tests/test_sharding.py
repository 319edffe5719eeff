"""Beyond one process: FSDP2 for every solver and energy, sharded checkpoints with torch.distributed.checkpoint, a
gathered `save_pretrained`, tensor parallelism with `tp_plan="auto"`, and the 0-dim solver scalars of older
checkpoints. The multi-process checks run in ONE `torchrun --nproc_per_node 2` launch (gloo, CPU) of
`tests/sharding_worker.py`; docs/distributed.md says what is and is not covered."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT, run_without_energy_gpt, tiny_config
from safetensors.torch import load_file, save_file

from energy_gpt import EnergyGPTForCausalLM

WORKER = REPO_ROOT / "tests" / "sharding_worker.py"


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    """Both ranks' reports of one two-process launch."""
    folder = tmp_path_factory.mktemp("two-ranks")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT),
           "HF_HOME": str(folder / "hf-home")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
               str(folder), "fsdp,tp"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=folder, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return [json.loads((folder / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def test_fsdp2_every_cell_matches_one_process(two_ranks):
    from sharding_worker import cells

    for report in two_ranks:
        assert report["world_size"] == 2
        assert set(report["fsdp_cells"]) == set(cells())
        for name, cell in report["fsdp_cells"].items():
            assert "error" not in cell, f"{name}:\n{cell.get('error')}"
            assert cell["loss"] == pytest.approx(cell["expected_loss"], abs=1e-6), name
            assert cell["gradient_error"] < 1e-6 and cell["parameter_error"] < 1e-6, (name, cell)


def test_fsdp2_checkpoint_resume_and_gathered_save(two_ranks):
    for solver in ("momentum", "newton_light"):
        run = two_ranks[0]["fsdp_training"][solver]
        assert len(set(run["uninterrupted"])) == 4  # it trains: four different losses
        assert run["resumed"] == pytest.approx(run["uninterrupted"], abs=1e-6), solver
        assert run["logits_error"] < 1e-6, solver  # from_pretrained of the gathered save_pretrained folder


def test_tensor_parallel_auto_plan(two_ranks):
    for report in two_ranks:
        for name, cell in report["tensor_parallel"].items():
            assert "error" not in cell, f"{name}:\n{cell.get('error')}"
            assert cell["sharded"], name  # the plan really split the fused projection
            assert cell["logits_error"] < 1e-5, (name, cell)
            assert cell["tokens"] == cell["expected_tokens"], (name, cell)
            assert len({token for row in cell["tokens"] for token in row}) >= 3, (name, cell)  # not degenerate


def save_with_zero_dim_scalars(folder, **overrides) -> dict[str, torch.Tensor]:
    """A checkpoint as earlier releases wrote it: per-layer solver scalars stored 0-dim. Returns its tensors."""
    model = EnergyGPTForCausalLM(tiny_config(attention_solver="nag", momentum_beta=0.3, **overrides))
    with torch.no_grad():
        for layer, block in enumerate(model.transformer.h[1:], start=1):
            block.residual_rule.momentum_beta.fill_(0.1 * (layer + 1))  # distinct from the config's value
    model.save_pretrained(folder)
    tensors = load_file(folder / "model.safetensors")
    tensors = {key: value.reshape(()) if key.endswith("momentum_beta") else value for key, value in tensors.items()}
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return tensors


def test_zero_dim_scalars_of_older_checkpoints_load_with_their_values(tmp_path):
    tensors = save_with_zero_dim_scalars(tmp_path / "old")
    assert tensors["transformer.h.1.residual_rule.momentum_beta"].shape == ()
    model, info = EnergyGPTForCausalLM.from_pretrained(tmp_path / "old", output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    betas = [block.residual_rule.momentum_beta for block in model.transformer.h[1:]]
    assert [tuple(beta.shape) for beta in betas] == [(1,), (1,)]
    assert torch.equal(torch.cat([beta.detach() for beta in betas]), torch.tensor([0.2, 0.3]))
    assert all(isinstance(beta, torch.nn.Parameter) and beta.requires_grad for beta in betas)
    # Plain torch `load_state_dict` takes the old 0-dim values too (a pre-hook reshapes them).
    fresh = EnergyGPTForCausalLM(tiny_config(attention_solver="nag", momentum_beta=0.3))
    fresh.load_state_dict(tensors, strict=False)
    assert torch.equal(fresh.transformer.h[2].residual_rule.momentum_beta, torch.tensor([0.3]))
    # Real mismatches still stop the load.
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        EnergyGPTForCausalLM.from_pretrained(tmp_path / "old", n_positions=32)
    # Fixed (buffer) scalars as well.
    save_with_zero_dim_scalars(tmp_path / "fixed", learn_solver_params=False)
    fixed = EnergyGPTForCausalLM.from_pretrained(tmp_path / "fixed")
    assert torch.equal(fixed.transformer.h[1].residual_rule.momentum_beta, torch.tensor([0.2]))


REMOTE_ZERO_DIM = """
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("old", trust_remote_code=True)
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
betas = [block.residual_rule.momentum_beta for block in model.transformer.h[1:]]
assert torch.equal(torch.cat([beta.detach() for beta in betas]), torch.tensor([0.2, 0.3])), betas
print("REMOTE OK", [tuple(beta.shape) for beta in betas])
"""


def test_zero_dim_scalars_load_through_remote_code(tmp_path):
    save_with_zero_dim_scalars(tmp_path / "old")
    result = run_without_energy_gpt(REMOTE_ZERO_DIM, cwd=tmp_path, env_extra={"HF_HOME": str(tmp_path / "hf-home")})
    assert "REMOTE OK [(1,), (1,)]" in result.stdout
