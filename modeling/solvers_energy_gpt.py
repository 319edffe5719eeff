"""Attention solvers: how one EnergyGPT layer takes its optimisation step on the attention energy.

Energy of one attention step (DESIGN.md section 1), per head, for a query state z and causal anchors v_i:
    F(z) = -T log sum_i exp(-||z - v_i||^2 / 2T),   grad F = z - mu,   Hess F = I - Sigma / T,
    p_i = softmax_i(z.v_i / T),   mu = sum_i p_i v_i,   Sigma = sum_i p_i (v_i - mu)(v_i - mu)^T.
One gradient step is softmax attention plus its residual. The other solvers are the textbook optimisers on the same
energy, *as specified in this project's DESIGN notes* (the paper's body was not available).

A solver is one of two kinds of rule, each a module whose `forward` is called (so accelerate's `device_map` hooks see
its parameters):
  * a **residual rule** (block level): how the attention output moves the residual stream across depth
    (`gd`, `momentum`, `nag`, `dense`), called twice per block: `rule(x, state)` gives the point the attention reads
    (Nesterov's lookahead), `rule(x, state, attn_output)` gives the new residual stream and state;
  * a **head rule** (attention level): what each head returns from its queries, keys and values (`newton`,
    `newton_light`; the energies' own rules, e.g. plain softmax attention, live in `ATTENTION_ENERGIES`).

Every rule (solver, energy or local energy) declares itself once, with `Solver(...)`: its rule class, config fields
(default, check, GPT-2-preserving value), checks across fields, parameters (name, shape, initialiser, per head or not),
properties (the state it carries across layers, whether it supports looped depth, whether it reads the KV cache, ...),
paper name and model-card description. The config and the model read these declarations; the package (`energy_gpt`:
model card, conversion, reports, recipes, benchmarks) reads the same registry. Adding a solver means writing its rule
and one `register_solver(...)` call (docs/solvers.md, "Adding a solver").
"""

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .newton_kernels_energy_gpt import fused_kernels_available, light_second_moment, newton_second_moments


NO_PRESERVING_VALUE = object()  # a field whose value does not matter for GPT-2 equivalence
RESIDUAL, HEAD = "residual", "head"

# Newton forms attention-shaped (T x S) products; queries are processed in chunks of this size on the fused
# (SDPA / flash) path so that memory grows linearly with the sequence length.
NEWTON_QUERY_CHUNK = 256


# ---------------------------------------------------------------------------------------------------------------------
# Declarations
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SolverField:
    """A config field owned by a solver: default, check (raises `ValueError` naming the field), documentation, and the
    value at which the solver computes GPT-2 (`NO_PRESERVING_VALUE` when any value does; `None` when no value does)."""

    name: str
    default: Any
    check: Callable[[Any], None]
    doc: str
    gpt2_value: Any = NO_PRESERVING_VALUE


ParameterInit = str | Callable[[Any, int, tuple[int, ...]], torch.Tensor]


@dataclass(frozen=True)
class SolverParameter:
    """A tensor of a rule, created on every layer whose `shape(config, layer_idx)` is not `None`.

    `init` is how it starts: the name of a config field (every element set to that field's value) or a function
    `init(config, layer_idx, shape) -> tensor` (e.g. RetNet's per-head decays). `shape` returning `None` means the
    layer has no such tensor (e.g. the first momentum layer, which sees no velocity: a parameter that never gets a
    gradient breaks DDP). `per_head=True` declares that the first axis is the attention head (size `n_head`), so that
    tensor-parallel plans shard it with its heads. `always_learned=True` keeps it a trained parameter even with
    `learn_solver_params=False` (which otherwise makes it a saved constant).
    """

    name: str
    init: ParameterInit
    shape: Callable[[Any, int], tuple[int, ...] | None]
    doc: str
    per_head: bool = False
    always_learned: bool = False


@dataclass(frozen=True)
class Solver:
    """Everything the project knows about one rule (a solver, an energy or a local energy), declared once.

    Residual rules declare the state they carry across layers (`state_kind`, `None`: nothing), whether that state can
    go round the block stack again (`supports_loops`), whether their lookahead point feeds only the queries
    (`queries_only_lookahead`, a bool or a function of the config) and whether a lone head rule composes with them
    (`default_residual`). Head rules declare whether they read the usual KV cache (`uses_kv_cache`), whether they are
    one call of the attention interface on (q, k, v) and nothing more (`single_attention_call`: then a serving engine
    that keeps the keys and values itself, as vLLM's Transformers backend does, can serve them) and the energies
    they exist for (`energies`; for a local energy: the energies it modifies). `reduces_to_gpt2` is whether the rule
    computes exactly GPT-2 at its fields' `gpt2_value`s; `check_config(config)` runs checks across fields.
    """

    name: str
    kind: str  # RESIDUAL or HEAD
    rule: type[nn.Module]
    paper_name: str
    description: str  # one paragraph for the model card
    update_rule: str = ""  # the update in one line, for the model card and docs
    fields: tuple[SolverField, ...] = ()
    parameters: tuple[SolverParameter, ...] = ()
    energies: tuple[str, ...] | None = None  # head rules: the energies they are defined for (None: all)
    check_config: Callable[[Any], None] | None = None
    reduces_to_gpt2: bool = True
    state_kind: str | None = None
    supports_loops: bool = True
    queries_only_lookahead: bool | Callable[[Any], bool] = False
    default_residual: bool = False
    uses_kv_cache: bool = True
    single_attention_call: bool = False


ATTENTION_SOLVERS: dict[str, Solver] = {}
ATTENTION_ENERGIES: dict[str, Solver] = {}  # energy name -> its plain (one gradient step) head rule
LOCAL_ENERGIES: dict[str, Solver | None] = {"elastic": None}  # None: the energy's own head rule


def register_solver(solver: Solver, registry: dict | None = None) -> Solver:
    """Add a solver (or, with `registry=ATTENTION_ENERGIES` / `LOCAL_ENERGIES`, an energy) to the registry."""
    registry = ATTENTION_SOLVERS if registry is None else registry
    if solver.kind not in (RESIDUAL, HEAD):
        raise ValueError(f"`Solver.kind` must be {RESIDUAL!r} or {HEAD!r}, got {solver.kind!r}.")
    registry[solver.name] = solver
    return solver


def registered_rules() -> list[Solver]:
    """Every declared rule: solvers, energies and local energies."""
    rules = [*ATTENTION_SOLVERS.values(), *ATTENTION_ENERGIES.values(), *LOCAL_ENERGIES.values()]
    return [rule for rule in rules if rule is not None]


def solver_config_fields() -> dict[str, SolverField]:
    """All config fields declared by registered rules, by name (a field shared by two rules is declared once)."""
    fields: dict[str, SolverField] = {}
    for rule in registered_rules():
        for solver_field in rule.fields:
            fields.setdefault(solver_field.name, solver_field)
    return fields


# ---------------------------------------------------------------------------------------------------------------------
# Resolving a config's per-layer solvers
# ---------------------------------------------------------------------------------------------------------------------


def _solver_names_message() -> str:
    residual = [name for name, solver in ATTENTION_SOLVERS.items() if solver.kind == RESIDUAL]
    heads = [name for name, solver in ATTENTION_SOLVERS.items() if solver.kind == HEAD]
    return f"{sorted(ATTENTION_SOLVERS)} or '<residual>+<head>' with residual in {residual} and head in {heads}"


def parse_solver(name: Any) -> tuple[Solver, Solver | None]:
    """`"nag"` -> (nag, None); `"newton"` -> (gd, newton); `"nag+newton_light"` -> (nag, newton_light)."""
    parts = name.split("+") if isinstance(name, str) else [None]
    solvers = [ATTENTION_SOLVERS.get(part) for part in parts]
    kinds = [solver.kind if solver else None for solver in solvers]
    if len(parts) == 1 and solvers[0] is not None:
        return (solvers[0], None) if kinds[0] == RESIDUAL else (default_residual(), solvers[0])
    if len(parts) == 2 and kinds == [RESIDUAL, HEAD]:
        return solvers[0], solvers[1]
    raise ValueError(f"`attention_solver` must be one of {_solver_names_message()}, got {name!r}.")


def default_residual() -> Solver:
    """The residual rule a head rule named alone composes with (the one declared `default_residual=True`)."""
    for solver in ATTENTION_SOLVERS.values():
        if solver.kind == RESIDUAL and solver.default_residual:
            return solver
    raise ValueError("No registered residual rule is declared `default_residual=True`.")


def layer_solver_names(config) -> list[str]:
    """The solver of every layer (a single name applies to all)."""
    schedule = config.attention_solver
    return list(schedule) if isinstance(schedule, (list, tuple)) else [schedule] * config.n_layer


def layer_solvers(config, layer_idx: int) -> tuple[Solver, Solver | None]:
    return parse_solver(layer_solver_names(config)[layer_idx])


def validate_solver_schedule(config) -> None:
    """Checks that need the whole config: the per-layer list, which energies a head rule exists for, and state kinds
    that cannot be mixed. Raises `ValueError` naming the field and the allowed values."""
    schedule = config.attention_solver
    if isinstance(schedule, (list, tuple)):
        if len(schedule) != config.n_layer:
            raise ValueError(
                f"`attention_solver` as a list needs one solver per layer: got {len(schedule)} for `n_layer`="
                f"{config.n_layer}."
            )
    elif not isinstance(schedule, str):
        raise ValueError(f"`attention_solver` must be a solver name or a list of names, got {schedule!r}.")
    parsed = [parse_solver(name) for name in layer_solver_names(config)]
    local = LOCAL_ENERGIES[config.local_energy]
    if local is not None and local.energies is not None and config.attention_energy not in local.energies:
        raise ValueError(
            f"`local_energy`={config.local_energy!r} is defined for `attention_energy`="
            f"{' / '.join(map(repr, local.energies))} only, got {config.attention_energy!r}."
        )
    for residual, head in parsed:
        if head is None:
            continue
        if head.energies is not None and config.attention_energy not in head.energies:
            raise ValueError(
                f"`attention_solver`={head.name!r} does not exist for `attention_energy`={config.attention_energy!r} "
                f"(defined for {list(head.energies)}); see the energy x optimiser table in the README."
            )
        if local is not None:
            raise ValueError(
                f"`attention_solver`={head.name!r} is not derived for `local_energy`={config.local_energy!r}: use a "
                f"residual solver ({[n for n, s in ATTENTION_SOLVERS.items() if s.kind == RESIDUAL]}) with it."
            )
    used = [rule for residual, head in parsed for rule in (residual, head) if rule is not None]
    for rule in dict.fromkeys([*used, ATTENTION_ENERGIES[config.attention_energy], local]):
        if rule is not None and rule.check_config is not None:
            rule.check_config(config)
    state_kinds = {residual.name: residual.state_kind for residual, _ in parsed if residual.state_kind is not None}
    if len(set(state_kinds.values())) > 1:
        raise ValueError(
            f"`attention_solver` mixes residual rules that carry different states across layers ({state_kinds}): got "
            f"{schedule!r}; use residual rules of one state kind (or none) in one schedule."
        )
    looping = sorted({residual.name for residual, _ in parsed if not residual.supports_loops})
    if config.num_loops > 1 and looping:
        raise ValueError(
            f"`num_loops` > 1 is not supported with `attention_solver` {looping}: their state grows with depth (one "
            f"weight per earlier layer); got `num_loops`={config.num_loops}."
        )


def _residual_state_kinds(config) -> list[str | None]:
    """The kind of state each layer's residual rule carries across layers (None: none)."""
    return [parse_solver(name)[0].state_kind for name in layer_solver_names(config)]


def has_incoming_state(config, layer_idx: int) -> bool:
    """Whether layer `layer_idx` can receive a residual-rule state from an earlier layer (or from the previous loop)."""
    kinds = _residual_state_kinds(config)
    kind = kinds[layer_idx]
    earlier = kinds[:layer_idx] if config.num_loops == 1 else kinds
    return kind is not None and kind in earlier


def earlier_layers_sharing_state(config, layer_idx: int) -> int:
    """How many earlier layers carry the same kind of state as this layer's residual rule (0 for a rule with none)."""
    kinds = _residual_state_kinds(config)
    return 0 if kinds[layer_idx] is None else kinds[:layer_idx].count(kinds[layer_idx])


def declared_parameters(rule_class: type[nn.Module]) -> tuple[SolverParameter, ...]:
    """The parameters declared for a rule class (by the registered rule whose class it is, or a parent's)."""
    for cls in rule_class.__mro__:
        for rule in registered_rules():
            if rule.rule is cls and rule.parameters:
                return rule.parameters
    return ()


def initial_value(parameter: SolverParameter, config, layer_idx: int, shape: tuple[int, ...]) -> torch.Tensor:
    """A declared parameter's initial value: its config field's value everywhere, or what its init function gives."""
    if isinstance(parameter.init, str):
        return torch.full(shape, float(getattr(config, parameter.init)))
    value = torch.as_tensor(parameter.init(config, layer_idx, shape), dtype=torch.float32)
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"The init of solver parameter `{parameter.name}` gave shape {tuple(value.shape)}, "
                         f"expected {tuple(shape)}.")
    return value


def add_solver_parameters(module: nn.Module, config, layer_idx: int) -> None:
    """Create the parameters declared for this rule on `module`, at their initial values: trained parameters, or fixed
    (saved) buffers under the same state-dict names when `learn_solver_params=False` (unless declared
    `always_learned`). The model's `_init_weights` sets them again through `init_solver_parameters`."""
    module.solver_parameters = []
    module.solver_layer_idx = layer_idx
    for parameter in declared_parameters(type(module)):
        shape = parameter.shape(config, layer_idx)
        if shape is None:
            continue
        if shape == (1,) and parameter.name in _ZERO_DIM_WHILE_LOADING.get():
            shape = ()
        tensor = initial_value(parameter, config, layer_idx, shape)
        if parameter.always_learned or getattr(config, "learn_solver_params", True):
            module.register_parameter(parameter.name, nn.Parameter(tensor))
        else:
            module.register_buffer(parameter.name, tensor, persistent=True)
        module.solver_parameters.append(parameter)
    if module.solver_parameters:
        module.register_load_state_dict_pre_hook(_reshape_zero_dim_scalars)


# Per-layer scalars are (1,) because FSDP2 cannot shard 0-dim tensors; checkpoints of earlier releases hold them 0-dim.
# transformers' loader compares shapes before any torch hook runs, so `from_pretrained` builds the named parameters
# 0-dim while it loads such a checkpoint (`zero_dim_while_loading`) and then reshapes them (`reshape_zero_dim_scalars`).
_ZERO_DIM_WHILE_LOADING: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar(
    "energy_gpt_zero_dim_while_loading", default=frozenset()
)


@contextlib.contextmanager
def zero_dim_while_loading(names: set[str]) -> Iterator[None]:
    """Rules built inside this block create their (1,) parameters named in `names` 0-dim, as older checkpoints hold them."""
    token = _ZERO_DIM_WHILE_LOADING.set(frozenset(names))
    try:
        yield
    finally:
        _ZERO_DIM_WHILE_LOADING.reset(token)


def reshape_zero_dim_scalars(model: nn.Module, names: set[str]) -> None:
    """Give the parameters named in `names` that were built 0-dim (`zero_dim_while_loading`) their current shape (1,),
    keeping value and trainability; a rule that declares a 0-dim parameter itself keeps it."""
    for module in model.modules():
        for parameter in getattr(module, "solver_parameters", ()):
            tensor = getattr(module, parameter.name)
            if tensor.ndim != 0 or parameter.name not in names:
                continue
            if isinstance(tensor, nn.Parameter):
                setattr(module, parameter.name, nn.Parameter(tensor.detach().reshape(1), tensor.requires_grad))
            else:
                module.register_buffer(parameter.name, tensor.reshape(1), persistent=True)


def _reshape_zero_dim_scalars(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """`load_state_dict` pre-hook: a 0-dim value saved for a (1,) parameter loads as (1,)."""
    for parameter in module.solver_parameters:
        key = prefix + parameter.name
        value = state_dict.get(key)
        if isinstance(value, torch.Tensor) and value.ndim == 0 and tuple(getattr(module, parameter.name).shape) == (1,):
            state_dict[key] = value.reshape(1)


def init_solver_parameters(module: nn.Module, config, init) -> None:
    """Set a rule's declared parameters to their initial values (called from `_init_weights` with transformers'
    `initialization` module, whose `copy_` skips tensors already loaded from a checkpoint)."""
    for parameter in getattr(module, "solver_parameters", ()):
        tensor = getattr(module, parameter.name)
        init.copy_(tensor, initial_value(parameter, config, module.solver_layer_idx, tuple(tensor.shape)))

# ---------------------------------------------------------------------------------------------------------------------
# Field checks
# ---------------------------------------------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_number_in(name: str, low: float, high: float, low_open: bool = False, high_open: bool = False):
    def check(value: Any) -> None:
        ok = _is_number(value) and (low < value if low_open else low <= value) and (value < high if high_open else value <= high)
        if not ok:
            interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            raise ValueError(f"`{name}` must be a float in {interval}, got {value!r}.")

    return check


def check_finite(name: str):
    def check(value: Any) -> None:
        if not _is_number(value) or not math.isfinite(value):
            raise ValueError(f"`{name}` must be a finite float, got {value!r}.")

    return check


def check_positive(name: str):
    def check(value: Any) -> None:
        if not _is_number(value) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"`{name}` must be a finite number > 0, got {value!r}.")

    return check


def check_choice(name: str, allowed: tuple):
    def check(value: Any) -> None:
        if value not in allowed:
            raise ValueError(f"`{name}` must be one of {list(allowed)}, got {value!r}.")

    return check


def check_bool(name: str):
    def check(value: Any) -> None:
        if not isinstance(value, bool):
            raise ValueError(f"`{name}` must be a bool (True or False), got {value!r}.")

    return check


def _check_step_bound(value: Any) -> None:
    if value is not None and (not _is_number(value) or not 0.0 < value < float("inf")):
        raise ValueError(f"`newton_step_bound` must be a positive float or None (no bound), got {value!r}.")


# ---------------------------------------------------------------------------------------------------------------------
# Residual rules (block level)
# ---------------------------------------------------------------------------------------------------------------------


class PlainResidual(nn.Module):
    """`gd`: `x' = x + A(LN1(x))`, exactly GPT-2. A state from earlier layers (in a per-layer schedule) passes through
    unchanged."""

    def __init__(self, config, layer_idx: int):
        super().__init__()

    def forward(self, hidden_states, state, attn_output=None):
        if attn_output is None:
            return hidden_states
        return hidden_states + attn_output, state


MOMENTUM_FORMS = ("heavy_ball", "ema")


class MomentumResidual(nn.Module):
    """`momentum` (MomenMHA): momentum across layers, `g = A(LN1(x)); m = beta_l m + g; x' = x + m` (heavy ball) or
    `m = beta_l m + (1 - beta_l) g` (`momentum_form="ema"`), with m = g at the first momentum layer (so the EMA starts
    bias-corrected). `momentum_velocity_norm=True` adds `x' = x + LayerNorm(m)`, the stabiliser reproductions of
    momentum-stream transformers needed. The state never mixes positions, so causality and the KV cache are
    untouched; unrolled it is a dense skip over earlier attention outputs."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        add_solver_parameters(self, config, layer_idx)
        self.ema = config.momentum_form == "ema"
        self.velocity_norm = (
            nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon) if config.momentum_velocity_norm else None
        )

    def forward(self, hidden_states, velocity, attn_output=None):
        if attn_output is None:
            return hidden_states
        if velocity is None:
            velocity = attn_output
        elif self.ema:
            velocity = torch.lerp(attn_output, velocity, self.momentum_beta)  # beta m + (1 - beta) g
        else:
            velocity = self.momentum_beta * velocity + attn_output
        step = velocity if self.velocity_norm is None else self.velocity_norm(velocity)
        return hidden_states + step, velocity


NAG_LOOKAHEAD_MODES = ("qkv", "query")
NEWTON_PATHS = ("torch", "triton")


class NesterovResidual(MomentumResidual):
    """`nag` (NagMHA): Nesterov momentum. `y = x + beta_l m; g = A(LN1(y))`, then the momentum update. With
    `nag_lookahead="query"` only the queries are taken at y (keys and values from x)."""

    def forward(self, hidden_states, velocity, attn_output=None):
        if attn_output is None:  # the lookahead point (x itself where there is no velocity yet)
            return hidden_states if velocity is None else hidden_states + self.momentum_beta * velocity
        return super().forward(hidden_states, velocity, attn_output)


class DenseResidual(nn.Module):
    """`dense` (DenseFormer-style control): `x' = x + g_l + sum_{j<l} alpha_{l,j} g_j`, a learned weighted sum of all
    earlier attention outputs, explicit rather than implied by momentum (whose unrolled weights are products of
    betas). With every alpha = 0 (`dense_init=0`, the default) it is exactly GPT-2."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        add_solver_parameters(self, config, layer_idx)

    def forward(self, hidden_states, history, attn_output=None):
        if attn_output is None:
            return hidden_states
        step = attn_output
        if history is None:
            history = attn_output.unsqueeze(0)
        else:
            weights = self.dense_weights.to(attn_output.dtype).view(-1, *([1] * attn_output.ndim))
            step = attn_output + (weights * history).sum(0)
            history = torch.cat([history, attn_output.unsqueeze(0)])
        return hidden_states + step, history


def _one_weight_per_earlier_layer(config, layer_idx: int) -> tuple[int, ...] | None:
    count = earlier_layers_sharing_state(config, layer_idx)
    return (count,) if count else None


# ---------------------------------------------------------------------------------------------------------------------
# Head rules (attention level)
# ---------------------------------------------------------------------------------------------------------------------


def key_positions_hidden(q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    """Boolean (q_len, kv_len): True where a causal query may not see the key (queries = the last q_len positions)."""
    query_positions = torch.arange(kv_len - q_len, kv_len, device=device).unsqueeze(-1)
    return torch.arange(kv_len, device=device) > query_positions


def keys_visible_without_mask(key, value, attention_mask, q_len: int):
    """Keys and values a causal query can see when SDPA's mask was skipped (`None`). transformers skips it for
    `q_len > 1` only when `kv_len == q_len` or the cache is empty (a static cache's prefill, whose later slots are
    empty) and then relies on SDPA's upper-left `is_causal`: keys past `q_len` are invisible. Dropping them lets the
    lower-right rule of `key_positions_hidden` read the same mask."""
    if attention_mask is None and 1 < q_len < key.shape[2]:
        return key[:, :, :q_len], value[:, :, :q_len]
    return key, value


def fused_kernel_padding(query, key, attention_mask, key_padding_mask) -> tuple[bool, torch.Tensor | None]:
    """Whether the fused Triton kernels can take this call (CUDA with Triton, or its interpreter), and their key
    padding mask. The kernels know "causal + key padding" only: a mask transformers skipped (`None`), or one it built
    from the 2D padding mask the model was given (`key_padding_mask`); any other 4D mask takes the PyTorch path."""
    if not fused_kernels_available(query):
        return False, None
    if attention_mask is None or (isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2):
        padding = attention_mask if attention_mask is not None else None
        return True, None if padding is None else padding[:, : key.shape[2]].bool()
    if key_padding_mask is not None and key_padding_mask.shape[-1] == key.shape[2]:
        return True, key_padding_mask
    return False, None


def attention_probabilities(query, key, attention_mask, scaling: float) -> torch.Tensor:
    """Causal softmax attention weights in fp32, whatever form the mask takes: `None` (pure causal, as `sdpa` leaves
    it), boolean 4D (True = keep), additive float 4D (`eager`), or the 2D padding mask of flash attention. Queries are
    the last `q_len` of the `kv_len` positions."""
    if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
        raise ValueError(
            f"The Newton head rules need the attention probabilities and cannot read a {type(attention_mask).__name__} "
            "mask (flex attention): use attn_implementation='sdpa', 'eager' or a flash / custom kernel."
        )
    # Scale the (smaller) query instead of the scores, and mask in place: one pass less over the T x S scores.
    scores = torch.matmul(query.float() * scaling, key.float().transpose(-1, -2))
    q_len, kv_len = scores.shape[-2:]
    lowest = torch.finfo(scores.dtype).min
    if attention_mask is None or attention_mask.ndim == 2:
        scores.masked_fill_(key_positions_hidden(q_len, kv_len, scores.device), lowest)
        if attention_mask is not None:  # flash attention's (batch, kv_len) padding mask, 1 = real token
            scores.masked_fill_(~attention_mask[:, None, None, :kv_len].bool(), lowest)
    elif attention_mask.dtype == torch.bool:
        scores.masked_fill_(~attention_mask[..., :kv_len], lowest)
    else:
        scores.add_(attention_mask[..., :kv_len].float())
    return torch.softmax(scores, dim=-1)


def softmax_attention_weights(
    attention, query, key, value, attention_mask, *, scaling: float, **kwargs
) -> torch.Tensor:
    """The softmax attention weights (B, H, Tq, S) of one call, before attention dropout, for `output_attentions=True`
    on backends that do not return them (sdpa, flash, custom kernels): the same probabilities eager returns."""
    key, _ = keys_visible_without_mask(key, value, attention_mask, query.shape[2])
    return attention_probabilities(query, key, attention_mask, scaling).to(query.dtype)


class _ChunkSecondMoments(torch.autograd.Function):
    """For one chunk of queries: `(sum_i p_ti (v_i . mu_t) v_i,  sum_i p_ti ||v_i||^2)`, the two attention-shaped
    products behind `Sigma_t mu_t` and `trace(Sigma_t)`, with `p` recomputed from q and k.

    Nothing attention-shaped is saved for the backward pass: it recomputes `p` and `v . mu` from the inputs (so memory
    grows linearly with the sequence length, as with SDPA) and applies the hand-derived gradients.
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
            # Softmax backward, dL/ds_ti = p_ti (dL/dp_ti - sum_j p_tj dL/dp_tj), in place on the chunk's buffer.
            grad_scores = grad_probs.sub_((grad_probs * probs).sum(-1, keepdim=True)).mul_(probs)
            if needs_query:
                grad_query = (torch.matmul(grad_scores, key.float()) * ctx.scaling).to(query.dtype)
            if needs_key:
                grad_key = (torch.matmul(grad_scores.transpose(-1, -2), query.float()) * ctx.scaling).to(key.dtype)
        return grad_query, grad_key, grad_value, grad_norms, grad_mean, None, None


def bounded_lambda(newton_lambda: torch.Tensor, step_size: torch.Tensor, step_bound: float | None) -> torch.Tensor:
    """Per token and head lambda with a soft bound on the step: `lambda / sqrt(1 + (lambda * s / bound)^2)`.

    `s = ||Sigma mu|| / ||mu||` (or its diagonal analogue) is the size of the correction relative to mu, so the
    correction `lambda_eff * Sigma mu` always stays below `bound * ||mu||`, in any precision and at any length. The
    scale is smooth: the gradient of lambda is `(1 + x^2)^(-3/2) > 0` wherever lambda is finite (the earlier hard clip
    had zero gradient where it engaged), lambda = 0 gives exactly 0 (GPT-2), and `step_bound=None` gives the plain
    first-order formula with no scaling (the paper's form).
    """
    lam = newton_lambda.float().view(1, -1, 1, 1)
    if step_bound is None:
        return lam
    return lam * torch.rsqrt(1.0 + (lam * step_size / step_bound).square())


def _relative_size(step: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    norm = torch.linalg.vector_norm
    return norm(step, dim=-1, keepdim=True) / norm(mean, dim=-1, keepdim=True).clamp_min(1e-30)


class NewtonHeads(nn.Module):
    """`newton` (MHA2nd1st): a Newton step with the first-order (Neumann) inverse Hessian `I + lambda * Sigma`.
    Per head `o = mu + lambda_h * Sigma mu` (the query state's own term dropped, as the GD step drops `-eta z`), with
    `Sigma_t mu_t = sum_i p_ti (v_i . mu_t) v_i - (2 - s_t)(mu_t . mu_t) mu_t`, `s_t = sum_i p_ti` (1 without dropout),
    under the query's own causal softmax; no d_h x d_h matrix is formed. lambda is soft-bounded per token (see
    `bounded_lambda`).

    Dropout: with `attn_pdrop > 0` in training, one dropped-out distribution `p~ = dropout(p)` feeds both mu (exactly
    GPT-2's dropped attention) and Sigma, centred at that mu (`Sigma = sum_i p~_i (v_i - mu)(v_i - mu)^T`, positive
    semi-definite for any mask); the probabilities are then materialised on every backend, so eager and SDPA compute
    the same function from the same random state.
    """

    # `output_attentions=True`: the softmax probabilities p the step is taken under (what eager returns). The output
    # is no single weighting of the values per head (`newton_light` rescales each channel), so p is what is defined.
    attention_weights = staticmethod(softmax_attention_weights)

    def __init__(self, config, layer_idx: int):
        super().__init__()
        add_solver_parameters(self, config, layer_idx)
        self.step_bound = config.newton_step_bound
        self.fused_kernels = config.newton_path == "triton"  # opt-in: see the `newton_path` field

    def forward(self, attention, query, key, value, attention_mask, attention_interface=None, dropout: float = 0.0,
                scaling: float = 1.0, cache=None, cache_index=None, key_padding_mask=None, **kwargs):
        key, value = keys_visible_without_mask(key, value, attention_mask, query.shape[2])
        if dropout > 0.0:
            probs = nn.functional.dropout(attention_probabilities(query, key, attention_mask, scaling), p=dropout)
            mean = torch.matmul(probs, value.float())
            mass = probs.sum(-1, keepdim=True)
            correction = self._bounded(*self._step_from_probabilities(probs, value.float(), mean, mass))
            return (mean + correction).to(value.dtype).transpose(1, 2), probs.to(value.dtype)
        # mu through the attention interface, so lambda = 0 reproduces GPT-2 bit for bit on every backend.
        attn_output, attn_weights = attention_interface(attention, query, key, value, attention_mask,
                                                        dropout=0.0, scaling=scaling, **kwargs)
        mean = attn_output.transpose(1, 2).float()  # (batch, heads, q_len, head_dim)
        use_kernel, padding = (fused_kernel_padding(query, key, attention_mask, key_padding_mask)
                               if self.fused_kernels else (False, None))
        if attn_weights is not None:  # eager returns the probabilities: reuse them
            correction = self._bounded(*self._step_from_probabilities(attn_weights.float(), value.float(), mean, None))
        elif use_kernel:  # CUDA: one fused flash-style pass over the keys (newton_kernels_energy_gpt.py)
            products, second_moment = newton_second_moments(query, key, value, mean, scaling, padding)
            correction = self._bounded(*self._covariance_step(products, second_moment, mean, None))
        else:
            correction = self._fused_correction(query, key, value.float(), mean, attention_mask, scaling)
        return (mean + correction).to(attn_output.dtype).transpose(1, 2), attn_weights

    @torch.no_grad()
    def step_sizes(self, query, key, value, attention_mask, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Per token and head (batch, heads, q_len, 1), from the materialised probabilities (for statistics, outside
        the forward path): the size `s` of the unbounded correction relative to mu (the soft bound engages where
        `|lambda| s > newton_step_bound`), and the spread of the values, `trace(Sigma)` (`newton_light`: the largest
        diagonal entry of Sigma), which a hard clip on `|lambda| trace(Sigma)` would have limited."""
        key, value = keys_visible_without_mask(key, value, attention_mask, query.shape[2])
        probs = attention_probabilities(query, key, attention_mask, scaling)
        mean = torch.matmul(probs, value.float())
        _, step_size, spread = self._step_from_probabilities(probs, value.float(), mean, None)
        return step_size, spread

    def _fused_correction(self, query, key, value, mean, attention_mask, scaling):
        """Query chunks with recomputed probabilities (SDPA does not return them). Attention is causal, so a chunk only
        reads the first `kv_len - q_len + end` keys. No T x S tensor outlives its chunk."""
        squared_norms = (value * value).sum(-1, keepdim=True)  # ||v_i||^2, for the trace of Sigma
        q_len, kv_len = query.shape[2], key.shape[2]
        products, second_moments = [], []
        for start in range(0, q_len, NEWTON_QUERY_CHUNK):
            end = min(start + NEWTON_QUERY_CHUNK, q_len)
            visible = kv_len - q_len + end
            mask = attention_mask
            if mask is not None and mask.ndim == 4:
                mask = mask[:, :, start:end, :visible] if mask.shape[2] > 1 else mask[..., :visible]
            chunk = _ChunkSecondMoments.apply(query[:, :, start:end], key[:, :, :visible], value[:, :, :visible],
                                              squared_norms[:, :, :visible], mean[:, :, start:end], mask, scaling)
            products.append(chunk[0])
            second_moments.append(chunk[1])
        return self._bounded(*self._covariance_step(torch.cat(products, dim=2), torch.cat(second_moments, dim=2), mean,
                                                    None))

    def _step_from_probabilities(self, probs, value, mean, mass):
        products = torch.matmul(probs * torch.matmul(mean, value.transpose(-1, -2)), value)
        return self._covariance_step(products, torch.matmul(probs, (value * value).sum(-1, keepdim=True)), mean, mass)

    def _covariance_step(self, products, second_moment, mean, mass):
        """(Sigma mu, its size relative to mu, trace(Sigma)) from `sum_i p_i (v_i . mu) v_i` and `sum_i p_i ||v_i||^2`
        (per token and head)."""
        centring = (mean * mean).sum(-1, keepdim=True)
        if mass is not None:
            centring = (2.0 - mass) * centring
        sigma_mean = products - centring * mean
        return sigma_mean, _relative_size(sigma_mean, mean), second_moment - centring

    def _bounded(self, step: torch.Tensor, step_size: torch.Tensor, spread: torch.Tensor) -> torch.Tensor:
        """lambda_eff * step, lambda soft-bounded by the step's relative size (`spread` serves `step_sizes` only)."""
        return bounded_lambda(self.newton_lambda, step_size, self.step_bound) * step


class LightNewtonHeads(NewtonHeads):
    """`newton_light` (LightMHA2nd1st): Newton with a diagonal covariance, `o = mu + lambda_h * var * mu` with
    `var = E_p[v*v] - (2 - s) mu*mu` (`s` as in `newton`). `E_p[v*v]` is one more attention pass with values `v*v`
    through the same attention interface, so it runs on SDPA / flash without materialising the T x T matrix."""

    def forward(self, attention, query, key, value, attention_mask, attention_interface=None, dropout: float = 0.0,
                scaling: float = 1.0, cache=None, cache_index=None, key_padding_mask=None, **kwargs):
        key, value = keys_visible_without_mask(key, value, attention_mask, query.shape[2])
        squared_values = value.float().square()
        if dropout > 0.0:
            probs = nn.functional.dropout(attention_probabilities(query, key, attention_mask, scaling), p=dropout)
            mean = torch.matmul(probs, value.float())
            output = mean + self._bounded(*self._step_from_probabilities(probs, value.float(), mean,
                                                                         probs.sum(-1, keepdim=True)))
            return output.to(value.dtype).transpose(1, 2), probs.to(value.dtype)
        attn_output, attn_weights = attention_interface(attention, query, key, value, attention_mask,
                                                        dropout=0.0, scaling=scaling, **kwargs)
        mean = attn_output.transpose(1, 2).float()
        use_kernel, padding = (fused_kernel_padding(query, key, attention_mask, key_padding_mask)
                               if self.fused_kernels else (False, None))
        if attn_weights is not None:
            second_moment = torch.matmul(attn_weights.float(), squared_values)
        elif use_kernel:
            second_moment = light_second_moment(query, key, value, scaling, padding)
        else:
            second_moment, _ = attention_interface(attention, query.float(), key.float(), squared_values,
                                                   attention_mask, dropout=0.0, scaling=scaling, **kwargs)
            second_moment = second_moment.transpose(1, 2)
        output = mean + self._bounded(*self._variance_step(second_moment, mean, None))
        return output.to(attn_output.dtype).transpose(1, 2), attn_weights

    def _step_from_probabilities(self, probs, value, mean, mass):
        return self._variance_step(torch.matmul(probs, value.square()), mean, mass)

    def _variance_step(self, second_moment, mean, mass):
        """(diag(Sigma) * mu, its size relative to mu, the largest diagonal entry of Sigma) from `E_p[v*v]`."""
        centring = mean * mean if mass is None else (2.0 - mass) * mean * mean
        variance = second_moment - centring
        step = variance.clamp(min=0) * mean  # rounding only: the variance is >= 0 in exact arithmetic
        return step, _relative_size(step, mean), variance.amax(-1, keepdim=True)


class TwicingHeads(nn.Module):
    """`twicing` (Kim et al., "Twicing Attention"): per head `o = A V + lambda_h (A V - A (A V))`, A the causal softmax
    attention matrix; lambda_h = 1 is twicing, `(2A - A^2) V`, and lambda_h = 0 is plain attention (GPT-2).

    `A^2 V = A (A V)` is a second pass of the same attention with the first pass's outputs as values: row t of the
    first pass, `mu_t = sum_{i<=t} A_ti v_i`, sits at key position t, so under the causal mask `A (A V)` only reads
    `mu_i` for `i <= t` and is well defined. Both passes go through the attention interface (SDPA and flash never
    form the T x T matrix); eager returns A, which the second pass then reuses. With attention dropout in training,
    one dropped-out A~ serves both passes (`A~ V + lambda (A~ V - A~ (A~ V))`).

    Generation: the second pass needs `mu_i` of every earlier token, which a KV cache does not hold, so the rule keeps
    keys, values and first-pass outputs itself, in the cache layer of its slot (`EnergyStateLayer`: the cache's batch
    operations, such as beam search's reordering, reach them). Dynamic caches only; cropping is refused.
    """

    def __init__(self, config, layer_idx: int):
        super().__init__()
        add_solver_parameters(self, config, layer_idx)

    @staticmethod
    def state_layer(cache, cache_index: int):
        """The rule's own layer of the generation cache (keys, values and first-pass outputs), dynamic caches only."""
        from .energies_energy_gpt import energy_state_layer  # the energies module imports this one at load time

        try:
            return energy_state_layer(cache, cache_index)
        except ValueError as error:
            raise ValueError(
                "`attention_solver`='twicing' keeps keys, values and its first pass's outputs in its own cache layer "
                f"and needs a dynamic cache (`cache_implementation='dynamic'`), got a {type(cache).__name__}."
            ) from error

    def forward(self, attention, query, key, value, attention_mask, attention_interface=None, dropout: float = 0.0,
                scaling: float = 1.0, cache=None, cache_index=None, key_padding_mask=None, **kwargs):
        num_new = query.shape[2]
        layer = self.state_layer(cache, cache_index) if cache is not None else None
        past = layer.states if layer is not None else {}
        if past:
            key, value = torch.cat([past["key"], key], dim=2), torch.cat([past["value"], value], dim=2)
        if dropout > 0.0:
            probs = nn.functional.dropout(attention_probabilities(query, key, attention_mask, scaling), p=dropout)
            mean, attn_weights = torch.matmul(probs, value.float()), probs.to(value.dtype)
        else:
            attn_output, attn_weights = attention_interface(attention, query, key, value, attention_mask,
                                                            dropout=0.0, scaling=scaling, **kwargs)
            mean = attn_output.transpose(1, 2)
        new_means = mean.to(value.dtype)
        if key_padding_mask is not None:  # a padded token's own row may be anything: it must not enter as a value
            new_means = new_means.masked_fill(~key_padding_mask[:, None, -num_new:, None].bool(), 0.0)
        means = torch.cat([past["mean"], new_means], dim=2) if past else new_means
        if attn_weights is not None:  # eager (or dropout): A itself, no second softmax
            twice = torch.matmul(attn_weights.to(means.dtype), means)
        else:
            twice, _ = attention_interface(attention, query, key, means, attention_mask, dropout=0.0, scaling=scaling,
                                           **kwargs)
            twice = twice.transpose(1, 2)
        if layer is not None:
            layer.store({"key": key, "value": value, "mean": means}, num_new)
        lam = self.twicing_lambda.float().view(1, -1, 1, 1)
        mean = mean.float()
        output = mean + lam * (mean - twice.float())
        return output.to(value.dtype).transpose(1, 2), attn_weights

    def attention_weights(self, attention, query, key, value, attention_mask, *, scaling: float, cache=None,
                          cache_index=None, **kwargs) -> torch.Tensor:
        """`output_attentions=True` where the backend returns none (sdpa, flash): A, the softmax attention both
        passes apply (what eager returns), over every key of the call just made (cached ones included)."""
        if cache is not None:
            key = self.state_layer(cache, cache_index).states["key"]  # stored by the call: cached and new keys
        return softmax_attention_weights(attention, query, key, key, attention_mask, scaling=scaling)


class SoftmaxHeads(nn.Module):
    """The softmax energy's gradient step: standard attention through the configured attention interface (eager,
    sdpa, flash, flex or a registered custom function), exactly as GPT-2 calls it."""

    attention_weights = staticmethod(softmax_attention_weights)  # `output_attentions=True` on sdpa / flash

    def __init__(self, config, layer_idx: int):
        super().__init__()

    def forward(self, attention, query, key, value, attention_mask, attention_interface=None, cache=None,
                cache_index=None, key_padding_mask=None, **kwargs):
        return attention_interface(attention, query, key, value, attention_mask, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# The registry. One `register_solver` line per solver (or energy).
# ---------------------------------------------------------------------------------------------------------------------

_MOMENTUM_FIELDS = (
    SolverField("momentum_beta", 0.5, check_number_in("momentum_beta", 0.0, 1.0, high_open=True),
                "Initial beta of every layer for `momentum` / `nag` (0.5 from scratch: the velocity carries a geometric "
                "average of about two earlier layers).", gpt2_value=0.0),
    SolverField("momentum_form", "heavy_ball", check_choice("momentum_form", MOMENTUM_FORMS),
                "`heavy_ball` (m = beta m + g) or `ema` (m = beta m + (1 - beta) g); both are GPT-2 at beta = 0."),
    SolverField("momentum_velocity_norm", False, check_bool("momentum_velocity_norm"),
                "LayerNorm on the velocity before it enters the residual stream (x' = x + LN(m)); a stabiliser, not "
                "function preserving (LN(g) != g).", gpt2_value=False),
)
_MOMENTUM_BETA = SolverParameter(
    "momentum_beta", "momentum_beta",
    lambda config, layer_idx: (1,) if has_incoming_state(config, layer_idx) else None,
    "beta_l, the velocity decay of layer l, shape (1,): FSDP2 cannot shard 0-dim tensors (absent where no velocity "
    "arrives, e.g. the first momentum layer).",
)
_NEWTON_FIELDS = (
    SolverField("newton_lambda", 0.1, check_finite("newton_lambda"),
                "Initial lambda (= 1/temperature) of every head: small, so the first-order inverse Hessian "
                "I + lambda Sigma starts close to plain attention.", gpt2_value=0.0),
    SolverField("newton_step_bound", 0.5, _check_step_bound,
                "Soft bound on the Newton correction relative to mu (||lambda_eff Sigma mu|| < bound ||mu||); None "
                "gives the plain formula with no scaling."),
    SolverField("newton_path", "torch", check_choice("newton_path", NEWTON_PATHS),
                "How the second pass runs: `torch` (default) or `triton`, the fused Triton kernels where they can run "
                "(CUDA, or Triton's CPU interpreter with TRITON_INTERPRET=1; the PyTorch path elsewhere). The kernels "
                "have not yet run on a GPU: `bash benchmarks/gpu.sh` checks both paths against each other first."),
)
_NEWTON_LAMBDA = SolverParameter("newton_lambda", "newton_lambda", lambda config, layer_idx: (config.n_head,),
                                 "lambda_{l,h}, one per head.", per_head=True)

register_solver(Solver(
    "gd", RESIDUAL, PlainResidual, "MHA",
    "One gradient-descent step on the attention energy: standard attention plus its residual, exactly GPT-2.",
    update_rule="x' = x + A(LN1(x))",
    default_residual=True,
))
register_solver(Solver(
    "momentum", RESIDUAL, MomentumResidual, "MomenMHA",
    "Momentum across layers: each layer adds a velocity m = beta_l m + A(LN1(x)) (or its EMA form) to the residual "
    "stream instead of its own attention output. With every beta_l = 0 it computes GPT-2.",
    update_rule="g = A(LN1(x));  m = beta_l * m + g  (ema: beta_l * m + (1 - beta_l) * g);  x' = x + m  (or + LN(m))",
    fields=_MOMENTUM_FIELDS, parameters=(_MOMENTUM_BETA,), state_kind="velocity",
))
register_solver(Solver(
    "nag", RESIDUAL, NesterovResidual, "NagMHA",
    "Nesterov momentum: the attention is evaluated at the lookahead point y = x + beta_l m instead of at x (queries, "
    "keys and values from y, or with nag_lookahead=\"query\" only the queries), then the momentum update. With every "
    "beta_l = 0 it computes GPT-2.",
    update_rule="y = x + beta_l * m;  g = A(LN1(y));  m = beta_l * m + g;  x' = x + m",
    fields=(*_MOMENTUM_FIELDS, SolverField(
        "nag_lookahead", "qkv", check_choice("nag_lookahead", NAG_LOOKAHEAD_MODES),
        "`qkv`: q, k and v from the lookahead point; `query`: only q (k and v from x).")),
    parameters=(_MOMENTUM_BETA,), state_kind="velocity",
    queries_only_lookahead=lambda config: config.nag_lookahead == "query",
))
register_solver(Solver(
    "dense", RESIDUAL, DenseResidual, "DenseFormer-style control",
    "Control for momentum: each layer adds its attention output plus a learned weighted sum of all earlier attention "
    "outputs (explicit connectivity, no momentum dynamics). With every weight 0 it computes GPT-2.",
    update_rule="g_l = A(LN1(x));  x' = x + g_l + sum_{j<l} alpha_{l,j} g_j",
    fields=(SolverField("dense_init", 0.0, check_finite("dense_init"),
                        "Initial weight of every earlier attention output (0: exactly GPT-2).", gpt2_value=0.0),),
    parameters=(SolverParameter("dense_weights", "dense_init", _one_weight_per_earlier_layer,
                                "alpha_{l,j}, the weight of earlier dense layer j's attention output at layer l."),),
    state_kind="history", supports_loops=False,
))
register_solver(Solver(
    "newton", HEAD, NewtonHeads, "MHA2nd1st",
    "A Newton step with the first-order inverse Hessian: per head o = mu + lambda_h Sigma mu, Sigma the "
    "attention-weighted covariance of the values, the step soft-bounded relative to mu. With every lambda_h = 0 it "
    "computes GPT-2.",
    update_rule="per head: o = mu + lambda_h * Sigma mu;  x' = x + c_proj(o)",
    fields=_NEWTON_FIELDS, parameters=(_NEWTON_LAMBDA,), energies=("softmax",),
))
register_solver(Solver(
    "newton_light", HEAD, LightNewtonHeads, "LightMHA2nd1st",
    "Newton with a diagonal covariance: per head o = mu + lambda_h (E_p[v*v] - mu*mu) * mu, one extra attention pass. "
    "With every lambda_h = 0 it computes GPT-2.",
    update_rule="per head: o = mu + lambda_h * (E_p[v*v] - mu*mu) * mu;  x' = x + c_proj(o)",
    fields=_NEWTON_FIELDS, parameters=(_NEWTON_LAMBDA,), energies=("softmax",),
))
register_solver(Solver(
    "twicing", HEAD, TwicingHeads, "Twicing attention (Kim et al.)",
    "Twicing attention: per head o = A V + lambda_h (A V - A (A V)), the attention applied once more to its own "
    "residual (kernel twicing); lambda_h = 1 is (2A - A^2) V, and with every lambda_h = 0 it computes GPT-2. A (A V) "
    "is a second pass of the same attention with the first pass's outputs as values.",
    update_rule="per head: mu = A V;  o = mu + lambda_h * (mu - A mu)  (lambda = 1: (2A - A^2) V);  x' = x + c_proj(o)",
    fields=(SolverField("twicing_lambda", 1.0, check_finite("twicing_lambda"),
                        "Initial lambda of every head: 1 is twicing attention (2A - A^2) V, 0 plain attention (GPT-2).",
                        gpt2_value=0.0),),
    parameters=(SolverParameter("twicing_lambda", "twicing_lambda", lambda config, layer_idx: (config.n_head,),
                                "lambda_{l,h}, the weight of the twicing correction, one per head.", per_head=True),),
    energies=("softmax",), uses_kv_cache=False,
))
register_solver(Solver(
    "softmax", HEAD, SoftmaxHeads, "MHA",
    "Softmax attention: the free energy -T log sum_i exp(-||z - v_i||^2 / 2T) of elastic local energies.",
    update_rule="per head: o = sum_i softmax_i(q . k_i / sqrt(d)) v_i",
    single_attention_call=True,
), registry=ATTENTION_ENERGIES)


# ---------------------------------------------------------------------------------------------------------------------
# Building and reporting
# ---------------------------------------------------------------------------------------------------------------------


def layer_rules(config, layer_idx: int) -> tuple[Solver, Solver]:
    """The declarations of a layer's residual rule and head rule. The head rule is its solver's (Newton), else the
    local energy's (Huber), else the energy's own (softmax attention for the default energy)."""
    residual, head = layer_solvers(config, layer_idx)
    if head is None:
        head = LOCAL_ENERGIES[config.local_energy] or ATTENTION_ENERGIES[config.attention_energy]
    return residual, head


def declared_property(value: bool | Callable[[Any], bool], config) -> bool:
    """A declaration property given as a value or as a function of the config."""
    return bool(value(config) if callable(value) else value)


__all__ = [
    "ATTENTION_ENERGIES",
    "ATTENTION_SOLVERS",
    "HEAD",
    "LOCAL_ENERGIES",
    "NAG_LOOKAHEAD_MODES",
    "NEWTON_PATHS",
    "RESIDUAL",
    "Solver",
    "SolverField",
    "SolverParameter",
    "add_solver_parameters",
    "attention_probabilities",
    "check_bool",
    "check_choice",
    "check_finite",
    "check_number_in",
    "check_positive",
    "init_solver_parameters",
    "layer_rules",
    "layer_solver_names",
    "parse_solver",
    "register_solver",
    "registered_rules",
    "softmax_attention_weights",
    "solver_config_fields",
]
