"""A stand-in for a serving engine's Transformers backend (as vLLM's): an attention function registered with
`AttentionInterface` that ignores transformers' cache and keeps its own keys and values per `module.layer_idx`; the
model is called without a cache, with only the new tokens and their true positions. Every solver whose heads are one
attention call (gd, momentum, nag, dense) gives the model's own greedy tokens; every other head rule refuses with a
clear error instead of computing something else."""

import copy

import pytest
import torch
from conftest import tiny_config
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from energy_gpt import EnergyGPTForCausalLM
from energy_gpt.modeling.solvers_energy_gpt import ATTENTION_ENERGIES, ATTENTION_SOLVERS, LOCAL_ENERGIES, layer_rules

ENGINE_KV: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # the engine's own store, by layer


def engine_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Append the new keys and values to the engine's store of this layer and attend over all of them (causal, the
    queries being the last positions); transformers' mask is ignored, as an engine uses its own metadata."""
    if module.layer_idx in ENGINE_KV:
        past_key, past_value = ENGINE_KV[module.layer_idx]
        key, value = torch.cat([past_key, key], dim=2), torch.cat([past_value, value], dim=2)
    ENGINE_KV[module.layer_idx] = (key, value)
    q_len, kv_len = query.shape[2], key.shape[2]
    visible = torch.arange(kv_len) <= torch.arange(kv_len - q_len, kv_len)[:, None]
    output = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=visible, scale=scaling)
    return output.transpose(1, 2), None


AttentionInterface.register("stand_in_engine", engine_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register("stand_in_engine", sdpa_mask)

CELLS = {
    **{name: dict(attention_solver=name) for name in ATTENTION_SOLVERS},
    "nag+newton_light": dict(attention_solver="nag+newton_light"),
    **{f"energy {name}": dict(attention_energy=name) for name in ATTENTION_ENERGIES if name != "softmax"},
    **{f"local {name}": dict(local_energy=name) for name in LOCAL_ENERGIES if name != "elastic"},
}
NEW_TOKENS = 8


def engine_greedy(model, prompt: torch.Tensor) -> list[int]:
    """The engine's loop: prefill the prompt, then one token at a time, never a transformers cache."""
    ENGINE_KV.clear()
    tokens, new = prompt, prompt
    for _ in range(NEW_TOKENS):
        start = tokens.shape[1] - new.shape[1]
        positions = torch.arange(start, tokens.shape[1])[None]
        logits = model(new, position_ids=positions, use_cache=False).logits
        new = logits[:, -1:].argmax(-1)
        tokens = torch.cat([tokens, new], dim=1)
    return tokens[0, prompt.shape[1]:].tolist()


@pytest.mark.parametrize("cell", list(CELLS))
def test_engine_serves_single_call_rules_and_others_refuse(cell):
    config = tiny_config(**CELLS[cell], initializer_range=0.3, momentum_beta=0.6, dense_init=0.3)
    torch.manual_seed(0)
    reference = EnergyGPTForCausalLM._from_config(copy.deepcopy(config), attn_implementation="sdpa").eval()
    served = EnergyGPTForCausalLM._from_config(copy.deepcopy(config), attn_implementation="stand_in_engine").eval()
    served.load_state_dict(reference.state_dict())
    prompt = torch.randint(0, 100, (1, 7), generator=torch.Generator().manual_seed(3))
    servable = all(layer_rules(config, layer)[1].single_attention_call for layer in range(config.n_layer))
    with torch.no_grad():
        if not servable:
            with pytest.raises(ValueError, match="cannot be served by an engine that keeps the keys and values"):
                engine_greedy(served, prompt)
            return
        expected = reference.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS,
                                      do_sample=False)[0, prompt.shape[1]:].tolist()
        assert engine_greedy(served, prompt) == expected
    assert len(set(expected)) >= 3, expected  # a continuation that is not one repeated token


def test_the_servable_set_is_what_the_design_says():
    servable = {cell for cell, overrides in CELLS.items()
                if all(layer_rules(tiny_config(**overrides), layer)[1].single_attention_call for layer in range(3))}
    assert {"gd", "momentum", "nag", "dense"} <= servable
    assert not servable & {"newton", "newton_light", "nag+newton_light", "twicing", "energy linear",
                           "energy gated_linear", "local huber"}
