"""Every decoding strategy of `generate` with the cache equals the same strategy without it (`use_cache=False`, which
recomputes the whole sequence at every step), on every solver x energy x loops variant.

The cache is one transformers `Cache` holding every per-layer decoding state at slot `loop * n_layer + layer`: keys and
values, or a linear energy's recurrent state. Decoding strategies act on it through the cache's own operations (beam
search's `reorder_cache`, assisted decoding's `crop`, `batch_select_indices` / `batch_repeat_interleave`), so a state
kept anywhere else would be missed by them: the comparisons below fail then (`test_*_has_teeth`).

Greedy decoding and beam search run on every variant; sampling, assisted decoding (prompt lookup and a draft model), a
static cache and the cache operations called directly run on a representative subset. Strategies that cannot apply
raise a clear error: cropping a recurrent state, a static cache with looped depth or a linear energy.
"""

import functools

import pytest
import torch
from conftest import left_pad, tiny_config
from transformers.cache_utils import Cache, DynamicCache, QuantizedCache

from energy_gpt import EnergyGPTForCausalLM

PAD = 100  # never a real token below (they come from [0, PAD))
NEW_TOKENS = 6
MIN_DISTINCT = 3
N_LAYER = 2
# Wide, untied weights: tiny random models fall into repeating one token, which would hide a broken cache (a model
# that sees only the last token repeats it too). Seed and width chosen so that every variant's greedy continuations
# have at least MIN_DISTINCT distinct tokens (asserted below; the other seeds tried, 0 to 5 at initializer_range 0.2,
# 0.5 and 1.0, repeat a token in some linear-energy or looped variant).
WEIGHT_SEED = 4
INITIALIZER_RANGE = 1.0
SAMPLING_SEED = 5

SOLVERS = ["gd", "momentum", "nag", "dense", "newton", "newton_light", "nag+newton_light"]
ENERGIES = {
    "softmax": {},
    "linear": {"attention_energy": "linear"},
    "gated_linear": {"attention_energy": "gated_linear"},
    # delta = 8 (default 1): these wide weights put queries and keys 15 to 30 apart, and every attention weight is
    # scaled by min(1, delta / ||q - k||), so at delta = 1 the attention is too weak for a broken cache to show.
    "huber": {"local_energy": "huber", "huber_delta": 8.0},
}
NEWTON_SOLVERS = ("newton", "newton_light", "nag+newton_light")
LINEAR_ENERGIES = ("linear", "gated_linear")


def is_valid(solver: str, energy: str, loops: int) -> bool:
    """The Newton steps exist for the softmax energy only; `dense` keeps one weight per earlier layer, so no loops."""
    return (energy == "softmax" or solver not in NEWTON_SOLVERS) and (loops == 1 or solver != "dense")


VARIANTS = [
    f"{solver}-{energy}-loops{loops}"
    for solver in SOLVERS
    for energy in ENERGIES
    for loops in (1, 2)
    if is_valid(solver, energy, loops)
]
# One of each kind of state for the slower strategies: residual rules (velocity, lookahead, dense history), the Newton
# heads, a KV cache and a recurrent state, with and without loops.
SUBSET = [
    "gd-softmax-loops2",
    "momentum-huber-loops2",
    "nag-linear-loops2",
    "momentum-gated_linear-loops1",
    "dense-huber-loops1",
    "newton-softmax-loops2",
    "nag+newton_light-softmax-loops1",
]
KV_SUBSET = [variant for variant in SUBSET if variant.split("-")[1] not in LINEAR_ENERGIES]
RECURRENT_SUBSET = [variant for variant in SUBSET if variant.split("-")[1] in LINEAR_ENERGIES]


def parse(variant: str) -> tuple[str, str, int]:
    solver, energy, loops = variant.split("-")
    return solver, energy, int(loops.removeprefix("loops"))


@functools.cache
def model_for(variant: str) -> EnergyGPTForCausalLM:
    """A tiny model with wide weights (varied continuations) and non-zero solver parameters, built once per variant."""
    solver, energy, loops = parse(variant)
    torch.manual_seed(WEIGHT_SEED)
    config = tiny_config(
        n_layer=N_LAYER, n_embd=32, num_loops=loops, attention_solver=solver, initializer_range=INITIALIZER_RANGE,
        momentum_beta=0.6, newton_lambda=0.4, dense_init=0.5, tie_word_embeddings=False, bos_token_id=None,
        eos_token_id=None, pad_token_id=PAD, **ENERGIES[energy],
    )
    return EnergyGPTForCausalLM(config).eval()


@functools.cache
def draft_model() -> EnergyGPTForCausalLM:
    """The assistant of assisted decoding: another tiny EnergyGPT with the same vocabulary and other weights."""
    torch.manual_seed(WEIGHT_SEED + 1)
    config = tiny_config(n_layer=1, n_embd=32, initializer_range=INITIALIZER_RANGE, tie_word_embeddings=False,
                         bos_token_id=None, eos_token_id=None, pad_token_id=PAD)
    return EnergyGPTForCausalLM(config).eval()


def left_padded_prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Three prompts of different lengths, left-padded with PAD into one batch, and their attention mask."""
    generator = torch.Generator().manual_seed(1)
    return left_pad([torch.randint(0, PAD, (length,), generator=generator) for length in (5, 3, 7)], PAD)


# Prompts that repeat themselves, so prompt-lookup decoding finds n-grams to propose (one per row: assisted decoding
# takes a batch of one).
REPEATING_PROMPTS = [[7, 8, 9, 7, 8, 9, 7, 8], [31, 4, 31, 4, 31], [60, 61, 62, 63, 60, 61]]

STRATEGIES = {
    "greedy": {"do_sample": False},
    "beam": {"do_sample": False, "num_beams": 4, "num_return_sequences": 2},
    "sampling": {"do_sample": True, "num_return_sequences": 2, "top_k": 0},
}


def generate(model, input_ids, attention_mask=None, seed: int | None = None, **kwargs) -> torch.Tensor:
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        return model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=NEW_TOKENS, pad_token_id=PAD,
                              **kwargs)


@functools.cache
def reference(variant: str, strategy: str) -> torch.Tensor:
    """The strategy without a cache, on the left-padded batch (computed once per variant and strategy)."""
    input_ids, attention_mask = left_padded_prompts()
    seed = SAMPLING_SEED if strategy == "sampling" else None
    return generate(model_for(variant), input_ids, attention_mask, seed, use_cache=False, **STRATEGIES[strategy])


def with_cache(variant: str, strategy: str, **kwargs) -> torch.Tensor:
    input_ids, attention_mask = left_padded_prompts()
    seed = SAMPLING_SEED if strategy == "sampling" else None
    return generate(model_for(variant), input_ids, attention_mask, seed, **STRATEGIES[strategy], **kwargs)


def assert_varied(sequences: torch.Tensor, prompt_length: int) -> None:
    for row in sequences[:, prompt_length:].tolist():
        assert len(set(row)) >= MIN_DISTINCT, f"degenerate continuation {row}: it would hide a broken cache"


@functools.cache
def greedy_alone(variant: str, prompt: tuple[int, ...]) -> torch.Tensor:
    """Plain greedy decoding without a cache of one unpadded prompt."""
    return generate(model_for(variant), torch.tensor([prompt]), use_cache=False, do_sample=False)


# ---------------------------------------------------------------------------------------------------------------------
# Every variant: greedy decoding and beam search.
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_and_beam_search_with_cache_equal_without(variant):
    prompt_length = left_padded_prompts()[0].shape[1]
    expected = reference(variant, "greedy")
    assert_varied(expected, prompt_length)
    assert torch.equal(with_cache(variant, "greedy"), expected)

    expected = reference(variant, "beam")
    assert expected.shape[0] == 3 * 2  # two returned sequences per prompt
    assert torch.equal(with_cache(variant, "beam"), expected), (with_cache(variant, "beam"), expected)


def reorder_first_loop_only(cache: Cache, beam_idx: torch.LongTensor) -> None:
    """The reorder of a cache whose later loops live outside its layers: beam search moves only loop 0's states."""
    for layer in cache.layers[:N_LAYER]:
        layer.reorder_cache(beam_idx)


@pytest.mark.parametrize("variant", ["momentum-softmax-loops2", "nag-huber-loops2", "gd-linear-loops2"])
def test_beam_search_comparison_has_teeth(variant, monkeypatch):
    """Beam search with loops generates other sequences when the later loops' states miss `reorder_cache`."""
    expected = reference(variant, "beam")
    monkeypatch.setattr(Cache, "reorder_cache", reorder_first_loop_only)
    assert not torch.equal(with_cache(variant, "beam"), expected)


# ---------------------------------------------------------------------------------------------------------------------
# The subset: sampling, assisted decoding, a static cache, the cache operations called directly.
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", SUBSET)
def test_sampling_with_cache_equals_without_from_the_same_seed(variant):
    expected = reference(variant, "sampling")
    assert_varied(expected, left_padded_prompts()[0].shape[1])
    assert torch.equal(with_cache(variant, "sampling"), expected)


def record_new_token_counts(model) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    """The number of new tokens each forward of the base model receives."""
    counts: list[int] = []
    handle = model.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: counts.append((args[0] if args else kwargs["input_ids"]).shape[1]),
        with_kwargs=True,
    )
    return counts, handle


ASSISTANTS = {
    # An eos id, which transformers 5.0's prompt lookup requires: PAD, which none of these continuations contains.
    "prompt_lookup": lambda: {"prompt_lookup_num_tokens": 3, "eos_token_id": PAD},
    "draft_model": lambda: {"assistant_model": draft_model()},
}


@pytest.mark.parametrize("assistant", list(ASSISTANTS))
@pytest.mark.parametrize("variant", KV_SUBSET)
def test_assisted_decoding_equals_greedy_without_cache(variant, assistant):
    """Candidates proposed by prompt lookup or a draft model, verified in one forward, the rejected ones cropped from
    the cache: the tokens of plain greedy decoding without a cache."""
    model = model_for(variant)
    verified_several = False
    for prompt in REPEATING_PROMPTS:
        expected = greedy_alone(variant, tuple(prompt))
        assert_varied(expected, len(prompt))
        assert PAD not in expected[0, len(prompt):]  # the eos id of prompt lookup
        counts, handle = record_new_token_counts(model)
        try:
            output = generate(model, torch.tensor([prompt]), do_sample=False, **ASSISTANTS[assistant]())
        finally:
            handle.remove()
        assert torch.equal(output, expected), (prompt, output, expected)
        verified_several |= any(count > 1 for count in counts[1:])
    assert verified_several  # candidates were really verified (and the rejected ones cropped)


def crop_first_loop_only(cache: Cache, tokens: int) -> None:
    """The crop of a cache whose later loops live outside its layers: rejected candidates stay in loop 1."""
    for layer in cache.layers[:N_LAYER]:
        layer.crop(tokens)


def test_assisted_decoding_comparison_has_teeth(monkeypatch):
    """With loops, prompt-lookup decoding generates other tokens when the later loops' states miss `crop`."""
    variant = "gd-softmax-loops2"
    expected = [greedy_alone(variant, tuple(prompt)) for prompt in REPEATING_PROMPTS]
    monkeypatch.setattr(Cache, "crop", crop_first_loop_only)
    outputs = [generate(model_for(variant), torch.tensor([prompt]), do_sample=False, **ASSISTANTS["prompt_lookup"]())
               for prompt in REPEATING_PROMPTS]
    assert not all(torch.equal(output, reference) for output, reference in zip(outputs, expected))


@pytest.mark.parametrize("assistant", list(ASSISTANTS))
@pytest.mark.parametrize("variant", RECURRENT_SUBSET)
def test_assisted_decoding_refuses_a_recurrent_state(variant, assistant):
    """A linear energy's state cannot forget the rejected candidates. transformers >= 5.24 refuses a cache that is not
    croppable after the prefill; earlier releases call `crop`, which raises."""
    with pytest.raises(ValueError, match="crop"):
        for prompt in REPEATING_PROMPTS:
            generate(model_for(variant), torch.tensor([prompt]), do_sample=False, **ASSISTANTS[assistant]())


@pytest.mark.parametrize("variant", SUBSET)
def test_static_cache_equals_no_cache_or_refuses_loops_and_recurrent_states(variant):
    _, energy, loops = parse(variant)
    if energy in LINEAR_ENERGIES:
        with pytest.raises(ValueError, match=r"recurrent state and need a dynamic cache .* StaticCache"):
            with_cache(variant, "greedy", cache_implementation="static")
    elif loops > 1:
        with pytest.raises(ValueError, match=r"`num_loops` > 1 every loop keeps its own cache layers .* StaticCache"):
            with_cache(variant, "greedy", cache_implementation="static")
    else:
        assert torch.equal(with_cache(variant, "greedy", cache_implementation="static"), reference(variant, "greedy"))


def test_quantized_cache_refuses_loops():
    """A quantized cache builds its `n_layer` layers with its own settings, so it cannot hold the later loops: a clear
    error. (Checked with the fp8 backend, which needs no extra package, where the running transformers has it.)"""
    try:
        QuantizedCache(backend="fp8", config=model_for("gd-softmax-loops2").config)
    except ValueError:
        pytest.skip("this transformers release has no fp8 backend for QuantizedCache")
    with pytest.raises(ValueError, match=r"`num_loops` > 1 every loop keeps its own cache layers .* QuantizedCache"):
        with_cache("gd-softmax-loops2", "greedy", cache_implementation="quantized", cache_config={"backend": "fp8"})


def next_token_logits(model, input_ids: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
    """The last position's logits; `cache` (if given) is read and updated in place, as `generate` does."""
    with torch.no_grad():
        return model(input_ids, cache=cache, use_cache=cache is not None).logits[:, -1]


def prefilled_cache(model, input_ids: torch.Tensor) -> Cache:
    """The cache `generate` builds (`DynamicCache(config=...)`: `n_layer` layers up front), after a prefill."""
    cache = DynamicCache(config=model.config)
    next_token_logits(model, input_ids, cache)
    return cache


@pytest.mark.parametrize("variant", SUBSET)
def test_cache_operations_reach_every_loop_and_state(variant):
    """After a prefill of four rows, each batch operation of the cache, then one more token: the logits of a prefill
    of the rows it selects (the whole sequence recomputed). Crop (where the states allow it), then one token: the
    same. The cache is the one `generate` builds, sized for `n_layer` layers before the first forward."""
    model = model_for(variant)
    _, energy, loops = parse(variant)
    generator = torch.Generator().manual_seed(2)
    prompts = torch.randint(0, PAD, (4, 6), generator=generator)
    next_tokens = torch.randint(0, PAD, (4, 1), generator=generator)
    operations = {
        "reorder_cache": (torch.tensor([2, 0, 3, 1]), lambda cache, rows: cache.reorder_cache(rows)),
        "batch_select_indices": (torch.tensor([3, 1]), lambda cache, rows: cache.batch_select_indices(rows)),
        "batch_repeat_interleave": (torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]),
                                    lambda cache, rows: cache.batch_repeat_interleave(2)),
    }
    for name, (rows, operation) in operations.items():
        cache = prefilled_cache(model, prompts)
        assert len(cache.layers) == loops * N_LAYER  # every (loop, layer) state in the one cache
        operation(cache, rows)
        logits = next_token_logits(model, next_tokens[rows], cache)
        expected = next_token_logits(model, torch.cat([prompts, next_tokens], dim=1)[rows])
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-5, msg=name)

    cache = prefilled_cache(model, torch.cat([prompts, next_tokens], dim=1))
    if energy in LINEAR_ENERGIES:
        with pytest.raises(ValueError, match="recurrent state, which cannot drop tokens"):
            cache.crop(-1)
        return
    cache.crop(-1)  # forget the last token, then feed another one in its place
    other_tokens = (next_tokens + 1) % PAD
    logits = next_token_logits(model, other_tokens, cache)
    expected = next_token_logits(model, torch.cat([prompts, other_tokens], dim=1))
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-5, msg="crop")
