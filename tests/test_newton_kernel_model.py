"""With `newton_path="triton"` (opt-in) the Newton head rules call the fused Triton kernels where they can run (CUDA;
here Triton's CPU interpreter) and then compute the eager path's logits and gradients (fp32, within 1e-4), padded
batches included; with the default `newton_path="torch"` they never call them."""

import subprocess
import sys

import pytest

pytest.importorskip("triton")

CHECK = """
import copy
import torch
import energy_gpt.modeling.solvers_energy_gpt as solvers
from energy_gpt import EnergyGPTConfig, EnergyGPTForCausalLM

calls = []
for name in ("newton_second_moments", "light_second_moment"):
    kernel = getattr(solvers, name)
    setattr(solvers, name, lambda *args, _kernel=kernel, **kwargs: calls.append(1) or _kernel(*args, **kwargs))
for solver in ("newton", "newton_light"):
    config = EnergyGPTConfig(vocab_size=101, n_positions=64, n_embd=32, n_layer=2, n_head=2, attention_solver=solver,
                             initializer_range=0.2, newton_lambda=0.5, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                             bos_token_id=0, eos_token_id=0, newton_path="triton")
    torch.manual_seed(0)
    fused = EnergyGPTForCausalLM._from_config(copy.deepcopy(config), attn_implementation="sdpa")
    eager = EnergyGPTForCausalLM._from_config(copy.deepcopy(config), attn_implementation="eager")
    eager.load_state_dict(fused.state_dict())
    ids = torch.randint(0, 100, (2, 11))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    calls.clear()
    with torch.no_grad():  # a left-padded batch: same logits at every real position
        logits = {name: model(ids, attention_mask=mask).logits for name, model in (("fused", fused), ("eager", eager))}
    assert len(calls) == config.n_layer, calls
    torch.testing.assert_close(logits["fused"][mask.bool()], logits["eager"][mask.bool()], rtol=0, atol=1e-4)
    losses = {}
    for name, model in (("fused", fused), ("eager", eager)):  # a training step: same loss and gradients
        loss = model(ids, labels=ids).loss
        loss.backward()
        losses[name] = loss.item()
    assert abs(losses["fused"] - losses["eager"]) < 1e-5, losses
    for (name, a), (_, b) in zip(fused.named_parameters(), eager.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=name)
    print(solver, "ok", losses)
    default = EnergyGPTForCausalLM._from_config(EnergyGPTConfig(**{**config.to_dict(), "newton_path": "torch"}),
                                                attn_implementation="sdpa")
    calls.clear()
    with torch.no_grad():
        default(ids, attention_mask=mask)
    assert not calls, "the default path called the fused kernels"
"""


@pytest.mark.triton_interpreter
def test_newton_heads_use_the_fused_kernels_and_match_eager():
    env = {"TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1"}
    import os

    result = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=300,
                            env={**os.environ, **env})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "newton ok" in result.stdout and "newton_light ok" in result.stdout


@pytest.mark.parametrize("field, allowed", [("newton_path", "'torch', 'triton'"), ("linear_attention_path", "'torch', 'fla'")])
def test_kernel_paths_are_opt_in_with_a_clear_error(field, allowed):
    from energy_gpt import EnergyGPTConfig

    assert getattr(EnergyGPTConfig(), field) == "torch"
    with pytest.raises(ValueError, match=rf"`{field}` must be one of \[{allowed}\], got 'cuda'"):
        EnergyGPTConfig(**{field: "cuda"})


@pytest.mark.parametrize("path, expected_calls", [("torch", 0), ("fla", 3)])
def test_linear_energies_call_flash_linear_attention_only_when_asked(monkeypatch, path, expected_calls):
    """`use_fla` forced true (as on CUDA with fla installed): only `linear_attention_path="fla"` dispatches there."""
    import torch

    from energy_gpt import EnergyGPTConfig, EnergyGPTForCausalLM
    from energy_gpt.modeling import energies_energy_gpt as energies

    calls = []
    monkeypatch.setattr(energies, "use_fla", lambda query: True)
    monkeypatch.setattr(energies, "fla_linear_attention", lambda q, k, v, g, s: calls.append(1) or
                        energies.chunked_linear_attention(q, k, v, g, s))
    config = EnergyGPTConfig(vocab_size=101, n_positions=64, n_embd=32, n_layer=3, n_head=2, attention_energy="linear",
                             linear_attention_path=path)
    with torch.no_grad():
        EnergyGPTForCausalLM(config)(torch.randint(0, 100, (1, 9)))
    assert len(calls) == expected_calls
