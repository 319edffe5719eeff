"""Generation tests that a broken KV cache cannot pass.

The reference is a plain loop of full forwards: at every step the whole sequence runs through `model(ids,
use_cache=False)` and the argmax of the last logits is appended. `generate` (which feeds one token per step against the
cache) must produce exactly those tokens, for every solver variant, eager and sdpa, through left-padded batches, the
text-generation pipeline, a static cache, `EnergyGPTForCausalLM.from_pretrained` and a remote-code load in a process
where `energy_gpt` cannot be imported.

A tiny random model that repeats one token would hide a broken cache (a model that sees only the last token also
repeats it), so the weights are wide (`initializer_range=0.2`), the solver parameters non-zero, and every test asserts
that each continuation has at least `MIN_DISTINCT` distinct tokens.
"""

import functools

import pytest
import torch
from conftest import ATTENTION_IMPLEMENTATIONS, left_pad, run_without_energy_gpt, tiny_config
from test_modeling import WIDE_INIT, one_thread, set_solver_params  # noqa: F401 (autouse fixture)
from transformers import PreTrainedTokenizerFast, pipeline

from energy_gpt import EnergyGPTForCausalLM

PAD = 100  # never drawn for real tokens below (they come from [0, PAD))
NEW_TOKENS = 12
MIN_DISTINCT = 4
# The seed of the weights: chosen so that every variant's greedy continuations are varied (at least 5 distinct tokens
# in 12 for every prompt below; asserted in every test: seeds 0, 3, 4, 6 give a repeated token for some variant).
WEIGHT_SEED = 1
PROMPT_LENGTH = 5

# Every solver: residual rules, head rules, both NAG lookaheads, the momentum options, a composition and a per-layer
# schedule. (id -> config overrides; the solver parameters are set non-zero by `set_solver_params`.)
VARIANTS = {
    "gd": {"attention_solver": "gd"},
    "momentum": {"attention_solver": "momentum"},
    "momentum-ema-velocity-norm": {"attention_solver": "momentum", "momentum_form": "ema", "momentum_velocity_norm": True},
    "nag-qkv": {"attention_solver": "nag", "nag_lookahead": "qkv"},
    "nag-query": {"attention_solver": "nag", "nag_lookahead": "query"},
    "newton": {"attention_solver": "newton"},
    "newton_light": {"attention_solver": "newton_light"},
    "dense": {"attention_solver": "dense", "dense_init": 0.5},
    "nag+newton_light": {"attention_solver": "nag+newton_light"},
    "list-gd-momentum-nag": {"attention_solver": ["gd", "momentum", "nag"]},
}


def generation_model(variant: str, attn: str = "sdpa", **overrides) -> EnergyGPTForCausalLM:
    torch.manual_seed(WEIGHT_SEED)
    # No eos: every generation runs its full length, so the token ids compare position by position. An untied head:
    # with wide tied embeddings the tiny model's argmax collapses onto a few tokens for most seeds (the cache path does
    # not depend on tying; tied checkpoints are round-tripped in test_modeling.py).
    config = tiny_config(**WIDE_INIT, **VARIANTS[variant], tie_word_embeddings=False, bos_token_id=None,
                         eos_token_id=None, pad_token_id=PAD, **overrides)
    model = EnergyGPTForCausalLM._from_config(config, attn_implementation=attn).eval()
    return set_solver_params(model, lambda_scale=0.05)


@torch.no_grad()
def plain_loop(model, input_ids: torch.Tensor, new_tokens: int = NEW_TOKENS) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Greedy decoding by full recomputation: every step runs the whole sequence without a cache."""
    step_logits = []
    for _ in range(new_tokens):
        logits = model(input_ids, use_cache=False).logits[:, -1]
        step_logits.append(logits)
        input_ids = torch.cat([input_ids, logits.argmax(-1, keepdim=True)], dim=1)
    return input_ids, step_logits


def greedy(model, input_ids, attention_mask=None, **kwargs):
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    return model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                          pad_token_id=PAD, **kwargs)


def assert_varied(continuations: torch.Tensor) -> None:
    for row in continuations.reshape(-1, continuations.shape[-1]).tolist():
        assert len(set(row)) >= MIN_DISTINCT, f"degenerate continuation {row}: it would hide a broken cache"


@functools.cache
def reference_run(variant: str, attn: str):
    """(model, prompts, plain-loop tokens, plain-loop step logits), computed once per variant and attention."""
    model = generation_model(variant, attn)
    torch.manual_seed(1)
    prompts = torch.randint(0, PAD, (2, PROMPT_LENGTH))
    tokens, step_logits = plain_loop(model, prompts)
    assert_varied(tokens[:, PROMPT_LENGTH:])
    return model, prompts, tokens, step_logits


def count_input_lengths(model) -> list[int]:
    """Records the number of new tokens each forward of the base model receives."""
    lengths: list[int] = []
    model.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append((args[0] if args else kwargs["input_ids"]).shape[1]),
        with_kwargs=True,
    )
    return lengths


# ---------------------------------------------------------------------------------------------------------------------
# generate with the cache == the plain loop of full forwards.
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ATTENTION_IMPLEMENTATIONS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cached_generate_equals_plain_loop_of_full_forwards(variant, attn):
    model, prompts, expected, expected_logits = reference_run(variant, attn)
    model = generation_model(variant, attn)  # a fresh copy: the forward hook below stays on it
    lengths = count_input_lengths(model)
    output = greedy(model, prompts, output_logits=True, return_dict_in_generate=True)

    # The cache was really used: one prefill of the prompt, then one token per step.
    assert lengths == [PROMPT_LENGTH] + [1] * (NEW_TOKENS - 1), lengths
    assert torch.equal(output.sequences, expected), (output.sequences, expected)
    assert len(output.logits) == NEW_TOKENS
    for step, (logits, reference) in enumerate(zip(output.logits, expected_logits)):
        torch.testing.assert_close(logits, reference, atol=1e-5, rtol=0, msg=f"step {step}")


def test_a_broken_cache_fails_the_comparison():
    """The comparison above has teeth: a model that drops the cache `generate` hands it (the bug with
    transformers 5.24, where the cache arrived as `cache=` and was swallowed) generates other tokens."""
    _, prompts, expected, _ = reference_run("gd", "sdpa")
    model = generation_model("gd", "sdpa")
    forward = model.forward

    def forgetful_forward(*args, cache=None, past_key_values=None, attention_mask=None, **kwargs):
        return forward(*args, **kwargs)  # sees only the new token, as the model did then

    model.forward = forgetful_forward
    assert not torch.equal(greedy(model, prompts), expected)


def assert_left_padded_batch_equals_each_row_alone(model, **generate_kwargs) -> None:
    """Three prompts of different lengths, left-padded with PAD (never a real token) into one batch: each row's
    continuation equals the plain loop on its unpadded prompt alone."""
    torch.manual_seed(2)
    prompts = [torch.randint(0, PAD, (length,)) for length in (5, 8, 3)]
    batch_ids, batch_mask = left_pad(prompts, PAD)
    longest = batch_ids.shape[1]
    batched = greedy(model, batch_ids, batch_mask, **generate_kwargs)[:, longest:]
    for row, prompt in enumerate(prompts):
        alone = plain_loop(model, prompt.unsqueeze(0))[0][0, len(prompt):]
        assert_varied(alone)
        assert torch.equal(batched[row], alone), (row, batched[row], alone)


@pytest.mark.parametrize("attn", ATTENTION_IMPLEMENTATIONS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_left_padded_batch_equals_each_row_alone(variant, attn):
    assert_left_padded_batch_equals_each_row_alone(generation_model(variant, attn))


@pytest.mark.parametrize("attn", ATTENTION_IMPLEMENTATIONS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_static_cache_generation_equals_plain_loop(variant, attn):
    """`cache_implementation="static"`: keys live in fixed-size buffers (empty slots after the prompt) and SDPA's
    prefill mask is skipped (upper-left `is_causal`); Newton's second pass must read the same mask. Unpadded and
    left-padded."""
    model, prompts, expected, _ = reference_run(variant, attn)
    assert torch.equal(greedy(model, prompts, cache_implementation="static"), expected)
    assert_left_padded_batch_equals_each_row_alone(model, cache_implementation="static")


# ---------------------------------------------------------------------------------------------------------------------
# The text-generation pipeline, with a tiny tokenizer built here.
# ---------------------------------------------------------------------------------------------------------------------


def word_level_tokenizer() -> PreTrainedTokenizerFast:
    """Words `w0` .. `w98` are ids 0 .. 98, `<unk>` 99, `<pad>` 100 (= PAD): the tiny model's whole vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(PAD - 1)} | {"<unk>": PAD - 1, "<pad>": PAD}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", padding_side="left")


@pytest.mark.parametrize("variant", ["nag+newton_light", "dense", "list-gd-momentum-nag"])
def test_text_generation_pipeline_from_saved_model_and_tokenizer(variant, tmp_path):
    model = generation_model(variant)
    tokenizer = word_level_tokenizer()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    torch.manual_seed(4)
    prompts = [torch.randint(0, PAD - 1, (length,)) for length in (6, 3)]  # no <unk> / <pad> in the prompts
    texts = [" ".join(f"w{i}" for i in prompt.tolist()) for prompt in prompts]
    generator = pipeline("text-generation", model=str(tmp_path), device="cpu")
    assert type(generator.model) is EnergyGPTForCausalLM
    # Both prompts in one left-padded batch.
    outputs = generator(texts, batch_size=2, max_new_tokens=NEW_TOKENS, do_sample=False, return_tensors=True)
    for prompt, output in zip(prompts, outputs):
        expected = plain_loop(model, prompt.unsqueeze(0))[0][0]
        assert_varied(expected[len(prompt):])
        generated = output[0]["generated_token_ids"]  # batched: with the batch's left padding in front
        padding = len(generated) - len(expected)
        assert generated[:padding] == [PAD] * padding and generated[padding:] == expected.tolist()
    # Text out: the continuation's words (the pipeline joins prompt and continuation without a space for a tokenizer
    # without a decoder, so the continuation alone is compared).
    text = generator(texts[0], max_new_tokens=NEW_TOKENS, do_sample=False, return_full_text=False)[0]["generated_text"]
    continuation = plain_loop(model, prompts[0].unsqueeze(0))[0][0, len(prompts[0]):]
    assert text.split() == [tokenizer.convert_ids_to_tokens(i) for i in continuation.tolist()]


# ---------------------------------------------------------------------------------------------------------------------
# Saved checkpoints: in-process without the Auto classes, and through remote code in a clean process.
# ---------------------------------------------------------------------------------------------------------------------


def assert_solver_tensors_non_zero(model) -> None:
    """The round trips below are only meaningful with non-zero, non-default solver values."""
    rule_tensors = {name: tensor for name, tensor in model.state_dict().items() if "_rule." in name}
    if model.config.attention_solver != "gd":
        assert rule_tensors and all(tensor.ne(0).all() for tensor in rule_tensors.values()), rule_tensors


# Every variant with learned solver parameters; fixed ones (buffers, `learn_solver_params=False`) on two of them.
ROUND_TRIPS = [pytest.param(variant, True, id=f"{variant}-learned") for variant in VARIANTS] + [
    pytest.param(variant, False, id=f"{variant}-fixed") for variant in ("nag+newton_light", "dense")
]


@pytest.mark.parametrize(("variant", "learn"), ROUND_TRIPS)
def test_from_pretrained_without_auto_classes_is_bit_exact_and_generates_same_tokens(variant, learn, tmp_path):
    model = generation_model(variant, learn_solver_params=learn)
    assert_solver_tensors_non_zero(model)
    model.save_pretrained(tmp_path)
    loaded = EnergyGPTForCausalLM.from_pretrained(tmp_path).eval()
    original, reloaded = model.state_dict(), loaded.state_dict()
    assert original.keys() == reloaded.keys()
    for name, tensor in original.items():
        assert torch.equal(reloaded[name], tensor), name
        assert reloaded[name].dtype == tensor.dtype, name
    _, prompts, expected, _ = reference_run(variant, "sdpa")
    assert torch.equal(greedy(loaded, prompts), expected)


REMOTE_GENERATE = """
import sys
import torch
from transformers import AutoModelForCausalLM

expected = torch.load("expected.pt")
for variant, reference in expected.items():
    model = AutoModelForCausalLM.from_pretrained(variant, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    state = model.state_dict()
    assert state.keys() == reference["state_dict"].keys(), variant
    for name, tensor in reference["state_dict"].items():
        assert torch.equal(state[name], tensor) and state[name].dtype == tensor.dtype, (variant, name)
    prompts = reference["prompts"]
    tokens = model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False, **reference["generate"])
    assert torch.equal(tokens, reference["tokens"]), (variant, tokens, reference["tokens"])
    print("ok", variant)
assert not any(name.split(".")[0] in ("energy_gpt", "modeling") for name in sys.modules)
"""


def test_remote_code_generation_in_clean_process(tmp_path):
    """Every variant saved here, loaded with `trust_remote_code=True` in a process that cannot import `energy_gpt`
    (temporary HF_HOME: nothing is written into the user's cache): every tensor bit-exact, and cached greedy generation
    gives the in-process plain loop's tokens."""
    expected = {}
    for variant in VARIANTS:
        model, prompts, tokens, _ = reference_run(variant, "sdpa")
        assert_solver_tensors_non_zero(model)
        model.save_pretrained(tmp_path / variant)
        expected[variant] = {"state_dict": model.state_dict(), "prompts": prompts, "tokens": tokens,
                             "generate": {"max_new_tokens": NEW_TOKENS, "pad_token_id": PAD}}
    torch.save(expected, tmp_path / "expected.pt")

    result = run_without_energy_gpt(REMOTE_GENERATE, cwd=tmp_path, env_extra={"HF_HOME": str(tmp_path / "hf-home"),
                                                                           "OMP_NUM_THREADS": "1"})
    assert result.stdout.split() == [word for variant in VARIANTS for word in ("ok", variant)]
    assert (tmp_path / "hf-home" / "modules" / "transformers_modules").is_dir()  # the remote code went there
