"""Model cards for EnergyGPT checkpoints, rendered from a run's own outputs.

Every number in a card comes from a file in the checkpoint folder: `config.json`, the safetensors weights,
`all_results.json` / `eval_results.json` / `train_results.json` (written by `Trainer.save_metrics`) and
`trainer_state.json`. Nothing is hand-filled: what the run did not record, the card says was not recorded.

The template is `energy_gpt/model_cards/energy_gpt_card.md.jinja`; its YAML header is built with
`huggingface_hub.ModelCardData` and the rendered text is parsed back with `huggingface_hub.ModelCard`, so a card that
the Hub would reject never reaches disk.
"""

import json
import math
import re
from importlib import resources
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from .equivalence import schedule_rules
from .io_utils import atomic_write_text
from .modeling.solvers_energy_gpt import layer_solver_names
from .solver_stats import solver_parameter_names


CARD_TEMPLATE = "energy_gpt_card.md.jinja"
RESULT_FILES = ("all_results.json", "eval_results.json", "train_results.json")
TRAINER_STATE_FILE = "trainer_state.json"
# Trainer bookkeeping, not a quality measurement: kept in the body table, never in the model-index.
NON_QUALITY_METRICS = ("runtime", "samples_per_second", "steps_per_second", "samples", "epoch", "total_flos")
# Rows of the training-log table: enough to see the curve without copying the whole log.
MAX_TRAINING_ROWS = 10


# Config fields always shown in the card; each rule in use adds its own declared fields (from the solver registry).
_SHAPE_FIELDS = ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size")


def _config_view(config: dict[str, Any]) -> SimpleNamespace:
    """The few config attributes the solver registry reads, from a config.json dict."""
    return SimpleNamespace(
        attention_solver=config.get("attention_solver", "gd"), n_layer=config.get("n_layer", 1),
        attention_energy=config.get("attention_energy", "softmax"), local_energy=config.get("local_energy", "elastic"),
        num_loops=config.get("num_loops", 1),
    )


def _card_rules(config: dict[str, Any]) -> list:
    """The registered rules this config uses (clear error for a solver this installation does not know)."""
    try:
        return schedule_rules(_config_view(config))
    except (ValueError, KeyError) as error:
        raise ValueError(f"config.json `attention_solver` / energy fields are not known here: {error}") from error


def _schedule_text(config: dict[str, Any]) -> str:
    """`nag` or, for a per-layer schedule, `gd (layers 0-1), nag (layers 2-3)`."""
    names = layer_solver_names(_config_view(config))
    if len(set(names)) == 1:
        return names[0]
    runs, start = [], 0
    for layer in range(1, len(names) + 1):
        if layer == len(names) or names[layer] != names[start]:
            runs.append(f"{names[start]} (layer{'s' if layer - start > 1 else ''} "
                        f"{start if layer - start == 1 else f'{start}-{layer - 1}'})")
            start = layer
    return ", ".join(runs)


# architecture suffix -> (pipeline_tag, Auto class a reader loads it with)
_TASKS = {
    "ForCausalLM": ("text-generation", "AutoModelForCausalLM"),
    "ForSequenceClassification": ("text-classification", "AutoModelForSequenceClassification"),
}
# Base models whose license is known to this project (GPT-2's weights are released under a modified MIT licence).
_BASE_MODEL_LICENSES = {name: "mit" for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}
PROJECT_LICENSE = "apache-2.0"


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); cannot render the model card from it.") from error


def _format_number(value: Any) -> str:
    """Short but faithful: 6 significant digits for floats, integers as they are."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.6g}"


def _is_hub_id(name: str | None) -> bool:
    """True for a Hub-style id (`gpt2`, `user/name`); False for local paths, which mean nothing on the Hub."""
    if not name or Path(name).expanduser().exists() or name.startswith((".", "/", "~")):
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _task_of(config: dict[str, Any]) -> tuple[str, str, str]:
    """(architecture, pipeline_tag, auto class) from config.json's `architectures`."""
    architectures = config.get("architectures") or []
    for architecture in architectures:
        for suffix, (pipeline_tag, auto_class) in _TASKS.items():
            if architecture.endswith(suffix):
                return architecture, pipeline_tag, auto_class
    raise ValueError(
        f"config.json `architectures` is {architectures!r}: a model card needs a head class ending in one of "
        f"{list(_TASKS)} (save an EnergyGPTForCausalLM or EnergyGPTForSequenceClassification)."
    )


def _read_results(model_dir: Path) -> dict[str, tuple[Any, str]]:
    """metric -> (value, file it came from); `all_results.json` wins over the per-split files it merges."""
    results: dict[str, tuple[Any, str]] = {}
    for name in reversed(RESULT_FILES):
        for key, value in (_read_json(model_dir / name) or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                results[key] = (value, name)
    return dict(sorted(results.items()))


def _is_quality_metric(key: str) -> bool:
    if key == "perplexity":  # run_clm.py's name for exp(eval_loss)
        return True
    return key.startswith("eval_") and not key.removeprefix("eval_").endswith(NON_QUALITY_METRICS)


def _training_rows(state: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """Up to MAX_TRAINING_ROWS evenly spaced (step, epoch, loss, eval_loss) rows of the Trainer log."""
    by_step: dict[int, dict[str, Any]] = {}
    for entry in state.get("log_history", []):
        if "step" in entry and ("loss" in entry or "eval_loss" in entry):
            by_step.setdefault(entry["step"], {}).update(entry)
    steps = sorted(by_step)
    if len(steps) > MAX_TRAINING_ROWS:  # keep the first and last logged step
        picks = {round(i * (len(steps) - 1) / (MAX_TRAINING_ROWS - 1)) for i in range(MAX_TRAINING_ROWS)}
        steps = [steps[i] for i in sorted(picks)]
    return [
        tuple(_format_number(by_step[step].get(key, "")) for key in ("step", "epoch", "loss", "eval_loss"))
        for step in steps
    ]


def _read_weights(model_dir: Path) -> tuple[int | None, dict[str, list[tuple[int, list[float]]]]]:
    """(number of stored parameters, {solver parameter name: per-layer values}) from the safetensors weights. Solver
    parameters are found by the names the registry declares, wherever the rule module sits."""
    from safetensors import safe_open

    index = _read_json(model_dir / "model.safetensors.index.json")
    files = sorted(set(index["weight_map"].values())) if index else ["model.safetensors"]
    if not all((model_dir / name).is_file() for name in files):
        return None, {}
    names = solver_parameter_names()
    parameter_count, scalars = 0, {}
    for name in files:
        with safe_open(str(model_dir / name), framework="pt") as weights:
            for key in weights.keys():
                parameter_count += math.prod(weights.get_slice(key).get_shape())
                leaf = key.rsplit(".", 1)[-1]
                if leaf in names and ".h." in key:
                    layer = int(key.split(".h.")[1].split(".")[0])
                    scalars.setdefault(leaf, {})[layer] = weights.get_tensor(key).float().flatten().tolist()
    return parameter_count, {name: sorted(values.items()) for name, values in sorted(scalars.items())}


def _provenance(base_model: str | None, trained: bool, scalars: dict[str, list[tuple[int, list[float]]]]) -> str:
    if trained:
        start = f"starting from `{base_model}`" if base_model else "from the configuration's initialisation"
        return f"Trained with the Hugging Face `Trainer` {start} (`trainer_state.json` is in the repository)."
    if base_model:
        text = f"Converted from `{base_model}`: its weights were copied into the EnergyGPT layout, without training."
        if scalars and all(value == 0.0 for rows in scalars.values() for _, values in rows for value in values):
            text += (" Every solver scalar stored in the weights is 0, so this checkpoint computes exactly the "
                     "function of the base model.")
        return text
    return "No trainer state and no base model were recorded for this folder: these are the weights as saved."


def _model_name(model_dir: Path, repo_id: str | None) -> str:
    """The repository name, else the folder name; a staging folder of `io_utils.atomic_directory`
    (`.NAME.partial-XXXX`) stands for the folder it becomes."""
    if repo_id:
        return repo_id.rsplit("/", 1)[-1]
    name = model_dir.resolve().name
    staging = re.fullmatch(r"\.(.+)\.partial-[^.]+", name)
    return staging.group(1) if staging else name


def _default_license(base_model: str | None) -> str:
    if base_model is None:
        return PROJECT_LICENSE
    return _BASE_MODEL_LICENSES.get(base_model.rsplit("/", 1)[-1], "other")


def render_model_card(
    model_dir: str | Path,
    *,
    base_model: str | None = None,
    command: str | None = None,
    datasets: list[str] | None = None,
    dataset_config: str | None = None,
    repo_id: str | None = None,
    revision: str | None = None,
    license: str | None = None,
) -> str:
    """The model card of the checkpoint in `model_dir` as Markdown with a Hub YAML header (see `write_model_card`).

    `dataset_config`: the configuration of the first dataset (e.g. `sst2` of `nyu-mll/glue`), for the model-index.
    `repo_id` / `revision`: shown in the loading snippet when known. `license`: defaults to GPT-2's `mit` for a
    GPT-2 base, the project's `apache-2.0` without a base model, `other` otherwise.
    """
    import jinja2
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    model_dir = Path(model_dir)
    config = _read_json(model_dir / "config.json")
    if config is None:
        raise FileNotFoundError(f"{model_dir / 'config.json'} not found: a model card is rendered from the config.")
    architecture, pipeline_tag, auto_class = _task_of(config)
    rules = _card_rules(config)
    solver = _schedule_text(config)

    results = _read_results(model_dir)
    state = _read_json(model_dir / TRAINER_STATE_FILE)
    parameter_count, scalars = _read_weights(model_dir)
    model_name = _model_name(model_dir, repo_id)
    hub_datasets = [name for name in datasets or [] if _is_hub_id(name)]

    # model-index: only quality metrics, and only against a dataset the Hub can link.
    eval_results = [
        EvalResult(
            task_type=pipeline_tag,
            dataset_type=hub_datasets[0],
            dataset_name=hub_datasets[0],
            dataset_config=dataset_config,
            metric_type=key.removeprefix("eval_"),
            metric_name=key,
            metric_value=value,
        )
        for key, (value, source) in results.items()
        if _is_quality_metric(key) and hub_datasets
    ]
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        tags=["energy-gpt", "energy-attention", *dict.fromkeys(layer_solver_names(_config_view(config))), "custom_code",
              "arxiv:2511.00907"],
        base_model=base_model if _is_hub_id(base_model) else None,
        datasets=hub_datasets or None,
        license=license or _default_license(base_model),
        model_name=model_name,
        eval_results=eval_results or None,
    )

    rule_fields = [solver_field.name for rule in rules for solver_field in rule.fields]
    config_rows = [("attention_solver", f"`{solver}`")]
    config_rows += [(name, _format_number(config[name])) for name in dict.fromkeys(
        [*_SHAPE_FIELDS, "attention_energy", "local_energy", "num_loops", *rule_fields, "learn_solver_params"])
        if name in config]
    if pipeline_tag == "text-classification" and config.get("id2label"):
        config_rows.append(("id2label", ", ".join(f"{k}: {v}" for k, v in sorted(config["id2label"].items()))))

    environment = jinja2.Environment(
        trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, undefined=jinja2.StrictUndefined
    )
    template = environment.from_string(
        resources.files("energy_gpt.model_cards").joinpath(CARD_TEMPLATE).read_text(encoding="utf-8")
    )
    text = template.render(
        card_data=card_data.to_yaml(),
        model_name=model_name,
        solver=solver,
        rules=rules,
        pipeline_tag=pipeline_tag,
        architecture=architecture,
        auto_class=auto_class,
        pad_is_eos=config.get("pad_token_id") is not None and config.get("pad_token_id") == config.get("eos_token_id"),
        config_rows=config_rows,
        solver_scalars={name: [(layer, ", ".join(f"{v:.6g}" for v in values)) for layer, values in rows]
                        for name, rows in scalars.items()},
        repo_id=repo_id or "<namespace>/<name>",
        revision=revision or "main",
        revision_comment=("the commit this card was pushed with" if revision
                          else "better: the commit sha you reviewed, from the repository's history"),
        provenance=_provenance(base_model, state is not None, scalars),
        command=command,
        dataset_names=list(datasets or []),
        dataset_config=dataset_config,
        result_rows=[(key, _format_number(value), source) for key, (value, source) in results.items()],
        training_rows=_training_rows(state) if state else [],
        global_step=state.get("global_step") if state else None,
        epoch=_format_number(state["epoch"]) if state and state.get("epoch") is not None else None,
        parameter_count=_format_number(parameter_count) if parameter_count else None,
        base_model=base_model,
        newton_step_bound=config.get("newton_step_bound"),
        uses_newton=any(parameter.name == "newton_lambda" for rule in rules for parameter in rule.parameters),
    )
    ModelCard(text)  # raises if the YAML header is not what the Hub accepts
    return text


def write_model_card(
    model_dir: str | Path,
    *,
    base_model: str | None = None,
    command: str | None = None,
    datasets: list[str] | None = None,
    dataset_config: str | None = None,
    repo_id: str | None = None,
    revision: str | None = None,
    license: str | None = None,
) -> Path:
    """Render `README.md` in `model_dir` from its config.json (and all_results.json / trainer_state.json if present).

    `base_model`: the Hub id or path it was converted from; `command`: the exact command that produced it;
    `datasets`: the datasets it was trained / evaluated on (Hub ids go into the YAML, local paths only into the text).
    """
    text = render_model_card(
        model_dir, base_model=base_model, command=command, datasets=datasets, dataset_config=dataset_config,
        repo_id=repo_id, revision=revision, license=license,
    )
    return atomic_write_text(Path(model_dir) / "README.md", text)
