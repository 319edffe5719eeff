"""The energy axis inside the model: every energy x residual-solver cell that exists, against a float64
reference loop written from DESIGN.md section 5, causal, cached generation == a loop of full forwards on
non-degenerate weights, save / load / remote code, and a clear error for the cells that do not exist. The head rules'
own maths (chunked == recurrent, padding, gates, Huber limits) is tested in test_energies.py."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import ATTENTION_IMPLEMENTATIONS, run_without_energy_gpt, tiny_config

from energy_gpt import EnergyGPTForCausalLM

PAD = 100
ENERGIES = [
    pytest.param({"attention_energy": "linear"}, id="linear"),
    pytest.param({"attention_energy": "linear", "linear_feature_map": "identity", "linear_normalization": "none"},
                 id="linear-exact-energy"),
    pytest.param({"attention_energy": "linear", "linear_feature_map": "identity", "linear_normalization": "length"},
                 id="linear-length"),
    pytest.param({"attention_energy": "gated_linear"}, id="gated_linear-data"),
    pytest.param({"attention_energy": "gated_linear", "gated_linear_gate": "constant"}, id="gated_linear-constant"),
    pytest.param({"local_energy": "huber", "huber_delta": 0.5}, id="huber"),
]
RESIDUALS = ["gd", "momentum", "nag", "dense"]


def build(attn="sdpa", **overrides):
    config = tiny_config(initializer_range=0.5, momentum_beta=0.6, dense_init=0.3, **overrides)
    return EnergyGPTForCausalLM._from_config(copy.deepcopy(config), attn_implementation=attn).eval()


def gelu_new(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def reference_heads(config, q, k, v, gate_params, keep):
    """One head's output per token, as plain loops over t and i (float64). q, k, v: (T, D); keep: (T,) bool."""
    length, head_dim = q.shape
    scale = head_dim**-0.5
    out = torch.zeros_like(v)
    phi = (lambda x: F.elu(x) + 1.0) if getattr(config, "linear_feature_map", None) == "elu_plus_one" else (lambda x: x)
    for t in range(length):
        if not keep[t]:
            continue
        visible = [i for i in range(t + 1) if keep[i]]
        if config.local_energy == "huber":
            delta = config.huber_delta
            distances = [torch.linalg.vector_norm(q[t] - k[i]) for i in visible]
            rho = [0.5 * r**2 if r <= delta else delta * (r - 0.5 * delta) for r in distances]
            probs = torch.softmax(torch.stack([-value * scale for value in rho]), dim=0)
            out[t] = sum(p * min(1.0, delta / float(r)) * v[i] for p, r, i in zip(probs, distances, visible))
            continue
        weights = []
        for i in visible:  # w_ti = prod_{j=i+1..t} g_j over real tokens (1 for `linear`)
            w = 1.0
            for j in range(i + 1, t + 1):
                if keep[j] and gate_params is not None:
                    w = w * gate_params(k[j])
            weights.append(w)
        terms = [w * (phi(q[t] * scale) @ phi(k[i])) for w, i in zip(weights, visible)]
        numerator = sum(term * v[i] for term, i in zip(terms, visible))
        if config.linear_normalization == "sum":
            out[t] = numerator / (sum(terms) + 1e-6)
        elif config.linear_normalization == "length":
            out[t] = numerator / max(1.0, float(sum(weights)))
        else:
            out[t] = numerator
    return out


def reference_logits(model, input_ids, keep):
    """The whole model in float64, from the state dict: the energy's heads, then the residual rule (gd, heavy-ball
    momentum, Nesterov with q, k, v at the lookahead point, or dense) as DESIGN.md section 2 writes it."""
    config = model.config
    w = {name: tensor.double() for name, tensor in model.state_dict().items()}
    width, n_head = config.n_embd, config.n_head
    head_dim = width // n_head
    positions = (keep.long().cumsum(-1) - 1).clamp(min=0)
    x = w["transformer.wte.weight"][input_ids] + w["transformer.wpe.weight"][positions]

    def layer_norm(h, name):
        return F.layer_norm(h, (width,), w[f"{name}.weight"], w[f"{name}.bias"], config.layer_norm_epsilon)

    def linear(h, name):
        return h @ w[f"{name}.weight"].T + w[f"{name}.bias"]

    solver = config.attention_solver
    velocity, history = None, []
    for layer in range(config.n_layer):
        prefix = f"transformer.h.{layer}"
        beta = w.get(f"{prefix}.residual_rule.momentum_beta")
        attn_input = x + beta * velocity if solver == "nag" and velocity is not None else x
        qkv = linear(layer_norm(attn_input, f"{prefix}.ln_1"), f"{prefix}.attn.c_attn")
        heads = torch.zeros_like(x)
        for b in range(x.shape[0]):
            for h in range(n_head):
                cols = slice(h * head_dim, (h + 1) * head_dim)
                q, k, v = (qkv[b, :, part * width:(part + 1) * width][:, cols] for part in range(3))
                gate = None
                if config.attention_energy == "gated_linear":
                    tau = config.gated_linear_gate_temperature
                    if config.gated_linear_gate == "data":
                        weight, bias = w[f"{prefix}.attn.head_rule.gate_weight"][h], w[f"{prefix}.attn.head_rule.gate_bias"][h]
                        gate = lambda key, weight=weight, bias=bias, tau=tau: torch.sigmoid(key @ weight + bias) ** (1 / tau)
                    else:
                        logit = w[f"{prefix}.attn.head_rule.gate_logit"][h]
                        gate = lambda key, logit=logit: torch.sigmoid(logit)
                heads[b, :, cols] = reference_heads(config, q, k, v, gate, keep[b])
        g = linear(heads, f"{prefix}.attn.c_proj")
        if solver in ("momentum", "nag"):
            velocity = g if velocity is None else beta * velocity + g
            x = x + velocity
        elif solver == "dense":
            alphas = w.get(f"{prefix}.residual_rule.dense_weights", torch.zeros(0, dtype=torch.float64))
            x = x + g + sum((alpha * earlier for alpha, earlier in zip(alphas, history)), torch.zeros_like(g))
            history.append(g)
        else:
            x = x + g
        x = x + linear(gelu_new(linear(layer_norm(x, f"{prefix}.ln_2"), f"{prefix}.mlp.c_fc")), f"{prefix}.mlp.c_proj")
    return layer_norm(x, "transformer.ln_f") @ w["transformer.wte.weight"].T


REFERENCE_CELLS = [
    pytest.param(energy.values[0], "gd", attn, id=f"{energy.id}-gd-{attn}")
    for energy in ENERGIES for attn in ATTENTION_IMPLEMENTATIONS
] + [  # every residual rule on the linear, gated-linear and Huber energies
    pytest.param(energy.values[0], residual, "sdpa", id=f"{energy.id}-{residual}-sdpa")
    for energy in (ENERGIES[0], ENERGIES[3], ENERGIES[5]) for residual in RESIDUALS[1:]
]


@pytest.mark.parametrize(("energy", "solver", "attn"), REFERENCE_CELLS)
def test_energy_matches_reference_loop(energy, solver, attn):
    model = build(attn, attention_solver=solver, **energy)
    if model.config.attention_energy == "gated_linear":  # gates far from 1, so the decay matters
        with torch.no_grad():
            for name, tensor in model.named_parameters():
                if name.endswith(("gate_bias", "gate_logit")):
                    tensor.uniform_(-1.0, 2.0)
                elif name.endswith("gate_weight"):
                    tensor.normal_(0.0, 0.5)
    input_ids = torch.randint(0, PAD, (2, 9))
    keep = torch.ones_like(input_ids, dtype=torch.bool)
    keep[1, :3] = False
    input_ids[1, :3] = PAD
    positions = (keep.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids, attention_mask=keep.long(), position_ids=positions).logits
    expected = reference_logits(model, input_ids, keep)
    torch.testing.assert_close(logits[keep], expected[keep].float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn", ATTENTION_IMPLEMENTATIONS)
@pytest.mark.parametrize("solver", RESIDUALS)
@pytest.mark.parametrize("energy", ENERGIES[::2] + ENERGIES[3:4])
def test_every_existing_cell_is_causal_and_generates_as_full_recomputation(energy, solver, attn):
    model = build(attn, attention_solver=solver, **energy)
    input_ids = torch.randint(0, PAD, (2, 10))
    changed = input_ids.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % PAD
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits[:, :6], model(changed).logits[:, :6])  # causal
        generated = model.generate(input_ids[:, :4], max_new_tokens=8, do_sample=False, pad_token_id=PAD)
        sequence = input_ids[:, :4]
        for _ in range(8):
            next_token = model(sequence, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, next_token], dim=1)
    assert torch.equal(generated, sequence)
    assert len(set(generated[:, 4:].flatten().tolist())) >= 3


@pytest.mark.parametrize("overrides", [
    ({"attention_energy": "linear", "attention_solver": "newton"}, "does not exist for `attention_energy`='linear'"),
    ({"attention_energy": "gated_linear", "attention_solver": "nag+newton_light"}, "does not exist"),
    ({"local_energy": "huber", "attention_solver": "newton"}, "not derived for `local_energy`='huber'"),
    ({"attention_energy": "linear", "local_energy": "huber"}, "defined for `attention_energy`='softmax' only"),
    ({"attention_energy": "linear", "linear_normalization": "sum", "linear_feature_map": "identity"}, "elu_plus_one"),
    ({"attention_energy": "cosine"}, "`attention_energy` must be one of"),
    ({"huber_delta": -1.0}, "huber_delta"),
], ids=lambda case: str(case)[:40] if isinstance(case, dict) else None)
def test_cells_that_do_not_exist_are_clear_errors(overrides):
    fields, message = overrides
    with pytest.raises(ValueError, match=message):
        tiny_config(**fields)


REMOTE = """
import torch
from transformers import AutoModelForCausalLM
expected = torch.load("expected.pt")
for name, tokens in expected.items():
    if name == "prompt":
        continue
    model = AutoModelForCausalLM.from_pretrained(name, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules")
    with torch.no_grad():
        out = model.generate(expected["prompt"], max_new_tokens=8, do_sample=False, pad_token_id=100)
    assert torch.equal(out, tokens), name
    print(name, "ok")
"""


def test_save_load_and_remote_code(tmp_path):
    prompt = torch.randint(0, PAD, (2, 4))
    expected = {"prompt": prompt}
    for energy in ("linear", "gated_linear", "huber"):
        fields = {"local_energy": "huber"} if energy == "huber" else {"attention_energy": energy}
        model = build("sdpa", attention_solver="nag", **fields)
        model.save_pretrained(tmp_path / energy)
        reloaded = EnergyGPTForCausalLM.from_pretrained(tmp_path / energy).eval()
        for name, tensor in model.state_dict().items():
            assert torch.equal(tensor, reloaded.state_dict()[name]), name
        with torch.no_grad():
            expected[energy] = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=PAD)
            assert torch.equal(reloaded.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=PAD),
                               expected[energy])
    torch.save(expected, tmp_path / "expected.pt")
    result = run_without_energy_gpt(REMOTE, cwd=tmp_path, env_extra={"HF_HOME": str(tmp_path / "hf-home")})
    assert all(f"{energy} ok" in result.stdout for energy in ("linear", "gated_linear", "huber"))
