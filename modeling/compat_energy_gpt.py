"""Every difference between the transformers releases EnergyGPT runs on (5.0.0 to the newest), in one place.

The model files ship beside every checkpoint as remote code, so they meet whichever release the user has installed.
Each helper below names the releases each of its branches serves; the model files call the helpers and never test a
version themselves. Dropping an old release means deleting its branch here and nothing else.

Names every supported release spells the same way are imported directly where they are used, with no shim:
`transformers.configuration_utils.PreTrainedConfig` (5.0 already has it; `PretrainedConfig` is its alias),
`transformers.initialization` (5.0 on; its `copy_` / `normal_` skip tensors loaded from a checkpoint),
`create_causal_mask`, `DynamicCache` / `DynamicLayer`, `from_pretrained(key_mapping=...)` and
`save_pretrained(save_original_format=...)`.

One difference cannot live here: `set_attn_implementation` decides from the *model file's source text* whether a model
can switch backends at run time, so `modeling_energy_gpt.py` spells the backend lookup as transformers' models do
(`ALL_ATTENTION_FUNCTIONS.get_interface(...)`, which this module provides on 5.0 too).

One private attribute is read on purpose: `config._attn_implementation`, in the attention sublayer exactly as in
transformers' own models. It is how every transformers model reads the attention backend, and no 5.x release has a
public attribute for it (`model.set_attn_implementation` writes it; nothing public reads it).
"""

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import torch
from transformers.cache_utils import Cache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS as _TRANSFORMERS_ATTENTION_FUNCTIONS


# ---------------------------------------------------------------------------------------------------------------------
# The KV cache's name: `cache` from 5.24, `past_key_values` before.
# ---------------------------------------------------------------------------------------------------------------------

# Both names, for the lists transformers matches keyword arguments against (`keys_to_ignore_at_inference`,
# `_skip_keys_device_placement`): `cache` from 5.24, `past_key_values` before.
CACHE_ARGUMENT_NAMES = ("past_key_values", "cache")

# The output field holding the KV cache, which `generate` reads back: `cache` from 5.24, `past_key_values` before.
CACHE_OUTPUT_FIELD = (
    "cache" if "cache" in {field.name for field in dataclasses.fields(BaseModelOutputWithPast)} else "past_key_values"
)


def cache_argument(cache: Cache | None, past_key_values: Cache | None, kwargs: dict[str, Any]) -> Cache | None:
    """The KV cache a `forward` was given: `generate` passes `cache` from 5.24, `past_key_values` before.

    Also drops `cache_position` from `kwargs`: `generate` passes it up to 5.3 (from 5.4 only to a remote-code `forward`
    that names it, which EnergyGPT's does not); EnergyGPT takes positions from the cache length, as GPT-2.
    """
    kwargs.pop("cache_position", None)
    return cache if cache is not None else past_key_values


def output_with_cache(output_class: type, cache: Cache | None, **fields: Any):
    """A model output with the cache under the field name the running release reads back in `generate`."""
    return output_class(**fields, **{CACHE_OUTPUT_FIELD: cache})


def output_cache(outputs) -> Cache | None:
    """The cache of a model output built by `output_with_cache` (None when the forward kept none)."""
    return getattr(outputs, CACHE_OUTPUT_FIELD, None)


# ---------------------------------------------------------------------------------------------------------------------
# Masks and attention backends.
# ---------------------------------------------------------------------------------------------------------------------

_CAUSAL_MASK_PARAMETERS = inspect.signature(create_causal_mask).parameters


def causal_mask(
    config, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, cache: Cache | None,
    position_ids: torch.Tensor | None,
):
    """`create_causal_mask` under the running release's argument names: `inputs_embeds` from 5.2 (`input_embeds` in
    5.0 and 5.1); `cache` from 5.24 (`past_key_values` before); `cache_position` required up to 5.3, optional and
    unused in 5.4 to 5.8, gone from 5.9."""
    kwargs = {"config": config, "attention_mask": attention_mask, "position_ids": position_ids}
    kwargs["inputs_embeds" if "inputs_embeds" in _CAUSAL_MASK_PARAMETERS else "input_embeds"] = inputs_embeds
    kwargs["cache" if "cache" in _CAUSAL_MASK_PARAMETERS else "past_key_values"] = cache
    if "cache_position" in _CAUSAL_MASK_PARAMETERS:
        past_length = cache.get_seq_length() if cache is not None else 0
        kwargs["cache_position"] = torch.arange(
            past_length, past_length + inputs_embeds.shape[1], device=inputs_embeds.device
        )
    return create_causal_mask(**kwargs)


class _AttentionFunctionsWithInterface:
    """transformers 5.0's attention registry with the `get_interface(name, default)` method that 5.1 added (5.0 has no
    "eager" entry: the caller's own eager function is the default)."""

    def __init__(self, functions):
        self.functions = functions

    def get_interface(self, attn_implementation: str, default: Callable) -> Callable:
        return default if attn_implementation == "eager" else self.functions[attn_implementation]


# The attention backends by name, read with `ALL_ATTENTION_FUNCTIONS.get_interface(name, eager)`: transformers' own
# registry from 5.1; on 5.0 the same registry behind the method it lacks.
if hasattr(_TRANSFORMERS_ATTENTION_FUNCTIONS, "get_interface"):
    ALL_ATTENTION_FUNCTIONS = _TRANSFORMERS_ATTENTION_FUNCTIONS
else:  # 5.0
    ALL_ATTENTION_FUNCTIONS = _AttentionFunctionsWithInterface(_TRANSFORMERS_ATTENTION_FUNCTIONS)


# ---------------------------------------------------------------------------------------------------------------------
# Cache updates.
# ---------------------------------------------------------------------------------------------------------------------


def update_kv_cache(
    cache: Cache, key: torch.Tensor, value: torch.Tensor, layer_idx: int, cache_position: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`cache.update` with the new tokens' positions in its kwargs: static caches place the tokens by
    `cache_position` up to 5.3; from 5.4 they count the tokens themselves and ignore it (dynamic caches never read
    it)."""
    return cache.update(key, value, layer_idx, {"cache_position": cache_position})


def tokens_kept_by_crop(argument: int, seq_length: int) -> int:
    """How many of `seq_length` cached tokens a cache layer's `crop(argument)` keeps. Negative: remove that many (every
    release). Positive: the length to keep (up to 5.19; 5.20 on reject it, their callers pass negatives). Zero:
    remove nothing (5.14 on; earlier releases read it as "keep 0", which no generation path asks for)."""
    if argument > 0:
        return min(argument, seq_length)
    return max(seq_length + argument, 0)


__all__ = [
    "ALL_ATTENTION_FUNCTIONS",
    "CACHE_ARGUMENT_NAMES",
    "CACHE_OUTPUT_FIELD",
    "cache_argument",
    "causal_mask",
    "output_cache",
    "output_with_cache",
    "tokens_kept_by_crop",
    "update_kv_cache",
]
