"""Attention through transformers' standard interface: a backend that plugs its own attention function in
(as vLLM's transformers backend does) serves every solver. gd / momentum / nag / dense only change the residual stream,
so every attention call goes through the registered function; the Newton heads take mu from it too (newton_light also
its second pass, with values v*v) and read the probabilities they need for Sigma themselves."""

import copy

import pytest
import torch
from conftest import tiny_config
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from energy_gpt import EnergyGPTForCausalLM, EnergyGPTPreTrainedModel

CALLS: list[tuple[int, ...]] = []


def counting_attention(module, query, key, value, attention_mask, **kwargs):
    CALLS.append(tuple(value.shape))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register("counting_sdpa", counting_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register("counting_sdpa", sdpa_mask)  # the mask its kernel expects, as documented

# solver -> attention-interface calls per layer and forward
CALLS_PER_LAYER = {"gd": 1, "momentum": 1, "nag": 1, "dense": 1, "newton": 1, "newton_light": 2, "nag+newton_light": 2}


def test_flags_say_what_the_model_supports():
    assert EnergyGPTPreTrainedModel._supports_attention_backend
    assert EnergyGPTPreTrainedModel._supports_sdpa and EnergyGPTPreTrainedModel._supports_flash_attn
    assert EnergyGPTPreTrainedModel._can_set_attn_implementation()


@pytest.mark.parametrize("solver", list(CALLS_PER_LAYER))
def test_custom_attention_function_serves_every_solver(solver):
    config = tiny_config(attention_solver=solver, initializer_range=0.2, momentum_beta=0.5, newton_lambda=0.5,
                         dense_init=0.3)
    torch.manual_seed(0)
    reference = EnergyGPTForCausalLM._from_config(copy.deepcopy(config), attn_implementation="sdpa").eval()
    model = EnergyGPTForCausalLM._from_config(copy.deepcopy(config), attn_implementation="counting_sdpa").eval()
    model.load_state_dict(reference.state_dict())
    assert model.config._attn_implementation == "counting_sdpa"
    input_ids = torch.randint(0, 100, (2, 9))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0
    CALLS.clear()
    with torch.no_grad():
        logits = model(input_ids, attention_mask=attention_mask).logits
        expected = reference(input_ids, attention_mask=attention_mask).logits
    assert len(CALLS) == CALLS_PER_LAYER[solver] * config.n_layer
    assert torch.equal(logits, expected)
    # The backend can be switched on a built model too.
    reference.set_attn_implementation("counting_sdpa")
    CALLS.clear()
    with torch.no_grad():
        assert torch.equal(reference(input_ids, attention_mask=attention_mask).logits, expected)
    assert len(CALLS) == CALLS_PER_LAYER[solver] * config.n_layer


def test_newton_names_what_it_needs_with_a_block_mask():
    from energy_gpt.modeling.solvers_energy_gpt import attention_probabilities

    class BlockMaskLike:  # flex attention hands the heads a BlockMask, not a tensor
        pass

    query = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="Newton head rules need the attention probabilities.*sdpa"):
        attention_probabilities(query, query, BlockMaskLike(), 0.1)
