"""GPT-2 <-> EnergyGPT weight conversion.

GPT-2 -> EnergyGPT works for every softmax-energy solver: at each solver's declared function-preserving values (e.g.
`momentum_beta = 0`, `newton_lambda = 0`, `dense_init = 0`; the defaults here, unlike `EnergyGPTConfig`'s own
training-from-scratch defaults) every solver computes exactly what GPT-2 computed, so a pretrained GPT-2 is a valid
starting point. Other energies (`linear`, `gated_linear`, `huber`) start from GPT-2's weights without computing GPT-2.
EnergyGPT -> GPT-2 works whenever the model reduces to GPT-2 (`gpt2_equivalence_problems` is empty): `gd` always,
`momentum` / `nag` when every layer's beta is 0, `newton` / `newton_light` when every head's lambda is 0, and so on for
every registered solver.

Checkpoint layouts read (local directory or Hub id, `revision` supported):
  * what `GPT2LMHeadModel.save_pretrained` writes today (`transformer.` prefix, `model.safetensors`, maybe sharded);
  * the Hub's original GPT-2 files (no `transformer.` prefix, legacy `attn.bias` / `attn.masked_bias` causal-mask
    buffers, no stored `lm_head` since it is tied to `wte`), as `pytorch_model.bin` or safetensors;
  * `GPT2ForSequenceClassification` checkpoints (head `score`).

The only change to the weights: GPT-2's `Conv1D` stores `[in, out]`, EnergyGPT's `nn.Linear` stores `[out, in]`, so
exactly the `c_attn`, attention `c_proj`, `c_fc` and MLP `c_proj` weights are transposed (never biases, embeddings
or LayerNorms).
"""

import json
import os
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel, PreTrainedModel
from transformers.utils import logging

from ..io_utils import atomic_directory, atomic_write_text
from ..model_card import write_model_card
from ..modeling import EnergyGPTConfig, EnergyGPTForCausalLM, EnergyGPTForSequenceClassification
from ..modeling.configuration_energy_gpt import GPT2_DOUBLE_HEADS_FIELDS
from ..modeling.solvers_energy_gpt import solver_config_fields
from ..equivalence import (
    energy_axis_config_fields,
    function_preserving_settings,
    gpt2_equivalence_problems,
    is_rule_tensor,
    schedule_rules,
)


logger = logging.get_logger(__name__)

TASKS = ("causal-lm", "sequence-classification")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
GPT2_MODEL_TYPES = ("gpt2",)
ENERGY_GPT_MODEL_TYPES = ("energy_gpt",)

# Conv1D weights ([in, out] in GPT-2, [out, in] in EnergyGPT's nn.Linear). Biases are never transposed.
CONV1D_WEIGHT_SUFFIXES = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
# Causal-mask buffers that old GPT-2 checkpoints (the Hub's original files) still store.
LEGACY_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")
# Task heads stored at the top level of a checkpoint; everything else belongs under `transformer.`.
HEAD_PREFIXES = ("lm_head.", "score.")
# Config keys that describe the file or class rather than the network: never carried across.
NOT_CARRIED_CONFIG_KEYS = ("model_type", "architectures", "auto_map", "transformers_version", "_name_or_path", "dtype")

# Weight files in the order transformers itself prefers them.
SAFETENSORS_INDEX, SAFETENSORS_SINGLE = "model.safetensors.index.json", "model.safetensors"
PYTORCH_INDEX, PYTORCH_SINGLE = "pytorch_model.bin.index.json", "pytorch_model.bin"
WEIGHT_LAYOUTS = (SAFETENSORS_INDEX, SAFETENSORS_SINGLE, PYTORCH_INDEX, PYTORCH_SINGLE)
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
    "added_tokens.json", "chat_template.jinja",
)
METADATA_FILES = ("config.json", "generation_config.json", *TOKENIZER_FILES)

# Legacy short Hub names: the Hub redirects them online, but a cache filled through the canonical id only knows that.
CANONICAL_HUB_IDS = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
    "distilgpt2": "distilbert/distilgpt2",
}


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message names what was found and what is accepted."""


class CheckpointNotFoundError(ConversionError, FileNotFoundError):
    """Neither a local directory nor a Hub model id that could be found."""


@dataclass
class SourceCheckpoint:
    """A checkpoint resolved to a local directory (a Hub snapshot or a user folder), or an in-memory model."""

    name: str  # what the user passed (Hub id or path): recorded as `base_model` in the model card
    config: dict[str, Any]
    directory: Path | None = None
    model: PreTrainedModel | None = None
    weight_files: list[Path] = field(default_factory=list)

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.model is not None:
            return dict(self.model.state_dict())
        state_dict: dict[str, torch.Tensor] = {}
        for path in self.weight_files:
            state_dict.update(_read_weights_file(path))
        return state_dict


# ----------------------------------------------------------------------------------------------------------------
# Reading checkpoints
# ----------------------------------------------------------------------------------------------------------------


def _read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.name.endswith(".safetensors"):
            from safetensors.torch import load_file

            tensors = load_file(str(path), device="cpu")
        else:
            # weights_only: a pickle from the Hub must not be able to run code.
            tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ConversionError(
            f"Cannot read the weights file {path}: {type(error).__name__}: {error}. The file is corrupt or truncated "
            "(an interrupted download?); download it again or re-save the model."
        ) from error
    if not isinstance(tensors, dict) or not all(isinstance(value, torch.Tensor) for value in tensors.values()):
        raise ConversionError(
            f"The weights file {path} does not hold a state dict (a mapping of names to tensors) but a "
            f"{type(tensors).__name__}; save the model with `save_pretrained`."
        )
    return tensors


def _weight_files(directory: Path) -> list[Path]:
    """The weight files of a checkpoint directory: single file or the shards named by an index, safetensors first."""
    for layout in WEIGHT_LAYOUTS:
        path = directory / layout
        if not path.is_file():
            continue
        if not layout.endswith(".index.json"):
            return [path]
        try:
            weight_map = json.loads(path.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as error:
            raise ConversionError(f"The shard index {path} is not valid JSON with a `weight_map`: {error}.") from error
        shards = [directory / name for name in dict.fromkeys(weight_map.values())]
        missing = [shard.name for shard in shards if not shard.is_file()]
        if missing:
            raise ConversionError(f"The shard index {path} names shards that are missing from {directory}: {missing}.")
        return shards
    other_formats = (".h5", ".msgpack", ".ot", ".bin", ".safetensors")
    found = sorted(path.name for path in directory.iterdir() if path.suffix in other_formats)
    raise ConversionError(
        f"No PyTorch weights in {directory}: expected one of {list(WEIGHT_LAYOUTS)}"
        + (f", found only {found} (TensorFlow / Flax / other formats are not read)." if found else ".")
    )


def _looks_like_local_path(name: str) -> bool:
    """Hub ids are `name` or `org/name`: anything else that does not exist is a mistyped local path."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def _download_from_hub(repo_id: str, revision: str | None) -> Path:
    """The Hub snapshot with config, tokenizer and weights (safetensors if the repo has them, else the .bin files)."""
    from huggingface_hub import snapshot_download

    safetensors_patterns = [*METADATA_FILES, "*.safetensors", SAFETENSORS_INDEX]
    directory = Path(snapshot_download(repo_id, revision=revision, allow_patterns=safetensors_patterns))
    if not any((directory / name).is_file() for name in (SAFETENSORS_INDEX, SAFETENSORS_SINGLE)):
        # Older repositories only have pytorch_model.bin: fetch it now rather than both formats up front.
        pytorch_patterns = [*METADATA_FILES, "pytorch_model*.bin", PYTORCH_INDEX]
        directory = Path(snapshot_download(repo_id, revision=revision, allow_patterns=pytorch_patterns))
    return directory


def _resolve_directory(name_or_path: str | os.PathLike, revision: str | None) -> tuple[Path, str]:
    """A local directory as is, otherwise a Hub id downloaded (or found in the cache) at `revision`.

    Returns the directory and the name to record as the base model (the Hub id actually found, or the path)."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    name = str(name_or_path)
    local = Path(name).expanduser()
    if local.is_dir():
        if revision is not None:
            logger.warning(f"`revision={revision!r}` is ignored for the local directory {local}.")
        return local, name
    if local.exists():
        raise CheckpointNotFoundError(
            f"--model_name_or_path {name} is a file; pass the checkpoint directory that holds config.json instead."
        )
    if isinstance(name_or_path, os.PathLike) or _looks_like_local_path(name):
        raise CheckpointNotFoundError(f"--model_name_or_path {name}: no such directory.")

    candidates = [name] + ([CANONICAL_HUB_IDS[name]] if name in CANONICAL_HUB_IDS else [])
    reasons = []
    for repo_id in candidates:
        try:
            return _download_from_hub(repo_id, revision), repo_id
        except RevisionNotFoundError as error:
            raise CheckpointNotFoundError(f"Hub model {repo_id!r} has no revision {revision!r}: {error}") from error
        except (LocalEntryNotFoundError, RepositoryNotFoundError, GatedRepoError, HFValidationError) as error:
            reasons.append(f"{repo_id}: {type(error).__name__}: {str(error).splitlines()[0]}")
    raise CheckpointNotFoundError(
        f"--model_name_or_path {name} is neither a local directory nor a Hub model id that could be found"
        + (f" at revision {revision!r}" if revision else "")
        + (" (HF_HUB_OFFLINE=1: only models already in the Hub cache can be found)" if constants.HF_HUB_OFFLINE else "")
        + ". "
        + "; ".join(reasons)
    )


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.is_file():
        raise ConversionError(f"{directory} has no config.json: it is not a Hugging Face model checkpoint.")
    try:
        config = json.loads(path.read_text())
    except ValueError as error:
        raise ConversionError(f"{path} is not valid JSON: {error}.") from error
    if not isinstance(config, dict):
        raise ConversionError(f"{path} holds a {type(config).__name__}, expected a JSON object.")
    return config


def _check_model_type(config: dict[str, Any], accepted: tuple[str, ...], where: str, hint: str) -> None:
    model_type = config.get("model_type")
    if model_type not in accepted:
        architectures = config.get("architectures") or []
        found = f"model_type={model_type!r}" + (f" ({', '.join(architectures)})" if architectures else "")
        raise ConversionError(
            f"{where} is not {hint} checkpoint: found {found}; accepted model_type: {list(accepted)}."
        )


def _load_source(
    model_or_path: str | os.PathLike | PreTrainedModel, accepted_model_types: tuple[str, ...], hint: str, revision=None
) -> SourceCheckpoint:
    """Resolve and check a source (directory, Hub id or model) without reading its weights yet."""
    if isinstance(model_or_path, PreTrainedModel):
        config = model_or_path.config.to_dict()
        _check_model_type(config, accepted_model_types, f"The {type(model_or_path).__name__} passed", hint)
        return SourceCheckpoint(name=config.get("_name_or_path") or type(model_or_path).__name__, config=config,
                                model=model_or_path)
    directory, name = _resolve_directory(model_or_path, revision)
    config = _read_config(directory)
    _check_model_type(config, accepted_model_types, str(model_or_path), hint)
    return SourceCheckpoint(name=name, config=config, directory=directory,
                            weight_files=_weight_files(directory))


def _resolve_dtype(dtype: str | torch.dtype | None, source_config: dict[str, Any]) -> torch.dtype:
    """float32 unless asked otherwise; "auto" keeps the dtype the source was saved in."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        stored = source_config.get("dtype") or source_config.get("torch_dtype") or "float32"
        return DTYPES.get(str(stored).replace("torch.", ""), torch.float32)
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype must be one of {[*DTYPES, 'auto']}, got {dtype!r}.")
    return DTYPES[dtype]


def _canonical_key(key: str) -> str:
    """GPT-2-family keys as `GPT2LMHeadModel` names them today: the Hub's original files lack `transformer.`."""
    return key if key.startswith(("transformer.", *HEAD_PREFIXES)) else f"transformer.{key}"


def _load_strict(model: PreTrainedModel, state_dict: dict[str, torch.Tensor], allowed_missing: set[str], source: str):
    """`load_state_dict` with every missing or unexpected tensor explained, instead of silently random weights."""
    expected = set(model.state_dict())
    missing = sorted(expected - set(state_dict) - allowed_missing)
    unexpected = sorted(set(state_dict) - expected)
    if missing or unexpected:
        details = []
        if missing:
            details.append(f"missing {len(missing)} tensor(s) the config's architecture needs, e.g. {missing[:4]}")
        if unexpected:
            details.append(f"{len(unexpected)} tensor(s) that have no place in it, e.g. {unexpected[:4]}")
        raise ConversionError(
            f"The weights of {source} do not match its config.json: {'; '.join(details)}. Is the checkpoint complete "
            "and a plain GPT-2 (GPT2Model, GPT2LMHeadModel or GPT2ForSequenceClassification)?"
        )
    try:
        model.load_state_dict(state_dict, strict=False)
    except RuntimeError as error:  # shape mismatches
        raise ConversionError(f"The weights of {source} do not fit the shapes in its config.json: {error}") from error


# ----------------------------------------------------------------------------------------------------------------
# GPT-2 -> EnergyGPT
# ----------------------------------------------------------------------------------------------------------------


def _energy_gpt_config(
    source_config: dict[str, Any], attention_solver: str, task: str, num_labels: int | None, overrides: dict[str, Any]
) -> EnergyGPTConfig:
    # GPT2Config normalises old config files (e.g. the Hub's `n_ctx`); then keep the fields EnergyGPT shares with it.
    gpt2_fields = GPT2Config.from_dict(source_config).to_dict()
    # The `summary_*` fields configure GPT-2's double-heads model only (no weights converted here): left at defaults.
    carried = {k: v for k, v in gpt2_fields.items() if k not in (*NOT_CARRIED_CONFIG_KEYS, *GPT2_DOUBLE_HEADS_FIELDS)}
    if num_labels is not None:
        carried.pop("id2label", None)
        carried.pop("label2id", None)
        carried["num_labels"] = num_labels
    known = {*gpt2_fields, *energy_axis_config_fields(), "num_labels", "pad_token_id", "bos_token_id", "eos_token_id"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConversionError(
            f"Unknown EnergyGPTConfig field(s) {unknown}; accepted solver fields: {list(energy_axis_config_fields())}."
        )
    # Function-preserving start (each solver's declared GPT-2 values, e.g. beta = 0, lambda = 0): passed explicitly
    # since EnergyGPTConfig's own defaults are for training from scratch.
    try:
        config = EnergyGPTConfig(**{**carried, "attention_solver": attention_solver, **overrides})
        config = EnergyGPTConfig(**{**carried, "attention_solver": attention_solver,
                                    **function_preserving_settings(config), **overrides})
    except ValueError as error:
        raise ConversionError(str(error)) from error
    # A solver field the chosen solvers do not have is almost certainly a mistake on the command line.
    used_fields = {solver_field.name for rule in schedule_rules(config) for solver_field in rule.fields}
    unused = sorted(set(overrides) & set(solver_config_fields()) - used_fields)
    if unused:
        logger.warning(f"{', '.join(unused)} has no effect with attention_solver={attention_solver!r}.")
    if problems := gpt2_equivalence_problems(config, {}):
        logger.warning(f"The converted model does not compute GPT-2 ({'; '.join(problems)}): a starting point only.")
    if task == "sequence-classification" and config.pad_token_id is None:
        logger.warning(
            "The converted classifier has no `pad_token_id`: it can only classify unpadded batches of one sequence. "
            "Pass `pad_token_id` (GPT-2 tokenizers usually use the eos token, 50256)."
        )
    return config


def _gpt2_to_energy_state_dict(state_dict: dict[str, torch.Tensor], task: str, tied: bool) -> dict[str, torch.Tensor]:
    converted = {}
    for key, tensor in state_dict.items():
        key = _canonical_key(key)
        if key.endswith(LEGACY_BUFFER_SUFFIXES):
            continue
        if key == "lm_head.weight" and (tied or task != "causal-lm"):
            continue  # tied to wte (re-tied on load), or not part of a classifier
        if key.startswith("score.") and task != "sequence-classification":
            continue  # a classifier converted to a language model keeps its body, the LM head is wte
        converted[key] = tensor.t().contiguous() if key.endswith(CONV1D_WEIGHT_SUFFIXES) else tensor
    return converted


def gpt2_to_energy_gpt(
    model_or_path: str | os.PathLike | PreTrainedModel,
    attention_solver: str = "gd",
    task: str = "causal-lm",
    num_labels: int | None = None,
    revision: str | None = None,
    dtype: str | torch.dtype | None = None,
    **config_overrides: Any,
) -> EnergyGPTForCausalLM | EnergyGPTForSequenceClassification:
    """Convert a GPT-2 checkpoint (Hub id, local directory or in-memory GPT-2 model) into an EnergyGPT model.

    Args:
        model_or_path: `gpt2`, `openai-community/gpt2-medium`, any fine-tuned GPT-2 on the Hub, a local checkpoint
            directory (both the Hub's original layout and today's `save_pretrained` layout), or a `GPT2LMHeadModel` /
            `GPT2ForSequenceClassification` / `GPT2Model` instance.
        attention_solver: any `EnergyGPTConfig.attention_solver` value (see `ATTENTION_SOLVERS`), also a per-layer list.
        task: `causal-lm` (EnergyGPTForCausalLM) or `sequence-classification` (EnergyGPTForSequenceClassification;
            the `score` head of a GPT2ForSequenceClassification source is kept, otherwise newly initialised).
        num_labels: labels of a new classification head (default: the source config's, i.e. 2 for a plain GPT-2).
        revision: Hub branch, tag or commit.
        dtype: `float32` (default), `float16`, `bfloat16`, or `auto` (the dtype the source was saved in).
        config_overrides: EnergyGPTConfig fields, e.g. `momentum_beta=0.3`, `learn_solver_params=False`,
            `nag_lookahead="query"`, `pad_token_id=50256`. Without them beta = lambda = 0: the converted model
            computes exactly what the GPT-2 computed.
    """
    if task not in TASKS:
        raise ConversionError(f"--task must be one of {list(TASKS)}, got {task!r}.")
    source = model_or_path if isinstance(model_or_path, SourceCheckpoint) else _load_source(
        model_or_path, GPT2_MODEL_TYPES, "a GPT-2", revision
    )
    target_dtype = _resolve_dtype(dtype, source.config)
    state_dict = source.state_dict()

    head_in_source = state_dict.get("score.weight")
    if task == "sequence-classification" and head_in_source is not None:
        if num_labels is not None and num_labels != head_in_source.shape[0]:
            raise ConversionError(
                f"--num_labels {num_labels} does not match the classification head of {source.name}, which has "
                f"{head_in_source.shape[0]} labels; drop --num_labels to keep that head."
            )
        num_labels = head_in_source.shape[0]
    config = _energy_gpt_config(source.config, attention_solver, task, num_labels, config_overrides)

    model_class = EnergyGPTForCausalLM if task == "causal-lm" else EnergyGPTForSequenceClassification
    model = model_class(config)
    converted = _gpt2_to_energy_state_dict(state_dict, task, tied=config.tie_word_embeddings)
    # Tensors the checkpoint does not provide: the solver's beta / lambda (set from the config), the tied LM head,
    # and a classification head that the source (a language model) did not have.
    allowed_missing = {key for key in model.state_dict() if is_rule_tensor(key)}
    if config.tie_word_embeddings:
        allowed_missing.add("lm_head.weight")
    if task == "sequence-classification" and head_in_source is None:
        allowed_missing.add("score.weight")
        logger.warning(f"{source.name} has no classification head: `score` is new ({config.num_labels} labels).")
    _load_strict(model, converted, allowed_missing, source.name)
    model.tie_weights()
    return model.to(target_dtype).eval()


# ----------------------------------------------------------------------------------------------------------------
# EnergyGPT -> GPT-2
# ----------------------------------------------------------------------------------------------------------------


def _check_reduces_to_gpt2(config: dict[str, Any], state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Refuse a model whose update GPT-2 cannot express (e.g. non-zero beta or lambda), naming every reason."""
    energy_config = EnergyGPTConfig(**{k: v for k, v in config.items() if k not in NOT_CARRIED_CONFIG_KEYS})
    problems = gpt2_equivalence_problems(energy_config, state_dict)
    if problems:
        solver = config.get("attention_solver", "gd")
        raise ConversionError(
            f"{source} (attention_solver={solver!r}) does not reduce to GPT-2: {'; '.join(problems[:6])}"
            f"{f' (and {len(problems) - 6} more)' if len(problems) > 6 else ''}. GPT-2 cannot express these terms, so "
            "a GPT-2 checkpoint would compute something else. Only models at their solvers' function-preserving values "
            "(`gd`; `momentum` / `nag` with every momentum_beta == 0; `newton` / `newton_light` with every "
            "newton_lambda == 0; `dense` with every weight 0; ...) reduce exactly to GPT-2."
        )


def energy_gpt_to_gpt2(
    model_or_path: str | os.PathLike | PreTrainedModel,
    revision: str | None = None,
    dtype: str | torch.dtype | None = None,
) -> GPT2LMHeadModel | GPT2ForSequenceClassification:
    """Convert an EnergyGPT model whose solver reduces to GPT-2 into `GPT2LMHeadModel` (or
    `GPT2ForSequenceClassification` for a classifier). Raises `ConversionError` otherwise (see module docstring)."""
    source = model_or_path if isinstance(model_or_path, SourceCheckpoint) else _load_source(
        model_or_path, ENERGY_GPT_MODEL_TYPES, "an EnergyGPT", revision
    )
    target_dtype = _resolve_dtype(dtype, source.config)
    state_dict = {_canonical_key(key): tensor for key, tensor in source.state_dict().items()}
    _check_reduces_to_gpt2(source.config, state_dict, source.name)

    gpt2_config_fields = {
        key: value for key, value in source.config.items()
        if key not in energy_axis_config_fields() and key not in NOT_CARRIED_CONFIG_KEYS
    }
    config = GPT2Config(**gpt2_config_fields)
    is_classifier = "score.weight" in state_dict
    model = (GPT2ForSequenceClassification if is_classifier else GPT2LMHeadModel)(config)

    converted = {
        key: tensor.t().contiguous() if key.endswith(CONV1D_WEIGHT_SUFFIXES) else tensor
        for key, tensor in state_dict.items()
        if not is_rule_tensor(key) and not (key == "lm_head.weight" and config.tie_word_embeddings)
    }
    allowed_missing = {"lm_head.weight"} if config.tie_word_embeddings else set()
    _load_strict(model, converted, allowed_missing, source.name)
    model.tie_weights()
    return model.to(target_dtype).eval()


# ----------------------------------------------------------------------------------------------------------------
# Writing complete checkpoint directories
# ----------------------------------------------------------------------------------------------------------------


def _copy_source_files(source: SourceCheckpoint, staging: Path) -> None:
    """Tokenizer files and generation_config.json of the source, verbatim (inside the atomic staging directory)."""
    if source.directory is None:
        if getattr(source.model, "generation_config", None) is not None and source.model.can_generate():
            source.model.generation_config.save_pretrained(staging)
        return
    copied = []
    for name in ("generation_config.json", *TOKENIZER_FILES):
        if (source.directory / name).is_file():
            shutil.copyfile(source.directory / name, staging / name)
            copied.append(name)
    if not any(name in copied for name in TOKENIZER_FILES):
        logger.warning(f"{source.name} has no tokenizer files: the converted checkpoint has none either.")


def _write_gpt2_model_card(staging: Path, model: PreTrainedModel, source: SourceCheckpoint, command: str) -> None:
    """A short card for an exported plain GPT-2 (the EnergyGPT card renderer describes EnergyGPT checkpoints only)."""
    solver = source.config.get("attention_solver", "gd")
    text = (
        f"---\nlibrary_name: transformers\ntags:\n- gpt2\n- energy-gpt-export\n---\n\n"
        f"# GPT-2 exported from EnergyGPT\n\n"
        f"A plain GPT-2 checkpoint (`{type(model).__name__}`, no remote code) exported from the EnergyGPT checkpoint "
        f"`{source.name}` (attention_solver `{solver}`, whose update with its stored solver scalars is GPT-2's). "
        "It computes the same function as the source and loads in any tool that knows GPT-2.\n\n"
        f"Exact command:\n\n```bash\n{command}\n```\n"
    )
    atomic_write_text(staging / "README.md", text)


def _write_checkpoint(
    model: PreTrainedModel, source: SourceCheckpoint, output_dir: str | os.PathLike, staging: Path, command: str
) -> Path:
    model.save_pretrained(staging)  # safetensors; for EnergyGPT also the remote-code files and the full auto_map
    _copy_source_files(source, staging)
    if isinstance(model, (EnergyGPTForCausalLM, EnergyGPTForSequenceClassification)):
        write_model_card(staging, base_model=source.name, command=command)
    else:
        _write_gpt2_model_card(staging, model, source, command)
    return Path(output_dir)


def _equivalent_command(model_name_or_path, output_dir, **flags: Any) -> str:
    """The `energy-gpt convert` command line that does what a Python API call did (recorded in the model card)."""
    parts = ["energy-gpt", "convert", "--model_name_or_path", str(model_name_or_path), "--output_dir", str(output_dir)]
    for name, value in flags.items():
        if name in ("overwrite", "to_gpt2"):  # store_true switches
            parts += [f"--{name}"] if value else []
        elif value is not None:
            parts += [f"--{name}", str(value).lower() if isinstance(value, bool) else str(value)]
    return shlex.join(parts)


def convert_gpt2_checkpoint(
    model_name_or_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    attention_solver: str = "gd",
    task: str = "causal-lm",
    num_labels: int | None = None,
    revision: str | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    command: str | None = None,
    **config_overrides: Any,
) -> Path:
    """`gpt2_to_energy_gpt` written to a complete checkpoint directory: safetensors weights, config with `auto_map`
    and the remote-code files, the source's tokenizer files and generation_config.json, and a README.md model card.

    The directory appears only once complete (any failure leaves nothing behind); an existing non-empty
    `output_dir` is refused unless `overwrite`.
    """
    source = _load_source(model_name_or_path, GPT2_MODEL_TYPES, "a GPT-2", revision)
    command = command or _equivalent_command(
        model_name_or_path, output_dir, attention_solver=attention_solver, task=task, num_labels=num_labels,
        revision=revision, dtype=dtype, overwrite=overwrite, **config_overrides,
    )
    # GPT-2 has no pad token, yet batched pipelines, run_glue.py and the classifier's pooling need one: the checkpoint
    # pads with eos, as is usual for GPT-2 (padded positions are masked), unless the source or the caller set one.
    if source.config.get("pad_token_id") is None and source.config.get("eos_token_id") is not None:
        config_overrides = {"pad_token_id": source.config["eos_token_id"], **config_overrides}
    # Convert before touching the disk: every input error (corrupt weights included) leaves no trace.
    model = gpt2_to_energy_gpt(source, attention_solver, task, num_labels, revision, dtype, **config_overrides)
    with atomic_directory(output_dir, overwrite=overwrite) as staging:
        _write_checkpoint(model, source, output_dir, staging, command)
        _save_tokenizer_with_pad_token(source, staging)
        return Path(output_dir)


def _save_tokenizer_with_pad_token(source: SourceCheckpoint, staging: Path) -> None:
    """Re-save the copied source tokenizer with eos as its pad token when it has none (nothing to do otherwise)."""
    if source.directory is None or not (source.directory / "tokenizer_config.json").is_file():
        return
    # The source is a GPT-2 folder: AutoTokenizer reads only its own config, no remote code.
    tokenizer = AutoTokenizer.from_pretrained(source.directory)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
        tokenizer.save_pretrained(staging)


def convert_energy_gpt_checkpoint_to_gpt2(
    model_name_or_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    revision: str | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    command: str | None = None,
) -> Path:
    """`energy_gpt_to_gpt2` written to a complete GPT-2 checkpoint directory that `GPT2LMHeadModel.from_pretrained`
    (and any GPT-2-only tool) loads; same atomicity and overwrite rules as `convert_gpt2_checkpoint`."""
    source = _load_source(model_name_or_path, ENERGY_GPT_MODEL_TYPES, "an EnergyGPT", revision)
    command = command or _equivalent_command(
        model_name_or_path, output_dir, to_gpt2=True, revision=revision, dtype=dtype, overwrite=overwrite
    )
    model = energy_gpt_to_gpt2(source, revision, dtype)
    with atomic_directory(output_dir, overwrite=overwrite) as staging:
        return _write_checkpoint(model, source, output_dir, staging, command)


__all__ = [
    "CheckpointNotFoundError",
    "ConversionError",
    "convert_energy_gpt_checkpoint_to_gpt2",
    "convert_gpt2_checkpoint",
    "energy_gpt_to_gpt2",
    "gpt2_to_energy_gpt",
]
