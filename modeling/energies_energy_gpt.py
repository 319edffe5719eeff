"""The energy axis of EnergyGPT: head rules for the linear, gated linear and robust (Huber) attention energies.

DESIGN.md sections 1 and 5, per head, for a query state z (projected: q) and causal anchors (untied: keys k_i, values
v_i), i <= t:

| energy | local energy | global energy F | one GD step (untied), what the head returns |
|---|---|---|---|
| `linear` | `e_i = -z . v_i` | `-1/2 sum_i e_i^2` | `o_t = sum_i (q_t . k_i) v_i` |
| `gated_linear` | as `linear` | `-1/2 sum_i w_ti e_i^2`, `w_ti = prod_{j=i+1..t} g_j` | `o_t = sum_i w_ti (q_t . k_i) v_i` |
| `huber` (local) | `rho_delta(||z - v_i||)` | `-T log sum_i exp(-E_i / T)` | `o_t = sum_i p_ti c_ti v_i` (see `HuberHeads`) |

These are *the paper's variants as specified in this project's DESIGN notes* (arXiv 2511.00907; its body was not
available), not a claim of matching the authors' numbers. Newton is undefined for the linear energies: their `F` is
concave (`Hess F = -sum_i w_ti v_i v_i^T`), so a Newton step would climb towards the maximum (and the Hessian is
singular while t < head_dim). See docs/energies.md for the energy x optimiser grid.

Each class is a *head rule* (the interface of `solvers_energy_gpt.py`): `forward(attention, query, key, value,
attention_mask, *, cache=None, cache_index=None, key_padding_mask=None, **kwargs) -> (output (B, Tq, H, D), weights or
None)`, with query / key / value in (B, H, T, D). The linear rules (declared `uses_kv_cache=False`) keep a recurrent
state of fixed size per layer and head in the generation cache (`EnergyStateLayer`); `huber` reads the usual KV cache.

Every energy is declared once, with `Solver(...)` at the end of this file, exactly as the solvers are: its config fields
(`SolverField`: name, default, check, doc), its checks across fields (`check_config`) and its parameters
(`SolverParameter`: name, shape, initialiser, per head or not), created by `add_solver_parameters` and initialised by
the model's `_init_weights`.

This file ships beside checkpoints as remote code: only `torch` / `transformers` imports at load time; the optional
flash-linear-attention kernels (`fla`) are imported lazily, on CUDA only, and their absence (or failure) never breaks
loading.
"""

import functools
import math
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import DynamicLayer

from .compat_energy_gpt import tokens_kept_by_crop
from .solvers_energy_gpt import (
    ATTENTION_ENERGIES,
    HEAD,
    LOCAL_ENERGIES,
    Solver,
    SolverField,
    SolverParameter,
    add_solver_parameters,
    check_choice,
    check_positive,
    keys_visible_without_mask,
    register_solver,
    softmax_attention_weights,
)

# --------------------------------------------------------------------------------------------------------------------
# Config fields: name, default, check, doc. The registry turns them into `EnergyGPTConfig` attributes.
# --------------------------------------------------------------------------------------------------------------------


LINEAR_FEATURE_MAPS = ("identity", "elu_plus_one")
LINEAR_NORMALIZATIONS = ("none", "sum", "length")
GATED_LINEAR_GATES = ("data", "constant")

LINEAR_FEATURE_MAP = SolverField(
    name="linear_feature_map",
    default="elu_plus_one",
    check=check_choice("linear_feature_map", LINEAR_FEATURE_MAPS),
    doc="Feature map phi on queries and keys of the linear energies: `identity` (the energy as derived) or "
        "`elu_plus_one` (phi(x) = elu(x) + 1 > 0, Katharopoulos et al. 2020; a departure from the energy; default, "
        "with `linear_normalization='sum'`: see docs/energies.md).",
)
LINEAR_NORMALIZATION = SolverField(
    name="linear_normalization",
    default="sum",
    check=check_choice("linear_normalization", LINEAR_NORMALIZATIONS),
    doc="Normalisation of the linear energies' output: `none` (the energy as derived; grows with t), `sum` (divide "
        "by sum_i w_ti phi(q_t).phi(k_i) + eps; needs `linear_feature_map='elu_plus_one'`) or `length` (divide by the "
        "total weight sum_i w_ti of the tokens seen, = t for `linear`). Default `sum`: see docs/energies.md.",
)
GATED_LINEAR_GATE = SolverField(
    name="gated_linear_gate",
    default="data",
    check=check_choice("gated_linear_gate", GATED_LINEAR_GATES),
    doc="Decay gate of `gated_linear`: `data` (GLA-style, g_t = sigmoid(k_t . w_h + b_h)^(1/gate_temperature) per "
        "head, from the head's key) or `constant` (RetNet-style, a learned g_h = sigmoid(a_h) per head).",
)
GATED_LINEAR_GATE_TEMPERATURE = SolverField(
    name="gated_linear_gate_temperature",
    default=16.0,
    check=check_positive("gated_linear_gate_temperature"),
    doc="Temperature tau of the data-dependent gate, log g_t = logsigmoid(k_t . w_h + b_h) / tau (GLA uses 16): a "
        "larger tau keeps the gates closer to 1 (longer memory). Unused by the constant gate.",
)
HUBER_DELTA = SolverField(
    name="huber_delta",
    default=1.0,
    check=check_positive("huber_delta"),
    doc="Threshold delta of the Huber local energy rho_delta (`local_energy='huber'`): quadratic (elastic) for "
        "||q - k_i|| <= delta, linear beyond. delta -> infinity gives back the elastic energy.",
)

# Gated linear: the initial per-head decays are RetNet's multi-scale gammas, gamma_h = 1 - 2^(-5 - h).
RETNET_DECAY_EXPONENT_OFFSET = 5.0
# Chunk length of the parallel form (tokens per chunk): the intra-chunk work is O(T * chunk * D), the state updates
# O(T / chunk * D^2) per head, so about head_dim is a good value. A pure speed knob: outputs match up to rounding.
LINEAR_CHUNK_SIZE = 64
# Added to the `sum` normaliser (sum_i w_ti phi(q_t).phi(k_i) > 0 with positive features) so a row without any real
# token (left padding) gives 0 instead of 0 / 0.
LINEAR_NORMALIZATION_EPS = 1e-6
# Set to "1" to keep the PyTorch path on CUDA even when flash-linear-attention is installed (for comparisons).
DISABLE_FLA_ENV = "ENERGY_GPT_DISABLE_FLA"


def retnet_decays(num_heads: int) -> torch.Tensor:
    """RetNet's per-head decays gamma_h = 1 - 2^(-5 - h), h = 0 .. num_heads - 1 (memories of ~32 .. 2^(4 + H) tokens)."""
    exponents = RETNET_DECAY_EXPONENT_OFFSET + torch.arange(num_heads, dtype=torch.float64)
    return 1.0 - torch.pow(2.0, -exponents)


# --------------------------------------------------------------------------------------------------------------------
# Linear attention kernels: o_t = sum_{i<=t} (prod_{j=i+1..t} g_j) (q_t . k_i) v_i  (+ the carried-in state).
# All tensors (B, H, T, D); `log_gate` (B, H, T) holds log g_t <= 0 (None: g = 1, plain linear attention).
# --------------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _strictly_upper(length: int, device: torch.device) -> torch.Tensor:
    """(length, length) bool mask of the pairs i > t (key after query) inside a chunk."""
    with torch.inference_mode(False):  # a normal tensor even if first built under inference mode
        return torch.ones(length, length, dtype=torch.bool, device=device).triu(1)


def chunked_linear_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    log_gate: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    chunk_size: int = LINEAR_CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked parallel form (the PyTorch path and the reference for the kernels).

    Within a chunk the (L x L) masked products `(q k^T) * decay` act on the values; across chunks the running state
    `S = sum_i (decay to the chunk end) k_i v_i^T` (B, H, Dk, Dv) carries the past: `o_t += exp(b_t) q_t S`. Gates are
    handled in log space: `b_t` is the cumulative sum of log g inside the chunk, and every decay is `exp(b_t - b_i)`
    with `i <= t` (masked to -inf before the exp), so no factor exceeds 1 and nothing overflows. Memory is linear in T
    (no T x T tensor); each chunk's intermediates are O(L^2 + L D) per head.

    Returns `(output (B, H, T, Dv), final state (B, H, Dk, Dv))`.
    """
    batch, heads, length, key_dim = query.shape
    state = initial_state
    if state is None:
        state = query.new_zeros(batch, heads, key_dim, value.shape[-1])
    outputs = []
    for start in range(0, length, chunk_size):
        end = min(start + chunk_size, length)
        q, k, v = query[:, :, start:end], key[:, :, start:end], value[:, :, start:end]
        future = _strictly_upper(end - start, query.device)
        scores = torch.matmul(q, k.transpose(-1, -2))
        if log_gate is None:
            output = torch.matmul(scores.masked_fill(future, 0.0), v) + torch.matmul(q, state)
            state = state + torch.matmul(k.transpose(-1, -2), v)
        else:
            cumulative = log_gate[:, :, start:end].cumsum(-1)  # b_t = sum_{j <= t in chunk} log g_j
            decay = (cumulative[..., :, None] - cumulative[..., None, :]).masked_fill(future, -math.inf).exp()
            output = torch.matmul(scores * decay, v) + torch.matmul(q * cumulative.exp()[..., None], state)
            to_chunk_end = cumulative[..., -1:] - cumulative  # log prod_{j=i+1..L} g_j
            state = state * cumulative[..., -1:, None].exp() + torch.matmul(
                (k * to_chunk_end.exp()[..., None]).transpose(-1, -2), v
            )
        outputs.append(output)
    return torch.cat(outputs, dim=2), state


def recurrent_linear_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    log_gate: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Recurrent form, one token at a time: `S_t = g_t S_{t-1} + k_t v_t^T`, `o_t = q_t S_t`. O(Dk Dv) work and memory
    per token and head, whatever the context length: this is the generation path (Tq = 1)."""
    batch, heads, length, key_dim = query.shape
    state = initial_state
    if state is None:
        state = query.new_zeros(batch, heads, key_dim, value.shape[-1])
    outputs = []
    for t in range(length):
        if log_gate is not None:
            state = state * log_gate[:, :, t, None, None].exp()
        state = state + key[:, :, t, :, None] * value[:, :, t, None, :]
        outputs.append(torch.matmul(query[:, :, t, None, :], state))
    return torch.cat(outputs, dim=2), state


@functools.cache
def _load_fla_kernel() -> Callable | None:
    """flash-linear-attention's chunked kernel for scalar (per-head) gates, or None when it is not usable.

    `chunk_simple_gla(q, k, v, g, scale, initial_state, output_final_state)` with (B, T, H, D) tensors and `g` (B, T, H)
    log gates covers both energies (g = 0 for `linear`); it is what `fla.ops.linear_attn.chunk_linear_attn` calls
    internally. (`fla.ops.gla.chunk_gla` takes per-channel gates (B, T, H, Dk) and would need the gate expanded.)
    """
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception:  # noqa: BLE001 - an optional accelerator must never stop the model from loading or running
        return None
    return chunk_simple_gla


def fla_linear_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    log_gate: torch.Tensor | None,
    initial_state: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunked form on flash-linear-attention's Triton kernels (CUDA only).

    NOT TESTED in this repository's suite (no GPU there): `chunked_linear_attention` is the reference it must match,
    and `benchmarks/energies.py` / a GPU session should compare both. Inputs as `chunked_linear_attention`.
    """
    kernel = _load_fla_kernel()
    if log_gate is None:  # g = 1 (plain linear attention); zeros rather than None: older fla releases need a tensor
        log_gate = query.new_zeros(query.shape[:3])
    state = None if initial_state is None else initial_state.float().contiguous()
    # fla's layout is (B, T, H, D) and (B, T, H) for the gates; queries are already scaled (scale=1).
    output, final_state = kernel(
        *(tensor.transpose(1, 2).contiguous() for tensor in (query, key, value, log_gate)),
        scale=1.0, initial_state=state, output_final_state=True,
    )
    return output.transpose(1, 2), final_state


def use_fla(query: torch.Tensor) -> bool:
    """flash-linear-attention runs the chunked form when the tensors are on CUDA, `fla` imports, and the environment
    variable `ENERGY_GPT_DISABLE_FLA` is not "1"."""
    return query.is_cuda and os.environ.get(DISABLE_FLA_ENV) != "1" and _load_fla_kernel() is not None


def linear_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    log_gate: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    chunk_size: int = LINEAR_CHUNK_SIZE,
    path: str = "torch",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch: one new token -> recurrent step; otherwise the chunked form (with `path="fla"`, flash-linear-attention
    where `use_fla` allows it; PyTorch otherwise)."""
    if query.shape[2] == 1:
        return recurrent_linear_attention(query, key, value, log_gate, initial_state)
    if path == "fla" and use_fla(query):
        return fla_linear_attention(query, key, value, log_gate, initial_state)
    return chunked_linear_attention(query, key, value, log_gate, initial_state, chunk_size)


# --------------------------------------------------------------------------------------------------------------------
# Per-layer decoding state in the generation cache: keys and values, or a linear energy's recurrent state.
# --------------------------------------------------------------------------------------------------------------------


class EnergyStateLayer(DynamicLayer):
    """The cache layer of a linear-energy attention layer: a recurrent state of fixed size instead of keys and values.

    Mechanism (version-tolerant across transformers 5.x, no `LinearAttentionLayer` needed): `generate()` gives the
    model a `DynamicCache` whose `layers` is a list of `DynamicLayer`. On first use, `energy_state_layer(cache, index)`
    swaps the still-empty `DynamicLayer` at `cache.layers[index]` (the slot `cache_layer` gives it) for this subclass.
    It stores its tensors in `self.states` (a dict of tensors whose first dim is the batch: the (B, H, Dk, Dv) state
    `S` and, for `linear_normalization='length'`, the (B, H, 1, 1) total weight) and counts the tokens seen, so
    `cache.get_seq_length()` and the causal-mask sizes stay right at zero memory per token. `keys` / `values` stay
    empty.

    Because the state lives in a cache layer, the cache's own batch operations apply to it: beam search's
    `reorder_cache`, `batch_select_indices` and `batch_repeat_interleave` (so beam search and `num_return_sequences`
    work), `reset`, `offload` / `prefetch`. Limitations, each with a clear error: a recurrent state cannot forget tokens,
    so `crop` (assisted / speculative decoding, prompt-lookup decoding, any cache rollback) raises; static, sliding,
    quantized or offloaded-static caches raise in `energy_state_layer`. A cache is not saved with the model (nothing
    to save/load beyond the weights); the class ships as remote code with the model.
    """

    is_energy_state_layer = True  # duck-typed marker: a remote-code copy of this module defines another class object
    is_sliding = False
    is_croppable = False
    is_compileable = False
    supports_early_init = False

    def __init__(self):
        super().__init__()
        self.states: dict[str, torch.Tensor] = {}
        self.seen_tokens = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.keys = key_states.new_empty(0)
        self.values = value_states.new_empty(0)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        raise RuntimeError(
            "This cache layer holds a linear energy's recurrent state (`attention_energy` linear / gated_linear): it "
            "stores no keys and values, so `cache.update` must not be called for it."
        )

    def store(self, states: dict[str, torch.Tensor], num_new_tokens: int) -> None:
        """Keep the states after `num_new_tokens` more tokens (padding included, like the KV cache's length)."""
        first = next(iter(states.values()))
        if not self.is_initialized:
            self.lazy_initialization(first, first)
        self.states = states
        self.seen_tokens += num_new_tokens

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def reset(self) -> None:
        self.states = {}
        self.seen_tokens = 0
        self.keys = self.values = None
        self.is_initialized = False

    def _map_states(self, function: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.states = {name: function(tensor) for name, tensor in self.states.items()}

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_states(lambda tensor: tensor.index_select(0, beam_idx.to(tensor.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_states(lambda tensor: tensor[indices, ...])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_states(lambda tensor: tensor.repeat_interleave(repeats, dim=0))

    def offload(self) -> None:
        self._map_states(lambda tensor: tensor.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        if self.is_initialized:
            self._map_states(lambda tensor: tensor.to(self.device, non_blocking=True))

    def crop(self, max_length: int) -> None:
        if tokens_kept_by_crop(max_length, self.seen_tokens) >= self.seen_tokens:
            return
        raise ValueError(
            "The linear energies (`attention_energy` linear / gated_linear) keep a recurrent state, which cannot drop "
            "tokens: cropping the cache (assisted / speculative / prompt-lookup decoding) is not supported with them."
        )


def cache_layer(cache: Any, index: int) -> Any:
    """The layer at slot `index` of the generation cache, growing a dynamic cache to hold it.

    The one cache object `generate` (or the caller) passes holds every per-layer decoding state of the model: layer `i`
    of loop `l` sits at slot `l * n_layer + i` (looped depth), as keys and values (the layer class the cache was built
    with) or as a linear energy's recurrent state (`EnergyStateLayer`). Being layers of that cache, they all follow
    its operations: beam search's `reorder_cache`, `crop`, `batch_select_indices` / `batch_repeat_interleave`, `reset`,
    offloading.

    `generate` builds `DynamicCache(config=...)`, which creates `n_layer` layers up front and does not grow in `update`
    (only a cache built without a config does), so the slots of later loops are appended here as `DynamicLayer`s.
    Other caches cannot take more layers than they were built with (a static cache is sized for `n_layer` layers, a
    quantized one builds its layers with its own settings): a clear error.
    """
    layers = getattr(cache, "layers", None)
    if not isinstance(layers, list):
        raise TypeError(
            f"EnergyGPT keeps its decoding state in a transformers `Cache` (a list of cache layers); got a "
            f"{type(cache).__name__}."
        )
    if index >= len(layers):
        layer_class = getattr(cache, "layer_class_to_replicate", None)  # a cache built without a config grows itself
        if layer_class is None and all(
            type(layer) is DynamicLayer or getattr(layer, "is_energy_state_layer", False) for layer in layers
        ):
            layer_class = DynamicLayer
        if layer_class is None:
            raise ValueError(
                f"The cache has no slot {index}: with `num_loops` > 1 every loop keeps its own cache layers (slot "
                f"`loop * n_layer + layer`), more than the {len(layers)} layers this {type(cache).__name__} (of "
                f"{type(layers[-1]).__name__}s) was built with, and only a dynamic cache of `DynamicLayer`s grows to "
                "hold them. With `num_loops` > 1, use `cache_implementation='dynamic'` (the default) or a "
                "`DynamicCache`."
            )
        while len(layers) <= index:
            layers.append(layer_class())
    return layers[index]


def energy_state_layer(cache: Any, cache_index: int) -> EnergyStateLayer:
    """The `EnergyStateLayer` at slot `cache_index` of the cache (`cache_layer`), swapped in for the empty
    `DynamicLayer` there on first use."""
    if cache_index is None:
        raise ValueError("Linear energies keep their recurrent state at a slot of the cache; `cache_index` is None.")
    layer = cache_layer(cache, cache_index)
    if getattr(layer, "is_energy_state_layer", False):
        return layer
    if type(layer) is not DynamicLayer or layer.get_seq_length() > 0:
        raise ValueError(
            f"The linear energies (`attention_energy` linear / gated_linear) keep a recurrent state and need a "
            f"dynamic cache (`cache_implementation='dynamic'`), got a {type(cache).__name__} whose "
            f"layer {cache_index} is a {type(layer).__name__}"
            f"{' that already holds keys and values' if type(layer) is DynamicLayer else ''}. Static, sliding-window "
            "and quantized caches are not supported."
        )
    cache.layers[cache_index] = layer = EnergyStateLayer()
    return layer


# --------------------------------------------------------------------------------------------------------------------
# Head rules.
# --------------------------------------------------------------------------------------------------------------------


def _real_tokens(key_padding_mask: torch.Tensor | None, num_new: int) -> torch.Tensor | None:
    """(B, 1, num_new) float, 1.0 for the new tokens that are real, from the (B, S_total) padding mask."""
    if key_padding_mask is None:
        return None
    if key_padding_mask.shape[-1] < num_new:
        raise ValueError(
            f"`key_padding_mask` covers {key_padding_mask.shape[-1]} tokens, fewer than the {num_new} new ones."
        )
    return key_padding_mask[:, None, -num_new:].to(torch.float32)


class LinearHeads(nn.Module):
    """`linear` energy: causal unnormalised linear attention, `o_t = sum_{i<=t} (q_t . k_i) v_i` per head.

    One GD step on `F(z) = -1/2 sum_i (z . v_i)^2` (DESIGN.md section 5), untied. Queries are scaled by the attention's
    `scaling` (head_dim^-0.5 with GPT-2's `scale_attn_weights`), which W_Q absorbs: no departure from the energy.
    Named departures (config fields, see docs/energies.md for the measurements behind the defaults):
      * `linear_feature_map`: `identity` (the energy) or `elu_plus_one` (positive features phi(x) = elu(x) + 1);
      * `linear_normalization`: `none` (the energy; the sum grows with t), `sum` (divide by
        `sum_i w_ti phi(q_t).phi(k_i) + eps`, needs positive features) or `length` (divide by the total weight of the
        tokens seen, `sum_i w_ti` = t here).
    Defaults `elu_plus_one` + `sum` (the linear transformer of Katharopoulos et al. 2020): the output is a convex
    combination of the values, like softmax attention's, so its scale does not grow with t; it trained best on the
    embedded LIS task, where the exact energy (`identity` + `none`) trained worse with 15x larger gradient spikes.
    `identity` + `none` gives the energy exactly.
    Padding (`key_padding_mask`, False = pad) contributes nothing: padded keys are zeroed and not counted (and padded
    positions do not decay the gated state). The 4D `attention_mask` is not read: causality is built in. There are no
    attention probabilities, so the attention-dropout `dropout` kwarg does not apply, and the weights returned are None;
    `attention_weights` forms the equivalent (B, H, T, T) matrix explicitly for `output_attentions=True`.

    Training / prefill: chunked parallel form (`chunked_linear_attention`, or flash-linear-attention on CUDA), memory
    linear in T. Generation: the recurrent state `S` (B, H, D, D) per layer in the cache (`EnergyStateLayer`), O(1)
    work and memory per new token. Computed in fp32 (the state accumulates over the whole context); output in the input
    dtype.
    """

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.feature_map = config.linear_feature_map
        self.normalization = config.linear_normalization
        self.chunk_size = LINEAR_CHUNK_SIZE
        self.path = config.linear_attention_path  # opt-in flash-linear-attention: see the field

    def log_gates(self, key: torch.Tensor) -> torch.Tensor | None:
        """(B, H, T) log g_t <= 0 for the new tokens, or None (no decay)."""
        return None

    def _features(self, states: torch.Tensor) -> torch.Tensor:
        if self.feature_map == "elu_plus_one":
            return nn.functional.elu(states) + 1.0
        return states

    def _features_and_gates(self, query, key, key_padding_mask, scaling: float):
        """fp32 `phi(q * scaling)`, `phi(k)` with padded keys zeroed, the log gates (1 on padding: a padded position
        neither adds nor decays) and the (B, 1, Tq) real-token mask (None without padding)."""
        q = self._features(query.float() * scaling)
        k = self._features(key.float())
        log_gate = self.log_gates(key)
        real = _real_tokens(key_padding_mask, query.shape[2])
        if real is not None:
            k = k * real[..., None]
            if log_gate is not None:
                log_gate = log_gate * real
        return q, k, log_gate, real

    def attention_weights(self, attention, query, key, value, attention_mask, *, cache=None, cache_index=None,
                          key_padding_mask=None, scaling: float | None = None, **kwargs) -> torch.Tensor:
        """The (B, H, Tq, Tq) matrix W the head applied in its last call (`output_attentions=True`): the output is
        `W @ v`, with `W_ti = decay_ti phi(q_t).phi(k_i) / normaliser_t` for i <= t (0 after t and at padded keys),
        decays and normalisation as in `forward`. Formed explicitly (T x T memory). The recurrent state keeps no keys,
        so a call that continued cached tokens has no such matrix over them: that raises."""
        num_new = query.shape[2]
        if cache is not None and energy_state_layer(cache, cache_index).get_seq_length() > num_new:
            raise ValueError(
                "`output_attentions=True` cannot give the weights of the linear energies (`attention_energy` linear / "
                "gated_linear) over cached tokens: their cache is a recurrent state, not the past keys. Run the whole "
                "sequence in one forward (e.g. `use_cache=False`) to get them."
            )
        scaling = attention.scaling if scaling is None else scaling
        q, k, log_gate, real = self._features_and_gates(query, key, key_padding_mask, scaling)
        hidden = _strictly_upper(num_new, query.device)  # keys after the query
        if log_gate is None:
            decay = torch.ones(num_new, num_new, device=query.device).masked_fill(hidden, 0.0)
        else:  # prod_{j=i+1..t} g_j = exp(b_t - b_i), b the cumulative log gate (masked before the exp: no overflow)
            cumulative = log_gate.cumsum(-1)
            decay = (cumulative[..., :, None] - cumulative[..., None, :]).masked_fill(hidden, -math.inf).exp()
        weights = torch.matmul(q, k.transpose(-1, -2)) * decay
        if self.normalization == "sum":
            weights = weights / (weights.sum(-1, keepdim=True) + LINEAR_NORMALIZATION_EPS)
        elif self.normalization == "length":
            counts = decay if real is None else decay * real[..., None, :]
            weights = weights / counts.sum(-1, keepdim=True).clamp(min=1.0)
        return weights.to(query.dtype)

    def forward(
        self,
        attention: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        *,
        cache: Any = None,
        cache_index: int | None = None,
        key_padding_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        batch, heads, num_new, _ = query.shape
        scaling = kwargs.get("scaling", attention.scaling)
        q, k, log_gate, real = self._features_and_gates(query, key, key_padding_mask, scaling)
        v = value.float()
        if self.normalization == "sum":
            v = torch.cat([v, v.new_ones(batch, heads, num_new, 1)], dim=-1)  # last column: sum_i w_ti q.k_i

        layer = energy_state_layer(cache, cache_index) if cache is not None else None
        past = layer.states if layer is not None else {}
        output, state = linear_attention(q, k, v, log_gate, past.get("state"), self.chunk_size, self.path)
        new_states = {"state": state}
        if self.normalization == "sum":
            output = output[..., :-1] / (output[..., -1:] + LINEAR_NORMALIZATION_EPS)
        elif self.normalization == "length":
            # sum_i w_ti over the real tokens: the same recurrence with q = 1, k = 1 (0 on padding), v = 1.
            ones = q.new_ones(batch, heads, num_new, 1)
            counts = ones if real is None else real[..., None].expand(batch, heads, num_new, 1)
            total, new_states["total_weight"] = linear_attention(
                ones, counts, ones, log_gate, past.get("total_weight"), self.chunk_size, self.path
            )
            output = output / total.clamp(min=1.0)  # >= 1 at every real token; padded rows (0 tokens) give 0
        if layer is not None:
            layer.store(new_states, num_new)
        return output.transpose(1, 2).to(query.dtype), None


class GatedLinearHeads(LinearHeads):
    """`gated_linear` energy: `o_t = sum_{i<=t} (prod_{j=i+1..t} g_j) (q_t . k_i) v_i` per head.

    One GD step on the position-discounted `F(z) = -1/2 sum_i w_ti (z . v_i)^2`, untied, with scalar gates per head and
    token (`gated_linear_gate`):
      * `data` (default, GLA-style): `g_t = sigmoid(k_t . w_h + b_h)^(1/tau)`, tau = `gated_linear_gate_temperature`.
        The head rule only sees q, k, v, and `k_t . w_h = (W_K^T w_h) . LN1(x_t)` is a linear map of the layer input
        restricted to the head's key subspace: a data-dependent gate with H * (D + 1) parameters and no change to the
        attention's interface. Parameters `gate_weight` (H, D), `gate_bias` (H,).
      * `constant` (RetNet-style): a learned `g_h = sigmoid(gate_logit_h)` per head. Parameter `gate_logit` (H,).
    Both start from RetNet's multi-scale decays `g_h = 1 - 2^(-5-h)` (declared initialisers; `gate_weight = 0`, so the
    data gate starts equal to the constant one). Gates are in log space throughout (`logsigmoid`, cumulative sums of log g),
    so nothing overflows. Options, padding, chunked / recurrent forms and the cache: as `LinearHeads`, with `sum_i w_ti`
    (the decayed token count) as the `length` normaliser. Gate parameters are always trained.
    """

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.gate = config.gated_linear_gate
        self.gate_temperature = float(config.gated_linear_gate_temperature)
        add_solver_parameters(self, config, layer_idx)  # the gate's parameters, declared at the end of this file

    def log_gates(self, key: torch.Tensor) -> torch.Tensor:
        if self.gate == "data":
            logits = torch.einsum("bhtd,hd->bht", key.float(), self.gate_weight.float())
            logits = logits + self.gate_bias.float()[None, :, None]
            return nn.functional.logsigmoid(logits) / self.gate_temperature
        batch, heads, length, _ = key.shape
        return nn.functional.logsigmoid(self.gate_logit.float())[None, :, None].expand(batch, heads, length)


def apply_attention_mask(
    scores: torch.Tensor, attention_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None
) -> torch.Tensor:
    """Mask (B, H, Tq, S) scores in place, whatever form the mask takes (queries = the last Tq of the S positions), as
    `solvers_energy_gpt.attention_probabilities` reads it: None = pure causal (sdpa may pass None), 2D (B, S) =
    flash attention's padding mask (1 = real) plus causality, bool 4D = True where allowed, float 4D = additive
    (eager). Padded keys of `key_padding_mask` (False) are masked too."""
    if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
        raise ValueError(
            f"The `huber` heads compute their own weights and cannot read a {type(attention_mask).__name__} mask (flex "
            "attention): use attn_implementation='eager' or 'sdpa'."
        )
    q_len, kv_len = scores.shape[-2:]
    lowest = torch.finfo(scores.dtype).min
    if attention_mask is None or attention_mask.ndim == 2:
        query_positions = torch.arange(kv_len - q_len, kv_len, device=scores.device).unsqueeze(-1)
        scores.masked_fill_(torch.arange(kv_len, device=scores.device) > query_positions, lowest)
        if attention_mask is not None:
            scores.masked_fill_(~attention_mask[:, None, None, :kv_len].bool(), lowest)
    elif attention_mask.dtype == torch.bool:
        scores.masked_fill_(~attention_mask[..., :kv_len], lowest)
    else:
        scores.add_(attention_mask[..., :kv_len].float()).clamp_(min=lowest)
    if key_padding_mask is not None:
        scores.masked_fill_(~key_padding_mask[:, None, None, :kv_len].bool(), lowest)
    return scores


class HuberHeads(nn.Module):
    """`huber` robust local energy on the softmax energy (`local_energy='huber'`), eager only (materialises Tq x S).

    Tied (DESIGN.md section 5): `E_i(z) = rho_delta(||z - v_i||)`, `F = -T log sum_i exp(-E_i / T)`, with the Huber
    function `rho_delta(r) = r^2 / 2` for `r <= delta`, `delta (r - delta / 2)` beyond. Then
    `grad F = sum_i p_i psi(z - v_i)`, `p_i ∝ exp(-E_i / T)`, and `psi(u) = c(u) u` with `c(u) = min(1, delta / ||u||)`
    is the clipped residual. A GD step: `z - eta grad F = z + eta sum_i p_i c_i (v_i - z)`.

    Untied, as the elastic step becomes softmax attention: the residual *norm*, which decides both the weight and the
    clip, is measured between the query and the key, `r_ti = ||q_t - k_i||`; the value carries the direction. The head
    returns
        `o_t = sum_i p_ti c_ti v_i`,   `p_ti = softmax_i(-rho_delta(r_ti) * scaling)`,   `c_ti = min(1, delta / r_ti)`,
    with T = 1 / scaling (the attention's `scaling`), causal and padding masks as for softmax. The query state's own
    term `-eta (sum_i p_i c_i) z` is dropped, as the GD step drops `-eta z` (absorbed by the residual and LayerNorm);
    here its coefficient is data dependent (<= 1), which is the one approximation. Each anchor's pull is bounded:
    `||p_i c_i (v_i - z)|| <= p_i delta` in the tied picture.

    delta -> infinity: `rho = r^2 / 2`, `c = 1`, so `o_t = sum_i softmax_i(-||q_t - k_i||^2 / 2T) v_i`: the elastic
    energy with exact distances, which equals `softmax_i(q_t . k_i / T)` up to the `-||k_i||^2 / 2T` term (the
    `||q_t||^2` term cancels in the softmax; the key-norm term cancels only when all keys have the same norm).
    Returns the weights `p` (B, H, Tq, S), after attention dropout (`dropout` kwarg, as eager attention).
    """

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.delta = float(config.huber_delta)

    def forward(
        self,
        attention: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        *,
        cache: Any = None,
        cache_index: int | None = None,
        key_padding_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        scaling = kwargs.get("scaling", attention.scaling)
        dropout = kwargs.get("dropout", 0.0)
        key, value = keys_visible_without_mask(key, value, attention_mask, query.shape[2])
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask[:, : key.shape[2]]
        q, k, v = query.float(), key.float(), value.float()
        delta, delta_squared = self.delta, self.delta**2
        squared_distances = (
            (q * q).sum(-1, keepdim=True) + (k * k).sum(-1)[..., None, :] - 2.0 * torch.matmul(q, k.transpose(-1, -2))
        ).clamp_(min=0.0)  # ||q_t - k_i||^2
        # max(r, delta): r on the linear branch; delta (a constant, no sqrt at 0) on the quadratic one.
        clipped_distances = squared_distances.clamp(min=delta_squared).sqrt()
        energies = torch.where(
            squared_distances <= delta_squared, 0.5 * squared_distances, delta * clipped_distances - 0.5 * delta_squared
        )
        scores = apply_attention_mask(-scaling * energies, attention_mask, key_padding_mask)
        probabilities = torch.softmax(scores, dim=-1)
        probabilities = nn.functional.dropout(probabilities, p=dropout, training=attention.training)
        clip = delta / clipped_distances  # min(1, delta / r)
        output = torch.matmul(probabilities * clip, v)
        return output.transpose(1, 2).to(query.dtype), probabilities.to(query.dtype)


SOFTMAX_DECAY_INITS = ("retnet", "alibi")
SOFTMAX_DECAY_INIT = SolverField(
    name="softmax_decay_init",
    default="retnet",
    check=check_choice("softmax_decay_init", SOFTMAX_DECAY_INITS),
    doc="Initial recency slopes of `softmax_decay`: `retnet` (slope_h = log(1 / gamma_h), gamma_h = 1 - 2^(-5-h), the "
        "decays `gated_linear` starts from) or `alibi` (ALiBi's geometric slopes 2^(-8 (h + 1) / H)).",
)


def recency_biased_mask(attention_mask, slopes: torch.Tensor, q_len: int, kv_len: int, dtype: torch.dtype
                        ) -> torch.Tensor:
    """The additive float mask (batch or 1, heads, q_len, kv_len) of `softmax_decay`: `-slope_h (t - i)` where query t
    may see key i, the dtype's lowest value elsewhere. Reads every tensor mask form the attention interfaces produce:
    `None` (pure causal, as `sdpa` leaves it), boolean 4D (True = keep) and additive float 4D (`eager`). Queries are
    the last `q_len` of the `kv_len` positions."""
    if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor) or attention_mask.ndim != 4):
        raise ValueError(
            "`attention_energy`='softmax_decay' adds its recency bias to the attention scores as a float mask, which "
            f"this attention implementation cannot take (it passes a {type(attention_mask).__name__}"
            f"{' of shape ' + str(tuple(attention_mask.shape)) if isinstance(attention_mask, torch.Tensor) else ''}; "
            "flash attention takes no additive mask, flex attention a BlockMask): use attn_implementation='eager' or "
            "'sdpa'."
        )
    device = slopes.device
    distances = (torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
                 - torch.arange(kv_len, device=device)[None, :]).float()  # t - i
    bias = (-slopes.float().view(-1, 1, 1) * distances).unsqueeze(0).to(dtype)  # (1, heads, q_len, kv_len)
    lowest = torch.finfo(dtype).min
    if attention_mask is None:
        return bias.masked_fill(distances < 0, lowest)
    attention_mask = attention_mask[..., :kv_len]
    if attention_mask.dtype == torch.bool:
        return bias.masked_fill(~attention_mask, lowest)
    return (attention_mask.to(dtype) + bias).clamp(min=lowest)


class RecencyBiasedSoftmaxHeads(nn.Module):
    """`softmax_decay` energy: softmax attention with a learned per-head recency bias, the softmax control for the
    gated linear energy. Per head `o_t = sum_i softmax_i(q_t . k_i * scaling - slope_h (t - i)) v_i`, with
    `slope_h = -log sigmoid(gate_logit_h) = log(1 / g_h) > 0`: the contribution of a token i steps back is multiplied
    by `g_h^(t - i)` before normalisation, the decay `gated_linear`'s constant gate `g_h = sigmoid(gate_logit_h)`
    applies. In energy terms the prior `-slope_h (t - i)` enters each anchor's weight:
    `F(z) = -T log sum_i exp(-||z - k_i||^2 / 2T - slope_h (t - i))`, and the gradient step is the attention above.

    `softmax_decay_init`: `retnet` (default) starts from RetNet's decays `g_h = 1 - 2^(-5-h)`, as `gated_linear` does;
    `alibi` from ALiBi's geometric slopes `2^(-8 (h + 1) / H)`. The bias goes through the attention interface as an
    additive float mask (eager, sdpa); flash and flex attention cannot take it and raise a `ValueError`.
    """

    def __init__(self, config, layer_idx: int):
        super().__init__()
        add_solver_parameters(self, config, layer_idx)

    def recency_slopes(self) -> torch.Tensor:
        """(heads,) slope_h = log(1 / g_h) > 0."""
        return -nn.functional.logsigmoid(self.gate_logit.float())

    def forward(self, attention, query, key, value, attention_mask, attention_interface=None, cache=None,
                cache_index=None, key_padding_mask=None, **kwargs):
        key, value = keys_visible_without_mask(key, value, attention_mask, query.shape[2])
        mask = recency_biased_mask(attention_mask, self.recency_slopes(), query.shape[2], key.shape[2], query.dtype)
        return attention_interface(attention, query, key, value, mask, **kwargs)

    def attention_weights(self, attention, query, key, value, attention_mask, *, scaling: float,
                          **kwargs) -> torch.Tensor:
        """`output_attentions=True` where the backend returns none (sdpa): the biased probabilities eager returns."""
        key, value = keys_visible_without_mask(key, value, attention_mask, query.shape[2])
        mask = recency_biased_mask(attention_mask, self.recency_slopes(), query.shape[2], key.shape[2], query.dtype)
        return softmax_attention_weights(attention, query, key, value, mask, scaling=scaling)


def _recency_gate_logit(config, layer_idx: int, shape: tuple[int, ...]) -> torch.Tensor:
    """logit(g_h) for the initial decays: RetNet's `1 - 2^(-5-h)`, or ALiBi's slopes m_h as g_h = exp(-m_h)."""
    if config.softmax_decay_init == "retnet":
        return torch.logit(retnet_decays(shape[0]))
    slopes = torch.pow(2.0, -8.0 * torch.arange(1, shape[0] + 1, dtype=torch.float64) / shape[0])
    return -torch.log(torch.expm1(slopes))  # logit(exp(-m)) = -log(e^m - 1)


# --------------------------------------------------------------------------------------------------------------------
# The declarations: the energies' plain gradient steps, and the robust local energy.
# --------------------------------------------------------------------------------------------------------------------


def check_sum_normalization(config) -> None:
    """`linear_normalization='sum'` needs positive features (a check across two fields)."""
    if config.linear_normalization == "sum" and config.linear_feature_map != "elu_plus_one":
        raise ValueError(
            "`linear_normalization='sum'` divides by sum_i phi(q).phi(k_i), which can be zero or negative without "
            f"positive features: set `linear_feature_map='elu_plus_one'` (got {config.linear_feature_map!r}) or "
            f"choose `linear_normalization` in {[n for n in LINEAR_NORMALIZATIONS if n != 'sum']}."
        )


def _with_gate(gate: str, per_head: tuple[str, ...] = ()) -> Callable[[Any, int], tuple[int, ...] | None]:
    """Shape (heads, *per_head sizes) on layers of a `gated_linear_gate=gate` config; no such tensor otherwise."""
    sizes = {"head_dim": lambda config: config.hidden_size // config.num_attention_heads}
    return lambda config, layer_idx: (
        (config.num_attention_heads, *(sizes[name](config) for name in per_head))
        if config.gated_linear_gate == gate else None
    )


def _zeros(config, layer_idx: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.zeros(shape)


def _retnet_data_gate_bias(config, layer_idx: int, shape: tuple[int, ...]) -> torch.Tensor:
    """sigmoid(b_h)^(1/tau) = gamma_h, i.e. b_h = logit(gamma_h^tau): with `gate_weight = 0`, RetNet's decays."""
    return torch.logit(retnet_decays(shape[0]).pow(float(config.gated_linear_gate_temperature)))


def _retnet_gate_logit(config, layer_idx: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.logit(retnet_decays(shape[0]))


LINEAR_ATTENTION_PATHS = ("torch", "fla")
LINEAR_ATTENTION_PATH = SolverField(
    name="linear_attention_path",
    default="torch",
    check=check_choice("linear_attention_path", LINEAR_ATTENTION_PATHS),
    doc="How the linear energies' chunked form runs: `torch` (default) or `fla`, flash-linear-attention's Triton "
        "kernels where they can run (CUDA with `fla` installed; the PyTorch path elsewhere). The fla path has not yet "
        "run on a GPU: `bash benchmarks/gpu.sh` checks both paths against each other first.",
)
_LINEAR_FIELDS = (LINEAR_FEATURE_MAP, LINEAR_NORMALIZATION, LINEAR_ATTENTION_PATH)

register_solver(Solver(
    "linear", HEAD, LinearHeads, "unnormalised linear attention",
    "The linear energy e_i = -z.v_i with F = -1/2 sum_i e_i^2: its gradient step is causal linear attention "
    "(chunked in training, a fixed-size recurrent state per head in generation).",
    update_rule="per head: o_t = sum_{i<=t} (phi(q_t) . phi(k_i)) v_i  (/ normaliser, see linear_normalization)",
    fields=_LINEAR_FIELDS, check_config=check_sum_normalization, reduces_to_gpt2=False, uses_kv_cache=False,
), registry=ATTENTION_ENERGIES)
register_solver(Solver(
    "gated_linear", HEAD, GatedLinearHeads, "gated linear attention",
    "The position-discounted linear energy: linear attention whose contributions decay by per-head gates g_j "
    "(data-dependent, GLA-style, or learned constants, RetNet-style).",
    update_rule="per head: o_t = sum_{i<=t} (prod_{j=i+1..t} g_j) (phi(q_t) . phi(k_i)) v_i",
    fields=(*_LINEAR_FIELDS, GATED_LINEAR_GATE, GATED_LINEAR_GATE_TEMPERATURE),
    parameters=(
        SolverParameter("gate_weight", _zeros, _with_gate("data", ("head_dim",)),
                        "w_h, the data gate's weights on the head's key (`gated_linear_gate='data'`).",
                        per_head=True, always_learned=True),
        SolverParameter("gate_bias", _retnet_data_gate_bias, _with_gate("data"),
                        "b_h, the data gate's bias (`gated_linear_gate='data'`).", per_head=True, always_learned=True),
        SolverParameter("gate_logit", _retnet_gate_logit, _with_gate("constant"),
                        "a_h, the constant gate g_h = sigmoid(a_h) (`gated_linear_gate='constant'`).",
                        per_head=True, always_learned=True),
    ),
    check_config=check_sum_normalization, reduces_to_gpt2=False, uses_kv_cache=False,
), registry=ATTENTION_ENERGIES)
register_solver(Solver(
    "huber", HEAD, HuberHeads, "robust (Huber) local energy",
    "Softmax attention's free energy with Huber local energies rho_delta(||z - v_i||): far anchors get clipped pulls "
    "(eager path, T x S memory).",
    update_rule="per head: p_ti ~ exp(-rho_delta(||q_t - k_i||) scaling);  o_t = sum_i p_ti min(1, delta/||q_t - k_i||) v_i",
    fields=(HUBER_DELTA,), energies=("softmax",), reduces_to_gpt2=False,
), registry=LOCAL_ENERGIES)
register_solver(Solver(
    "softmax_decay", HEAD, RecencyBiasedSoftmaxHeads, "softmax with a learned recency bias (ALiBi-style)",
    "Softmax attention with a learned per-head recency bias -slope_h (t - i) on the scores, slope_h = log(1 / g_h): "
    "the softmax control with the recency prior of the gated linear energy (same initial decays). Eager and sdpa.",
    update_rule="per head: o_t = sum_i softmax_i(q_t . k_i / sqrt(d) - slope_h (t - i)) v_i,  slope_h = -log sigmoid(a_h)",
    fields=(SOFTMAX_DECAY_INIT,),
    parameters=(SolverParameter("gate_logit", _recency_gate_logit, lambda config, layer_idx: (config.n_head,),
                                "a_h, the recency decay g_h = sigmoid(a_h) (slope log(1 / g_h)) of the scores.",
                                per_head=True, always_learned=True),),
    reduces_to_gpt2=False,
), registry=ATTENTION_ENERGIES)

__all__ = [
    "EnergyStateLayer",
    "GatedLinearHeads",
    "HuberHeads",
    "LinearHeads",
    "RecencyBiasedSoftmaxHeads",
    "cache_layer",
    "chunked_linear_attention",
    "energy_state_layer",
    "fla_linear_attention",
    "linear_attention",
    "recency_biased_mask",
    "recurrent_linear_attention",
]
