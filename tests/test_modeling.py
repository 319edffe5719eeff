"""Tests of the EnergyGPT model family: the solvers against a plain reference, exact GPT-2 equivalence,
causality, generation with the cache and with padding, gradients, loading, config validation and Auto classes.

Everything runs on tiny models (CPU, fp32, offline). The remote-code round trip lives in `test_remote_code.py`.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    ATTENTION_IMPLEMENTATIONS,
    SOLVERS,
    GPT2_EAGER_BIT_EXACT,
    assert_same_as_gpt2,
    gpt2_to_energy_state_dict,
    left_pad,
    tiny_config,
    tiny_gpt2_config,
)
from safetensors.torch import save_file
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
)

from energy_gpt import EnergyGPTConfig, EnergyGPTForCausalLM, EnergyGPTForSequenceClassification, EnergyGPTModel
from energy_gpt.modeling.configuration_energy_gpt import ENERGY_GPT_AUTO_MAP
from energy_gpt.solver_stats import record_solver_statistics, solver_report


SOLVER_PARAM_SUFFIXES = ("momentum_beta", "newton_lambda", "dense_weights")
PAD = 100  # last id of the tiny vocabulary; random inputs below never contain it
# Every solver, with both NAG lookahead modes: (id, config overrides).
SOLVER_VARIANTS = [
    pytest.param({"attention_solver": "gd"}, id="gd"),
    pytest.param({"attention_solver": "momentum"}, id="momentum"),
    pytest.param({"attention_solver": "nag", "nag_lookahead": "qkv"}, id="nag-qkv"),
    pytest.param({"attention_solver": "nag", "nag_lookahead": "query"}, id="nag-query"),
    pytest.param({"attention_solver": "newton"}, id="newton"),
    pytest.param({"attention_solver": "newton_light"}, id="newton_light"),
]
# Weights with std 0.2 (instead of 0.02) give spread-out logits: solver terms are large enough to test, and argmax
# decoding has no near-ties.
WIDE_INIT = {"initializer_range": 0.2}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: a second intra-op thread only adds synchronisation, and its spin-waiting on a shared 2-core machine
    made these modules 5 to 10 times slower. (Modules that import this fixture get it too.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(cls=EnergyGPTForCausalLM, attn="eager", **config_overrides):
    model = cls._from_config(tiny_config(**config_overrides), attn_implementation=attn)
    assert model.config._attn_implementation == attn
    return model.eval()


@torch.no_grad()
def set_solver_params(model, betas=(0.7, 0.4, 0.9), lambda_scale=1.0):
    """Non-zero, layer-dependent beta and head-dependent lambda (of both signs); dense weights of both signs; a
    velocity LayerNorm (where configured) with non-trivial weights, so that a reference reading the wrong ones fails."""
    for layer, block in enumerate(model.transformer.h):
        rule = block.residual_rule
        if hasattr(rule, "momentum_beta"):
            rule.momentum_beta.fill_(betas[layer])
        if hasattr(rule, "dense_weights"):
            rule.dense_weights.copy_(torch.tensor([0.8, -0.5, 0.3])[: rule.dense_weights.numel()])
        if getattr(rule, "velocity_norm", None) is not None:
            rule.velocity_norm.weight.copy_(1.0 + 0.3 * torch.randn_like(rule.velocity_norm.weight))
            rule.velocity_norm.bias.copy_(0.1 * torch.randn_like(rule.velocity_norm.bias))
        if hasattr(block.attn.head_rule, "newton_lambda"):
            head_lambdas = torch.tensor([1.0, -0.6, 2.0, 0.3]) * (1.0 + 0.5 * layer)
            block.attn.head_rule.newton_lambda.copy_(lambda_scale * head_lambdas)
    return model


def expected_solver_tensor_count(model) -> int:
    """One beta per layer after the first (layer 0 sees m = 0) or one lambda vector per layer."""
    return model.config.n_layer - (model.config.attention_solver in ("momentum", "nag"))


def solver_tensors(model) -> dict[str, torch.Tensor]:
    return {name: tensor for name, tensor in model.state_dict().items() if name.endswith(SOLVER_PARAM_SUFFIXES)}


def left_padded(input_ids: torch.Tensor, pad_lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    input_ids, attention_mask = input_ids.clone(), torch.ones_like(input_ids)
    for row, length in enumerate(pad_lengths):
        input_ids[row, :length] = PAD
        attention_mask[row, :length] = 0
    return input_ids, attention_mask


# ---------------------------------------------------------------------------------------------------------------------
# The reference: DESIGN.md section 2 written as plain loops over tokens and heads, in float64, from the state dict.
# ---------------------------------------------------------------------------------------------------------------------


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


RESIDUAL_RULES = ("gd", "momentum", "nag", "dense")
DEFAULT_STEP_BOUND = 0.5  # where `newton_step_bound=None`, engagement is counted against this (the default) bound


def reference_schedule(config) -> list[tuple[str, str | None]]:
    """(residual rule, head rule or None) per layer, parsed here independently of the model's registry."""
    names = config.attention_solver if isinstance(config.attention_solver, list) else [config.attention_solver] * config.n_layer
    schedule = []
    for name in names:
        residual, _, head = name.partition("+")
        schedule.append((residual, head or None) if residual in RESIDUAL_RULES else ("gd", residual))
    return schedule


def reference_logits(state_dict, config, input_ids, attention_mask=None, position_ids=None, weights=None):
    """Logits of EnergyGPT computed token by token and head by head; returns (logits, newton_steps, engaged_steps).

    Per layer l, with g = A(LN1(.)) the attention sublayer and m the velocity (None before the first momentum layer):
      gd:        x' = x + g                                  (m and the dense history pass through unchanged)
      momentum:  m = g if m is None else beta_l m + g  (ema: beta_l m + (1 - beta_l) g);  x' = x + m  (or x + LN_v(m))
      nag:       y = x + beta_l m;  g = A(LN1(y)) (keys / values from x with nag_lookahead="query");  then momentum
      dense:     x' = x + g_l + sum_j alpha_{l,j} g_j over the earlier dense layers j
    Head rules: `newton` uses the explicit d_h x d_h covariance Sigma = sum_i p_i (v_i - mu)(v_i - mu)^T, step =
    Sigma mu; `newton_light` its diagonal, step = diag(Sigma) * mu. Soft step bound: lambda_eff = lambda /
    sqrt(1 + (lambda s / bound)^2), s = ||step|| / ||mu||; `newton_step_bound=None`: lambda_eff = lambda (plain
    formula). "engaged" counts |lambda| s > bound (the default bound where there is none). Padding keys get no
    probability. `weights` (float64, e.g. leaves requiring grad) replaces `state_dict` when given.
    """
    if weights is None:
        weights = {name: tensor.double() for name, tensor in state_dict.items()}
    schedule = reference_schedule(config)
    batch, length = input_ids.shape
    width, n_head = config.n_embd, config.n_head
    head_dim = width // n_head
    bound = config.newton_step_bound
    keep = torch.ones(batch, length, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if position_ids is None:
        position_ids = torch.arange(length).expand(batch, length)
    counts = {"newton_steps": 0, "engaged": 0}

    def layer_norm(x, name):
        return F.layer_norm(x, (width,), weights[f"{name}.weight"], weights[f"{name}.bias"], config.layer_norm_epsilon)

    def linear(x, name):
        return x @ weights[f"{name}.weight"].T + weights[f"{name}.bias"]

    def attention(layer, head_rule, query_source, context_source):
        prefix = f"transformer.h.{layer}"
        queries = linear(layer_norm(query_source, f"{prefix}.ln_1"), f"{prefix}.attn.c_attn")[..., :width]
        context = linear(layer_norm(context_source, f"{prefix}.ln_1"), f"{prefix}.attn.c_attn")
        keys, values = context[..., width : 2 * width], context[..., 2 * width :]
        rows = []
        for b in range(batch):
            for t in range(length):
                visible = [i for i in range(t + 1) if keep[b, i]]
                if not visible:  # a padding query with no real key: its output is never used
                    rows.append(torch.zeros(width, dtype=torch.float64))
                    continue
                heads = []
                for h in range(n_head):
                    cols = slice(h * head_dim, (h + 1) * head_dim)
                    q = queries[b, t, cols]
                    scores = torch.stack([q @ keys[b, i, cols] / math.sqrt(head_dim) for i in visible])
                    probs = torch.softmax(scores, dim=0)
                    vs = [values[b, i, cols] for i in visible]
                    mu = sum(p * v for p, v in zip(probs, vs))
                    out = mu
                    if head_rule is not None:
                        lam = weights[f"{prefix}.attn.head_rule.newton_lambda"][h]
                        sigma = sum(p * torch.outer(v - mu, v - mu) for p, v in zip(probs, vs))
                        step = sigma @ mu if head_rule == "newton" else torch.diagonal(sigma) * mu
                        size = torch.linalg.vector_norm(step) / torch.linalg.vector_norm(mu)
                        counts["newton_steps"] += 1
                        counts["engaged"] += int(abs(float(lam.detach())) * float(size.detach()) > (bound or DEFAULT_STEP_BOUND))
                        lam_eff = lam if bound is None else lam / torch.sqrt(1 + (lam * size / bound) ** 2)
                        out = mu + lam_eff * step
                    heads.append(out)
                rows.append(torch.cat(heads))
        return linear(torch.stack(rows).view(batch, length, width), f"{prefix}.attn.c_proj")

    x = weights["transformer.wte.weight"][input_ids] + weights["transformer.wpe.weight"][position_ids]
    velocity, history = None, []
    for layer, (residual, head_rule) in enumerate(schedule):
        prefix = f"transformer.h.{layer}"
        beta = weights.get(f"{prefix}.residual_rule.momentum_beta")  # absent where no velocity arrives
        assert (beta is None) == (velocity is None) or residual not in ("momentum", "nag"), (layer, residual)
        if residual == "nag" and velocity is not None:
            lookahead = x + beta * velocity
            gradient_step = attention(layer, head_rule, lookahead, lookahead if config.nag_lookahead == "qkv" else x)
        else:
            gradient_step = attention(layer, head_rule, x, x)
        if residual == "gd":
            x = x + gradient_step
        elif residual in ("momentum", "nag"):
            if velocity is None:
                velocity = gradient_step
            elif config.momentum_form == "ema":
                velocity = beta * velocity + (1 - beta) * gradient_step
            else:
                velocity = beta * velocity + gradient_step
            x = x + (layer_norm(velocity, f"{prefix}.residual_rule.velocity_norm") if config.momentum_velocity_norm else velocity)
        elif residual == "dense":
            alphas = weights.get(f"{prefix}.residual_rule.dense_weights", torch.zeros(0, dtype=torch.float64))
            assert len(alphas) == len(history), (layer, len(history))  # one weight per earlier dense layer
            x = x + gradient_step + sum((alpha * earlier for alpha, earlier in zip(alphas, history)), torch.zeros_like(x))
            history.append(gradient_step)
        else:
            raise AssertionError(residual)
        x = x + linear(gelu_new(linear(layer_norm(x, f"{prefix}.ln_2"), f"{prefix}.mlp.c_fc")), f"{prefix}.mlp.c_proj")
    x = layer_norm(x, "transformer.ln_f")
    return x @ weights["transformer.wte.weight"].T, counts["newton_steps"], counts["engaged"]


REFERENCE_CASES = [
    *SOLVER_VARIANTS[:4],
    # lambda * size(Sigma) stays below the bound everywhere (plain formula) / exceeds it for some tokens (clamped).
    pytest.param({"attention_solver": "newton", "lambda_scale": 0.002}, id="newton-unbounded"),
    pytest.param({"attention_solver": "newton", "lambda_scale": 0.2}, id="newton-bounded"),
    pytest.param({"attention_solver": "newton_light", "lambda_scale": 0.01}, id="newton_light-unbounded"),
    pytest.param({"attention_solver": "newton_light", "lambda_scale": 1.0}, id="newton_light-bounded"),
    # No bound at all: the plain first-order formula, on weights where the default bound would engage.
    pytest.param({"attention_solver": "newton", "newton_step_bound": None, "lambda_scale": 0.2}, id="newton-no-bound"),
    pytest.param({"attention_solver": "newton_light", "newton_step_bound": None, "lambda_scale": 1.0},
                 id="newton_light-no-bound"),
    # Momentum options and the dense control.
    pytest.param({"attention_solver": "momentum", "momentum_form": "ema"}, id="momentum-ema"),
    pytest.param({"attention_solver": "momentum", "momentum_velocity_norm": True}, id="momentum-velocity-norm"),
    pytest.param({"attention_solver": "nag", "nag_lookahead": "query", "momentum_form": "ema",
                  "momentum_velocity_norm": True}, id="nag-query-ema-velocity-norm"),
    pytest.param({"attention_solver": "dense"}, id="dense"),
    # Compositions of a residual rule with a head rule (item 2) and per-layer schedules (item 3).
    pytest.param({"attention_solver": "nag+newton_light"}, id="nag+newton_light"),
    pytest.param({"attention_solver": "momentum+newton", "lambda_scale": 0.2}, id="momentum+newton"),
    pytest.param({"attention_solver": "dense+newton_light"}, id="dense+newton_light"),
    pytest.param({"attention_solver": ["gd", "momentum", "nag"]}, id="list-gd-momentum-nag"),
    # The velocity crosses a gd layer unchanged; each layer has its own head rule.
    pytest.param({"attention_solver": ["momentum", "newton", "nag+newton_light"], "lambda_scale": 0.2},
                 id="list-momentum-newton-nag+newton_light"),
    pytest.param({"attention_solver": ["dense", "gd", "dense+newton"], "lambda_scale": 0.2}, id="list-dense-gd-dense"),
]


def has_newton_heads(config) -> bool:
    return any(head is not None for _, head in reference_schedule(config))


@pytest.mark.parametrize("attn", ATTENTION_IMPLEMENTATIONS)
@pytest.mark.parametrize("case", REFERENCE_CASES)
def test_solver_matches_reference_loop(case, attn):
    case = dict(case)
    lambda_scale = case.pop("lambda_scale", 1.0)
    model = set_solver_params(build(attn=attn, **WIDE_INIT, **case), lambda_scale=lambda_scale)
    # One full row and one left-padded row (padding keys must get no probability), GPT-2 style positions.
    input_ids, attention_mask = left_padded(torch.randint(0, PAD, (2, 9)), [0, 3])
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    state_dict = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}

    with torch.no_grad():
        logits = model(input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    expected, newton_steps, engaged = reference_logits(
        state_dict, model.config, input_ids, attention_mask, position_ids
    )

    real = attention_mask.bool()
    torch.testing.assert_close(logits[real], expected[real].float(), atol=1e-5, rtol=0)
    if has_newton_heads(model.config):
        # The "-unbounded" cases (scale < 0.2) never reach the bound; the others reach it for some token-heads (with
        # `newton_step_bound=None` the default bound would engage there, and the plain formula is used instead).
        assert newton_steps > 0
        assert (engaged > 0) == (lambda_scale >= 0.2), (engaged, newton_steps)

    # The solver terms are large enough to matter: the same weights with beta = lambda = alpha = 0 give other logits.
    if case["attention_solver"] != "gd":
        with torch.no_grad():
            for tensor in solver_tensors(model).values():
                tensor.zero_()
            plain = model(input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
        assert (plain[real] - logits[real]).abs().max() > 1e-3


@pytest.mark.parametrize("attn", ATTENTION_IMPLEMENTATIONS)
@pytest.mark.parametrize(
    "solver", ["newton", "newton_light", ["momentum", "newton", "nag+newton_light"]], ids=["newton", "newton_light", "list"]
)
def test_newton_lambda_gradient_matches_reference_where_bound_engages(solver, attn):
    """The gradient of lambda is the float64 reference's autograd gradient (soft bound included) and
    non-zero for every head, on weights where the bound engages for most token-heads (a hard trace clip gives 0
    there). On sdpa this also checks the hand-written chunked backward of the Newton correction."""
    model = set_solver_params(build(attn=attn, **WIDE_INIT, attention_solver=solver), lambda_scale=3.0).train()
    input_ids = torch.randint(0, PAD, (2, 7))
    probe = torch.randn(2, 7, model.config.vocab_size, dtype=torch.float64)
    with record_solver_statistics(model):
        (model(input_ids).logits.double() * probe).sum().backward()
    engagement = [value for value in solver_report(model)["newton_bound_engagement"] if value is not None]
    assert engagement and min(engagement) > 0.5, engagement

    weights = {name: tensor.detach().double() for name, tensor in model.state_dict().items()}
    lambda_names = [name for name in weights if name.endswith("newton_lambda")]
    for name in lambda_names:
        weights[name].requires_grad_(True)
    expected, _, _ = reference_logits(None, model.config, input_ids, weights=weights)
    (expected * probe).sum().backward()
    parameters = dict(model.named_parameters())
    for name in lambda_names:
        gradient = parameters[name].grad
        assert gradient is not None and bool((gradient != 0).all()), (name, gradient)
        torch.testing.assert_close(gradient.double(), weights[name].grad, atol=1e-4, rtol=1e-3, msg=name)


# ---------------------------------------------------------------------------------------------------------------------
# beta = lambda = 0 is exactly GPT-2.
# ---------------------------------------------------------------------------------------------------------------------


def transplant_gpt2(gpt2, energy_model):
    missing, unexpected = energy_model.load_state_dict(gpt2_to_energy_state_dict(gpt2.state_dict()), strict=False)
    assert all(name.endswith(SOLVER_PARAM_SUFFIXES) for name in missing), missing
    assert set(unexpected) <= {"lm_head.weight"}, unexpected  # tied: not in EnergyGPT's state dict
    return energy_model


# The new options' function-preserving starts: dense with every alpha = 0 (`dense_init=0`),
# the EMA momentum form at beta = 0, Newton without a bound at lambda = 0, compositions and per-layer schedules. The
# velocity LayerNorm is not function preserving (LN(g) != g) and is documented as such: no case here.
FUNCTION_PRESERVING_VARIANTS = [
    pytest.param({"attention_solver": "dense", "dense_init": 0.0}, id="dense"),
    pytest.param({"attention_solver": "momentum", "momentum_form": "ema"}, id="momentum-ema"),
    pytest.param({"attention_solver": "nag", "nag_lookahead": "query", "momentum_form": "ema"}, id="nag-query-ema"),
    pytest.param({"attention_solver": "newton", "newton_step_bound": None}, id="newton-no-bound"),
    pytest.param({"attention_solver": "nag+newton_light"}, id="nag+newton_light"),
    pytest.param({"attention_solver": "momentum+newton"}, id="momentum+newton"),
    pytest.param({"attention_solver": ["gd", "dense", "dense+newton_light"], "dense_init": 0.0}, id="list-dense"),
    pytest.param({"attention_solver": ["momentum", "gd", "nag+newton"]}, id="list-momentum"),
]


@pytest.mark.parametrize("attn", ATTENTION_IMPLEMENTATIONS)
@pytest.mark.parametrize("variant", SOLVER_VARIANTS + FUNCTION_PRESERVING_VARIANTS)
def test_zero_solver_params_give_gpt2_logits_exactly(variant, attn):
    gpt2 = GPT2LMHeadModel._from_config(tiny_gpt2_config(), attn_implementation=attn).eval()
    model = transplant_gpt2(gpt2, build(attn=attn, **{"momentum_beta": 0.0, "newton_lambda": 0.0, **variant}))
    assert solver_tensors(model) or variant["attention_solver"] == "gd"  # the solver's own tensors exist, all zero
    assert all(not tensor.any() for tensor in solver_tensors(model).values())
    input_ids, attention_mask = left_padded(torch.randint(0, PAD, (2, 10)), [0, 4])
    with torch.no_grad():
        for mask in (None, attention_mask):
            outputs = model(
                input_ids, attention_mask=mask, output_hidden_states=True, output_attentions=attn == "eager"
            )
            expected = gpt2(
                input_ids, attention_mask=mask, output_hidden_states=True, output_attentions=attn == "eager"
            )
            real = torch.ones_like(input_ids) if mask is None else mask
            assert_same_as_gpt2(outputs.logits, expected.logits, attn, real)
            # GPT-2 returns 1 + n_layer hidden states, the last one after ln_f: the same layout, bit for bit.
            assert len(outputs.hidden_states) == len(expected.hidden_states) == model.config.n_layer + 1
            for ours, theirs in zip(outputs.hidden_states, expected.hidden_states):
                assert_same_as_gpt2(ours, theirs, attn, real)
            if attn == "eager" and GPT2_EAGER_BIT_EXACT:  # (older GPT-2s fill padded rows differently)
                assert len(outputs.attentions) == model.config.n_layer
                for ours, theirs in zip(outputs.attentions, expected.attentions):
                    assert_same_as_gpt2(ours, theirs, attn)


@pytest.mark.parametrize("attn", ATTENTION_IMPLEMENTATIONS)
@pytest.mark.parametrize("variant", SOLVER_VARIANTS)
def test_zero_solver_params_classifier_matches_gpt2(variant, attn):
    gpt2 = GPT2ForSequenceClassification._from_config(
        tiny_gpt2_config(pad_token_id=PAD, num_labels=3), attn_implementation=attn
    ).eval()
    model = build(
        EnergyGPTForSequenceClassification,
        attn,
        pad_token_id=PAD,
        num_labels=3,
        momentum_beta=0.0,
        newton_lambda=0.0,
        **variant,
    )
    transplant_gpt2(gpt2, model)
    input_ids = torch.randint(0, PAD, (3, 8))
    left_ids, left_mask = left_padded(input_ids, [0, 2, 5])
    right_ids, right_mask = input_ids.clone(), torch.ones_like(input_ids)
    right_ids[1, 6:], right_mask[1, 6:] = PAD, 0
    right_ids[2, 3:], right_mask[2, 3:] = PAD, 0
    with torch.no_grad():
        for ids, mask in ((left_ids, left_mask), (right_ids, right_mask)):
            logits = model(ids, attention_mask=mask).logits
            assert logits.shape == (3, 3)
            assert_same_as_gpt2(logits, gpt2(ids, attention_mask=mask).logits, attn)


# ---------------------------------------------------------------------------------------------------------------------
# Causality and generation.
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ATTENTION_IMPLEMENTATIONS)
@pytest.mark.parametrize("variant", SOLVER_VARIANTS)
def test_causality(variant, attn):
    model = set_solver_params(build(attn=attn, **WIDE_INIT, **variant), lambda_scale=0.05)
    input_ids = torch.randint(0, PAD, (2, 10))
    changed = input_ids.clone()
    changed[:, 6:] = (changed[:, 6:] + 17) % PAD
    with torch.no_grad():
        logits, changed_logits = model(input_ids).logits, model(changed).logits
    torch.testing.assert_close(changed_logits[:, :6], logits[:, :6], atol=1e-6, rtol=0)
    assert (changed_logits[:, 6:] - logits[:, 6:]).abs().max() > 1e-3


def generation_model(variant, attn):
    # No eos: every generation runs its full length, so the token ids compare position by position.
    model = build(attn=attn, **WIDE_INIT, **variant, bos_token_id=None, eos_token_id=None, pad_token_id=PAD)
    return set_solver_params(model, lambda_scale=0.05)


def greedy(model, input_ids, attention_mask=None, **kwargs):
    return model.generate(
        input_ids, attention_mask=attention_mask, max_new_tokens=4, do_sample=False, pad_token_id=PAD, **kwargs
    )


@pytest.mark.parametrize("attn", ATTENTION_IMPLEMENTATIONS)
@pytest.mark.parametrize("variant", SOLVER_VARIANTS)
def test_greedy_generation_with_cache_equals_without(variant, attn):
    model = generation_model(variant, attn)
    input_ids = torch.randint(0, PAD, (2, 5))
    cached = greedy(model, input_ids, use_cache=True, output_scores=True, return_dict_in_generate=True)
    uncached = greedy(model, input_ids, use_cache=False, output_scores=True, return_dict_in_generate=True)
    assert cached.sequences.shape == (2, 9)
    assert torch.equal(cached.sequences, uncached.sequences)
    for cached_scores, uncached_scores in zip(cached.scores, uncached.scores):
        torch.testing.assert_close(cached_scores, uncached_scores, atol=1e-5, rtol=0)


@pytest.mark.parametrize("attn", ATTENTION_IMPLEMENTATIONS)
@pytest.mark.parametrize("variant", SOLVER_VARIANTS)
def test_batched_left_padded_generation_equals_one_by_one(variant, attn):
    model = generation_model(variant, attn)
    prompts = [torch.randint(0, PAD, (length,)) for length in (5, 8, 3)]
    batch_ids, batch_mask = left_pad(prompts, PAD)
    longest = batch_ids.shape[1]
    batched = greedy(model, batch_ids, batch_mask)[:, longest:]
    for row, prompt in enumerate(prompts):
        alone = greedy(model, prompt.unsqueeze(0))[:, len(prompt) :]
        assert torch.equal(batched[row], alone[0]), (row, batched[row], alone[0])


# ---------------------------------------------------------------------------------------------------------------------
# Training: gradient checkpointing, learned / fixed solver parameters.
# ---------------------------------------------------------------------------------------------------------------------


def loss_and_gradients(model, input_ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids, labels=input_ids, use_cache=False).loss
    loss.backward()
    # beta of layer 0 multiplies the zero momentum: it gets no gradient (None).
    return loss.detach(), {
        name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None
    }


@pytest.mark.parametrize("variant", SOLVER_VARIANTS)
def test_gradient_checkpointing_gives_same_gradients(variant):
    model = set_solver_params(build(**WIDE_INIT, **variant), lambda_scale=0.05).train()
    input_ids = torch.randint(0, PAD, (2, 8))
    loss, gradients = loss_and_gradients(model, input_ids)

    # The checkpoint wraps the block's `forward`: count calls of its first submodule (torch's non-reentrant
    # recomputation stops early, so a later submodule like the MLP may not run again).
    block_calls = []
    model.transformer.h[0].ln_1.register_forward_hook(lambda *args: block_calls.append(1))
    model.gradient_checkpointing_enable()
    assert model.transformer.gradient_checkpointing
    checkpointed_loss, checkpointed_gradients = loss_and_gradients(model, input_ids)
    assert len(block_calls) == 2  # forward, then recomputed in backward: checkpointing really ran

    assert torch.equal(loss, checkpointed_loss)
    assert gradients.keys() == checkpointed_gradients.keys()
    assert len(gradients) >= len(list(model.parameters())) - 1
    for name, gradient in gradients.items():
        torch.testing.assert_close(checkpointed_gradients[name], gradient, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("variant", SOLVER_VARIANTS[1:])
def test_learned_solver_params_receive_gradients(variant):
    model = set_solver_params(build(**WIDE_INIT, **variant, learn_solver_params=True), lambda_scale=0.05).train()
    parameters = dict(model.named_parameters())
    solver_names = list(solver_tensors(model))
    assert len(solver_names) == expected_solver_tensor_count(model) and all(name in parameters for name in solver_names)
    before = {name: parameters[name].detach().clone() for name in solver_names}
    _, gradients = loss_and_gradients(model, torch.randint(0, PAD, (2, 8)))
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    for name in solver_names:
        assert gradients[name].abs().sum() > 0, name
        assert not torch.equal(parameters[name].detach(), before[name]), name


@pytest.mark.parametrize("variant", SOLVER_VARIANTS[1:])
def test_fixed_solver_params_are_constant_buffers(variant):
    model = set_solver_params(build(**WIDE_INIT, **variant, learn_solver_params=False), lambda_scale=0.05).train()
    solver_names = list(solver_tensors(model))
    assert len(solver_names) == expected_solver_tensor_count(model)
    assert not set(solver_names) & {name for name, _ in model.named_parameters()}
    assert set(solver_names) <= {name for name, _ in model.named_buffers()}
    before = {name: tensor.clone() for name, tensor in solver_tensors(model).items()}
    weight_before = model.transformer.h[0].attn.c_attn.weight.detach().clone()
    loss_and_gradients(model, torch.randint(0, PAD, (2, 8)))
    torch.optim.AdamW(model.parameters(), lr=0.1).step()
    assert not torch.equal(model.transformer.h[0].attn.c_attn.weight, weight_before)  # the step did happen
    for name, tensor in solver_tensors(model).items():
        assert not tensor.requires_grad
        assert torch.equal(tensor, before[name]), name


# ---------------------------------------------------------------------------------------------------------------------
# Saving and loading.
# ---------------------------------------------------------------------------------------------------------------------


def assert_all_finite(model):
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        assert torch.isfinite(tensor).all(), name


@pytest.mark.parametrize("learn", [True, False], ids=["learned", "fixed"])
@pytest.mark.parametrize("variant", SOLVER_VARIANTS)
def test_save_load_round_trip_is_exact_and_initialised(variant, learn, tmp_path):
    model = build(**variant, momentum_beta=0.3, newton_lambda=0.25, learn_solver_params=learn)
    model.save_pretrained(tmp_path)
    loaded = EnergyGPTForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()

    assert_all_finite(loaded)
    for name, tensor in solver_tensors(loaded).items():
        assert torch.equal(tensor, torch.full_like(tensor, 0.3 if name.endswith("momentum_beta") else 0.25)), name
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()  # still tied
    original, reloaded = model.state_dict(), loaded.state_dict()
    assert original.keys() == reloaded.keys()
    for name, tensor in original.items():
        assert torch.equal(tensor, reloaded[name]), name
    input_ids = torch.randint(0, PAD, (2, 7))
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, loaded(input_ids).logits)


@pytest.mark.parametrize("learn", [True, False], ids=["learned", "fixed"])
@pytest.mark.parametrize("solver", ["momentum", "nag", "newton", "newton_light"])
def test_gpt2_shaped_checkpoint_gets_solver_params_from_config(solver, learn, tmp_path):
    """A checkpoint without solver tensors (a GPT-2 transplant) loads them from the config's init value, not
    from uninitialised memory."""
    config = tiny_config(attention_solver=solver, momentum_beta=0.3, newton_lambda=0.25, learn_solver_params=learn)
    config.save_pretrained(tmp_path)
    gpt2_state = gpt2_to_energy_state_dict(GPT2LMHeadModel(tiny_gpt2_config()).state_dict())
    gpt2_state.pop("lm_head.weight")  # Hub GPT-2 checkpoints do not store the tied head
    save_file(gpt2_state, tmp_path / "model.safetensors", metadata={"format": "pt"})

    loaded = EnergyGPTForCausalLM.from_pretrained(tmp_path)
    assert_all_finite(loaded)
    solver_state = solver_tensors(loaded)
    assert len(solver_state) == expected_solver_tensor_count(loaded)
    for name, tensor in solver_state.items():
        assert torch.equal(tensor, torch.full_like(tensor, 0.3 if name.endswith("momentum_beta") else 0.25)), name
    for name, tensor in gpt2_state.items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert torch.equal(loaded.lm_head.weight, gpt2_state["transformer.wte.weight"])


# ---------------------------------------------------------------------------------------------------------------------
# Outputs.
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", SOLVER_VARIANTS)
def test_hidden_states_and_attentions(variant):
    model = set_solver_params(build(**WIDE_INIT, **variant), lambda_scale=0.05)
    input_ids = torch.randint(0, PAD, (2, 6))
    with torch.no_grad():
        outputs = model(input_ids, output_hidden_states=True, output_attentions=True)
        embeddings = model.transformer.wte(input_ids) + model.transformer.wpe(torch.arange(6))
        last_hidden_state = model.transformer(input_ids).last_hidden_state
    n_layer, n_head = model.config.n_layer, model.config.n_head
    assert len(outputs.hidden_states) == n_layer + 1
    assert torch.equal(outputs.hidden_states[0], embeddings)
    assert torch.equal(outputs.hidden_states[-1], last_hidden_state)
    assert len(outputs.attentions) == n_layer
    for weights in outputs.attentions:
        assert weights.shape == (2, n_head, 6, 6)
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, n_head, 6))
        assert not weights.triu(1).any()  # causal


# ---------------------------------------------------------------------------------------------------------------------
# Configuration.
# ---------------------------------------------------------------------------------------------------------------------


def test_config_keeps_every_gpt2_field_and_default():
    gpt2_fields = GPT2Config().to_dict()
    ours = EnergyGPTConfig().to_dict()
    for name, value in gpt2_fields.items():
        if name not in ("model_type", "transformers_version"):
            assert ours[name] == value, name
    assert ours["model_type"] == "energy_gpt"

    converted = EnergyGPTConfig(**tiny_gpt2_config().to_dict())
    for name, value in tiny_gpt2_config().to_dict().items():
        if name not in ("model_type", "transformers_version"):
            assert getattr(converted, name) == value, name
    assert converted.to_dict()["model_type"] == "energy_gpt"
    assert (converted.attention_solver, converted.nag_lookahead, converted.learn_solver_params) == ("gd", "qkv", True)
    assert 0.0 <= converted.momentum_beta < 1.0


def test_config_attribute_map():
    config = tiny_config()
    assert (config.hidden_size, config.num_attention_heads, config.num_hidden_layers) == (32, 4, 3)
    assert config.max_position_embeddings == config.n_positions == 64
    config.hidden_size = 64
    assert config.n_embd == 64
    standard = EnergyGPTConfig(hidden_size=48, num_attention_heads=6, num_hidden_layers=2, max_position_embeddings=32)
    assert (standard.n_embd, standard.n_head, standard.n_layer, standard.n_positions) == (48, 6, 2, 32)


BAD_CONFIG_VALUES = [
    pytest.param({"attention_solver": "adam"}, "attention_solver", id="unknown-solver"),
    pytest.param({"momentum_beta": 1.0}, "momentum_beta", id="beta-one"),
    pytest.param({"momentum_beta": -0.1}, "momentum_beta", id="beta-negative"),
    pytest.param({"n_embd": 30}, "n_embd", id="n_embd-not-divisible-by-n_head"),
    pytest.param({"n_layer": -1}, "n_layer", id="negative-n_layer"),
    pytest.param({"vocab_size": -5}, "vocab_size", id="negative-vocab"),
    pytest.param({"n_head": 0}, "n_head", id="zero-heads"),
    pytest.param({"nag_lookahead": "keys"}, "nag_lookahead", id="bad-lookahead"),
    pytest.param({"newton_step_bound": -0.5}, "newton_step_bound", id="bad-step-bound"),
    pytest.param({"newton_lambda": float("nan")}, "newton_lambda", id="nan-lambda"),
]


@pytest.mark.parametrize(("overrides", "field"), BAD_CONFIG_VALUES)
def test_config_rejects_bad_values_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field) as error:
        tiny_config(**overrides)
    if field != "n_embd":
        assert repr(next(iter(overrides.values()))) in str(error.value)
    if field == "attention_solver":
        assert all(solver in str(error.value) for solver in SOLVERS)


@pytest.fixture
def saved_model_dir(tmp_path):
    build(attention_solver="momentum").save_pretrained(tmp_path)
    return tmp_path


def test_bad_overrides_in_from_pretrained_and_from_config(saved_model_dir):
    with pytest.raises(ValueError, match="attention_solver.*'bad'"):
        EnergyGPTForCausalLM.from_pretrained(saved_model_dir, attention_solver="bad")
    with pytest.raises(ValueError, match="attention_solver.*'bad'"):
        AutoModelForCausalLM.from_pretrained(saved_model_dir, attention_solver="bad")
    with pytest.raises(ValueError, match="momentum_beta.*1.5"):
        AutoConfig.from_pretrained(saved_model_dir, momentum_beta=1.5)
    with pytest.raises(ValueError, match="nag_lookahead"):
        AutoConfig.from_pretrained(saved_model_dir, nag_lookahead="kv")

    # A config changed after loading is checked again when a model is built from it.
    config = AutoConfig.from_pretrained(saved_model_dir)
    config.attention_solver = "bad"
    with pytest.raises(ValueError, match="attention_solver"):
        AutoModelForCausalLM.from_config(config)
    config.attention_solver = "momentum"
    config.momentum_beta = 1.5
    with pytest.raises(ValueError, match="momentum_beta"):
        AutoModelForCausalLM.from_config(config)
    config.momentum_beta = 0.5
    config.n_head = 5
    with pytest.raises(ValueError, match="n_embd"):
        AutoModelForCausalLM.from_config(config)


# ---------------------------------------------------------------------------------------------------------------------
# Auto classes and what `save_pretrained` writes.
# ---------------------------------------------------------------------------------------------------------------------


def test_auto_classes_are_registered():
    assert type(AutoConfig.for_model("energy_gpt")) is EnergyGPTConfig
    config = tiny_config()
    assert type(AutoModel.from_config(config)) is EnergyGPTModel
    assert type(AutoModelForCausalLM.from_config(config)) is EnergyGPTForCausalLM
    assert type(AutoModelForSequenceClassification.from_config(config)) is EnergyGPTForSequenceClassification


@pytest.mark.parametrize("cls", [EnergyGPTForCausalLM, EnergyGPTForSequenceClassification, EnergyGPTModel])
def test_save_pretrained_writes_auto_map_and_model_files(cls, tmp_path):
    import json

    build(cls, attention_solver="newton", pad_token_id=PAD).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "energy_gpt"
    assert saved["auto_map"] == ENERGY_GPT_AUTO_MAP and len(saved["auto_map"]) == 4
    for filename in ("configuration_energy_gpt.py", "modeling_energy_gpt.py", "solvers_energy_gpt.py"):
        assert (tmp_path / filename).is_file(), filename
    auto_class = {
        EnergyGPTForCausalLM: AutoModelForCausalLM,
        EnergyGPTForSequenceClassification: AutoModelForSequenceClassification,
        EnergyGPTModel: AutoModel,
    }[cls]
    assert type(auto_class.from_pretrained(tmp_path)) is cls


# ---------------------------------------------------------------------------------------------------------------------
# output_attentions: the weights of every rule on every backend.
# ---------------------------------------------------------------------------------------------------------------------

def attention_weight_families() -> dict[str, dict]:
    """Every registered energy, robust local energy and head solver (and a residual solver), as config overrides."""
    from energy_gpt.modeling.solvers_energy_gpt import ATTENTION_ENERGIES, ATTENTION_SOLVERS, HEAD, LOCAL_ENERGIES

    families = {"nag": {"attention_solver": "nag", "momentum_beta": 0.5}}
    families.update({f"energy={name}": {"attention_energy": name} for name in ATTENTION_ENERGIES})
    families.update({f"local={name}": {"local_energy": name} for name, rule in LOCAL_ENERGIES.items() if rule})
    families.update({name: {"attention_solver": name} for name, rule in ATTENTION_SOLVERS.items() if rule.kind == HEAD})
    return families


ATTENTION_WEIGHT_FAMILIES = attention_weight_families()


@pytest.mark.parametrize("family", sorted(ATTENTION_WEIGHT_FAMILIES))
def test_output_attentions_gives_the_same_weights_on_eager_and_sdpa(family):
    torch.manual_seed(0)
    model = EnergyGPTForCausalLM(tiny_config(**ATTENTION_WEIGHT_FAMILIES[family])).eval()
    input_ids, attention_mask = left_pad([torch.tensor([5, 17, 42, 9, 3, 60, 8]), torch.tensor([8, 1, 77, 23])], PAD)
    weights = {}
    for implementation in ATTENTION_IMPLEMENTATIONS:
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            attentions = model(input_ids, attention_mask=attention_mask, output_attentions=True).attentions
        assert len(attentions) == model.config.n_layer
        weights[implementation] = torch.stack(attentions)  # (layers, batch, heads, T, T)
    real_queries = attention_mask.bool()[None, :, None, :, None]
    real_keys = attention_mask.bool()[None, :, None, None, :]
    future = torch.ones(7, 7, dtype=torch.bool).triu(1)
    for implementation, stacked in weights.items():
        assert stacked.shape == (model.config.n_layer, 2, model.config.n_head, 7, 7), implementation
        at_real = stacked.masked_fill(~real_queries, 0.0)
        assert torch.all(at_real[..., future] == 0), f"{implementation}: weight on a later key"
        assert torch.all(at_real.masked_fill(real_keys, 0.0) == 0), f"{implementation}: weight on padding"
    torch.testing.assert_close(weights["sdpa"].masked_fill(~real_queries, 0.0),
                               weights["eager"].masked_fill(~real_queries, 0.0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", [name for name in sorted(ATTENTION_WEIGHT_FAMILIES) if "linear" not in name])
def test_output_attentions_in_cached_generation_match_across_backends(family):
    """With a cache, each step's weights cover the cached keys too (the rules that keep their own keys included)."""
    prompt = torch.tensor([[5, 17, 42, 9]])
    steps = {}
    for implementation in ATTENTION_IMPLEMENTATIONS:
        torch.manual_seed(0)
        model = EnergyGPTForCausalLM(tiny_config(**ATTENTION_WEIGHT_FAMILIES[family])).eval()
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            steps[implementation] = model.generate(prompt, max_new_tokens=3, do_sample=False, output_attentions=True,
                                                   return_dict_in_generate=True, pad_token_id=0).attentions
    assert [tuple(step[0].shape[-2:]) for step in steps["sdpa"]] == [(4, 4), (1, 5), (1, 6)]
    for sdpa_step, eager_step in zip(steps["sdpa"], steps["eager"], strict=True):
        torch.testing.assert_close(torch.stack(sdpa_step), torch.stack(eager_step), rtol=1e-5, atol=1e-6)


class _Attention(torch.nn.Module):
    scaling = 0.5


@pytest.mark.parametrize("energy, overrides", [
    ("linear", {"linear_feature_map": "elu_plus_one", "linear_normalization": "sum"}),
    ("linear", {"linear_feature_map": "identity", "linear_normalization": "none"}),
    ("linear", {"linear_feature_map": "identity", "linear_normalization": "length"}),
    ("gated_linear", {"gated_linear_gate": "data"}),
    ("gated_linear", {"gated_linear_gate": "constant", "linear_normalization": "length"}),
    ("gated_linear", {"linear_feature_map": "identity", "linear_normalization": "none"}),
])
def test_linear_energy_weights_times_values_are_the_head_output(energy, overrides):
    """The explicit matrix W of `output_attentions=True` is what the head applies: W @ v equals its output (causal,
    decays and normalisation included), with left padding."""
    from energy_gpt.modeling.solvers_energy_gpt import ATTENTION_ENERGIES

    config = tiny_config(attention_energy=energy, **overrides)
    torch.manual_seed(0)
    head = ATTENTION_ENERGIES[energy].rule(config, 0)
    with torch.no_grad():
        for parameter in head.parameters():
            parameter.add_(torch.randn_like(parameter))  # data-dependent gates that differ per token
    batch, heads, length, dim = 2, config.n_head, 9, config.n_embd // config.n_head
    query, key, value = (torch.randn(batch, heads, length, dim) for _ in range(3))
    key_padding_mask = torch.ones(batch, length, dtype=torch.bool)
    key_padding_mask[1, :3] = False
    attention = _Attention()
    output, _ = head(attention, query, key, value, None, key_padding_mask=key_padding_mask)
    weights = head.attention_weights(attention, query, key, value, None, key_padding_mask=key_padding_mask)
    assert weights.shape == (batch, heads, length, length)
    torch.testing.assert_close(torch.matmul(weights, value), output.transpose(1, 2), rtol=1e-4, atol=1e-5)
    assert torch.all(weights[..., torch.ones(length, length, dtype=torch.bool).triu(1)] == 0)
    assert torch.all(weights[1, :, :, :3] == 0)


def test_linear_energy_weights_over_cached_tokens_raise():
    model = EnergyGPTForCausalLM(tiny_config(attention_energy="linear")).eval()
    with torch.no_grad():
        cache = model(torch.tensor([[5, 17, 42]]), use_cache=True, output_attentions=True).past_key_values
        with pytest.raises(ValueError, match="`output_attentions=True`.*linear energies.*cached tokens"):
            model(torch.tensor([[9]]), past_key_values=cache, use_cache=True, output_attentions=True)
