"""PyTorch EnergyGPT: GPT-2 whose attention sublayer is one step of a chosen optimiser on the attention energy.

Modelled on transformers' `models/gpt2/modeling_gpt2.py` (same state-dict names, `nn.Linear` weights in [out, in]) and
`models/llama`. This file and its relative imports are exactly what ships beside a checkpoint as remote code, so it
uses only public transformers API; every difference between transformers releases is behind a named helper of
`compat_energy_gpt.py`.
"""

import math
from collections.abc import Callable

import torch
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    SequenceClassifierOutputWithPast,
)
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import logging

# Remote code on transformers 5.0 copies only the files an entry file imports itself (one level deep): every model
# file is imported directly here so a local checkpoint folder loads on every release.
from .compat_energy_gpt import (
    ALL_ATTENTION_FUNCTIONS,
    CACHE_ARGUMENT_NAMES,
    cache_argument,
    causal_mask,
    output_cache,
    output_with_cache,
    update_kv_cache,
)
from .configuration_energy_gpt import EnergyGPTConfig
from .energies_energy_gpt import cache_layer
from .newton_kernels_energy_gpt import fused_kernels_available  # noqa: F401
from .solvers_energy_gpt import (
    declared_property,
    init_solver_parameters,
    layer_rules,
    reshape_zero_dim_scalars,
    zero_dim_while_loading,
)


logger = logging.get_logger(__name__)


def eager_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """GPT-2's eager attention (same operations, so `gd` stays bit-exact with `GPT2LMHeadModel`)."""
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    attn_weights = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1)
    attn_weights = attn_weights.type(value.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value)
    return attn_output.transpose(1, 2), attn_weights


class EnergyGPTAttention(nn.Module):
    """The attention sublayer A(.): q, k, v from `c_attn`, per-head outputs from the head rule, then `c_proj`."""

    def __init__(self, config: EnergyGPTConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.embed_dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.embed_dim // self.num_heads
        self.is_causal = True
        # Same scaling as GPT-2, including its optional 1 / (layer_idx + 1).
        self.scaling = self.head_dim**-0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            self.scaling /= float(layer_idx + 1)

        self.c_attn = nn.Linear(self.embed_dim, 3 * self.embed_dim)
        self.c_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.attn_dropout = nn.Dropout(config.attn_pdrop)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)
        head = layer_rules(config, layer_idx)[1]
        self.head_rule = head.rule(config, layer_idx)
        self.uses_kv_cache = head.uses_kv_cache  # False: the rule keeps its own state in the cache (linear energies)
        # False: the rule reads more than one attention call gives it, which an engine keeping the KV itself cannot serve.
        self.single_attention_call = head.single_attention_call
        self.head_rule_name = head.name

    def _split_heads(self, states: torch.Tensor) -> torch.Tensor:
        return states.view(*states.shape[:-1], -1, self.head_dim).transpose(1, 2)

    def forward(
        self,
        hidden_states: torch.Tensor,
        context_states: torch.Tensor | None = None,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        cache_index: int | None = None,
        cache_position: torch.Tensor | None = None,
        output_attentions: bool = False,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`hidden_states` gives the queries; `context_states` (default: the same) gives the keys and values.
        `cache_index` is the layer's slot in the cache (`loop * n_layer + layer_idx` with looped depth)."""
        query, key, value = self.c_attn(hidden_states).split(self.embed_dim, dim=2)
        if context_states is not None:
            _, key, value = self.c_attn(context_states).split(self.embed_dim, dim=2)
        query, key, value = self._split_heads(query), self._split_heads(key), self._split_heads(value)
        cache_index = self.layer_idx if cache_index is None else cache_index

        if cache is not None and self.uses_kv_cache:
            cache_layer(cache, cache_index)  # the slot of this (loop, layer), appended to the cache if it is new
            key, value = update_kv_cache(cache, key, value, cache_index, cache_position)

        # Spelled as in transformers' models: `set_attn_implementation` switches backends at run time only in a file
        # whose source shows this lookup (`ALL_ATTENTION_FUNCTIONS.get_interface(` from 5.1; on 5.0,
        # `ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]` next to `eager_attention_forward`).
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )

        # By keyword, with `attention` in `_skip_keys_device_placement`: accelerate's offload hook on the head rule
        # (it owns lambda) moves its arguments to the execution device, and `.to()` on this module would try to move
        # its offloaded (meta) weights.
        attn_output, attn_weights = self.head_rule(
            attention=self,
            query=query,
            key=key,
            value=value,
            attention_mask=attention_mask,
            attention_interface=attention_interface,
            cache=cache,
            cache_index=cache_index,
            dropout=self.attn_dropout.p if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        if output_attentions and attn_weights is None:  # backends that return no weights (sdpa, flash, ...)
            attn_weights = self._attention_weights(query, key, value, attention_mask, cache, cache_index, **kwargs)
        attn_output = attn_output.reshape(*attn_output.shape[:-2], -1).contiguous()
        attn_output = self.resid_dropout(self.c_proj(attn_output))
        return attn_output, attn_weights

    def _attention_weights(self, query, key, value, attention_mask, cache, cache_index, **kwargs) -> torch.Tensor:
        """The weights of the call just made, from the head rule's `attention_weights`."""
        attention_weights = getattr(self.head_rule, "attention_weights", None)
        if attention_weights is None:
            raise ValueError(
                f"`output_attentions=True`: the head rule {type(self.head_rule).__name__} returned no attention "
                "weights and defines no `attention_weights` method to compute them."
            )
        return attention_weights(
            self, query, key, value, attention_mask,
            cache=cache, cache_index=cache_index, scaling=self.scaling, **kwargs,
        )


class EnergyGPTMLP(nn.Module):
    def __init__(self, intermediate_size: int, config: EnergyGPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.hidden_size, intermediate_size)
        self.c_proj = nn.Linear(intermediate_size, config.hidden_size)
        self.act = ACT2FN[config.activation_function]
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(hidden_states))))


class EnergyGPTBlock(GradientCheckpointingLayer):
    """Pre-LN block: the solver's step on the residual stream (the residual rule carries the momentum state across
    layers), then GPT-2's MLP sublayer unchanged."""

    def __init__(self, config: EnergyGPTConfig, layer_idx: int):
        super().__init__()
        hidden_size = config.hidden_size
        inner_dim = config.n_inner if config.n_inner is not None else 4 * hidden_size
        self.ln_1 = nn.LayerNorm(hidden_size, eps=config.layer_norm_epsilon)
        self.attn = EnergyGPTAttention(config, layer_idx=layer_idx)
        residual = layer_rules(config, layer_idx)[0]
        self.residual_rule = residual.rule(config, layer_idx)
        # Whether the point the residual rule returns feeds only the queries (keys and values from x).
        self.queries_only_lookahead = declared_property(residual.queries_only_lookahead, config)
        self.ln_2 = nn.LayerNorm(hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = EnergyGPTMLP(inner_dim, config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        velocity: torch.Tensor | None = None,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        # Where the attention reads: x, or Nesterov's lookahead x + beta m (keys and values from x if asked).
        attn_input = self.residual_rule(hidden_states, velocity)
        context_states = None
        if self.queries_only_lookahead and attn_input is not hidden_states:
            context_states = self.ln_1(hidden_states)
        attn_output, attn_weights = self.attn(
            self.ln_1(attn_input), context_states, cache=cache, attention_mask=attention_mask, **kwargs
        )
        # The optimiser's update of the residual stream: x + A(...) for gd, x + m for momentum, ...
        hidden_states, velocity = self.residual_rule(hidden_states, velocity, attn_output)

        hidden_states = hidden_states + self.mlp(self.ln_2(hidden_states))
        return hidden_states, velocity, attn_weights


# Where EnergyGPT 0.1 checkpoints keep the solver scalars -> where they live now.
_LEGACY_SOLVER_KEYS = {
    r"\.attn\.solver\.momentum_beta": ".residual_rule.momentum_beta",
    r"\.attn\.solver\.newton_lambda": ".attn.head_rule.newton_lambda",
}


class EnergyGPTPreTrainedModel(PreTrainedModel):
    config: EnergyGPTConfig
    config_class = EnergyGPTConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["EnergyGPTBlock"]
    _skip_keys_device_placement = [*CACHE_ARGUMENT_NAMES, "attention"]
    # Softmax heads run through the standard attention interface, so every backend works for gd / momentum / nag /
    # dense; the Newton heads take mu from it too and read a tensor mask for their second pass (flex's BlockMask gets
    # a clear error from them).
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True
    # Hub GPT-2 checkpoints carry these legacy causal-mask buffers.
    _keys_to_ignore_on_load_unexpected = [r"\.attn\.bias$", r"\.attn\.masked_bias$"]

    def __init__(self, config: EnergyGPTConfig, *inputs, **kwargs):
        # Overrides passed to from_pretrained / from_config land on the config after its own checks: check again.
        config._validate_config()
        super().__init__(config, *inputs, **kwargs)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, which also loads checkpoints of earlier releases: EnergyGPT 0.1's solver
        scalars sat under `attn.solver.` (renamed in the same pass by transformers' `key_mapping`, which is
        `_LEGACY_SOLVER_KEYS` unless the caller gives one; it renames nothing in today's checkpoints), and per-layer
        scalars such as `momentum_beta` were 0-dim before they became (1,) for FSDP2 (built 0-dim while such a
        checkpoint loads, then reshaped with their values)."""
        wants_loading_info = kwargs.pop("output_loading_info", False)
        ignore_mismatched_sizes = kwargs.pop("ignore_mismatched_sizes", False)
        kwargs.setdefault("key_mapping", _LEGACY_SOLVER_KEYS)
        zero_dim = set()
        while True:
            # Mismatched sizes are collected rather than raised so the 0-dim scalars of older checkpoints can be told
            # from real mismatches (raised below unless the caller ignores them).
            with zero_dim_while_loading(zero_dim):
                model, loading_info = super().from_pretrained(
                    *args, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs
                )
            mismatched = [(key, tuple(saved), tuple(expected))
                          for key, saved, expected, *_ in loading_info["mismatched_keys"]]
            scalars = {key.rsplit(".", 1)[-1] for key, saved, expected in mismatched if (saved, expected) == ((), (1,))}
            if scalars - zero_dim:
                zero_dim |= scalars
                continue
            break
        reshape_zero_dim_scalars(model, zero_dim)
        if mismatched and not ignore_mismatched_sizes:  # the error transformers raises itself
            raise RuntimeError(
                "The checkpoint's tensors do not have the model's shapes (key, checkpoint shape, model shape): "
                f"{sorted(mismatched)}. Pass `ignore_mismatched_sizes=True` to initialise them instead."
            )
        return (model, loading_info) if wants_loading_info else model

    def save_pretrained(self, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, writing today's tensor names: transformers would otherwise write back the
        names `key_mapping` renamed at load (its `save_original_format=True` default), e.g. EnergyGPT 0.1's."""
        kwargs.setdefault("save_original_format", False)
        return super().save_pretrained(*args, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        config = self.config
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=config.initializer_range)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        # GPT-2's depth-scaled init of the two residual projections per block (flagged on the leaf Linear, since
        # `_init_weights` is not called on the parent modules in custom code).
        if getattr(module, "_is_residual_projection", False):
            init.normal_(module.weight, mean=0.0, std=config.initializer_range / math.sqrt(2 * config.n_layer))
        # Every rule's declared parameters (solvers' scalars, the gated energy's gates), skipping loaded ones.
        init_solver_parameters(module, config, init)

    def post_init(self):
        for module in self.modules():
            if isinstance(module, (EnergyGPTAttention, EnergyGPTMLP)):
                module.c_proj._is_residual_projection = True
        super().post_init()


class EnergyGPTModel(EnergyGPTPreTrainedModel):
    def __init__(self, config: EnergyGPTConfig):
        super().__init__(config)
        self.embed_dim = config.hidden_size
        self.wte = nn.Embedding(config.vocab_size, self.embed_dim)
        self.wpe = nn.Embedding(config.max_position_embeddings, self.embed_dim)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList([EnergyGPTBlock(config, layer_idx=i) for i in range(config.num_hidden_layers)])
        # Fixed by the config: read by the serving-engine check of every forward that is given `position_ids`.
        self.head_rules_needing_more_than_one_call = sorted(
            {block.attn.head_rule_name for block in self.h if not block.attn.single_attention_call}
        )
        self.ln_f = nn.LayerNorm(self.embed_dim, eps=config.layer_norm_epsilon)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, new_embeddings):
        self.wte = new_embeddings

    def _check_inputs(self, input_ids, inputs_embeds, attention_mask, past_length: int) -> tuple[int, int]:
        """Clear errors for bad input, before it becomes an index error deep in torch."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of `input_ids` or `inputs_embeds`.")
        batch_size, seq_length = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        if batch_size == 0 or seq_length == 0:
            raise ValueError(f"Empty input: got a batch of shape ({batch_size}, {seq_length}); need at least one token.")
        # The id range check reads the ids on the host: free on CPU, a sync per step on an accelerator, so only there.
        if input_ids is not None and input_ids.device.type == "cpu" and not torch.compiler.is_compiling():
            low, high = (int(bound) for bound in torch.aminmax(input_ids))
            if low < 0 or high >= self.config.vocab_size:
                bad = low if low < 0 else high
                raise ValueError(
                    f"`input_ids` contains token id {bad}, outside the vocabulary: ids must be in "
                    f"[0, {self.config.vocab_size - 1}] (`vocab_size`={self.config.vocab_size})."
                )
        if past_length + seq_length > self.config.n_positions:
            raise ValueError(
                f"Sequence too long: {past_length} cached + {seq_length} new tokens > `n_positions`="
                f"{self.config.n_positions}, the number of learned position embeddings."
            )
        if attention_mask is not None and attention_mask.ndim == 2:
            expected = (batch_size, past_length + seq_length)
            if tuple(attention_mask.shape) != expected:
                raise ValueError(
                    f"`attention_mask` has shape {tuple(attention_mask.shape)}, expected {expected} "
                    "(batch size, cached + new tokens)."
                )
        return batch_size, seq_length

    def _check_every_token_reaches_the_rules(self, position_ids: torch.Tensor, past_length: int, seq_length: int):
        """Refuse a serving engine that keeps the keys and values itself (vLLM's Transformers backend calls the model
        without a transformers cache and gives only the new tokens, with their true positions) when a layer's head
        rule needs more than one attention call on those tokens: it would silently compute something else. Detected
        from the caller's positions running past the tokens this call can see (cached + new); a host read of the
        positions, done only when the caller passes them and a layer has such a rule."""
        unservable = self.head_rules_needing_more_than_one_call
        if not unservable or torch.compiler.is_compiling():
            return
        last_position = int(position_ids.max())
        if last_position >= past_length + seq_length:
            raise ValueError(
                f"The head rules {unservable} cannot be served by an engine that keeps the keys and values itself "
                f"(e.g. vLLM's Transformers backend): `position_ids` reach {last_position}, but only {past_length} "
                f"cached + {seq_length} new tokens reach the model. These rules read every earlier token (Newton's "
                "covariance, a second attention pass, a recurrent state, their own weights), which such an engine "
                "does not pass. Serve a solver whose heads are plain softmax attention (gd, momentum, nag, dense), or "
                "generate with transformers (`model.generate`). See docs/distributed.md."
            )

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast | tuple:
        r"""
        cache (`Cache`, *optional*): the KV cache (also accepted as `past_key_values`, its name before 5.24).
        token_type_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            As in GPT-2: looked up in the token embedding and added to the input embeddings.
        """
        cache = cache_argument(cache, past_key_values, kwargs)
        config = self.config
        use_cache = config.use_cache if use_cache is None else use_cache
        output_attentions = config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
        return_dict = config.return_dict if return_dict is None else return_dict
        if self.gradient_checkpointing and self.training and use_cache:
            use_cache = False  # recomputation in the backward pass would update the cache twice
        if use_cache and cache is None:
            cache = DynamicCache()
        past_length = cache.get_seq_length() if cache is not None else 0
        _, seq_length = self._check_inputs(input_ids, inputs_embeds, attention_mask, past_length)
        device = (input_ids if input_ids is not None else inputs_embeds).device
        cache_position = torch.arange(past_length, past_length + seq_length, device=device)

        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)
        # The mask only sees the caller's position ids: transformers reads them on the host to detect packed sequences
        # (a device sync per forward on an accelerator), which the default positions never are.
        mask_position_ids = position_ids
        if position_ids is not None:
            self._check_every_token_reaches_the_rules(position_ids, past_length, seq_length)
        if position_ids is None:
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_length
            position_ids = position_ids.unsqueeze(0)
        hidden_states = inputs_embeds + self.wpe(position_ids).to(inputs_embeds.device)
        if token_type_ids is not None:
            hidden_states = hidden_states + self.wte(token_type_ids.view(-1, inputs_embeds.shape[1]))
        hidden_states = self.drop(hidden_states)

        mask = causal_mask(config, inputs_embeds, attention_mask, cache if use_cache else None, mask_position_ids)
        key_padding_mask = attention_mask.bool() if attention_mask is not None and attention_mask.ndim == 2 else None

        all_hidden_states = () if output_hidden_states else None
        all_attentions = () if output_attentions else None
        velocity = None  # the residual rules' state (momentum, dense history), empty before the first layer
        for loop in range(config.num_loops):
            for block in self.h:
                if output_hidden_states:
                    all_hidden_states += (hidden_states,)
                hidden_states, velocity, attn_weights = block(
                    hidden_states,
                    velocity,
                    cache if use_cache else None,
                    mask,
                    cache_index=loop * config.n_layer + block.attn.layer_idx,
                    cache_position=cache_position,
                    output_attentions=output_attentions,
                    key_padding_mask=key_padding_mask,
                    position_ids=position_ids,
                    **kwargs,
                )
                if output_attentions:
                    all_attentions += (attn_weights,)
        hidden_states = self.ln_f(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)

        output = output_with_cache(
            BaseModelOutputWithPast,
            cache if use_cache else None,
            last_hidden_state=hidden_states,
            hidden_states=all_hidden_states,
            attentions=all_attentions,
        )
        return output if return_dict else output.to_tuple()


class EnergyGPTForCausalLM(EnergyGPTPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: EnergyGPTConfig):
        super().__init__(config)
        self.transformer = EnergyGPTModel(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_dict: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Language-modelling labels, shifted inside the model (`labels = input_ids` works); -100 is ignored.
        """
        return_dict = self.config.return_dict if return_dict is None else return_dict
        outputs: BaseModelOutputWithPast = self.transformer(
            input_ids,
            cache=cache_argument(cache, past_key_values, kwargs),
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            return_dict=True,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])

        loss = None
        if labels is not None:
            if labels.shape != hidden_states.shape[:2]:
                raise ValueError(
                    f"`labels` has shape {tuple(labels.shape)}, expected {tuple(hidden_states.shape[:2])} "
                    "(the shape of `input_ids`)."
                )
            loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size, **kwargs)

        output = output_with_cache(
            CausalLMOutputWithPast,
            output_cache(outputs),
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return output if return_dict else output.to_tuple()


class EnergyGPTForSequenceClassification(EnergyGPTPreTrainedModel):
    """EnergyGPT with a linear head (`score`) on the last non-padding token, as `GPT2ForSequenceClassification`."""

    def __init__(self, config: EnergyGPTConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.transformer = EnergyGPTModel(config)
        self.score = nn.Linear(config.n_embd, self.num_labels, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> SequenceClassifierOutputWithPast | tuple:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
            Class indices (single-label), a float multi-hot matrix (multi-label) or floats (regression, `num_labels=1`).
        """
        return_dict = self.config.return_dict if return_dict is None else return_dict
        batch_size = (input_ids if input_ids is not None else inputs_embeds).shape[0]
        if self.config.pad_token_id is None and batch_size != 1:
            raise ValueError(
                f"Cannot classify a batch of {batch_size} sequences without `config.pad_token_id`: the last real "
                "token of each sequence is found from it. Set `model.config.pad_token_id` (for GPT-2 tokenizers, "
                "usually the eos token id 50256)."
            )
        outputs: BaseModelOutputWithPast = self.transformer(
            input_ids,
            cache=cache_argument(cache, past_key_values, kwargs),
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            return_dict=True,
            **kwargs,
        )
        logits = self.score(outputs.last_hidden_state)

        if self.config.pad_token_id is None:
            last_non_pad_token = -1
        elif input_ids is not None:
            # Rightmost token that is not padding: handles both left and right padding.
            non_pad_mask = (input_ids != self.config.pad_token_id).to(logits.device, torch.int32)
            token_indices = torch.arange(input_ids.shape[-1], device=logits.device, dtype=torch.int32)
            last_non_pad_token = (token_indices * non_pad_mask).argmax(-1)
        else:
            last_non_pad_token = -1
            logger.warning_once(
                f"{self.__class__.__name__} will not detect padding tokens in `inputs_embeds`: the last position is "
                "used for every sequence."
            )
        pooled_logits = logits[torch.arange(batch_size, device=logits.device), last_non_pad_token]

        loss = None
        if labels is not None:
            if labels.shape[0] != batch_size:
                raise ValueError(
                    f"`labels` has {labels.shape[0]} rows for a batch of {batch_size} sequences; expected shape "
                    f"({batch_size},) or ({batch_size}, {self.num_labels})."
                )
            loss = self.loss_function(labels=labels, pooled_logits=pooled_logits, config=self.config)

        output = output_with_cache(
            SequenceClassifierOutputWithPast,
            output_cache(outputs),
            loss=loss,
            logits=pooled_logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return output if return_dict else output.to_tuple()


# So `save_pretrained` copies these files beside the weights (the config writes the full `auto_map`).
EnergyGPTConfig.register_for_auto_class()
EnergyGPTModel.register_for_auto_class("AutoModel")
EnergyGPTForCausalLM.register_for_auto_class("AutoModelForCausalLM")
EnergyGPTForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")

__all__ = [
    "EnergyGPTForCausalLM",
    "EnergyGPTForSequenceClassification",
    "EnergyGPTModel",
    "EnergyGPTPreTrainedModel",
]
