"""Attention solvers: how one EnergyGPT layer takes its optimisation step on the attention energy.

Energy of one attention step (DESIGN.md section 1), per head, for a query state z and causal anchors v_i:
    F(z) = -T log sum_i exp(-||z - v_i||^2 / 2T),   grad F = z - mu,   Hess F = I - Sigma / T,
    p_i = softmax_i(z.v_i / T),   mu = sum_i p_i v_i,   Sigma = sum_i p_i (v_i - mu)(v_i - mu)^T.
One gradient step is softmax attention plus its residual. The other solvers are the textbook optimisers on the same
energy, *as specified in this project's DESIGN notes* (the paper's body was not available).

A solver is a small module with one job. It may override
  * `residual_step`: how the attention output updates the residual stream (momentum, Nesterov), and/or
  * `head_outputs`: what each head returns from its queries, keys and values (Newton-style).
Adding a solver means writing one class here and adding one line to `ATTENTION_SOLVERS`.
"""

import functools
from collections.abc import Callable

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.gpt2.modeling_gpt2 import eager_attention_forward

# `attend(query_source, context_source=None) -> (attention_output, attention_weights)`: the whole attention sublayer
# A(LN1(.)) of a block; `context_source` (for keys and values) defaults to `query_source`.
AttendFn = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]

# Newton forms attention-shaped (T x S) products; queries are processed in chunks of this size on the SDPA path so
# that inference memory grows linearly with the sequence length.
NEWTON_QUERY_CHUNK = 256


def standard_attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
    """Softmax attention through the configured interface (eager, sdpa, ...), exactly as GPT-2 calls it."""
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(module.config._attn_implementation, eager_attention_forward)
    return interface(module, query, key, value, attention_mask, **kwargs)


@functools.lru_cache(maxsize=32)
def _future_positions(q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    """Boolean (q_len, kv_len) mask of the keys a causal query may not see (queries = the last q_len positions).
    Cached: every layer and every query chunk of a forward (and the backward recomputation) asks for the same few."""
    with torch.inference_mode(False):  # a normal tensor even if first built under inference mode
        return torch.ones(q_len, kv_len, dtype=torch.bool, device=device).triu(kv_len - q_len + 1)


def attention_probabilities(query, key, attention_mask, scaling: float) -> torch.Tensor:
    """Softmax attention weights in fp32, whatever form the mask takes.

    With `sdpa` the causal mask may be `None` (pure causal, left to `is_causal`) or boolean; with `eager` it is an
    additive float mask. Queries are the last `q_len` of the `kv_len` positions.
    """
    # Scale the (smaller) query instead of the scores, and mask in place: one pass less over the T x S scores.
    scores = torch.matmul(query.float() * scaling, key.float().transpose(-1, -2))
    q_len, kv_len = scores.shape[-2:]
    if attention_mask is None:
        scores.masked_fill_(_future_positions(q_len, kv_len, scores.device), torch.finfo(scores.dtype).min)
    elif attention_mask.dtype == torch.bool:
        scores.masked_fill_(~attention_mask[..., :kv_len], torch.finfo(scores.dtype).min)
    else:
        scores.add_(attention_mask[..., :kv_len].float())
    return torch.softmax(scores, dim=-1)


def _bounded_lambda(newton_lambda: torch.Tensor, sigma_bound: torch.Tensor, step_bound: float) -> torch.Tensor:
    """Per token and head lambda, scaled so that |lambda| * bound(Sigma) <= step_bound (Neumann series validity).

    The scale is exactly 1.0 below the bound, so small lambdas (and lambda = 0) give the plain formula bit for bit.
    """
    lam = newton_lambda.float().view(1, -1, 1, 1)
    scale = step_bound / torch.clamp(lam.abs() * sigma_bound, min=step_bound)
    return lam * scale


class _ChunkSecondMoments(torch.autograd.Function):
    """For one chunk of queries: `(sum_i p_ti (v_i . mu_t) v_i,  sum_i p_ti ||v_i||^2)`, the two attention-shaped
    products behind `Sigma_t mu_t` and `trace(Sigma_t)`, with `p` recomputed from q and k.

    Nothing attention-shaped is saved for the backward pass: it recomputes `p` and `v . mu` from the inputs (so memory
    grows linearly with the sequence length, as with SDPA) and applies the hand-derived gradients, which need one matmul
    and several elementwise passes less than autograd through the same ops with checkpointing.
    """

    @staticmethod
    def forward(ctx, query, key, value, squared_norms, mean, mask, scaling: float):
        probs = attention_probabilities(query, key, mask, scaling)
        weights = torch.matmul(mean, value.transpose(-1, -2)).mul_(probs)  # p_ti * (v_i . mu_t)
        ctx.save_for_backward(query, key, value, squared_norms, mean, mask)
        ctx.scaling = scaling
        return torch.matmul(weights, value), torch.matmul(probs, squared_norms)

    @staticmethod
    def backward(ctx, grad_products, grad_second_moment):
        query, key, value, squared_norms, mean, mask = ctx.saved_tensors
        needs_query, needs_key, needs_value, needs_norms, needs_mean = ctx.needs_input_grad[:5]
        probs = attention_probabilities(query, key, mask, ctx.scaling)
        projections = torch.matmul(mean, value.transpose(-1, -2))
        grad_weights = torch.matmul(grad_products, value.transpose(-1, -2))
        grad_query = grad_key = grad_value = grad_norms = grad_mean = None
        if needs_value:
            grad_value = torch.matmul((projections * probs).transpose(-1, -2), grad_products)
        if needs_mean or needs_value:
            grad_projections = grad_weights * probs
            if needs_mean:
                grad_mean = torch.matmul(grad_projections, value)
            if needs_value:
                grad_value = grad_value + torch.matmul(grad_projections.transpose(-1, -2), mean)
            del grad_projections
        if needs_norms:
            grad_norms = torch.matmul(probs.transpose(-1, -2), grad_second_moment)
        if needs_query or needs_key:
            grad_probs = grad_weights.mul_(projections).addcmul_(grad_second_moment, squared_norms.transpose(-1, -2))
            grad_scores = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype)
            if needs_query:
                grad_query = (torch.matmul(grad_scores, key.float()) * ctx.scaling).to(query.dtype)
            if needs_key:
                grad_key = (torch.matmul(grad_scores.transpose(-1, -2), query.float()) * ctx.scaling).to(key.dtype)
        return grad_query, grad_key, grad_value, grad_norms, grad_mean, None, None


class GradientDescentSolver(nn.Module):
    """`gd` (MHA): one gradient step on the energy, i.e. softmax attention plus residual. Exactly GPT-2:
    `x' = x + A(LN1(x))`."""

    uses_momentum = False

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx

    def residual_step(
        self, hidden_states: torch.Tensor, momentum: torch.Tensor | None, attend: AttendFn
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        attn_output, attn_weights = attend(hidden_states)
        return hidden_states + attn_output, momentum, attn_weights

    def head_outputs(self, module: nn.Module, query, key, value, attention_mask, **kwargs):
        return standard_attention(module, query, key, value, attention_mask, **kwargs)

    def _register_solver_scalar(self, name: str, init_value: float, shape: tuple[int, ...], learn: bool) -> None:
        """A trained parameter or a fixed (saved) buffer, under the same state-dict name either way."""
        tensor = torch.full(shape, float(init_value))
        if learn:
            self.register_parameter(name, nn.Parameter(tensor))
        else:
            self.register_buffer(name, tensor, persistent=True)


class MomentumSolver(GradientDescentSolver):
    """`momentum` (MomenMHA): heavy-ball momentum across layers.
    `g = A(LN1(x)); m = beta_l m + g; x' = x + m`, with m = 0 before the first layer. The state never mixes
    positions, so causality and the KV cache are untouched; unrolled it is a dense skip over earlier attention outputs.
    """

    uses_momentum = True

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        # The first layer sees m = 0, so its beta would multiply nothing: it has none (a parameter that never gets a
        # gradient breaks DDP without find_unused_parameters).
        if layer_idx > 0:
            self._register_solver_scalar("momentum_beta", config.momentum_beta, (), config.learn_solver_params)

    def residual_step(self, hidden_states, momentum, attend):
        attn_output, attn_weights = attend(hidden_states)
        momentum = attn_output if momentum is None else self.momentum_beta * momentum + attn_output
        return hidden_states + momentum, momentum, attn_weights


class NesterovSolver(MomentumSolver):
    """`nag` (NagMHA): Nesterov momentum. `y = x + beta_l m; g = A(LN1(y)); m = beta_l m + g; x' = x + m`.
    With `nag_lookahead="query"` only the query is taken at y (keys and values from x)."""

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.query_only_lookahead = config.nag_lookahead == "query"

    def residual_step(self, hidden_states, momentum, attend):
        if momentum is None:  # first layer: m = 0, so the lookahead point is x itself
            return super().residual_step(hidden_states, momentum, attend)
        lookahead = hidden_states + self.momentum_beta * momentum
        if self.query_only_lookahead:
            attn_output, attn_weights = attend(lookahead, hidden_states)
        else:
            attn_output, attn_weights = attend(lookahead)
        momentum = self.momentum_beta * momentum + attn_output
        return hidden_states + momentum, momentum, attn_weights


class NewtonSolver(GradientDescentSolver):
    """`newton` (MHA2nd1st): a Newton step with the first-order (Neumann) inverse Hessian `I + lambda * Sigma`.
    Per head `o = mu + lambda_h * Sigma mu`, with
    `Sigma_t mu_t = sum_i p_ti (v_i . mu_t) v_i - (mu_t . mu_t) mu_t` under the query's own causal softmax; no
    d_h x d_h matrix is formed. lambda is bounded per token (see `EnergyGPTConfig.newton_step_bound`)."""

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self._register_solver_scalar("newton_lambda", config.newton_lambda, (config.n_head,), config.learn_solver_params)
        self.step_bound = config.newton_step_bound

    def correction_vanishes(self) -> bool:
        """lambda fixed (not trained) at exactly 0: the output is mu, so skip the correction altogether."""
        return not self.newton_lambda.requires_grad and not bool(self.newton_lambda.any())

    def head_outputs(self, module, query, key, value, attention_mask, **kwargs):
        # mu through the standard interface, so lambda = 0 reproduces GPT-2 bit for bit on every path.
        attn_output, attn_weights = standard_attention(module, query, key, value, attention_mask, **kwargs)
        if self.correction_vanishes():
            return attn_output, attn_weights
        mean = attn_output.transpose(1, 2).float()  # (batch, heads, q_len, head_dim)
        value = value.float()
        squared_norms = (value * value).sum(-1, keepdim=True)  # ||v_i||^2, for the trace of Sigma
        if attn_weights is not None:  # eager already has the probabilities (after dropout): reuse them
            correction = self._correction(attn_weights.float(), value, squared_norms, mean)
        else:
            correction = torch.cat(
                [self._chunk_correction(query, key, value, squared_norms, mean, attention_mask, kwargs["scaling"], *chunk)
                 for chunk in self._query_chunks(query.shape[2])],
                dim=2,
            )
        output = (mean + correction).to(attn_output.dtype).transpose(1, 2)
        return output, attn_weights

    @staticmethod
    def _query_chunks(q_len: int) -> list[tuple[int, int]]:
        return [(start, min(start + NEWTON_QUERY_CHUNK, q_len)) for start in range(0, q_len, NEWTON_QUERY_CHUNK)]

    def _chunk_correction(self, query, key, value, squared_norms, mean, attention_mask, scaling, start, end):
        """The correction for queries [start, end) from recomputed probabilities (SDPA does not return them).

        Attention is causal, so the chunk only sees the first `kv_len - q_len + end` keys: the rest are never read.
        No T x S tensor outlives its chunk (see `_ChunkSecondMoments`), so memory grows linearly with the sequence
        length, in training as in inference.
        """
        visible = key.shape[2] - query.shape[2] + end
        mask = attention_mask
        if mask is not None:
            mask = mask[:, :, start:end, :visible] if mask.shape[2] > 1 else mask[..., :visible]
        # With mask None, `attention_probabilities` puts the causal diagonal at offset visible - (end - start), which
        # is exactly this chunk's offset in the full sequence.
        args = (query[:, :, start:end], key[:, :, :visible], value[:, :, :visible], squared_norms[:, :, :visible],
                mean[:, :, start:end], mask, scaling)
        products, second_moment = _ChunkSecondMoments.apply(*args)
        return self._finish_correction(products, second_moment, mean[:, :, start:end])

    def _correction(self, probs, value, squared_norms, mean):
        """From explicit probabilities (eager path), through autograd."""
        products = torch.matmul(probs * torch.matmul(mean, value.transpose(-1, -2)), value)
        return self._finish_correction(products, torch.matmul(probs, squared_norms), mean)

    def _finish_correction(self, products, second_moment, mean):
        """lambda * Sigma mu from `sum_i p_i (v_i . mu) v_i` and `sum_i p_i ||v_i||^2` (per token and head)."""
        mean_norm = (mean * mean).sum(-1, keepdim=True)
        sigma_mean = products - mean_norm * mean
        trace = second_moment - mean_norm
        return _bounded_lambda(self.newton_lambda, trace.clamp(min=0), self.step_bound) * sigma_mean


class LightNewtonSolver(NewtonSolver):
    """`newton_light` (LightMHA2nd1st): Newton with a diagonal covariance,
    `o = mu + lambda_h * (E_p[v*v] - mu*mu) * mu`. `E_p[v*v]` is one more attention pass with values `v*v`, so it runs
    on SDPA without materialising the T x T matrix."""

    def head_outputs(self, module, query, key, value, attention_mask, **kwargs):
        attn_output, attn_weights = standard_attention(module, query, key, value, attention_mask, **kwargs)
        if self.correction_vanishes():
            return attn_output, attn_weights
        mean = attn_output.transpose(1, 2).float()
        squared_values = value.float().square()
        if attn_weights is not None:
            second_moment = torch.matmul(attn_weights.float(), squared_values)
        else:
            second_moment, _ = standard_attention(
                module, query.float(), key.float(), squared_values, attention_mask, **kwargs
            )
            second_moment = second_moment.transpose(1, 2)
        variance = (second_moment - mean * mean).clamp(min=0)
        lam = _bounded_lambda(self.newton_lambda, variance.amax(-1, keepdim=True), self.step_bound)
        output = (mean + lam * variance * mean).to(attn_output.dtype).transpose(1, 2)
        return output, attn_weights


# The registry: config value -> solver class. One line per solver.
ATTENTION_SOLVERS: dict[str, type[GradientDescentSolver]] = {
    "gd": GradientDescentSolver,
    "momentum": MomentumSolver,
    "nag": NesterovSolver,
    "newton": NewtonSolver,
    "newton_light": LightNewtonSolver,
}

__all__ = [
    "ATTENTION_SOLVERS",
    "GradientDescentSolver",
    "MomentumSolver",
    "NesterovSolver",
    "NewtonSolver",
    "LightNewtonSolver",
    "attention_probabilities",
    "standard_attention",
]
