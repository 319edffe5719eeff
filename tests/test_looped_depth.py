"""Looped depth: `num_loops` applies the block stack several times with shared weights, the momentum state
carried through the loops as through layers, the KV cache kept per (loop, layer). Checked against the same model
unrolled into `num_loops * n_layer` distinct layers holding copies of the shared weights."""

import pytest
import torch
from conftest import ATTENTION_IMPLEMENTATIONS, tiny_config

from energy_gpt import EnergyGPTForCausalLM

SOLVERS = ["gd", "momentum", "nag", "newton_light", "nag+newton"]


def looped_and_unrolled(solver: str, attn: str, loops: int = 2, layers: int = 2):
    settings = dict(attention_solver=solver, initializer_range=0.5, momentum_beta=0.6, newton_lambda=0.4)
    looped = EnergyGPTForCausalLM._from_config(
        tiny_config(n_layer=layers, num_loops=loops, **settings), attn_implementation=attn).eval()
    unrolled = EnergyGPTForCausalLM._from_config(
        tiny_config(n_layer=layers * loops, **settings), attn_implementation=attn).eval()
    shared = looped.state_dict()
    weights = {}
    for key in unrolled.state_dict():
        if ".h." in key:  # layer l of the unrolled model is layer l % n_layer of the looped one
            layer = int(key.split(".h.")[1].split(".")[0])
            key_in_loop = key.replace(f".h.{layer}.", f".h.{layer % layers}.")
            weights[key] = shared[key_in_loop]
        else:
            weights[key] = shared[key]
    unrolled.load_state_dict(weights)
    return looped, unrolled


@pytest.mark.parametrize("attn", ATTENTION_IMPLEMENTATIONS)
@pytest.mark.parametrize("solver", SOLVERS)
def test_looped_model_equals_unrolled_copies_and_caches_per_loop(solver, attn):
    looped, unrolled = looped_and_unrolled(solver, attn)
    # Momentum needs a beta at layer 0 too: in loop 2 a velocity arrives there from the last layer of loop 1.
    if solver in ("momentum", "nag"):
        assert hasattr(looped.transformer.h[0].residual_rule, "momentum_beta")
    input_ids = torch.randint(0, 100, (2, 10))
    with torch.no_grad():
        assert torch.equal(looped(input_ids).logits, unrolled(input_ids).logits)
        generated = looped.generate(input_ids[:, :4], max_new_tokens=8, do_sample=False, pad_token_id=100)
        sequence = input_ids[:, :4]
        for _ in range(8):  # a plain loop of full forwards, no cache
            next_token = looped(sequence, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, next_token], dim=1)
    assert torch.equal(generated, sequence)
    assert len(set(generated[:, 4:].flatten().tolist())) >= 3  # a continuation that can expose a broken cache


def test_one_loop_is_the_plain_model_and_dense_refuses_loops():
    model = EnergyGPTForCausalLM(tiny_config(num_loops=1)).eval()
    assert model.config.num_loops == 1
    with pytest.raises(ValueError, match="num_loops"):
        tiny_config(attention_solver="dense", num_loops=2)
    with pytest.raises(ValueError, match="`num_loops` must be a positive integer"):
        tiny_config(num_loops=0)
