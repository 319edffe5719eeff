"""The energy-descent check (`energy_gpt.energy_descent`): the energies against a float64 loop over tokens and
anchors, the known cases (a gradient step lowers every energy, a reversed step raises it), and the per-layer report of
a model against a plain loop over its layers."""

import math

import pytest
import torch

from conftest import tiny_config
from energy_gpt import EnergyGPTForCausalLM
from energy_gpt.energy_descent import (
    causal_visibility,
    energy_descent_report,
    linear_family_energy,
    softmax_family_energy,
    summarise_energy_changes,
)


def reference_energy(z, anchors, temperature, kind, delta=None, slope=0.0, weights=None, scaling=1.0, distances=None):
    """F of one query state against its visible anchors, plainly written in float64 (lists of floats); `distances`
    holds t - i per anchor (default: the anchors are positions 0..t)."""
    if kind == "linear":
        return -0.5 * sum(w * (scaling * sum(a * b for a, b in zip(z, k))) ** 2 for w, k in zip(weights, anchors))
    distances = distances or list(range(len(anchors) - 1, -1, -1))
    total = 0.0
    for k, distance in zip(anchors, distances):
        r = math.sqrt(sum((a - b) ** 2 for a, b in zip(z, k)))
        local = 0.5 * r * r if delta is None or r <= delta else delta * (r - 0.5 * delta)
        total += math.exp(-local / temperature - slope * distance)
    return -temperature * math.log(total)


def batched_energy(kind, query, key, visible, temperature=2.0, delta=None, slope=0.0, log_gates=None):
    if kind == "linear":
        log_weights = None
        if log_gates is not None:
            cumulative = log_gates.cumsum(-1)
            log_weights = cumulative[..., :, None] - cumulative[..., None, :]
        return linear_family_energy(query, key, visible, 1.0 / temperature, "identity", log_weights)
    length = key.shape[2]
    positions = torch.arange(length, dtype=torch.float64)
    prior = -slope * (positions[:, None] - positions[None, :]) if slope else None
    return softmax_family_energy(query, key, visible, temperature, delta, prior)


CASES = [("softmax", None, 0.0), ("huber", 0.8, 0.0), ("softmax_decay", None, 0.3), ("linear", None, 0.0),
         ("gated_linear", None, 0.0)]


def _case(name):
    kind, delta, slope = next(case for case in CASES if case[0] == name)
    return ("linear" if "linear" in kind else "softmax"), delta, slope


def _states(seed=0, batch=2, heads=2, length=5, dim=3):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, heads, length, dim, generator=generator, dtype=torch.float64)
    key = torch.randn(batch, heads, length, dim, generator=generator, dtype=torch.float64)
    log_gates = -torch.rand(batch, heads, length, generator=generator, dtype=torch.float64)
    return query, key, log_gates


@pytest.mark.parametrize("name", [case[0] for case in CASES])
def test_energies_match_a_loop_over_tokens_and_anchors(name):
    kind, delta, slope = _case(name)
    query, key, log_gates = _states()
    padding = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]], dtype=torch.bool)
    visible = causal_visibility(5, padding, query.device)
    gates = log_gates if name == "gated_linear" else None
    energies = batched_energy(kind, query, key, visible, delta=delta, slope=slope, log_gates=gates)
    for b in range(2):
        for h in range(2):
            for t in range(5):
                if not padding[b, t]:
                    continue
                anchors = [key[b, h, i].tolist() for i in range(t + 1)]
                weights = [math.exp(sum(log_gates[b, h, j].item() for j in range(i + 1, t + 1))) if gates is not None
                           else 1.0 for i in range(t + 1)]
                kept = [i for i in range(t + 1) if padding[b, i]]
                expected = reference_energy(query[b, h, t].tolist(), [anchors[i] for i in kept], 2.0, kind, delta,
                                            slope, [weights[i] for i in kept], scaling=0.5,
                                            distances=[t - i for i in kept])
                assert energies[b, h, t].item() == pytest.approx(expected, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("name", [case[0] for case in CASES])
def test_a_gradient_step_lowers_every_energy_and_a_reversed_step_raises_it(name):
    """The known answer: z - eta grad F(z) lowers F at every token and head (descent lemma, or concavity for the
    linear energies); z + eta grad F(z) with a small eta raises it. Gradients by autograd on the batched energy."""
    kind, delta, slope = _case(name)
    query, key, log_gates = _states(seed=1)
    visible = causal_visibility(5, None, query.device)
    gates = log_gates if name == "gated_linear" else None

    def energy(states):
        return batched_energy(kind, states, key, visible, delta=delta, slope=slope, log_gates=gates)

    states = query.clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(energy(states).sum(), states)  # rows are independent: per-token gradients
    real = torch.ones(2, 1, 5, dtype=torch.bool)
    before = energy(query)
    descent = summarise_energy_changes(before, energy(query - 0.5 * gradient), real)
    ascent = summarise_energy_changes(before, energy(query + 1e-3 * gradient), real)
    assert descent["fraction"] == [1.0, 1.0] and all(change < 0 for change in descent["mean_change"])
    assert ascent["fraction"] == [0.0, 0.0] and all(change > 0 for change in ascent["mean_change"])


def _model(**overrides):
    torch.manual_seed(0)
    config = tiny_config(n_layer=2, n_head=2, attn_implementation="eager", **overrides)
    return EnergyGPTForCausalLM(config).eval()


def test_report_matches_a_plain_loop_over_the_layers():
    """The hooks' report against the layers run by hand (gd: x' = x + A(LN1(x))) with energies from the float64 loop."""
    model = _model()
    input_ids = torch.tensor([[5, 17, 3, 99, 42, 8]])
    report = energy_descent_report(model, input_ids)
    transformer = model.transformer
    with torch.no_grad():
        hidden = transformer.wte(input_ids) + transformer.wpe(torch.arange(6))[None]
        for layer, block in enumerate(transformer.h):
            attention = block.attn

            def heads(states):
                q, k, _ = attention.c_attn(block.ln_1(states)).split(attention.embed_dim, dim=2)
                return [x.view(1, 6, 2, -1)[0].double() for x in (q, k)]

            causal = torch.full((6, 6), torch.finfo(torch.float32).min).triu(1)[None, None]
            after = hidden + attention(block.ln_1(hidden), attention_mask=causal)[0]
            (q_before, keys), (q_after, _) = heads(hidden), heads(after)
            temperature = 1.0 / attention.scaling
            for head in range(2):
                changes = []
                for t in range(6):
                    anchors = [keys[i, head].tolist() for i in range(t + 1)]
                    changes.append(reference_energy(q_after[t, head].tolist(), anchors, temperature, "softmax")
                                   - reference_energy(q_before[t, head].tolist(), anchors, temperature, "softmax"))
                assert report["energy_descent_fraction"][layer][head] == pytest.approx(
                    sum(change < 0 for change in changes) / 6)
                assert report["energy_descent_mean_change"][layer][head] == pytest.approx(sum(changes) / 6, rel=1e-9,
                                                                                         abs=1e-12)
            hidden = after + block.mlp(block.ln_2(after))


@pytest.mark.parametrize("overrides", [{}, {"attention_solver": "momentum", "momentum_beta": 0.5},
                                       {"attention_energy": "gated_linear", "linear_feature_map": "identity",
                                        "linear_normalization": "none"}, {"local_energy": "huber"},
                                       {"attention_energy": "softmax_decay"}, {"attention_solver": "twicing"}],
                         ids=["gd", "momentum", "gated_linear", "huber", "softmax_decay", "twicing"])
def test_a_tiny_step_and_its_reverse_split_the_tokens(overrides):
    """Scaling the first layer's attention output by +eps or -eps (float64 model) (c_proj weight and bias) flips the sign of every
    first-order energy change: the two fractions add up to 1 and the mean changes have opposite signs. A zero step
    changes nothing and lowers nothing."""
    model = _model(**overrides).double()  # float64 states: rounding far below the first-order changes
    input_ids = torch.tensor([[5, 17, 3, 99, 42, 8, 1, 64], [7, 7, 2, 31, 90, 13, 55, 4]])
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :2] = 0  # left padding, left out of the statistics
    projection = model.transformer.h[0].attn.c_proj
    weight, bias = projection.weight.detach().clone(), projection.bias.detach().clone()
    reports = {}
    for scale in (1e-6, -1e-6, 0.0):
        with torch.no_grad():
            projection.weight.copy_(weight * scale)
            projection.bias.copy_(bias * scale)
        reports[scale] = energy_descent_report(model, input_ids, attention_mask)
    for head in range(2):
        up, down = (reports[scale]["energy_descent_fraction"][0][head] for scale in (1e-6, -1e-6))
        assert up + down == pytest.approx(1.0)
        change_up, change_down = (reports[scale]["energy_descent_mean_change"][0][head] for scale in (1e-6, -1e-6))
        assert change_up * change_down < 0
    assert reports[0.0]["energy_descent_fraction"][0] == [0.0, 0.0]
    assert reports[0.0]["energy_descent_mean_change"][0] == [0.0, 0.0]


def test_looped_depth_reports_every_application():
    model = _model(num_loops=2)
    report = energy_descent_report(model, torch.tensor([[1, 2, 3, 4]]))
    assert len(report["energy_descent_fraction"]) == 4 and len(report["energy_descent_fraction"][0]) == 2


def test_solver_report_holds_the_check_and_the_learned_decays():
    """`solver_report(model, input_ids)` adds the energy-descent report; every report names the learned decay gates
    (RetNet's gamma_h = 1 - 2^(-5-h) at init, for gated_linear's data and constant gates and softmax_decay)."""
    from energy_gpt import solver_report

    input_ids = torch.tensor([[5, 17, 3, 99, 42, 8]])
    model = _model()
    report = solver_report(model, input_ids)
    assert report["energy_descent_fraction"] == energy_descent_report(model, input_ids)["energy_descent_fraction"]
    assert report["decay_gate"] == [None, None]
    assert "energy_descent_fraction" not in solver_report(model)
    gammas = (1.0 - 2.0 ** -(5.0 + torch.arange(2, dtype=torch.float64))).tolist()
    for overrides in ({"attention_energy": "gated_linear"}, {"attention_energy": "gated_linear",
                                                             "gated_linear_gate": "constant"},
                      {"attention_energy": "softmax_decay"}):
        for gates in solver_report(_model(**overrides))["decay_gate"]:
            assert gates == pytest.approx(gammas, rel=1e-5)


def test_compare_reports_the_check_per_layer():
    """compare's run record holds the check (one validation batch) and its summary keeps one mean per layer, which the
    'What the solvers learned' table prints."""
    from types import SimpleNamespace

    from energy_gpt.recipes.compare import mean_solver_report
    from energy_gpt.recipes.compare.runner import learned_solver_values

    input_ids = torch.tensor([5, 17, 3, 99, 42, 8])
    task = SimpleNamespace(eval_dataset=[{"input_ids": input_ids, "attention_mask": torch.ones(6, dtype=torch.long),
                                          "labels": input_ids}] * 2)
    report = learned_solver_values(_model(), task, SimpleNamespace(per_device_eval_batch_size=2))
    assert len(report["energy_descent_fraction"]) == 2 and len(report["energy_descent_fraction"][0]) == 2
    summary = mean_solver_report([report, report])
    for layer in range(2):
        assert summary["energy_descent_fraction"][layer] == pytest.approx(
            sum(report["energy_descent_fraction"][layer]) / 2)
    assert "decay_gate" not in summary  # no decay in a softmax model: the row is left out
