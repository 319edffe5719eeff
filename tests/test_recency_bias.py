"""The `softmax_decay` energy: softmax attention with a learned per-head recency bias `-slope_h (t - i)`, against a
float64 reference loop (eager and sdpa, left padding), its two initialisations, cached generation against a loop of
full forwards, save / load, and a clear error where the attention implementation cannot take a float mask."""

import math

import pytest
import torch
from conftest import ATTENTION_IMPLEMENTATIONS, tiny_config
from test_generation import PAD
from test_modeling import one_thread  # noqa: F401 (autouse fixture)
from test_twicing import assert_generation_matches_full_forwards, assert_heads_match_reference

from energy_gpt import EnergyGPTForCausalLM

SLOPES = torch.tensor([[0.5, 0.05, 0.0, 2.0], [0.2, 0.01, 1.0, 0.3], [0.1, 0.6, 0.02, 0.0]])


def decay_model(attn: str = "sdpa", slopes: torch.Tensor | None = SLOPES, seed: int = 1, **overrides):
    torch.manual_seed(seed)
    config = tiny_config(attention_energy="softmax_decay", initializer_range=0.2, tie_word_embeddings=False,
                         bos_token_id=None, eos_token_id=None, pad_token_id=PAD, **overrides)
    model = EnergyGPTForCausalLM._from_config(config, attn_implementation=attn).eval()
    if slopes is not None:
        with torch.no_grad():
            for layer, block in enumerate(model.transformer.h):
                # slope = -log sigmoid(a)  <=>  a = -log(expm1(slope)); slope 0 is the limit a -> +inf
                block.attn.head_rule.gate_logit.copy_(-torch.log(torch.expm1(slopes[layer].clamp(min=1e-30))))
    return model


def reference_heads(query, key, value, real, scaling, slopes):
    """float64, one token and anchor at a time: softmax_i(scaling q_t . k_i - slope_h (t - i)) over visible i."""
    batch, heads, length, _ = query.shape
    output = torch.zeros(batch, length, heads, value.shape[-1], dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            for t in range(length):
                visible = [i for i in range(t + 1) if real[b, i]]
                scores = [float(query[b, h, t].double() @ key[b, h, i].double()) * scaling - float(slopes[h]) * (t - i)
                          for i in visible]
                top = max(scores, default=0.0)
                weights = [math.exp(score - top) for score in scores]
                for i, weight in zip(visible, weights):
                    output[b, t, h] += weight / sum(weights) * value[b, h, i].double()
    return output


@pytest.mark.parametrize("attn", ATTENTION_IMPLEMENTATIONS)
def test_heads_match_a_float64_reference_loop(attn):
    assert_heads_match_reference(decay_model(attn), reference_heads, SLOPES)


def test_initial_slopes_are_retnet_decays_or_alibi_slopes():
    retnet = decay_model(slopes=None)
    for block in retnet.transformer.h:
        gammas = 1.0 - 2.0 ** -(5.0 + torch.arange(4, dtype=torch.float64))
        torch.testing.assert_close(block.attn.head_rule.recency_slopes().double(), -torch.log(gammas), rtol=1e-5,
                                   atol=0)
    alibi = decay_model(slopes=None, softmax_decay_init="alibi")
    expected = torch.tensor([2.0 ** (-8.0 * h / 4) for h in range(1, 5)], dtype=torch.float64)
    torch.testing.assert_close(alibi.transformer.h[0].attn.head_rule.recency_slopes().double(), expected, rtol=1e-5,
                               atol=0)
    with pytest.raises(ValueError, match="softmax_decay_init"):
        tiny_config(attention_energy="softmax_decay", softmax_decay_init="linear")


@pytest.mark.parametrize("attn", ATTENTION_IMPLEMENTATIONS)
def test_cached_generation_equals_a_loop_of_full_forwards(attn):
    assert_generation_matches_full_forwards(decay_model(attn))


def test_save_and_load_keep_the_slopes_and_outputs(tmp_path):
    model = decay_model("eager")
    input_ids = torch.tensor([[5, 17, 3, 99, 42]])
    model.save_pretrained(tmp_path)
    loaded = EnergyGPTForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    for original, block in zip(model.transformer.h, loaded.transformer.h):
        assert torch.equal(original.attn.head_rule.gate_logit, block.attn.head_rule.gate_logit)
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, loaded(input_ids).logits)


def test_slopes_train_and_unsupported_masks_get_a_clear_error():
    model = decay_model("sdpa").train()
    model(torch.tensor([[5, 17, 3, 99, 42]]), labels=torch.tensor([[5, 17, 3, 99, 42]])).loss.backward()
    assert model.transformer.h[0].attn.head_rule.gate_logit.grad.abs().sum() > 0
    rule, attention = model.transformer.h[0].attn.head_rule, model.transformer.h[0].attn
    states = torch.randn(1, 4, 3, 8)
    for mask in (torch.ones(1, 3, dtype=torch.long), object()):  # flash's 2D padding mask, flex's BlockMask
        with pytest.raises(ValueError, match="softmax_decay.*eager.*sdpa"):
            rule(attention=attention, query=states, key=states, value=states, attention_mask=mask,
                 attention_interface=None)
    with pytest.raises(ValueError, match="newton"):
        tiny_config(attention_energy="softmax_decay", attention_solver="newton")
