"""The energy head rules (`modeling/energies_energy_gpt.py`) against slow, plainly written reference loops.

Head-rule level, with a tiny stand-in for the attention module (model-level tests come with the wiring). The module is
loaded from its file, as remote code loads it, which also checks that it needs nothing but torch and transformers.
"""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config
from transformers import initialization as transformers_init
from transformers.cache_utils import DynamicCache, StaticCache

import energy_gpt.modeling.energies_energy_gpt as energies
from energy_gpt.modeling.solvers_energy_gpt import ATTENTION_ENERGIES, LOCAL_ENERGIES, init_solver_parameters

B, H, D = 2, 3, 8
SCALING = D**-0.5
VALID_LINEAR_OPTIONS = [
    ("identity", "none"),
    ("identity", "length"),
    ("elu_plus_one", "none"),
    ("elu_plus_one", "sum"),
    ("elu_plus_one", "length"),
]


# The energies' declarations (energy name -> `Solver`): the head rules tested here, their fields and parameters.
ENERGY_RULES = {"linear": ATTENTION_ENERGIES["linear"], "gated_linear": ATTENTION_ENERGIES["gated_linear"],
                "huber": LOCAL_ENERGIES["huber"]}


def make_config(**overrides) -> SimpleNamespace:
    fields = {field.name: field.default for rule in ENERGY_RULES.values() for field in rule.fields}
    return SimpleNamespace(**{**fields, "num_attention_heads": H, "hidden_size": H * D, **overrides})


class FakeAttention(torch.nn.Module):
    """What a head rule reads from `EnergyGPTAttention`."""

    def __init__(self, config):
        super().__init__()
        self.config, self.layer_idx, self.num_heads, self.head_dim, self.scaling = config, 0, H, D, SCALING


def make_rule(name: str, **overrides):
    config = make_config(**overrides)
    rule = ENERGY_RULES[name].rule(config, layer_idx=0)
    with torch.no_grad():  # non-degenerate gates: different per head and token, far from the init
        for parameter in rule.parameters():
            parameter.add_(torch.randn_like(parameter))
    return rule, FakeAttention(config)


def qkv(length: int, seed: int = 0, batch: int = B) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, H, length, D, generator=generator) for _ in range(3))


def run(rule, attention, query, key, value, **kwargs):
    output, weights = rule(attention, query, key, value, kwargs.pop("attention_mask", None), scaling=SCALING, **kwargs)
    return output, weights


# ---------------------------------------------------------------------------------------------------------------------
# Reference loops (float64, one query and one key at a time).
# ---------------------------------------------------------------------------------------------------------------------


def reference_gate(rule, key_vector: torch.Tensor, head: int) -> float:
    """g for one token and head, written out from the docstring's formula."""
    if rule.gate == "data":
        logit = float(key_vector @ rule.gate_weight[head].detach().double()) + float(rule.gate_bias[head].detach())
        return (1.0 / (1.0 + math.exp(-logit))) ** (1.0 / rule.gate_temperature)
    return 1.0 / (1.0 + math.exp(-float(rule.gate_logit[head].detach())))


def reference_linear(rule, query, key, value, real=None) -> torch.Tensor:
    """o_t = sum_{i<=t, real} (prod_{j=i+1..t, real} g_j) phi(s q_t).phi(k_i) v_i, then the normalisation."""
    query, key, value = query.double(), key.double(), value.double()
    phi = (lambda x: F.elu(x) + 1.0) if rule.feature_map == "elu_plus_one" else (lambda x: x)
    gated = isinstance(rule, energies.GatedLinearHeads)
    batch, heads, length, _ = query.shape
    is_real = lambda b, i: real is None or bool(real[b, i])
    output = torch.zeros(batch, length, heads, value.shape[-1], dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            gates = [reference_gate(rule, key[b, h, j], h) if gated and is_real(b, j) else 1.0 for j in range(length)]
            for t in range(length):
                numerator, similarity_sum, weight_sum = torch.zeros(value.shape[-1], dtype=torch.float64), 0.0, 0.0
                for i in range(t + 1):
                    if not is_real(b, i):
                        continue
                    weight = math.prod(gates[i + 1 : t + 1])
                    similarity = float(phi(query[b, h, t] * SCALING) @ phi(key[b, h, i]))
                    numerator += weight * similarity * value[b, h, i]
                    similarity_sum += weight * similarity
                    weight_sum += weight
                if rule.normalization == "sum":
                    numerator = numerator / (similarity_sum + energies.LINEAR_NORMALIZATION_EPS)
                elif rule.normalization == "length":
                    numerator = numerator / max(weight_sum, 1.0)
                output[b, t, h] = numerator
    return output


def reference_huber(query, key, value, delta: float, allowed) -> torch.Tensor:
    """o_t = sum_i p_ti min(1, delta / r_ti) v_i, p_t = softmax over allowed i of -rho_delta(r_ti) * scaling."""
    query, key, value = query.double(), key.double(), value.double()
    batch, heads, q_len, _ = query.shape
    output = torch.zeros(batch, q_len, heads, value.shape[-1], dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            for t in range(q_len):
                keys = [i for i in range(key.shape[2]) if allowed(b, t, i)]
                distances = [float(torch.linalg.vector_norm(query[b, h, t] - key[b, h, i])) for i in keys]
                rho = [r * r / 2 if r <= delta else delta * (r - delta / 2) for r in distances]
                exps = [math.exp(-e * SCALING) for e in rho]
                for i, r, e in zip(keys, distances, exps):
                    output[b, t, h] += e / sum(exps) * min(1.0, delta / r if r > 0 else 1.0) * value[b, h, i]
    return output


# ---------------------------------------------------------------------------------------------------------------------
# Exactness against the reference loops.
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("feature_map,normalization", VALID_LINEAR_OPTIONS)
def test_linear_matches_reference_loop(feature_map, normalization):
    rule, attention = make_rule("linear", linear_feature_map=feature_map, linear_normalization=normalization)
    rule.chunk_size = 5  # several chunks, the last one partial
    query, key, value = qkv(13)
    output, weights = run(rule, attention, query, key, value)
    assert weights is None and output.shape == (B, 13, H, D) and output.dtype == torch.float32
    torch.testing.assert_close(output.double(), reference_linear(rule, query, key, value), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("gate", ["data", "constant"])
@pytest.mark.parametrize("feature_map,normalization", [("identity", "none"), ("identity", "length"),
                                                       ("elu_plus_one", "sum")])
def test_gated_linear_matches_reference_loop(gate, feature_map, normalization):
    rule, attention = make_rule(
        "gated_linear", gated_linear_gate=gate, linear_feature_map=feature_map, linear_normalization=normalization,
        gated_linear_gate_temperature=2.0,  # strong, visibly data-dependent decay
    )
    rule.chunk_size = 4
    query, key, value = qkv(11, seed=1)
    output, _ = run(rule, attention, query, key, value)
    torch.testing.assert_close(output.double(), reference_linear(rule, query, key, value), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float", "2d"])
@pytest.mark.parametrize("delta", [0.5, 3.0])
def test_huber_matches_reference_loop(mask_kind, delta):
    rule, attention = make_rule("huber", huber_delta=delta)
    query, key, value = qkv(9, seed=2)
    # Row 0 has its first two keys padded (left padding); row 1 has none.
    real = torch.ones(B, 9, dtype=torch.bool)
    real[0, :2] = False
    causal = torch.ones(9, 9, dtype=torch.bool).tril()
    allowed = causal[None, None] & real[:, None, None, :]
    mask = {"none": None, "bool": allowed, "2d": real.long(),  # flash attention's (B, S) padding mask
            "float": torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)}[mask_kind]
    padding = None if mask_kind == "none" else real  # with no mask only causality: no padding either
    output, weights = run(rule, attention, query, key, value, attention_mask=mask, key_padding_mask=padding)
    expected = reference_huber(
        query, key, value, delta, lambda b, t, i: i <= t and (padding is None or bool(real[b, i]))
    )
    # Rows of padded queries have no allowed key; the model ignores them.
    rows = slice(2, None)
    torch.testing.assert_close(output[0, rows].double(), expected[0, rows], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(output[1].double(), expected[1], atol=1e-5, rtol=1e-5)
    assert weights.shape == (B, H, 9, 9) and torch.allclose(weights.sum(-1), torch.ones(B, H, 9))


def test_huber_large_delta_is_the_elastic_energy():
    """delta -> infinity: softmax(-||q - k||^2 / 2T) = softmax(q.k / T - ||k||^2 / 2T); with keys of one norm, exactly
    softmax attention."""
    rule, attention = make_rule("huber", huber_delta=1e6)
    query, key, value = qkv(10, seed=3)
    output, _ = run(rule, attention, query, key, value)
    causal = torch.ones(10, 10, dtype=torch.bool).tril()
    scores = (query @ key.transpose(-1, -2) - 0.5 * (key * key).sum(-1)[..., None, :]) * SCALING
    expected = torch.softmax(scores.masked_fill(~causal, -math.inf), -1) @ value
    torch.testing.assert_close(output, expected.transpose(1, 2), atol=1e-5, rtol=1e-5)

    unit_keys = F.normalize(key, dim=-1) * 2.0
    output, _ = run(rule, attention, query, unit_keys, value)
    sdpa = F.scaled_dot_product_attention(query, unit_keys, value, is_causal=True, scale=SCALING)
    torch.testing.assert_close(output, sdpa.transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_huber_with_cached_keys_equals_the_full_forward():
    """uses_kv_cache: the attention passes all S keys and the Tq new queries (the last Tq positions)."""
    rule, attention = make_rule("huber", huber_delta=0.8)
    query, key, value = qkv(8, seed=12)
    full, _ = run(rule, attention, query, key, value)
    mask = torch.ones(B, 1, 3, 8, dtype=torch.bool).tril(5)  # 3 new queries after 5 cached tokens
    last, _ = run(rule, attention, query[:, :, 5:], key, value, attention_mask=mask)
    torch.testing.assert_close(last, full[:, 5:], atol=1e-6, rtol=1e-6)
    last, _ = run(rule, attention, query[:, :, 7:], key, value)  # one new query, no mask: it sees every key
    torch.testing.assert_close(last, full[:, 7:], atol=1e-6, rtol=1e-6)
    # Several queries and no mask (transformers skipped it: a static cache's prefill, later slots empty): upper-left.
    empty_slots = lambda tensor: torch.cat([tensor[:, :, :5], torch.zeros_like(tensor[:, :, 5:])], dim=2)
    prefill, _ = run(rule, attention, query[:, :, :5], empty_slots(key), empty_slots(value))
    torch.testing.assert_close(prefill, full[:, :5], atol=1e-6, rtol=1e-6)


def test_huber_small_delta_clips_far_anchors():
    """A far-away anchor pulls with at most delta per unit weight: its contribution is bounded, unlike elastic."""
    rule, attention = make_rule("huber", huber_delta=0.5)
    query, key, value = qkv(2, seed=4)
    key = key.clone()
    key[:, :, 0] = query[:, :, 1] + 100.0  # one key very far from the second query
    _, weights = run(rule, attention, query, key, value)
    far = weights[:, :, 1, 0] * 0.5 / torch.linalg.vector_norm(query[:, :, 1] - key[:, :, 0], dim=-1)
    assert torch.all(far < 1e-2)


# ---------------------------------------------------------------------------------------------------------------------
# Chunked == recurrent, chunk sizes, the cache.
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 3, 7, 16, 64])
def test_chunked_equals_recurrent_for_any_chunk_size(gated, chunk_size):
    query, key, value = qkv(17, seed=5)
    log_gate = F.logsigmoid(torch.randn(B, H, 17) * 3) if gated else None
    state = torch.randn(B, H, D, D)
    chunked, chunked_state = energies.chunked_linear_attention(query, key, value, log_gate, state, chunk_size)
    recurrent, recurrent_state = energies.recurrent_linear_attention(query, key, value, log_gate, state)
    torch.testing.assert_close(chunked, recurrent, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked_state, recurrent_state, atol=1e-5, rtol=1e-5)


LINEAR_RULES = [
    ("linear", {"linear_feature_map": "identity", "linear_normalization": "none"}),
    ("linear", {"linear_feature_map": "identity", "linear_normalization": "length"}),
    ("linear", {"linear_feature_map": "elu_plus_one", "linear_normalization": "sum"}),
    ("gated_linear", {"gated_linear_gate": "data", "linear_feature_map": "identity", "linear_normalization": "length"}),
    ("gated_linear", {"gated_linear_gate": "constant", "linear_feature_map": "identity", "linear_normalization": "none"}),
    ("gated_linear", {"gated_linear_gate": "data", "linear_feature_map": "elu_plus_one", "linear_normalization": "sum"}),
]


@pytest.mark.parametrize("name,options", LINEAR_RULES)
def test_cached_step_by_step_equals_full_forward(name, options):
    """Prefill 5 tokens (chunked, with the state written to a DynamicCache), then one token at a time (recurrent)."""
    rule, attention = make_rule(name, **options)
    rule.chunk_size = 4
    query, key, value = qkv(12, seed=6)
    full, _ = run(rule, attention, query, key, value)
    cache = DynamicCache()
    pieces = [run(rule, attention, query[:, :, :5], key[:, :, :5], value[:, :, :5], cache=cache, cache_index=0)[0]]
    for t in range(5, 12):
        step = slice(t, t + 1)
        pieces.append(run(rule, attention, query[:, :, step], key[:, :, step], value[:, :, step], cache=cache,
                          cache_index=0)[0])
        assert cache.get_seq_length() == t + 1
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
    layer = cache.layers[0]
    assert isinstance(layer, energies.EnergyStateLayer)
    # Fixed size: the state does not grow with the context.
    assert layer.states["state"].shape == (B, H, D, D + (rule.normalization == "sum"))


@pytest.mark.parametrize("name,options", LINEAR_RULES)
def test_padding_anywhere_contributes_nothing(name, options):
    """Padded tokens, wherever they are, add nothing, are not counted and do not decay the gated state."""
    rule, attention = make_rule(name, **options)
    rule.chunk_size = 3
    query, key, value = qkv(9, seed=11)
    real = torch.tensor([[0, 0, 1, 1, 0, 1, 1, 0, 1], [1, 1, 1, 0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    output, _ = run(rule, attention, query, key, value, key_padding_mask=real)
    expected = reference_linear(rule, query, key, value, real)
    torch.testing.assert_close(output.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,options", LINEAR_RULES + [("huber", {"huber_delta": 0.7})])
def test_causality(name, options):
    """Changing token 7's query, key and value changes nothing before position 7."""
    rule, attention = make_rule(name, **options)
    query, key, value = qkv(10, seed=7)
    before, _ = run(rule, attention, query, key, value)
    changed = [tensor.clone() for tensor in (query, key, value)]
    for tensor in changed:
        tensor[:, :, 7] += 5.0 * torch.randn_like(tensor[:, :, 7])
    after, _ = run(rule, attention, *changed)
    torch.testing.assert_close(after[:, :7], before[:, :7], atol=0, rtol=0)
    assert not torch.allclose(after[:, 7:], before[:, 7:])


@pytest.mark.parametrize("name,options", LINEAR_RULES)
def test_left_padded_row_equals_unpadded_row(name, options):
    """Row 0 of a batch, left padded by 3 garbage tokens, gives the same outputs as the row alone, in the forward and
    in cached decoding after it."""
    rule, attention = make_rule(name, **options)
    rule.chunk_size = 4
    query, key, value = qkv(10, seed=8, batch=1)
    alone, _ = run(rule, attention, query, key, value)
    garbage = [torch.randn(1, H, 3, D) * 10 for _ in range(3)]
    padded = [torch.cat([g, t], dim=2) for g, t in zip(garbage, (query, key, value))]
    padded = [torch.cat([p, torch.randn_like(p)], dim=0) for p in padded]  # row 1: another sequence, no padding
    padding_mask = torch.ones(2, 13, dtype=torch.bool)
    padding_mask[0, :3] = False
    # Prefill the first 10 positions (7 real tokens of row 0), then decode its last 3 tokens one by one.
    cache = DynamicCache()
    outputs = [run(rule, attention, *(p[:, :, :10] for p in padded), cache=cache, cache_index=0,
                   key_padding_mask=padding_mask[:, :10])[0]]
    for t in range(10, 13):
        outputs.append(run(rule, attention, *(p[:, :, t : t + 1] for p in padded), cache=cache, cache_index=0,
                           key_padding_mask=padding_mask[:, : t + 1])[0])
    padded_output = torch.cat(outputs, dim=1)
    torch.testing.assert_close(padded_output[0, 3:], alone[0], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(padded_output).all()


@pytest.mark.parametrize("name,options", LINEAR_RULES + [("huber", {"huber_delta": 0.7})])
def test_gradients_are_finite(name, options):
    """Long context, strong decays, a zero-distance pair for Huber: every gradient finite and the parameters reached."""
    rule, attention = make_rule(name, **{**options, **({"gated_linear_gate_temperature": 0.1}
                                                        if name == "gated_linear" else {})})
    query, key, value = (tensor.requires_grad_() for tensor in qkv(150, seed=9))
    with torch.no_grad():
        key[:, :, 3] = query[:, :, 5]  # ||q_5 - k_3|| = 0
    output, _ = run(rule, attention, query, key, value)
    output.square().mean().backward()
    for tensor in (query, key, value, *rule.parameters()):
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all()
        assert tensor.grad.abs().sum() > 0


def test_state_layer_follows_the_cache_batch_operations():
    """Beam search's reorder, batch selection and repetition act on the recurrent state like on keys and values."""
    rule, attention = make_rule("gated_linear", linear_normalization="length")
    query, key, value = qkv(6, seed=10)
    cache = DynamicCache()
    run(rule, attention, query[:, :, :5], key[:, :, :5], value[:, :, :5], cache=cache, cache_index=0)
    order = torch.tensor([1, 0])
    cache.reorder_cache(order)
    last = [tensor[:, :, 5:] for tensor in (query, key, value)]
    stepped, _ = run(rule, attention, *(t[order] for t in last), cache=cache, cache_index=0)
    full, _ = run(rule, attention, query, key, value)
    torch.testing.assert_close(stepped, full[order][:, 5:], atol=1e-5, rtol=1e-5)

    cache.batch_repeat_interleave(2)
    assert cache.layers[0].states["state"].shape[0] == 2 * B
    cache.batch_select_indices(torch.tensor([0, 2]))
    assert cache.layers[0].states["total_weight"].shape[0] == B
    assert cache.get_seq_length() == 6
    cache.crop(0)  # a no-op is allowed
    with pytest.raises(ValueError, match="cannot drop tokens"):
        cache.crop(-1)
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.layers[0].states == {}


def test_unsupported_caches_raise_clear_errors():
    rule, attention = make_rule("linear")
    query, key, value = qkv(3)
    static = StaticCache(config=GPT2Config(n_layer=1, n_head=H, n_embd=H * D), max_cache_len=8)
    with pytest.raises(ValueError, match="dynamic cache.*StaticLayer"):
        run(rule, attention, query, key, value, cache=static, cache_index=0)
    cache = DynamicCache()
    cache.update(key, value, 0)  # a layer that already holds keys and values
    with pytest.raises(ValueError, match="already holds keys and values"):
        run(rule, attention, query, key, value, cache=cache, cache_index=0)
    with pytest.raises(RuntimeError, match="recurrent state"):
        energies.EnergyStateLayer().update(key, value)


# ---------------------------------------------------------------------------------------------------------------------
# Config fields, parameters, dispatch.
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field,bad",
    [("linear_feature_map", "relu"), ("linear_normalization", "softmax"), ("gated_linear_gate", "learned"),
     ("gated_linear_gate_temperature", 0.0), ("gated_linear_gate_temperature", True), ("huber_delta", -1.0),
     ("huber_delta", float("inf")), ("huber_delta", "1")],
)
def test_config_field_checks_name_the_field(field, bad):
    checks = {f.name: f for rule in ENERGY_RULES.values() for f in rule.fields}
    checks[field].check(checks[field].default)  # the default passes
    with pytest.raises(ValueError, match=f"`{field}`"):
        checks[field].check(bad)


def test_sum_normalisation_needs_positive_features():
    with pytest.raises(ValueError, match="elu_plus_one"):
        ENERGY_RULES["linear"].check_config(make_config(linear_normalization="sum", linear_feature_map="identity"))
    ENERGY_RULES["gated_linear"].check_config(make_config(linear_normalization="sum",
                                                          linear_feature_map="elu_plus_one"))


def test_gates_start_at_retnet_decays_and_respect_loaded_weights():
    data = energies.GatedLinearHeads(make_config(gated_linear_gate="data"), 0)
    constant = energies.GatedLinearHeads(make_config(gated_linear_gate="constant"), 0)
    assert {n for n, _ in data.named_parameters()} == {"gate_weight", "gate_bias"}
    assert {n for n, _ in constant.named_parameters()} == {"gate_logit"}
    fixed_solvers = energies.GatedLinearHeads(make_config(gated_linear_gate="constant", learn_solver_params=False), 0)
    assert {n for n, _ in fixed_solvers.named_parameters()} == {"gate_logit"}  # gates are always trained
    declared = {parameter.name: parameter for parameter in ENERGY_RULES["gated_linear"].parameters}
    assert set(declared) == {"gate_weight", "gate_bias", "gate_logit"}
    assert all(parameter.per_head and parameter.always_learned for parameter in declared.values())
    key = torch.randn(1, H, 4, D)
    gammas = 1 - 2.0 ** -(5 + torch.arange(H, dtype=torch.float32))
    for rule in (data, constant):
        torch.testing.assert_close(rule.log_gates(key).exp(), gammas[None, :, None].expand(1, H, 4))
    with torch.no_grad():
        data.gate_bias.fill_(3.0)
        data.gate_weight.fill_(1.0)
    data.gate_bias._is_hf_initialized = True  # loaded from a checkpoint: init must not overwrite it
    init_solver_parameters(data, make_config(gated_linear_gate="data"), transformers_init)
    assert torch.all(data.gate_bias == 3.0) and torch.all(data.gate_weight == 0.0)  # the other one is initialised


def test_pytorch_path_on_cpu_even_without_fla():
    query, key, value = qkv(4)
    assert not energies.use_fla(query)
    output, state = energies.linear_attention(query, key, value)
    reference, _ = energies.recurrent_linear_attention(query, key, value)
    torch.testing.assert_close(output, reference, atol=1e-5, rtol=1e-5)
    assert state.shape == (B, H, D, D)
