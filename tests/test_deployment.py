"""Where users run the model: accelerate's device_map with CPU and disk offload, torch.compile with
fullgraph, no host sync per forward, Newton heads with attention dropout, and bf16 / fp16.

Every solver variant of `test_generation.VARIANTS` (non-zero solver parameters, wide weights) runs each check.
"""

import copy

import pytest
import torch
from energy_gpt.modeling.modeling_energy_gpt import EnergyGPTPreTrainedModel
from energy_gpt.modeling.solvers_energy_gpt import (
    attention_probabilities,
    bounded_lambda,
)
from test_generation import (
    PAD,
    VARIANTS,
    assert_varied,
    generation_model,
    greedy,
    plain_loop,
    reference_run,
)
from test_modeling import SOLVER_PARAM_SUFFIXES, one_thread  # noqa: F401 (autouse fixture)
from torch import nn
from transformers import DynamicCache

from energy_gpt import EnergyGPTForCausalLM

NEWTON_VARIANTS = ["newton", "newton_light", "nag+newton_light"]


def rule_parameter_names(model) -> list[str]:
    return [name for name, _ in model.named_parameters() if "_rule." in name]


# ---------------------------------------------------------------------------------------------------------------------
# accelerate: device_map with CPU and disk offload.
# ---------------------------------------------------------------------------------------------------------------------


def parameter_bytes(module: nn.Module) -> int:
    return sum(parameter.numel() * parameter.element_size() for parameter in module.parameters())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_device_map_auto_with_disk_offload_matches_in_memory_model(variant, tmp_path):
    """`device_map="auto"` with a CPU budget that holds the embeddings, the head and one block: accelerate puts the
    other blocks on disk (weights in `offload_folder`, parameters on meta, loaded by hooks at each forward). The solver
    parameters live in the rule modules, whose `forward` is called, so the hooks load them too."""
    model, prompts, expected, _ = reference_run(variant, "sdpa")
    model.save_pretrained(tmp_path / "model")
    transformer = model.transformer
    block, embeddings = parameter_bytes(transformer.h[0]), parameter_bytes(transformer.wte) + parameter_bytes(
        transformer.wpe
    )
    # accelerate keeps room for the largest layer on the main device: embeddings + head + 2.5 blocks leaves room for
    # exactly one block.
    budget = embeddings + parameter_bytes(model.lm_head) + int(2.5 * block)
    offloaded = EnergyGPTForCausalLM.from_pretrained(
        tmp_path / "model", device_map="auto", max_memory={"cpu": budget}, offload_folder=tmp_path / "offload"
    ).eval()
    placements = offloaded.hf_device_map
    assert {"cpu", "disk"} <= set(placements.values()), placements
    assert placements.get("transformer.h.2") == "disk", placements
    on_disk = [name for name, parameter in offloaded.named_parameters() if parameter.device.type == "meta"]
    assert any(name.startswith("transformer.h.2.") for name in on_disk)
    if variant != "gd":
        assert set(rule_parameter_names(model)) & set(on_disk)  # some solver parameters are offloaded

    input_ids = torch.randint(0, PAD, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(offloaded(input_ids).logits, model(input_ids).logits, atol=1e-6, rtol=0)
    assert torch.equal(greedy(offloaded, prompts), expected)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cpu_and_disk_offload_hooks_match_in_memory_model(variant, tmp_path):
    """CPU offload (weights kept in a RAM state dict, parameters on meta, moved to the execution device by hooks),
    plus disk offload for the last block.

    On a machine without an accelerator, accelerate takes "cpu" as the main device and offloads nothing to it (the
    `device_map="auto"` test above can only offload to disk). The trick: `dispatch_model(..., main_device=
    torch.device("cpu"))`. accelerate compares the main device with the *string* "cpu" to decide whether "cpu"
    entries are offloaded; a `torch.device` is never equal to that string, so "cpu" modules get the same offload hooks
    as on a GPU machine, with the CPU as execution device. `skip_keys` is what `from_pretrained` passes."""
    from accelerate import dispatch_model

    model, prompts, expected, _ = reference_run(variant, "sdpa")
    device_map = {"transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.drop": "cpu",
                  "transformer.h.0": "cpu", "transformer.h.1": "cpu", "transformer.h.2": "disk",
                  "transformer.ln_f": "cpu", "lm_head": "cpu"}
    offloaded = dispatch_model(copy.deepcopy(model), device_map=device_map, main_device=torch.device("cpu"),
                               offload_dir=tmp_path / "offload", skip_keys=model._skip_keys_device_placement)
    # Every parameter is offloaded: none is materialised between forwards.
    assert all(parameter.device.type == "meta" for parameter in offloaded.parameters())

    input_ids = torch.randint(0, PAD, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(offloaded(input_ids).logits, model(input_ids).logits, atol=1e-6, rtol=0)
    assert torch.equal(greedy(offloaded, prompts), expected)
    assert all(parameter.device.type == "meta" for parameter in offloaded.parameters())


# ---------------------------------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True) and no host sync per forward.
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def dynamo():
    """A clean dynamo state (no cache size limit reached from earlier tests, empty graph-break counter)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()


def loss_and_gradients(model, forward, input_ids):
    model.zero_grad(set_to_none=True)
    loss = forward(input_ids, labels=input_ids, use_cache=False).loss
    loss.backward()
    return loss.detach(), {name: parameter.grad.clone() for name, parameter in model.named_parameters()
                           if parameter.grad is not None}


def check_compiled_matches_eager(model, dynamo, backend: str) -> None:
    """Training step (loss and every gradient) and one decoding step against a `DynamicCache`, compiled with
    `fullgraph=True` (a graph break raises) vs eager, within 1e-5; the graph-break counter stays empty."""
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    input_ids = torch.randint(0, PAD, (2, 8))

    model.train()  # every dropout p is 0 in the tiny config: train mode is deterministic
    loss, gradients = loss_and_gradients(model, model, input_ids)
    compiled_loss, compiled_gradients = loss_and_gradients(model, compiled, input_ids)
    torch.testing.assert_close(compiled_loss, loss, atol=1e-5, rtol=0)
    assert compiled_gradients.keys() == gradients.keys()
    assert set(rule_parameter_names(model)) <= gradients.keys()
    for name, gradient in gradients.items():
        torch.testing.assert_close(compiled_gradients[name], gradient, atol=1e-5, rtol=0, msg=name)

    model.eval()
    with torch.no_grad():
        caches = DynamicCache(), DynamicCache()
        for cache in caches:  # the prompt, eagerly
            model(input_ids, cache=cache, use_cache=True)
        next_ids = torch.randint(0, PAD, (2, 1))
        logits = model(next_ids, cache=caches[0], use_cache=True).logits
        compiled_logits = compiled(next_ids, cache=caches[1], use_cache=True).logits
    torch.testing.assert_close(compiled_logits, logits, atol=1e-5, rtol=0)
    assert caches[1].get_seq_length() == caches[0].get_seq_length() == 9
    assert not dynamo["graph_break"], dict(dynamo["graph_break"])


# Graph breaks are a property of dynamo's tracing, independent of the backend that compiles the captured graph:
# backend="eager" finds every break that inductor would, at a fraction of the CPU time. Residual rules run the same
# code on every attention backend, so eager attention is compiled for the head rules that have their own eager path.
COMPILE_CASES = [pytest.param(variant, "sdpa", id=f"{variant}-sdpa") for variant in VARIANTS] + [
    pytest.param(variant, "eager", id=f"{variant}-eager") for variant in ("newton", "newton_light")
]


@pytest.mark.parametrize(("variant", "attn"), COMPILE_CASES)
def test_compile_fullgraph_training_and_decoding_step_match_eager(variant, attn, dynamo):
    check_compiled_matches_eager(generation_model(variant, attn), dynamo, backend="eager")


def test_compile_aot_autograd_traces_newton_chunked_backward(dynamo):
    """aot_eager also traces the backward graph: the sdpa Newton heads' hand-written `autograd.Function`."""
    check_compiled_matches_eager(generation_model("newton", "sdpa"), dynamo, backend="aot_eager")


@pytest.mark.parametrize("variant", ["nag+newton_light", "dense", "momentum-ema-velocity-norm"])
def test_compile_fullgraph_with_fixed_solver_params(variant, dynamo):
    """`learn_solver_params=False`: beta / lambda / alpha are buffers (an `.item()` on them would break the graph)."""
    model = generation_model(variant, learn_solver_params=False)
    fixed = [name for name, _ in model.named_buffers() if name.endswith(SOLVER_PARAM_SUFFIXES)]
    assert fixed and not set(fixed) & {name for name, _ in model.named_parameters()}
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    input_ids = torch.randint(0, PAD, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(compiled(input_ids).logits, model(input_ids).logits, atol=1e-5, rtol=0)
    assert not dynamo["graph_break"], dict(dynamo["graph_break"])


@pytest.mark.slow
def test_compile_with_inductor(dynamo):
    """The default backend (inductor) on one solver, forward only (compiling the backward too takes minutes here)."""
    model = generation_model("newton_light", "sdpa")
    compiled = torch.compile(model, fullgraph=True)
    input_ids = torch.randint(0, PAD, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(compiled(input_ids).logits, model(input_ids).logits, atol=1e-5, rtol=0)
    assert not dynamo["graph_break"], dict(dynamo["graph_break"])


def test_can_compile_fullgraph_says_so():
    assert EnergyGPTPreTrainedModel._can_compile_fullgraph is True
    assert EnergyGPTForCausalLM._can_compile_fullgraph is True


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_no_host_sync_per_forward(variant, attn):
    """A forward on the meta device has no values: any host read (`.item()`, `int()`, `bool()`, `.tolist()`, a
    data-dependent shape) raises. Prefill with a cache, a decoding step and a training step (forward and backward) all
    run there, so none reads a tensor on the host (on a GPU each such read is a device sync). The input-id range
    check only runs on CPU tensors, where it costs nothing."""
    model = generation_model(variant, attn).to("meta")
    input_ids = torch.zeros(2, 8, dtype=torch.long, device="meta")
    with torch.no_grad():
        cache = DynamicCache()
        model(input_ids, cache=cache, use_cache=True)
        logits = model(input_ids[:, :1], cache=cache, use_cache=True).logits
    assert logits.shape == (2, 1, model.config.vocab_size) and logits.device.type == "meta"
    model.train()
    model(input_ids, labels=input_ids, use_cache=False).loss.backward()


def test_id_range_check_runs_on_cpu_only():
    model = generation_model("gd")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(torch.tensor([[1, 2, model.config.vocab_size]]))
    # On any other device the ids are not read (a meta tensor has no values: reading one raises).
    bad = torch.tensor([[1, 2, model.config.vocab_size]]).to("meta")
    assert model.transformer._check_inputs(bad, None, None, 0) == (1, 3)


# ---------------------------------------------------------------------------------------------------------------------
# Newton heads with attention dropout.
# ---------------------------------------------------------------------------------------------------------------------


def dropout_models(variant: str, attn_pdrop: float) -> tuple[EnergyGPTForCausalLM, EnergyGPTForCausalLM]:
    eager = generation_model(variant, "eager", attn_pdrop=attn_pdrop).train()
    sdpa = generation_model(variant, "sdpa", attn_pdrop=attn_pdrop).train()
    sdpa.load_state_dict(eager.state_dict())
    return eager, sdpa


@pytest.mark.parametrize("variant", NEWTON_VARIANTS)
def test_newton_dropout_eager_and_sdpa_compute_the_same_function(variant):
    """With `attn_pdrop > 0` in training, one dropped-out distribution feeds mu and Sigma on every backend: from the
    same random state, eager and SDPA give identical outputs."""
    eager, sdpa = dropout_models(variant, attn_pdrop=0.3)
    input_ids = torch.randint(0, PAD, (2, 10))
    draws = []
    for seed in range(3):
        torch.manual_seed(seed)
        eager_logits = eager(input_ids).logits
        torch.manual_seed(seed)
        assert torch.equal(sdpa(input_ids).logits, eager_logits), seed
        draws.append(eager_logits.detach())
    with torch.no_grad():
        clean = eager.eval()(input_ids).logits
    assert (draws[0] - clean).abs().max() > 1e-2  # dropout really acts
    assert (draws[0] - draws[1]).abs().max() > 1e-2  # and differs between draws


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("variant", NEWTON_VARIANTS)
def test_newton_dropout_one_mask_for_mu_and_sigma_and_variances_non_negative(variant, attn):
    """Hooks on every Newton head rule save the random state before it runs, then redraw the same dropout mask from
    it and recompute the head's output by hand: p~ = dropout(softmax), mu = sum p~ v, s = sum p~, and
    `newton`: Sigma mu = sum p~ (v - mu)((v - mu) . mu);  `newton_light`: var = sum p~ (v - mu)^2.
    Checked: the model's output equals mu + lambda_eff * step from that single mask (so one distribution feeds both
    mu and Sigma), and the expanded variance the model computes, E_p~[v*v] - (2 - s) mu*mu, equals the centred
    form sum p~ (v - mu)^2 and is never below -1e-5 (relative to max mu*mu) before any clamp."""
    model = generation_model(variant, attn, attn_pdrop=0.5).train()
    checked = []

    def save_state(module, args, kwargs):
        module._rng_state = torch.get_rng_state()

    def recompute(module, args, kwargs, output):
        query, key, value, mask = (kwargs[name] for name in ("query", "key", "value", "attention_mask"))
        state_after = torch.get_rng_state()
        torch.set_rng_state(module._rng_state)
        probs = nn.functional.dropout(attention_probabilities(query, key, mask, kwargs["scaling"]), p=kwargs["dropout"])
        torch.set_rng_state(state_after)
        value = value.float()
        mean = probs @ value
        mass = probs.sum(-1, keepdim=True)
        centred = value.unsqueeze(2) - mean.unsqueeze(3)  # (batch, heads, q, k, d): v_i - mu_t
        if type(module).__name__ == "LightNewtonHeads":
            variance = (probs.unsqueeze(-1) * centred.square()).sum(3)
            expanded = probs @ value.square() - (2.0 - mass) * mean.square()
            torch.testing.assert_close(expanded, variance, atol=1e-5, rtol=1e-4)
            scale = mean.square().amax().clamp_min(1e-12)
            assert expanded.min() / scale >= -1e-5, expanded.min()
            step = variance * mean
        else:
            step = ((probs * (centred @ mean.unsqueeze(-1)).squeeze(-1)).unsqueeze(-1) * centred).sum(3)
        # (A query whose every key was dropped has mu = 0 and step = 0: any finite size gives its output, 0.)
        size = torch.linalg.vector_norm(step, dim=-1, keepdim=True) / torch.linalg.vector_norm(
            mean, dim=-1, keepdim=True
        ).clamp_min(1e-30)
        expected = mean + bounded_lambda(module.newton_lambda, size, module.step_bound) * step
        torch.testing.assert_close(output[0], expected.transpose(1, 2).to(output[0].dtype), atol=1e-5, rtol=1e-4)
        checked.append(type(module).__name__)

    for block in model.transformer.h:
        block.attn.head_rule.register_forward_pre_hook(save_state, with_kwargs=True)
        block.attn.head_rule.register_forward_hook(recompute, with_kwargs=True)
    input_ids = torch.randint(0, PAD, (2, 10))
    for seed in range(3):
        torch.manual_seed(seed)
        model(input_ids)
    assert len(checked) == 3 * model.config.n_layer


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_attention_dropout_is_unbiased_for_softmax_heads(attn):
    """Sanity check of where dropout acts (on the attention probabilities, rescaled by 1 / (1 - p)): for plain softmax
    heads the attention sublayer is linear in them, so its mean over many training-mode draws is the eval output."""
    model = generation_model("gd", attn, attn_pdrop=0.3)
    attention = model.transformer.h[0].attn
    length = 6
    hidden = torch.randn(1, length, model.config.n_embd)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    mask = causal if attn == "sdpa" else torch.zeros(length, length).masked_fill(~causal, torch.finfo(torch.float32).min)
    mask = mask[None, None]
    with torch.no_grad():
        clean = attention.eval()(hidden, attention_mask=mask)[0]
        attention.train()
        draws = torch.stack([attention(hidden, attention_mask=mask)[0] for _ in range(4000)])
    standard_error = draws.std(0) / draws.shape[0] ** 0.5
    assert (draws[0] - clean).abs().max() > 1e-3
    assert ((draws.mean(0) - clean).abs() <= 5 * standard_error + 1e-6).all()


# ---------------------------------------------------------------------------------------------------------------------
# bf16 and fp16.
# ---------------------------------------------------------------------------------------------------------------------

# Documented tolerance: max |logits_half - logits_fp32| / max |logits_fp32| on the tiny wide model. Measured about
# 1.5e-2 (bf16, 8 mantissa bits) and 2e-3 (fp16, 11 bits) for every solver.
HALF_TOLERANCE = {torch.bfloat16: 5e-2, torch.float16: 1e-2}


def assert_cache_matches_full_recomputation(model, prompts, tolerance: float) -> None:
    """Cached greedy generation in low precision == the plain loop of full forwards in the same precision, up to near
    ties: the cache and the full forward round differently (other matmul shapes), so two almost equal logits may swap.

    Checked: (1) teacher forcing, one full forward over the generated sequence gives every step's logits; the cached
    steps' logits are within `tolerance * max|logit|` of them, and every generated token is their argmax up to that
    margin; (2) the generated tokens equal the plain loop's, except after a step where the plain loop itself had a
    near tie (its two candidates within the margin)."""
    prompt_length = prompts.shape[1]
    output = greedy(model, prompts, output_logits=True, return_dict_in_generate=True)
    sequences, new_tokens = output.sequences, output.sequences[:, prompt_length:]
    assert_varied(new_tokens)
    with torch.no_grad():
        full = model(sequences, use_cache=False).logits[:, prompt_length - 1 : -1].float()
    margin = tolerance * full.abs().max()
    assert (torch.stack(output.logits, dim=1).float() - full).abs().max() <= margin
    assert (full.amax(-1) - full.gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1) <= margin).all()

    expected, expected_logits = plain_loop(model, prompts)
    for row in range(len(prompts)):
        differs = (sequences[row] != expected[row]).nonzero().flatten()
        if len(differs):
            step_logits = expected_logits[int(differs[0]) - prompt_length][row].float()
            assert step_logits.max() - step_logits[sequences[row, differs[0]]] <= margin, (row, int(differs[0]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_half_precision_forward_generation_and_training(variant, dtype):
    model = generation_model(variant)
    half = copy.deepcopy(model).to(dtype)
    input_ids = torch.randint(0, PAD, (2, 12))
    with torch.no_grad():
        reference, logits = model(input_ids).logits, half(input_ids).logits
    assert logits.dtype == dtype and torch.isfinite(logits).all()
    relative_error = (logits.float() - reference).abs().max() / reference.abs().max()
    assert relative_error <= HALF_TOLERANCE[dtype], relative_error

    assert_cache_matches_full_recomputation(half, input_ids[:, :5], HALF_TOLERANCE[dtype])

    # One training step: finite loss, finite gradients (solver parameters included), finite updated weights.
    half.train()
    loss = half(input_ids, labels=input_ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    gradients = {name: parameter.grad for name, parameter in half.named_parameters() if parameter.grad is not None}
    assert set(rule_parameter_names(half)) <= gradients.keys()
    assert all(torch.isfinite(gradient).all() for gradient in gradients.values())
    torch.optim.SGD(half.parameters(), lr=1e-2).step()
    assert all(torch.isfinite(parameter).all() for parameter in half.parameters())

