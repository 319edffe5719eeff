"""`energy_gpt.solver_stats`: Newton's bound-engagement fractions, recorded by forward hooks outside the shipped rules,
against a plain float64 loop over tokens and heads with the covariance matrix Sigma written out."""

import pytest
import torch
from conftest import tiny_config

from energy_gpt import EnergyGPTForCausalLM, record_solver_statistics, solver_report


@torch.no_grad()
def reference_engagement(model, input_ids: torch.Tensor, light: bool) -> tuple[list[float], list[float]]:
    """Per layer: the fraction of (token, head) with |lambda_h| s > bound, s = ||Sigma mu|| / ||mu|| (light:
    ||diag(Sigma) * mu|| / ||mu||), and with |lambda_h| trace(Sigma) > bound (light: the largest diagonal entry)."""
    config = model.config
    hidden_states = model(input_ids, output_hidden_states=True).hidden_states
    bound_fractions, trace_fractions = [], []
    for layer, block in enumerate(model.transformer.h):
        rule = block.attn.head_rule
        x = block.ln_1(hidden_states[layer]).double()
        weight, bias = block.attn.c_attn.weight.double(), block.attn.c_attn.bias.double()
        query, key, value = (x @ weight.T + bias).split(config.n_embd, dim=-1)
        head_dim = config.n_embd // config.n_head
        engaged = clipped = total = 0
        for b in range(input_ids.shape[0]):
            for h in range(config.n_head):
                heads = slice(h * head_dim, (h + 1) * head_dim)
                lam = abs(float(rule.newton_lambda[h]))
                for t in range(input_ids.shape[1]):
                    q, k, v = query[b, t, heads], key[b, : t + 1, heads], value[b, : t + 1, heads]
                    p = torch.softmax(k @ q / head_dim**0.5, dim=0)
                    mu = p @ v
                    sigma = sum(p[i] * torch.outer(v[i] - mu, v[i] - mu) for i in range(t + 1))
                    step = torch.diagonal(sigma) * mu if light else sigma @ mu
                    spread = torch.diagonal(sigma).max() if light else torch.trace(sigma)
                    engaged += lam * float(step.norm() / mu.norm()) > rule.step_bound
                    clipped += lam * float(spread) > rule.step_bound
                    total += 1
        bound_fractions.append(engaged / total)
        trace_fractions.append(clipped / total)
    return bound_fractions, trace_fractions


@pytest.mark.parametrize("solver", ["newton", "newton_light"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_engagement_fractions_match_a_plain_reference(solver, attn):
    torch.manual_seed(0)
    config = tiny_config(attention_solver=solver, initializer_range=0.2, newton_step_bound=0.5)
    model = EnergyGPTForCausalLM(config).eval()
    model.set_attn_implementation(attn)
    with torch.no_grad():
        for layer, block in enumerate(model.transformer.h):
            block.attn.head_rule.newton_lambda.copy_(torch.linspace(-0.6, 0.9, config.n_head) * (layer + 1))
    input_ids = torch.randint(0, config.vocab_size, (2, 9))
    assert solver_report(model)["newton_bound_engagement"] == [None] * config.n_layer  # nothing recorded yet
    with torch.no_grad(), record_solver_statistics(model):
        logits = model(input_ids).logits
    report = solver_report(model)
    expected_bound, expected_trace = reference_engagement(model, input_ids, light=solver == "newton_light")
    tokens = 2 * config.n_head * 9
    assert report["newton_bound_engagement"] == pytest.approx(expected_bound, abs=1.5 / tokens)
    assert report["newton_trace_rule_engagement"] == pytest.approx(expected_trace, abs=1.5 / tokens)
    assert all(0.2 < value < 0.8 for value in report["newton_bound_engagement"])  # engages for some, not all
    # The hooks are gone and the rules hold no statistics: a forward outside the block records nothing new.
    rules = [block.attn.head_rule for block in model.transformer.h]
    assert all(not rule._forward_hooks and not hasattr(rule, "statistics") for rule in rules)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, logits, rtol=0, atol=0)  # recording changed nothing
        for rule in rules:
            rule.newton_lambda.zero_()
        model(input_ids)
    assert solver_report(model)["newton_bound_engagement"] == report["newton_bound_engagement"]
