"""EnergyGPT configuration.

Every `GPT2Config` field keeps its name and default, so `EnergyGPTConfig(**GPT2Config().to_dict())` works; the
energy-attention solver fields come on top. All checks live in `EnergyGPTConfig._validate_config` (one place, explicit
messages, in the style of llm-foundry's MPT config).
"""

from typing import Any

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig

from .solvers_energy_gpt import ATTENTION_SOLVERS


NAG_LOOKAHEAD_MODES = ("qkv", "query")

# Written into every saved config so `from_pretrained(..., trust_remote_code=True)` finds all four classes.
ENERGY_GPT_AUTO_MAP = {
    "AutoConfig": "configuration_energy_gpt.EnergyGPTConfig",
    "AutoModel": "modeling_energy_gpt.EnergyGPTModel",
    "AutoModelForCausalLM": "modeling_energy_gpt.EnergyGPTForCausalLM",
    "AutoModelForSequenceClassification": "modeling_energy_gpt.EnergyGPTForSequenceClassification",
}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")


def _check_probability(name: str, value: Any) -> None:
    if not _is_number(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"`{name}` must be a float in [0, 1], got {value!r}.")


def _check_attention_solver(value: Any) -> None:
    if value not in ATTENTION_SOLVERS:
        raise ValueError(f"`attention_solver` must be one of {sorted(ATTENTION_SOLVERS)}, got {value!r}.")


def _check_momentum_beta(value: Any) -> None:
    if not _is_number(value) or not 0.0 <= value < 1.0:
        raise ValueError(f"`momentum_beta` must be a float in [0, 1), got {value!r}.")


def _check_newton_lambda(value: Any) -> None:
    if not _is_number(value) or value != value or abs(value) == float("inf"):
        raise ValueError(f"`newton_lambda` must be a finite float, got {value!r}.")


def _check_newton_step_bound(value: Any) -> None:
    if not _is_number(value) or not 0.0 < value < 1.0:
        raise ValueError(f"`newton_step_bound` must be a float in (0, 1), got {value!r}.")


def _check_learn_solver_params(value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"`learn_solver_params` must be a bool (True or False), got {value!r}.")


def _check_nag_lookahead(value: Any) -> None:
    if value not in NAG_LOOKAHEAD_MODES:
        raise ValueError(f"`nag_lookahead` must be one of {list(NAG_LOOKAHEAD_MODES)}, got {value!r}.")


def _check_n_inner(value: Any) -> None:
    if value is not None:
        _check_positive_int("n_inner", value)


def _check_no_cross_attention(value: Any) -> None:
    if value:
        raise ValueError("`add_cross_attention` must be False: EnergyGPT is a decoder-only model, got True.")


# Checks of one field at a time; they also run on every assignment, so a bad `from_pretrained` override fails at once.
_FIELD_CHECKS = {
    "attention_solver": _check_attention_solver,
    "momentum_beta": _check_momentum_beta,
    "newton_lambda": _check_newton_lambda,
    "newton_step_bound": _check_newton_step_bound,
    "learn_solver_params": _check_learn_solver_params,
    "nag_lookahead": _check_nag_lookahead,
    "vocab_size": lambda v: _check_positive_int("vocab_size", v),
    "n_positions": lambda v: _check_positive_int("n_positions", v),
    "n_embd": lambda v: _check_positive_int("n_embd", v),
    "n_layer": lambda v: _check_positive_int("n_layer", v),
    "n_head": lambda v: _check_positive_int("n_head", v),
    "n_inner": _check_n_inner,
    "resid_pdrop": lambda v: _check_probability("resid_pdrop", v),
    "embd_pdrop": lambda v: _check_probability("embd_pdrop", v),
    "attn_pdrop": lambda v: _check_probability("attn_pdrop", v),
    "add_cross_attention": _check_no_cross_attention,
}
_FIELD_ALIASES = {"hidden_size": "n_embd", "max_position_embeddings": "n_positions",
                  "num_attention_heads": "n_head", "num_hidden_layers": "n_layer"}


@strict
class EnergyGPTConfig(PreTrainedConfig):
    r"""
    Configuration of an EnergyGPT model: a GPT-2 whose attention sublayer is one step of a chosen optimiser on the
    attention energy (arXiv 2511.00907). With `momentum_beta=0` / `newton_lambda=0` every solver computes exactly
    GPT-2, which is what makes GPT-2 weights a valid start for any solver.

    The update rules are *the paper's variants as specified in this project's DESIGN notes* (textbook optimisers
    on the energy whose one gradient step is softmax attention), not a claim of matching the authors' numbers.

    Args (beyond `GPT2Config`, whose fields and defaults are kept unchanged):
        attention_solver (`str`, defaults to `"gd"`):
            `gd` (MHA, exactly GPT-2), `momentum` (MomenMHA), `nag` (NagMHA), `newton` (MHA2nd1st) or
            `newton_light` (LightMHA2nd1st, diagonal covariance).
        momentum_beta (`float` in [0, 1), defaults to 0.5):
            Initial beta of every layer for `momentum` and `nag`. 0.5 for a model trained from scratch: the
            momentum term then carries a geometric average of about two earlier layers, a moderate dense skip.
            Conversion from GPT-2 uses 0.0 (function preserving).
        newton_lambda (`float`, defaults to 0.1):
            Initial lambda (= 1/temperature) of every head for `newton` and `newton_light`. Small so that the
            first-order inverse Hessian `I + lambda * Sigma` starts close to plain attention. Conversion uses 0.0.
        newton_step_bound (`float` in (0, 1), defaults to 0.5):
            The Neumann (first-order) inverse is valid only while `lambda * ||Sigma|| < 1`. Per token and head the
            effective lambda is scaled down so that `|lambda| * bound(Sigma) <= newton_step_bound`, where the bound is
            `trace(Sigma)` (>= spectral norm) for `newton` and `max(diag Sigma)` for `newton_light`. Below the bound
            nothing changes (the scale is exactly 1), so small lambdas give the plain formula.
        learn_solver_params (`bool`, defaults to `True`):
            Whether beta / lambda are trained parameters or fixed constants (buffers).
        nag_lookahead (`str`, defaults to `"qkv"`):
            `qkv`: q, k and v come from the lookahead point; `query`: only the query does, k and v from the current
            state ("gradient at the lookahead, context fixed").
    """

    model_type = "energy_gpt"
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {
        "hidden_size": "n_embd",
        "max_position_embeddings": "n_positions",
        "num_attention_heads": "n_head",
        "num_hidden_layers": "n_layer",
    }

    # GPT2Config fields, same names and defaults.
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    resid_pdrop: float | int = 0.1
    embd_pdrop: float | int = 0.1
    attn_pdrop: float | int = 0.1
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    summary_type: str = "cls_index"
    summary_use_proj: bool = True
    summary_activation: str | None = None
    summary_proj_to_labels: bool = True
    summary_first_dropout: float | int = 0.1
    scale_attn_weights: bool = True
    use_cache: bool = True
    bos_token_id: int | None = 50256
    eos_token_id: int | list[int] | None = 50256
    pad_token_id: int | None = None
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False
    add_cross_attention: bool = False
    tie_word_embeddings: bool = True

    # Energy-attention solver fields.
    attention_solver: str = "gd"
    momentum_beta: float | int = 0.5
    newton_lambda: float | int = 0.1
    newton_step_bound: float = 0.5
    learn_solver_params: bool = True
    nag_lookahead: str = "qkv"

    def __post_init__(self, **kwargs):
        if getattr(self, "auto_map", None) is None and "auto_map" not in kwargs:
            kwargs["auto_map"] = dict(ENERGY_GPT_AUTO_MAP)
        super().__post_init__(**kwargs)
        self._validate_config()

    def _validate_config(self) -> None:
        """Every check of the configuration, in one place. Raises `ValueError` naming the field and what is allowed."""
        for name, check in _FIELD_CHECKS.items():
            check(getattr(self, name))
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"`n_embd` ({self.n_embd}) must be divisible by `n_head` ({self.n_head}); "
                f"allowed `n_head` values for this width: {[h for h in range(1, self.n_embd + 1) if self.n_embd % h == 0][:12]}..."
            )

    def validate_architecture(self):
        """Part of `@strict`-powered validation (run on save)."""
        self._validate_config()


def _checked_setattr(strict_setattr):
    """Run our field checks before `@strict`'s type validators, so a bad value (also a `from_pretrained` override,
    which is applied by assignment) raises a `ValueError` that names the field and the allowed values."""

    def __setattr__(self, name: str, value: Any) -> None:
        check = _FIELD_CHECKS.get(_FIELD_ALIASES.get(name, name))
        if check is not None:
            check(value)
        strict_setattr(self, name, value)

    return __setattr__


EnergyGPTConfig.__setattr__ = _checked_setattr(EnergyGPTConfig.__setattr__)


__all__ = ["EnergyGPTConfig", "ENERGY_GPT_AUTO_MAP", "NAG_LOOKAHEAD_MODES"]
