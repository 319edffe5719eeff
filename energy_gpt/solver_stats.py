"""What the solvers learned and how their bounds behave: `solver_report` and `record_solver_statistics`.

The statistics are computed here, by forward hooks on the head rules, so the shipped rules hold no statistics state
and compiled graphs have no side effects. A rule that offers `step_sizes(query, key, value, attention_mask, scaling)`
(the Newton heads) has its relative step size recomputed from the same inputs while `record_solver_statistics(model)`
is active.
"""

import inspect
import weakref
from typing import Any

import torch
from torch import nn

from .energy_descent import energy_descent_report, model_blocks
from .modeling.solvers_energy_gpt import registered_rules


# The statistics of the last forward under `record_solver_statistics`, per head rule.
_LAST_STATISTICS: "weakref.WeakKeyDictionary[nn.Module, dict[str, float]]" = weakref.WeakKeyDictionary()
# The bound the hard trace clip is compared against when the soft bound is off (`newton_step_bound=None`).
TRACE_CLIP_WITHOUT_BOUND = 0.5


def solver_parameter_names() -> set[str]:
    """State-dict leaf names of every registered rule's parameters (e.g. `momentum_beta`, `newton_lambda`)."""
    return {parameter.name for rule in registered_rules() for parameter in rule.parameters}


def _records_statistics(module: nn.Module) -> bool:
    return callable(getattr(module, "step_sizes", None)) and isinstance(getattr(module, "newton_lambda", None),
                                                                         torch.Tensor)


@torch.no_grad()
def _record(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    """Fraction of token-heads where the soft bound engages (|lambda| s > bound: lambda shrunk by > 29 %), and where a
    hard clip on `|lambda| * trace(Sigma)` (newton_light: the largest diagonal entry of Sigma) would engage."""
    inputs = inspect.signature(module.forward).bind(*args, **kwargs).arguments
    extra = inputs.get("kwargs", {})
    step_size, spread = module.step_sizes(inputs["query"], inputs["key"], inputs["value"], inputs["attention_mask"],
                                          inputs.get("scaling", extra.get("scaling", 1.0)))
    lam = module.newton_lambda.float().abs().view(1, -1, 1, 1)
    bound = module.step_bound
    _LAST_STATISTICS[module] = {
        "bound_engagement": float((lam * step_size > (bound if bound is not None else float("inf"))).float().mean()),
        "trace_rule_engagement": float(
            (lam * spread.clamp(min=0) > (bound or TRACE_CLIP_WITHOUT_BOUND)).float().mean()
        ),
    }


class record_solver_statistics:
    """Context manager: while active, the head rules that offer `step_sizes` (Newton's) record how often their step
    bound engages at every forward. `solver_report` reads the values of the last forward."""

    def __init__(self, model: nn.Module):
        self.rules = [module for module in model.modules() if _records_statistics(module)]
        self.handles: list = []

    def __enter__(self):
        for rule in self.rules:
            _LAST_STATISTICS.pop(rule, None)
            self.handles.append(rule.register_forward_hook(_record, with_kwargs=True))
        return self

    def __exit__(self, *exc_info):
        for handle in self.handles:
            handle.remove()
        self.handles = []


def decay_gates(head_rule: nn.Module) -> list[float] | None:
    """The per-head decay a head rule learned, as the gate g_h in (0, 1) (None where it has none): `gated_linear`'s
    constant gate and `softmax_decay`'s recency decay, sigmoid(gate_logit); the data gate at `k . w = 0`,
    sigmoid(gate_bias)^(1 / tau)."""
    if isinstance(logit := getattr(head_rule, "gate_logit", None), torch.Tensor):
        return torch.sigmoid(logit.detach().float()).cpu().tolist()
    if isinstance(bias := getattr(head_rule, "gate_bias", None), torch.Tensor):
        temperature = float(getattr(head_rule, "gate_temperature", 1.0))
        return torch.sigmoid(bias.detach().float()).pow(1.0 / temperature).cpu().tolist()
    return None


def solver_report(model: nn.Module, input_ids: torch.Tensor | None = None,
                  attention_mask: torch.Tensor | None = None) -> dict[str, Any]:
    """What the solvers learned: {"parameters": {name: [value per layer (a list for per-head values), None where the
    layer has none]}, "newton_bound_engagement": [fraction per layer or None], "newton_trace_rule_engagement": [...],
    "decay_gate": [per-head gates g_h per layer, or None] (see `decay_gates`)}.
    The engagement fractions are those of the last forward run under `record_solver_statistics(model)`. Given
    `input_ids` (and their `attention_mask`), the report also holds `energy_gpt.energy_descent.energy_descent_report`
    on them: "energy_descent_fraction" and "energy_descent_mean_change", per layer and head."""
    report = _learned_values(model)
    if input_ids is not None:
        report.update(energy_descent_report(model, input_ids, attention_mask))
    return report


def _learned_values(model: nn.Module) -> dict[str, Any]:
    blocks = model_blocks(model)
    report: dict[str, Any] = {"parameters": {}, "newton_bound_engagement": [], "newton_trace_rule_engagement": [],
                              "decay_gate": []}
    names = sorted(solver_parameter_names())
    for layer, block in enumerate(blocks):
        for name in names:
            values = [tensor for module in (block.residual_rule, block.attn.head_rule)
                      if isinstance(tensor := getattr(module, name, None), torch.Tensor)]
            if values:
                report["parameters"].setdefault(name, [None] * len(blocks))[layer] = values[0].detach().float().cpu().tolist()
        statistics = _LAST_STATISTICS.get(block.attn.head_rule, {})
        for key in ("bound_engagement", "trace_rule_engagement"):
            value = statistics.get(key)
            report[f"newton_{key}"].append(None if value is None else float(value))
        report["decay_gate"].append(decay_gates(block.attn.head_rule))
    return report


__all__ = ["decay_gates", "record_solver_statistics", "solver_parameter_names", "solver_report"]
