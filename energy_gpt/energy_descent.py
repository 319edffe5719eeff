"""Energy descent: does each layer's attention step lower the attention energy it is supposed to descend?

EnergyGPT reads every attention layer as one optimiser step on an attention energy (DESIGN.md section 1,
docs/energies.md). This module measures whether a model's layers actually descend that energy: per layer and head, the
energy of the head's query state before and after the layer's attention step, on given inputs. It only reads the
model, through forward hooks on the blocks' head and residual rules; the shipped model files keep no statistics.

What is measured, in the untied model (per head h, token t):

* ``z_before`` is the head's query ``W_Q LN1(x_t) + b_Q`` of the residual stream ``x`` entering the block;
* ``z_after`` is the same layer's query of the stream after the attention step, ``x' = residual_rule(x, A(...))``
  before the MLP: ``x + A(LN1(x))`` for ``gd``, ``x + m`` for ``momentum`` and ``nag`` (the step taken, not Nesterov's
  lookahead point), the head rules' outputs (``newton``, ``twicing``, ...) through ``c_proj``;
* the anchors are the keys ``k_i`` the head attended to in that forward pass (causal ``i <= t``, padded keys left
  out), held fixed, as a gradient step on ``F(z)`` holds its context fixed;
* the temperature is ``T = 1 / scaling`` (the attention's scaling, ``head_dim ** -0.5`` for GPT-2), so that
  ``exp(-||z - k_i||^2 / 2T) ∝ exp(scaling z.k_i - scaling ||k_i||^2 / 2)``: softmax attention's weights up to the key
  norm term (which cancels when every key has one norm, as the tied derivation assumes).

The energy per ``attention_energy`` / ``local_energy`` (``s = scaling``):

================================  ==========================================================================
``softmax``, ``elastic``          ``F(z) = -T log sum_i exp(-||z - k_i||^2 / 2T)``
``softmax``, ``huber``            ``F(z) = -T log sum_i exp(-rho_delta(||z - k_i||) / T)``
``softmax_decay``                 ``F(z) = -T log sum_i exp(-||z - k_i||^2 / 2T - slope_h (t - i))``
``linear``, ``gated_linear``      ``F(z) = -1/2 sum_i w_ti (phi(s z) . phi(k_i))^2``, ``w_ti = prod_{j=i+1..t} g_j``
================================  ==========================================================================

(``w = 1`` for ``linear``; the output normalisation of the linear energies is a positive factor per token on the
step, not part of ``F``.) Why one gradient step provably lowers these (the known cases the tests check):

* the softmax-family energies are 1-smooth: ``Hess F = sum_i p_i Hess E_i - Cov_p(grad E_i) / T <= I`` (elastic:
  ``Hess E_i = I``; Huber: ``Hess rho <= I`` on both branches; the recency prior does not depend on ``z``), so by the
  descent lemma ``F(z - eta grad F(z)) <= F(z) - eta (1 - eta / 2) ||grad F(z)||^2 < F(z)`` for ``0 < eta < 2``;
* the linear energy with identity features is concave, ``F(z) = -1/2 z^T A z`` with ``A = s^2 sum_i w_ti k_i k_i^T``
  positive semi-definite, so ``F(z - eta grad F) = F(z) - eta z^T A^2 z - eta^2 / 2 z^T A^3 z <= F(z)`` for any
  ``eta > 0``;
* a step against the gradient, ``z + eta grad F(z)``, raises each of them for small enough ``eta``.

A trained model's layer is not a gradient step on this energy (``W_O W_V`` is not tied to ``W_Q``, LayerNorm sits
between the stream and the query): the fraction of token-heads whose energy goes down is what the check reports.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


ENERGY_DESCENT_KEYS = ("energy_descent_fraction", "energy_descent_mean_change")


# ---------------------------------------------------------------------------------------------------------------------
# The energies, batched: (B, H, Tq, D) queries against (B, H, S, D) anchors, `visible` (B or 1, 1 or H, Tq, S) bool.
# ---------------------------------------------------------------------------------------------------------------------


def softmax_family_energy(
    query: torch.Tensor,
    key: torch.Tensor,
    visible: torch.Tensor,
    temperature: float,
    huber_delta: float | None = None,
    log_prior: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F(z_t) = -T log sum_{i visible} exp(-E(||z_t - k_i||) / T + log_prior_ti)`` per (B, H, Tq), with ``E(r) = r^2
    / 2`` (elastic) or ``rho_delta(r)`` (Huber, ``huber_delta`` given). Rows with no visible anchor give ``+inf``."""
    squared_distances = (
        (query * query).sum(-1, keepdim=True) + (key * key).sum(-1)[..., None, :] - 2.0 * query @ key.transpose(-1, -2)
    ).clamp(min=0.0)
    if huber_delta is None:
        local = 0.5 * squared_distances
    else:
        distances = squared_distances.sqrt()
        local = torch.where(distances <= huber_delta, 0.5 * squared_distances,
                            huber_delta * (distances - 0.5 * huber_delta))
    logits = -local / temperature
    if log_prior is not None:
        logits = logits + log_prior
    logits = logits.masked_fill(~visible, -torch.inf)
    return -temperature * torch.logsumexp(logits, dim=-1)


def linear_family_energy(
    query: torch.Tensor,
    key: torch.Tensor,
    visible: torch.Tensor,
    scaling: float,
    feature_map: str = "identity",
    log_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F(z_t) = -1/2 sum_{i visible} w_ti (phi(scaling z_t) . phi(k_i))^2`` per (B, H, Tq); ``log_weights`` holds
    ``log w_ti`` (None: every ``w = 1``); ``feature_map`` is ``identity`` or ``elu_plus_one``."""

    def phi(states: torch.Tensor) -> torch.Tensor:
        return nn.functional.elu(states) + 1.0 if feature_map == "elu_plus_one" else states

    scores = phi(query * scaling) @ phi(key).transpose(-1, -2)
    terms = scores.square()
    if log_weights is not None:
        terms = terms * log_weights.exp()
    return -0.5 * terms.masked_fill(~visible, 0.0).sum(-1)


def causal_visibility(length: int, key_padding_mask: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """(B or 1, 1, T, T) bool: key i is visible from query t when i <= t and key i is not padding."""
    visible = torch.ones(length, length, dtype=torch.bool, device=device).tril()[None, None]
    if key_padding_mask is not None:
        visible = visible & key_padding_mask[:, None, None, :length].bool()
    return visible


def _decay_log_weights(log_gates: torch.Tensor) -> torch.Tensor:
    """(B, H, T) log g_t -> (B, H, T, T) log w_ti = sum_{j=i+1..t} log g_j (finite for i <= t; masked elsewhere)."""
    cumulative = log_gates.cumsum(-1)
    return cumulative[..., :, None] - cumulative[..., None, :]


def _relative_positions(length: int, device: torch.device) -> torch.Tensor:
    positions = torch.arange(length, device=device, dtype=torch.float64)
    return positions[:, None] - positions[None, :]  # t - i


def layer_energy(model_config, head_rule: nn.Module, query: torch.Tensor, key: torch.Tensor, visible: torch.Tensor,
                 scaling: float, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    """The energy of ``query`` (B, H, T, D) against the layer's anchors ``key``, for the model's energy (float64)."""
    energy = getattr(model_config, "attention_energy", "softmax")
    local = getattr(model_config, "local_energy", "elastic")
    query, key = query.double(), key.double()
    if energy in ("linear", "gated_linear"):
        log_weights = None
        if energy == "gated_linear":
            log_gates = head_rule.log_gates(key.float()).double()
            if key_padding_mask is not None:  # padded positions neither add nor decay, as in the head rule
                log_gates = log_gates * key_padding_mask[:, None, : key.shape[2]].double()
            log_weights = _decay_log_weights(log_gates)
        return linear_family_energy(query, key, visible, scaling, getattr(model_config, "linear_feature_map",
                                                                          "identity"), log_weights)
    log_prior = None
    if hasattr(head_rule, "recency_slopes"):  # softmax_decay: the head's recency prior -slope_h (t - i)
        slopes = head_rule.recency_slopes().detach().double().view(1, -1, 1, 1)
        log_prior = -slopes * _relative_positions(key.shape[2], key.device)
    huber_delta = float(model_config.huber_delta) if local == "huber" else None
    return softmax_family_energy(query, key, visible, 1.0 / scaling, huber_delta, log_prior)


# ---------------------------------------------------------------------------------------------------------------------
# Collecting the states with forward hooks
# ---------------------------------------------------------------------------------------------------------------------


def model_blocks(model: nn.Module) -> list[nn.Module]:
    """The EnergyGPT blocks of a model: a bare `EnergyGPTModel`, a model with a head, or one wrapped by PEFT."""
    base = getattr(model, "base_model", model)
    base = getattr(base, "transformer", base)
    return list(base.h)


@contextmanager
def capture_attention_steps(model: nn.Module) -> Iterator[list[dict[str, Any]]]:
    """While active, every block application appends ``{"block", "keys", "scaling", "key_padding_mask", "before",
    "after"}`` to the yielded list (in the order the blocks run, loops included): the keys and scaling the head rule
    received and the residual stream before and after the attention step (from the residual rule's second call)."""
    steps: list[dict[str, Any]] = []
    pending: dict[int, dict[str, Any]] = {}
    handles = []

    def on_head_rule(block_index: int):
        def hook(module, args, kwargs, output):
            pending[block_index] = {
                "keys": kwargs["key"].detach(),
                "scaling": float(kwargs.get("scaling", module_scaling(block_index))),
                "key_padding_mask": kwargs.get("key_padding_mask"),
            }
        return hook

    def on_residual_rule(block_index: int):
        def hook(module, args, kwargs, output):
            attn_output = args[2] if len(args) > 2 else kwargs.get("attn_output")
            if attn_output is None:  # the first call: the point the attention reads
                return
            step = pending.pop(block_index)
            step.update(block=block_index, before=args[0].detach(), after=output[0].detach())
            steps.append(step)
        return hook

    blocks = model_blocks(model)

    def module_scaling(block_index: int) -> float:
        return blocks[block_index].attn.scaling

    for index, block in enumerate(blocks):
        handles.append(block.attn.head_rule.register_forward_hook(on_head_rule(index), with_kwargs=True))
        handles.append(block.residual_rule.register_forward_hook(on_residual_rule(index), with_kwargs=True))
    try:
        yield steps
    finally:
        for handle in handles:
            handle.remove()


def _queries(block: nn.Module, states: torch.Tensor) -> torch.Tensor:
    """The block's per-head queries (B, H, T, D) of a residual stream (B, T, d)."""
    attention = block.attn
    query = attention.c_attn(block.ln_1(states))[..., : attention.embed_dim]
    return query.view(*query.shape[:-1], -1, attention.head_dim).transpose(1, 2)


# ---------------------------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------------------------


def energy_changes(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                   ) -> list[dict[str, torch.Tensor]]:
    """One entry per block application (layer order, then loops): ``before`` / ``after`` energies (B, H, T) in float64
    and ``real`` (B, 1, T), the non-padding query tokens."""
    blocks = model_blocks(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), capture_attention_steps(model) as steps:
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            results = []
            for step in steps:
                block = blocks[step["block"]]
                keys = step["keys"]
                padding = step["key_padding_mask"]
                if padding is None and attention_mask is not None:
                    padding = attention_mask.bool()
                visible = causal_visibility(keys.shape[2], padding, keys.device)
                energies = [
                    layer_energy(model.config, block.attn.head_rule, _queries(block, step[when]), keys, visible,
                                 step["scaling"], padding)
                    for when in ("before", "after")
                ]
                real = (torch.ones_like(input_ids, dtype=torch.bool) if padding is None
                        else padding[:, : keys.shape[2]].bool())
                results.append({"before": energies[0], "after": energies[1], "real": real[:, None, :]})
    finally:
        model.train(was_training)
    return results


def summarise_energy_changes(before: torch.Tensor, after: torch.Tensor, real: torch.Tensor) -> dict[str, list[float]]:
    """Per head: the fraction of real tokens whose energy went down (strictly) and the mean change ``F_after -
    F_before``."""
    real = real.expand_as(before)
    change = torch.where(real, after - before, torch.zeros((), dtype=before.dtype, device=before.device))
    counts = real.sum(dim=(0, 2)).clamp(min=1).double()
    lowered = ((change < 0) & real).sum(dim=(0, 2)).double() / counts
    mean_change = change.sum(dim=(0, 2)) / counts
    return {"fraction": lowered.tolist(), "mean_change": mean_change.tolist()}


def energy_descent_report(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                          ) -> dict[str, list[list[float]]]:
    """Per layer (in the order the blocks run; with looped depth, loop after loop) and head:

    * ``energy_descent_fraction``: the fraction of token-heads whose attention energy the layer's step lowered;
    * ``energy_descent_mean_change``: the mean change of the energy, ``F(z_after) - F(z_before)`` (negative: descent).

    Computed in float64 on one forward pass (no cache) of ``input_ids`` (padding in ``attention_mask`` left out); the
    energies, states and anchors are those of this module's docstring."""
    report: dict[str, list[list[float]]] = {key: [] for key in ENERGY_DESCENT_KEYS}
    for layer in energy_changes(model, input_ids, attention_mask):
        summary = summarise_energy_changes(layer["before"], layer["after"], layer["real"])
        report["energy_descent_fraction"].append(summary["fraction"])
        report["energy_descent_mean_change"].append(summary["mean_change"])
    return report


__all__ = [
    "ENERGY_DESCENT_KEYS",
    "capture_attention_steps",
    "causal_visibility",
    "energy_changes",
    "energy_descent_report",
    "layer_energy",
    "linear_family_energy",
    "softmax_family_energy",
    "summarise_energy_changes",
]
