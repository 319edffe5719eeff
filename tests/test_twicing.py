"""The `twicing` head rule: `o = A V + lambda_h (A V - A (A V))` per head, against a float64 loop with explicit T x T
attention matrices (eager and sdpa, left padding), GPT-2 at lambda = 0, cached generation against a loop of full
forwards, and save / load."""

import pytest
import torch
from conftest import ATTENTION_IMPLEMENTATIONS, tiny_config
from test_generation import PAD, assert_left_padded_batch_equals_each_row_alone, assert_varied, greedy, plain_loop
from test_modeling import one_thread  # noqa: F401 (autouse fixture)

from energy_gpt import EnergyGPTForCausalLM

# Per layer and head: twicing itself (1), plain attention (0), and values of both signs.
LAMBDAS = torch.tensor([[1.0, 0.0, -0.7, 2.5], [0.4, 1.0, 1.6, -0.3], [1.2, -1.0, 0.0, 0.8]])


def twicing_model(attn: str = "sdpa", lambdas: torch.Tensor | None = LAMBDAS, seed: int = 1, **overrides):
    torch.manual_seed(seed)
    config = tiny_config(attention_solver="twicing", initializer_range=0.2, tie_word_embeddings=False,
                         bos_token_id=None, eos_token_id=None, pad_token_id=PAD, **overrides)
    model = EnergyGPTForCausalLM._from_config(config, attn_implementation=attn).eval()
    if lambdas is not None:
        with torch.no_grad():
            for layer, block in enumerate(model.transformer.h):
                block.attn.head_rule.twicing_lambda.copy_(lambdas[layer])
    return model


def reference_heads(query, key, value, real, scaling, lambdas):
    """float64: A (T x T, causal, padded keys left out) as an explicit matrix per batch row and head, then
    `A V + lambda (A V - A A V)`, one token and anchor at a time."""
    batch, heads, length, _ = query.shape
    output = torch.zeros(batch, length, heads, value.shape[-1], dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            matrix = torch.zeros(length, length, dtype=torch.float64)
            for t in range(length):
                visible = [i for i in range(t + 1) if real[b, i]]
                scores = [float(query[b, h, t].double() @ key[b, h, i].double()) * scaling for i in visible]
                top = max(scores, default=0.0)
                weights = [torch.tensor(score - top, dtype=torch.float64).exp() for score in scores]
                for i, weight in zip(visible, weights):
                    matrix[t, i] = weight / sum(weights)
            once = matrix @ value[b, h].double()
            twice = matrix @ matrix @ value[b, h].double()
            output[b, :, h] = once + float(lambdas[h]) * (once - twice)
    return output


def assert_heads_match_reference(model, reference, per_layer) -> None:
    """Every layer's head-rule output, on a batch with a left-padded row, equals `reference(query, key, value, real,
    scaling, per_layer[layer])` (float64, (B, T, H, D)) at the real tokens; the inputs are the ones the rule got."""
    input_ids = torch.tensor([[5, 17, 3, 99, 42, 8, 1], [PAD, PAD, 7, 31, 90, 13, 55]])
    real = input_ids != PAD
    captured = []

    def capture(module, args, kwargs, output):
        captured.append((kwargs["query"], kwargs["key"], kwargs["value"], kwargs["scaling"], output[0]))

    handles = [block.attn.head_rule.register_forward_hook(capture, with_kwargs=True) for block in model.transformer.h]
    with torch.no_grad():
        model(input_ids, attention_mask=real.long(), use_cache=False)
    for handle in handles:
        handle.remove()
    assert len(captured) == model.config.n_layer
    for layer, (query, key, value, scaling, output) in enumerate(captured):
        expected = reference(query, key, value, real, scaling, per_layer[layer])
        torch.testing.assert_close(output[real].double(), expected[real], atol=2e-5, rtol=1e-5)


def assert_generation_matches_full_forwards(model) -> None:
    """Greedy `generate` with the cache equals a loop of full forwards (varied continuations), also for a left-padded
    batch against each row alone."""
    torch.manual_seed(3)
    prompts = torch.randint(0, PAD, (2, 5))
    expected, _ = plain_loop(model, prompts)
    assert_varied(expected[:, 5:])
    assert torch.equal(greedy(model, prompts), expected)
    assert_left_padded_batch_equals_each_row_alone(model)


@pytest.mark.parametrize("attn", ATTENTION_IMPLEMENTATIONS)
def test_heads_match_a_float64_reference_with_explicit_attention_matrices(attn):
    assert_heads_match_reference(twicing_model(attn), reference_heads, LAMBDAS)


@pytest.mark.parametrize("attn", ATTENTION_IMPLEMENTATIONS)
def test_lambda_zero_is_plain_attention_bit_for_bit(attn):
    twicing = twicing_model(attn, lambdas=torch.zeros(3, 4))
    plain = EnergyGPTForCausalLM._from_config(tiny_config(**{**twicing.config.to_diff_dict(), "attention_solver": "gd"}),
                                              attn_implementation=attn).eval()
    plain.load_state_dict(twicing.state_dict(), strict=False)
    input_ids = torch.tensor([[5, 17, 3, 99, 42, 8, 1], [PAD, PAD, 7, 31, 90, 13, 55]])
    attention_mask = (input_ids != PAD).long()
    with torch.no_grad():
        assert torch.equal(twicing(input_ids, attention_mask=attention_mask).logits,
                           plain(input_ids, attention_mask=attention_mask).logits)


def test_eager_returns_the_attention_matrix_and_the_declaration_is_read():
    model = twicing_model("eager")
    with torch.no_grad():
        attentions = model(torch.tensor([[5, 17, 3, 99]]), output_attentions=True).attentions
    assert len(attentions) == 3 and attentions[0].shape == (1, 4, 4, 4)
    torch.testing.assert_close(attentions[0].sum(-1), torch.ones(1, 4, 4))
    assert torch.equal(attentions[0].triu(1), torch.zeros_like(attentions[0]))
    assert model.config.twicing_lambda == 1.0  # the default: twicing exactly
    with pytest.raises(ValueError, match="twicing"):
        tiny_config(attention_solver="twicing", attention_energy="linear")


@pytest.mark.parametrize("attn", ATTENTION_IMPLEMENTATIONS)
def test_cached_generation_equals_a_loop_of_full_forwards(attn):
    model = twicing_model(attn)
    assert_generation_matches_full_forwards(model)
    prompts = torch.tensor([[5, 17, 3, 99, 42], [7, 31, 90, 13, 55]])
    beams = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=6, num_beams=3,
                           do_sample=False, pad_token_id=PAD)
    no_cache = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=6, num_beams=3,
                              do_sample=False, pad_token_id=PAD, use_cache=False)
    assert torch.equal(beams, no_cache)


def test_save_and_load_keep_lambda_and_outputs(tmp_path):
    model = twicing_model("eager")
    input_ids = torch.tensor([[5, 17, 3, 99, 42]])
    model.save_pretrained(tmp_path)
    loaded = EnergyGPTForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    for block in loaded.transformer.h:
        assert isinstance(block.attn.head_rule.twicing_lambda, torch.nn.Parameter)
    assert torch.equal(torch.stack([block.attn.head_rule.twicing_lambda for block in loaded.transformer.h]), LAMBDAS)
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, loaded(input_ids).logits)


def test_dropout_uses_one_attention_matrix_for_both_passes_and_trains_lambda():
    """With attention dropout, eager and sdpa compute the same function from the same random state, and lambda gets
    a gradient."""
    outputs = {}
    for attn in ATTENTION_IMPLEMENTATIONS:
        model = twicing_model(attn, attn_pdrop=0.3).train()
        torch.manual_seed(7)
        loss = model(torch.tensor([[5, 17, 3, 99, 42, 8]]), labels=torch.tensor([[5, 17, 3, 99, 42, 8]])).loss
        loss.backward()
        assert model.transformer.h[0].attn.head_rule.twicing_lambda.grad.abs().sum() > 0
        outputs[attn] = loss.detach()
    torch.testing.assert_close(outputs["eager"], outputs["sdpa"])


def test_a_static_cache_gets_a_clear_error():
    model = twicing_model("sdpa")
    prompts = torch.tensor([[5, 17, 3, 99, 42]])
    with pytest.raises(ValueError, match="twicing.*dynamic cache"):
        model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=3, do_sample=False,
                       pad_token_id=PAD, cache_implementation="static")
