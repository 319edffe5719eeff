"""EnergyGPT configuration.

Every `GPT2Config` field keeps its name and default, so `EnergyGPTConfig(**GPT2Config().to_dict())` works. Each is
honoured, except three kinds refused at any value but their default, with an error saying why: `add_cross_attention`
(decoder only), `reorder_and_upcast_attn` (no fp32 upcast path) and the `summary_*` fields of GPT-2's double-heads
model (EnergyGPT has none; GPT-2 -> EnergyGPT conversion leaves them behind). The solver
fields come from the solver registry (`solvers_energy_gpt.py`): each solver declares its own fields, defaults and
checks, so adding a solver never touches this file. All checks run in one place, `EnergyGPTConfig._validate_config`
(explicit messages, in the style of llm-foundry's MPT config), called when a config is built or loaded and again when
a model is built from it.

The class is a plain (non-`@strict`) config with its own `__init__`, the form every transformers 5.x release accepts for
remote code, so a checkpoint's copy of this file loads across the whole supported range.
"""

from typing import Any

from transformers.activations import ACT2FN
from transformers.configuration_utils import PreTrainedConfig

# Remote code on transformers 5.0 copies only the files an entry file imports itself (one level deep): every model
# file is imported directly here so a local checkpoint folder loads on every release.
from .compat_energy_gpt import CACHE_ARGUMENT_NAMES
from .energies_energy_gpt import LinearHeads  # noqa: F401
from .newton_kernels_energy_gpt import fused_kernels_available  # noqa: F401
from .solvers_energy_gpt import (
    ATTENTION_ENERGIES,
    LOCAL_ENERGIES,
    check_bool,
    check_choice,
    check_number_in,
    check_positive,
    solver_config_fields,
    validate_solver_schedule,
)


# Written into every saved config so `from_pretrained(..., trust_remote_code=True)` finds all four classes.
ENERGY_GPT_AUTO_MAP = {
    "AutoConfig": "configuration_energy_gpt.EnergyGPTConfig",
    "AutoModel": "modeling_energy_gpt.EnergyGPTModel",
    "AutoModelForCausalLM": "modeling_energy_gpt.EnergyGPTForCausalLM",
    "AutoModelForSequenceClassification": "modeling_energy_gpt.EnergyGPTForSequenceClassification",
}


# GPT-2's fields of its double-heads (multiple-choice) model, `GPT2DoubleHeadsModel`, with their defaults. EnergyGPT has
# no such model, so they are kept only for GPT-2 config compatibility and must stay at these values.
GPT2_DOUBLE_HEADS_FIELDS = {
    "summary_type": "cls_index",
    "summary_use_proj": True,
    "summary_activation": None,
    "summary_proj_to_labels": True,
    "summary_first_dropout": 0.1,
}


def _check_positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")


class EnergyGPTConfig(PreTrainedConfig):
    r"""
    Configuration of an EnergyGPT model: a GPT-2 whose attention sublayer is one step of a chosen optimiser on a chosen
    attention energy (arXiv 2511.00907). With the solvers' function-preserving values (e.g. `momentum_beta=0`,
    `newton_lambda=0`) every softmax-energy solver computes exactly GPT-2, which makes GPT-2 weights a valid start.

    The update rules are *the paper's variants as specified in this project's DESIGN notes* (textbook optimisers on
    the energy whose one gradient step is softmax attention), not a claim of matching the authors' numbers.

    Args (beyond `GPT2Config`, whose fields and defaults are kept unchanged):
        attention_solver (`str` or `list[str]`, defaults to `"gd"`):
            The optimiser: `gd` (MHA, exactly GPT-2), `momentum`, `nag`, `dense` (residual rules across depth),
            `newton`, `newton_light` (head rules), or a composition `"<residual>+<head>"` such as
            `"nag+newton_light"`. A list gives one solver per layer (e.g. `["gd", "gd", "nag", "nag"]`).
            `solvers_energy_gpt.ATTENTION_SOLVERS` lists them with their own fields (below).
        attention_energy (`str`, defaults to `"softmax"`):
            The global energy: `softmax` (today's attention), `linear` (unnormalised linear attention) or
            `gated_linear` (its position-discounted form), where registered.
        local_energy (`str`, defaults to `"elastic"`):
            `elastic` (`1/2 ||z - v||^2`, softmax attention) or a robust local energy such as `huber`, where registered.
        learn_solver_params (`bool`, defaults to `True`):
            Whether the solvers' scalars (beta, lambda, ...) are trained parameters or fixed constants (buffers).
        num_loops (`int`, defaults to 1):
            Looped depth: the block stack is applied `num_loops` times with shared weights.
        **solver fields**: every registered solver adds its own fields with defaults and checks (for example
            `momentum_beta`, `momentum_form`, `momentum_velocity_norm`, `nag_lookahead`, `newton_lambda`,
            `newton_step_bound`, `dense_init`); see `solver_config_fields()` and the solvers' docstrings.
    """

    model_type = "energy_gpt"
    keys_to_ignore_at_inference = list(CACHE_ARGUMENT_NAMES)
    # Tensor parallelism (`from_pretrained(..., tp_plan="auto")`): the MLP is split, `c_fc` by columns and `c_proj` by
    # rows. The attention stays replicated on every rank: `c_attn` is fused [q | k | v], and no parallel style of
    # every supported transformers release splits each of q, k and v by heads ("colwise" cuts the fused output into
    # contiguous pieces, e.g. q and half of k; "packed_colwise", where it exists, splits two packed blocks, not three).
    # Every head rule and per-head parameter (`newton_lambda`, energy gates) thus runs whole on each rank, and the
    # per-layer scalars are replicated. See docs/distributed.md.
    base_model_tp_plan = {"h.*.mlp.c_fc": "colwise", "h.*.mlp.c_proj": "rowwise"}
    attribute_map = {
        "hidden_size": "n_embd",
        "max_position_embeddings": "n_positions",
        "num_attention_heads": "n_head",
        "num_hidden_layers": "n_layer",
    }

    def __init__(
        self,
        vocab_size: int = 50257,
        n_positions: int = 1024,
        n_embd: int = 768,
        n_layer: int = 12,
        n_head: int = 12,
        n_inner: int | None = None,
        activation_function: str = "gelu_new",
        resid_pdrop: float = 0.1,
        embd_pdrop: float = 0.1,
        attn_pdrop: float = 0.1,
        layer_norm_epsilon: float = 1e-5,
        initializer_range: float = 0.02,
        summary_type: str = "cls_index",
        summary_use_proj: bool = True,
        summary_activation: str | None = None,
        summary_proj_to_labels: bool = True,
        summary_first_dropout: float = 0.1,
        scale_attn_weights: bool = True,
        use_cache: bool = True,
        bos_token_id: int | None = 50256,
        eos_token_id: int | list[int] | None = 50256,
        pad_token_id: int | None = None,
        scale_attn_by_inverse_layer_idx: bool = False,
        reorder_and_upcast_attn: bool = False,
        add_cross_attention: bool = False,
        tie_word_embeddings: bool = True,
        attention_solver: str | list[str] = "gd",
        attention_energy: str = "softmax",
        local_energy: str = "elastic",
        learn_solver_params: bool = True,
        num_loops: int = 1,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.n_positions = n_positions
        self.n_embd = n_embd
        self.n_layer = n_layer
        self.n_head = n_head
        self.n_inner = n_inner
        self.activation_function = activation_function
        self.resid_pdrop = resid_pdrop
        self.embd_pdrop = embd_pdrop
        self.attn_pdrop = attn_pdrop
        self.layer_norm_epsilon = layer_norm_epsilon
        self.initializer_range = initializer_range
        self.summary_type = summary_type
        self.summary_use_proj = summary_use_proj
        self.summary_activation = summary_activation
        self.summary_first_dropout = summary_first_dropout
        self.summary_proj_to_labels = summary_proj_to_labels
        self.scale_attn_weights = scale_attn_weights
        self.use_cache = use_cache
        self.scale_attn_by_inverse_layer_idx = scale_attn_by_inverse_layer_idx
        self.reorder_and_upcast_attn = reorder_and_upcast_attn
        self.add_cross_attention = add_cross_attention
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.attention_solver = list(attention_solver) if isinstance(attention_solver, tuple) else attention_solver
        self.attention_energy = attention_energy
        self.local_energy = local_energy
        self.learn_solver_params = learn_solver_params
        self.num_loops = num_loops
        # The registered solvers' own fields (defaults from their declarations).
        for name, solver_field in solver_config_fields().items():
            setattr(self, name, kwargs.pop(name, solver_field.default))
        kwargs.setdefault("auto_map", dict(ENERGY_GPT_AUTO_MAP))
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self._validate_config()

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs):
        # `from_pretrained(..., field=value)` overrides are applied by assignment after `__init__`: check them too.
        result = super().from_dict(config_dict, **kwargs)
        (result[0] if isinstance(result, tuple) else result)._validate_config()
        return result

    def _validate_config(self) -> None:
        """Every check of the configuration, in one place. Raises `ValueError` naming the field and what is allowed."""
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "num_loops"):
            _check_positive_int(name, getattr(self, name))
        if self.n_inner is not None:
            _check_positive_int("n_inner", self.n_inner)
        for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
            check_number_in(name, 0.0, 1.0)(getattr(self, name))
        if self.add_cross_attention:
            raise ValueError("`add_cross_attention` must be False: EnergyGPT is a decoder-only model, got True.")
        if self.reorder_and_upcast_attn:
            raise ValueError(
                "`reorder_and_upcast_attn` must be False, got True: EnergyGPT's softmax attention runs in the model's "
                "dtype through the configured backend, as GPT-2's does without this option (eager does not upcast). "
                "For fp32 attention, run the model in float32 (`dtype=torch.float32`)."
            )
        for name, default in GPT2_DOUBLE_HEADS_FIELDS.items():
            if getattr(self, name) != default:
                raise ValueError(
                    f"`{name}` must be {default!r} (its default), got {getattr(self, name)!r}: it configures GPT-2's "
                    "double-heads (multiple-choice) model, which EnergyGPT does not have."
                )
        for name in ("scale_attn_weights", "scale_attn_by_inverse_layer_idx"):
            check_bool(name)(getattr(self, name))
        if self.activation_function not in ACT2FN:
            raise ValueError(
                f"`activation_function` must be one of {sorted(ACT2FN)}, got {self.activation_function!r}."
            )
        check_positive("layer_norm_epsilon")(self.layer_norm_epsilon)
        check_number_in("initializer_range", 0.0, float("inf"), high_open=True)(self.initializer_range)
        if self.n_embd % self.n_head != 0:
            divisors = [h for h in range(1, self.n_embd + 1) if self.n_embd % h == 0][:12]
            raise ValueError(
                f"`n_embd` ({self.n_embd}) must be divisible by `n_head` ({self.n_head}); "
                f"allowed `n_head` values for this width: {divisors}..."
            )
        check_bool("learn_solver_params")(self.learn_solver_params)
        check_choice("attention_energy", tuple(ATTENTION_ENERGIES))(self.attention_energy)
        check_choice("local_energy", tuple(LOCAL_ENERGIES))(self.local_energy)
        for name, solver_field in solver_config_fields().items():
            solver_field.check(getattr(self, name))
        validate_solver_schedule(self)


__all__ = ["EnergyGPTConfig", "ENERGY_GPT_AUTO_MAP", "GPT2_DOUBLE_HEADS_FIELDS"]
