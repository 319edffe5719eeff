"""GPT-2 <-> EnergyGPT conversion: function preservation for every solver, every checkpoint layout (today's
save_pretrained, the Hub's original files as .bin / sharded safetensors, a fake Hub cache), complete atomic output,
the reverse direction, and clear errors that leave nothing behind. Offline, tiny random models."""

import json
import shutil
import textwrap
from pathlib import Path

import pytest
from energy_gpt.equivalence import function_preserving_settings
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, GPT2ForSequenceClassification, GPT2LMHeadModel

from conftest import assert_same_as_gpt2, run_without_energy_gpt, tiny_gpt2_config
from energy_gpt import ATTENTION_SOLVERS, cli
from energy_gpt.conversion import (
    CheckpointNotFoundError,
    ConversionError,
    convert_energy_gpt_checkpoint_to_gpt2,
    convert_gpt2_checkpoint,
    energy_gpt_to_gpt2,
    gpt2_to_energy_gpt,
)


# Every registered solver converts: at its declared GPT-2 values each one is GPT-2.
SOLVERS = list(ATTENTION_SOLVERS)
FAKE_COMMIT = "0123456789abcdef0123456789abcdef01234567"
REMOTE_CODE_FILES = ("configuration_energy_gpt.py", "modeling_energy_gpt.py", "solvers_energy_gpt.py")
GREEDY = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
GENERATION_CONFIG = {"bos_token_id": 0, "eos_token_id": 0, "max_length": 17, "transformers_version": "4.26.0.dev0"}


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints built locally
# ----------------------------------------------------------------------------------------------------------------


def write_legacy_hub_layout(model: GPT2LMHeadModel, directory: Path, weights: str, shards: int = 1) -> Path:
    """The Hub's original GPT-2 files, built by hand: no `transformer.` prefix, the legacy `attn.bias` /
    `attn.masked_bias` buffers, no stored (tied) `lm_head`, an old-style config.json (`n_ctx`, task params)."""
    directory.mkdir(parents=True)
    config = model.config
    state_dict = {key.removeprefix("transformer."): value.clone() for key, value in model.state_dict().items()
                  if key != "lm_head.weight"}
    causal = torch.tril(torch.ones(config.n_positions, config.n_positions)).view(1, 1, config.n_positions, -1)
    for layer in range(config.n_layer):
        state_dict[f"h.{layer}.attn.bias"] = causal.clone()
        state_dict[f"h.{layer}.attn.masked_bias"] = torch.tensor(-1e4)
    names = sorted(state_dict)
    shard_names = [names[i::shards] for i in range(shards)]
    if weights == "bin":
        assert shards == 1
        # The 2019 Hub files predate torch's zip format: write the legacy serialization too.
        torch.save(state_dict, directory / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    elif shards == 1:
        save_file(state_dict, directory / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        for index, keys in enumerate(shard_names, start=1):
            file_name = f"model-{index:05d}-of-{shards:05d}.safetensors"
            save_file({key: state_dict[key] for key in keys}, directory / file_name, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(keys, file_name))
        (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    hub_config = {
        key: getattr(config, key) for key in (
            "activation_function", "attn_pdrop", "bos_token_id", "embd_pdrop", "eos_token_id", "initializer_range",
            "layer_norm_epsilon", "n_embd", "n_head", "n_layer", "n_positions", "resid_pdrop", "vocab_size",
        )
    }
    hub_config.update(architectures=["GPT2LMHeadModel"], model_type="gpt2", n_ctx=config.n_positions,
                      task_specific_params={"text-generation": {"do_sample": True, "max_length": 50}})
    (directory / "config.json").write_text(json.dumps(hub_config))
    (directory / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG))
    return directory


@pytest.fixture(scope="module")
def gpt2_model() -> GPT2LMHeadModel:
    torch.manual_seed(1)
    return GPT2LMHeadModel(tiny_gpt2_config()).eval()


@pytest.fixture(scope="module")
def checkpoints(gpt2_model, tmp_path_factory) -> dict[str, Path]:
    """The same GPT-2 in every layout it comes in."""
    root = tmp_path_factory.mktemp("gpt2-checkpoints")
    gpt2_model.save_pretrained(root / "save_pretrained")
    (root / "save_pretrained" / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG))
    write_legacy_hub_layout(gpt2_model, root / "hub_bin", "bin")
    write_legacy_hub_layout(gpt2_model, root / "hub_sharded_safetensors", "safetensors", shards=2)
    return {path.name: path for path in root.iterdir()}


@pytest.fixture
def fake_hub(gpt2_model, tmp_path, monkeypatch) -> Path:
    """`openai-community/gpt2` (legacy .bin layout) in a Hub cache under a temporary HF_HOME; HF_HUB_OFFLINE=1."""
    import huggingface_hub.constants

    hub_cache = tmp_path / "hf_home" / "hub"
    repo = hub_cache / "models--openai-community--gpt2"
    write_legacy_hub_layout(gpt2_model, repo / "snapshots" / FAKE_COMMIT, "bin")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(FAKE_COMMIT)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return hub_cache


def input_batch() -> tuple[torch.Tensor, torch.Tensor]:
    input_ids = torch.randint(1, 101, (2, 12))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :4] = 0  # left padding in the second row: the mask path must match too
    return input_ids, attention_mask


@pytest.fixture(scope="module")
def gpt2_greedy(gpt2_model) -> tuple[torch.Tensor, torch.Tensor]:
    prompt = torch.tensor([[5, 17, 42, 99, 3]])
    return prompt, gpt2_model.generate(prompt, **GREEDY)


def assert_same_logits(energy_model, gpt2_model) -> None:
    input_ids, attention_mask = input_batch()
    with torch.no_grad():
        expected = gpt2_model(input_ids, attention_mask=attention_mask).logits
        actual = energy_model(input_ids, attention_mask=attention_mask).logits
    # Bit for bit (eager before transformers 5.4: to rounding at the real positions, as GPT-2's own eager differed).
    assert_same_as_gpt2(actual, expected, energy_model.config._attn_implementation, real=attention_mask)


def assert_nothing_left(parent: Path, allowed: set[str]) -> None:
    left = {path.name for path in parent.iterdir()} - allowed
    assert not left, f"conversion left {left} behind in {parent}"


# ----------------------------------------------------------------------------------------------------------------
# GPT-2 -> EnergyGPT computes exactly GPT-2
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["save_pretrained", "hub_bin", "hub_sharded_safetensors"])
@pytest.mark.parametrize("solver", SOLVERS)
def test_every_solver_and_layout_computes_gpt2(solver, layout, checkpoints, gpt2_model, gpt2_greedy):
    model = gpt2_to_energy_gpt(checkpoints[layout], attention_solver=solver)
    assert model.config.attention_solver == solver
    preserving = function_preserving_settings(model.config)  # the solvers' own GPT-2 values, e.g. beta = lambda = 0
    assert all(getattr(model.config, name) == value for name, value in preserving.items())
    assert bool(preserving) == (solver != "gd")
    assert model.dtype == torch.float32
    assert_same_logits(model, gpt2_model)
    if layout == "hub_bin":  # greedy decoding (KV cache path) once per solver: the weights are the same per layout
        prompt, expected = gpt2_greedy
        assert torch.equal(model.generate(prompt, **GREEDY), expected)


def test_conv1d_weights_are_transposed_and_nothing_else(checkpoints, gpt2_model):
    model = gpt2_to_energy_gpt(checkpoints["hub_bin"], attention_solver="momentum")
    source, converted = gpt2_model.state_dict(), model.state_dict()
    for key, tensor in source.items():
        if key.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            assert torch.equal(converted[key], tensor.t()), key
        else:
            assert torch.equal(converted[key], tensor), key
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # still tied


def test_in_memory_model_and_solver_overrides(gpt2_model):
    model = gpt2_to_energy_gpt(gpt2_model, attention_solver="nag", momentum_beta=0.25, nag_lookahead="query",
                               learn_solver_params=False)
    assert model.config.nag_lookahead == "query" and not model.config.learn_solver_params
    betas = [block.residual_rule.momentum_beta for block in model.transformer.h[1:]]  # layer 0 has no beta
    assert all(not isinstance(beta, torch.nn.Parameter) and beta.item() == 0.25 for beta in betas)
    input_ids, _ = input_batch()
    with torch.no_grad():  # beta != 0 is no longer GPT-2: the override really reached the layers
        assert not torch.allclose(model(input_ids).logits, gpt2_model(input_ids).logits, atol=1e-3)
    with pytest.raises(ValueError, match="momentum_beta"):
        gpt2_to_energy_gpt(gpt2_model, attention_solver="momentum", momentum_beta=1.5)
    with pytest.raises(ConversionError, match="attention_solver.*'sgd'"):
        gpt2_to_energy_gpt(gpt2_model, attention_solver="sgd")


def test_dtype_defaults_to_float32_and_can_be_chosen(checkpoints):
    assert gpt2_to_energy_gpt(checkpoints["save_pretrained"], dtype="bfloat16").dtype == torch.bfloat16
    half_source = checkpoints["save_pretrained"].parent / "half"
    GPT2LMHeadModel.from_pretrained(checkpoints["save_pretrained"], dtype=torch.float16).save_pretrained(half_source)
    assert gpt2_to_energy_gpt(half_source).dtype == torch.float32
    assert gpt2_to_energy_gpt(half_source, dtype="auto").dtype == torch.float16


@pytest.mark.parametrize("solver", SOLVERS)
def test_sequence_classification_matches_gpt2(solver, tmp_path):
    torch.manual_seed(2)
    classifier = GPT2ForSequenceClassification(tiny_gpt2_config(num_labels=3, pad_token_id=0)).eval()
    classifier.save_pretrained(tmp_path / "classifier")
    model = gpt2_to_energy_gpt(tmp_path / "classifier", attention_solver=solver, task="sequence-classification")
    assert type(model).__name__ == "EnergyGPTForSequenceClassification" and model.config.num_labels == 3
    input_ids = torch.randint(1, 101, (3, 10))
    input_ids[1, 6:] = 0  # right padding: pooled at the last non-pad token
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, classifier(input_ids).logits, atol=1e-5, rtol=0)


def test_classification_head_rules(checkpoints, tmp_path):
    new_head = gpt2_to_energy_gpt(checkpoints["save_pretrained"], task="sequence-classification", num_labels=5)
    assert new_head.score.weight.shape == (5, 32)
    GPT2ForSequenceClassification(tiny_gpt2_config(num_labels=3)).save_pretrained(tmp_path / "classifier")
    with pytest.raises(ConversionError, match="--num_labels 2 does not match .* 3 labels"):
        gpt2_to_energy_gpt(tmp_path / "classifier", task="sequence-classification", num_labels=2)
    with pytest.raises(ConversionError, match="--task must be one of"):
        gpt2_to_energy_gpt(tmp_path / "classifier", task="token-classification")


# ----------------------------------------------------------------------------------------------------------------
# Hub ids (through a fake Hub cache)
# ----------------------------------------------------------------------------------------------------------------


def test_hub_ids_and_revisions_from_the_cache(fake_hub, gpt2_model, tmp_path):
    for name in ("openai-community/gpt2", "gpt2"):  # the short legacy id falls back to the canonical one
        assert_same_logits(gpt2_to_energy_gpt(name, attention_solver="newton", revision=FAKE_COMMIT), gpt2_model)
    output = convert_gpt2_checkpoint("gpt2", tmp_path / "out", attention_solver="newton_light")
    assert json.loads((output / "generation_config.json").read_text()) == GENERATION_CONFIG
    assert "openai-community/gpt2" in (output / "README.md").read_text()  # base model: the id actually found
    with pytest.raises(CheckpointNotFoundError, match="revision 'v9'"):
        gpt2_to_energy_gpt("openai-community/gpt2", revision="v9")
    with pytest.raises(CheckpointNotFoundError, match="neither a local directory nor a Hub model id.*HF_HUB_OFFLINE"):
        convert_gpt2_checkpoint("someone/not-in-the-cache", tmp_path / "missing")
    assert not (tmp_path / "missing").exists()


# ----------------------------------------------------------------------------------------------------------------
# The command, the output directory, loading without the package
# ----------------------------------------------------------------------------------------------------------------


def test_cli_writes_a_complete_checkpoint_that_loads_without_the_package(checkpoints, gpt2_model, tmp_path):
    source = checkpoints["hub_sharded_safetensors"]
    output = tmp_path / "converted"
    argv = ["convert", "--model_name_or_path", str(source), "--attention_solver", "nag", "--output_dir", str(output)]
    assert cli.main(argv) == 0

    files = {path.name for path in output.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "README.md", *REMOTE_CODE_FILES} <= files
    assert not any(name.endswith(".bin") for name in files)
    config = json.loads((output / "config.json").read_text())
    assert config["attention_solver"] == "nag" and config["momentum_beta"] == 0.0 and config["dtype"] == "float32"
    assert set(config["auto_map"]) >= {"AutoConfig", "AutoModelForCausalLM", "AutoModelForSequenceClassification"}
    assert (output / "generation_config.json").read_bytes() == (source / "generation_config.json").read_bytes()
    card = (output / "README.md").read_text()
    assert str(source) in card and "nag" in card and "energy-gpt convert" in card
    assert_nothing_left(tmp_path, {"converted"})

    # An existing output is refused (and kept) unless --overwrite.
    before = (output / "model.safetensors").read_bytes()
    assert cli.main(argv) == 1
    assert (output / "model.safetensors").read_bytes() == before
    assert cli.main([*argv, "--attention_solver", "momentum", "--overwrite"]) == 0
    assert json.loads((output / "config.json").read_text())["attention_solver"] == "momentum"
    assert_nothing_left(tmp_path, {"converted"})

    input_ids, attention_mask = input_batch()
    with torch.no_grad():
        torch.save({"input_ids": input_ids, "attention_mask": attention_mask,
                    "logits": gpt2_model(input_ids, attention_mask=attention_mask).logits}, tmp_path / "expected.pt")
    run_without_energy_gpt(textwrap.dedent(f"""
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(output)!r}, trust_remote_code=True).eval()
        assert type(model).__name__ == "EnergyGPTForCausalLM", type(model)
        assert model.config.attention_solver == "momentum"
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        with torch.no_grad():
            logits = model(expected["input_ids"], attention_mask=expected["attention_mask"]).logits
        torch.testing.assert_close(logits, expected["logits"], atol=1e-5, rtol=0)
    """), cwd=tmp_path)


def test_cli_solver_flags_reach_the_config(checkpoints, tmp_path):
    argv = ["convert", "--model_name_or_path", str(checkpoints["save_pretrained"]), "--output_dir",
            str(tmp_path / "out"), "--attention_solver", "newton", "--newton_lambda", "0.05",
            "--learn_solver_params", "false", "--dtype", "bfloat16"]
    assert cli.main(argv) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["newton_lambda"], config["learn_solver_params"], config["dtype"]) == (0.05, False, "bfloat16")
    weights = load_file(tmp_path / "out" / "model.safetensors")
    assert weights["transformer.h.0.attn.head_rule.newton_lambda"].float().tolist() == pytest.approx([0.05] * 4, rel=1e-2)
    with pytest.raises(SystemExit):  # argparse: forward-only flags make no sense with --to_gpt2
        cli.main(["convert", "--to_gpt2", "--model_name_or_path", str(tmp_path / "out"), "--output_dir",
                  str(tmp_path / "back"), "--attention_solver", "gd"])


def test_cli_classifier_both_ways(tmp_path):
    from transformers import AutoModelForSequenceClassification

    classifier = GPT2ForSequenceClassification(tiny_gpt2_config(num_labels=3, pad_token_id=0)).eval()
    classifier.save_pretrained(tmp_path / "classifier")
    common = ["convert", "--model_name_or_path"]
    assert cli.main([*common, str(tmp_path / "classifier"), "--output_dir", str(tmp_path / "energy"),
                     "--task", "sequence-classification", "--attention_solver", "newton_light"]) == 0
    assert cli.main([*common, str(tmp_path / "energy"), "--output_dir", str(tmp_path / "back"), "--to_gpt2"]) == 0
    input_ids = torch.randint(1, 101, (2, 9))
    input_ids[0, 5:] = 0
    energy = AutoModelForSequenceClassification.from_pretrained(tmp_path / "energy").eval()
    back = GPT2ForSequenceClassification.from_pretrained(tmp_path / "back").eval()
    assert type(energy).__name__ == "EnergyGPTForSequenceClassification"
    with torch.no_grad():
        expected = classifier(input_ids).logits
        torch.testing.assert_close(energy(input_ids).logits, expected, atol=1e-5, rtol=0)
        assert torch.equal(back(input_ids).logits, expected)


def test_a_failure_while_writing_leaves_nothing(checkpoints, tmp_path, monkeypatch):
    import energy_gpt.conversion.gpt2 as conversion_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # e.g. Ctrl-C after the weights were written, before the model card

    monkeypatch.setattr(conversion_module, "write_model_card", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert_gpt2_checkpoint(checkpoints["save_pretrained"], tmp_path / "out", attention_solver="nag")
    assert_nothing_left(tmp_path, set())


def test_real_gpt2_tokenizer_survives_the_round_trip(checkpoints, gpt2_tokenizer_dir, tmp_path):
    source = tmp_path / "with_tokenizer"
    shutil.copytree(checkpoints["save_pretrained"], source)
    for path in gpt2_tokenizer_dir.iterdir():
        shutil.copy(path, source / path.name)
    energy_dir = convert_gpt2_checkpoint(source, tmp_path / "energy", attention_solver="momentum")
    gpt2_dir = convert_energy_gpt_checkpoint_to_gpt2(energy_dir, tmp_path / "gpt2_again")
    text = "Hello world! EnergyGPT turns attention into an optimiser step, ünïcödé and    spaces."
    expected = AutoTokenizer.from_pretrained(source)(text)["input_ids"]
    assert expected[:2] == [15496, 995]
    for directory in (energy_dir, gpt2_dir):
        assert AutoTokenizer.from_pretrained(directory)(text)["input_ids"] == expected
        assert {path.name for path in gpt2_tokenizer_dir.iterdir()} <= {path.name for path in directory.iterdir()}


# ----------------------------------------------------------------------------------------------------------------
# EnergyGPT -> GPT-2
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["save_pretrained", "hub_bin"])
def test_round_trip_gives_bit_identical_gpt2_weights(layout, checkpoints, gpt2_model, tmp_path):
    energy_dir = convert_gpt2_checkpoint(checkpoints[layout], tmp_path / "energy")
    assert cli.main(["convert", "--to_gpt2", "--model_name_or_path", str(energy_dir),
                     "--output_dir", str(tmp_path / "gpt2_again")]) == 0
    original = {k: v for k, v in gpt2_model.state_dict().items() if k != "lm_head.weight"}
    round_trip = load_file(tmp_path / "gpt2_again" / "model.safetensors")
    assert round_trip.keys() == original.keys()
    assert all(torch.equal(round_trip[key], original[key]) for key in original)

    reloaded = GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2_again").eval()
    input_ids, attention_mask = input_batch()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids, attention_mask=attention_mask).logits,
                           gpt2_model(input_ids, attention_mask=attention_mask).logits)
    assert "energy_gpt" not in (tmp_path / "gpt2_again" / "config.json").read_text()


def test_reverse_accepts_solvers_that_reduce_to_gpt2(gpt2_model):
    for solver in SOLVERS:  # beta = 0 / lambda = 0: every solver is GPT-2
        back = energy_gpt_to_gpt2(gpt2_to_energy_gpt(gpt2_model, attention_solver=solver))
        assert all(torch.equal(back.state_dict()[k], v) for k, v in gpt2_model.state_dict().items())


def test_reverse_classifier(tmp_path):
    classifier = GPT2ForSequenceClassification(tiny_gpt2_config(num_labels=3, pad_token_id=0)).eval()
    back = energy_gpt_to_gpt2(gpt2_to_energy_gpt(classifier, task="sequence-classification"))
    assert type(back) is GPT2ForSequenceClassification
    assert all(torch.equal(back.state_dict()[k], v) for k, v in classifier.state_dict().items())


@pytest.mark.parametrize(("solver", "setting", "explained"), [
    ("momentum", {"momentum_beta": 0.3}, r"h\.1\.residual_rule\.momentum_beta = .*h\.2\.residual_rule\.momentum_beta"),
    ("nag", {"momentum_beta": 0.1}, "momentum_beta = "),
    ("newton", {"newton_lambda": 0.2}, r"h\.0\.attn\.head_rule\.newton_lambda = \[0\.2"),
    ("momentum", {"momentum_velocity_norm": True}, "momentum_velocity_norm=True"),
    ("dense", {"dense_init": 0.1}, "dense_weights = "),
])
def test_reverse_refuses_solvers_that_do_not_reduce(solver, setting, explained, gpt2_model, tmp_path):
    energy_dir = convert_gpt2_checkpoint(gpt2_model, tmp_path / "energy", attention_solver=solver, **setting)
    with pytest.raises(ConversionError, match=f"(?s){explained}.*Only models at their solvers' function-preserving"):
        convert_energy_gpt_checkpoint_to_gpt2(energy_dir, tmp_path / "gpt2")
    assert_nothing_left(tmp_path, {"energy"})


def test_reverse_sees_learned_values_not_the_config(gpt2_model, tmp_path):
    """A model converted with beta = 0 and then trained has non-zero betas in its weights: refused."""
    model = gpt2_to_energy_gpt(gpt2_model, attention_solver="momentum")
    with torch.no_grad():
        model.transformer.h[1].residual_rule.momentum_beta.fill_(0.01)  # as if training moved it
    with pytest.raises(ConversionError, match="h.1.residual_rule.momentum_beta") as error:
        energy_gpt_to_gpt2(model)
    assert "h.2." not in str(error.value)


# ----------------------------------------------------------------------------------------------------------------
# Bad input: a clear error, nothing left behind
# ----------------------------------------------------------------------------------------------------------------


def _other_architecture(kind: str):
    from transformers import BertConfig, GPTNeoConfig, LlamaConfig

    small = {"vocab_size": 50, "hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32}
    return {
        "bert": lambda: BertConfig(num_hidden_layers=1, **small),
        "gpt_neo": lambda: GPTNeoConfig(num_layers=1, attention_types=[[["global"], 1]], vocab_size=50, hidden_size=16,
                                        num_heads=2),
        "llama": lambda: LlamaConfig(num_hidden_layers=1, **small),
    }[kind]()


def _corrupt_weights(directory: Path) -> None:
    path = directory / "model.safetensors"
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])  # truncated download


def _garbage_bin(directory: Path) -> None:
    (directory / "model.safetensors").unlink()
    (directory / "pytorch_model.bin").write_bytes(b"this is not a torch file")


def _missing_tensor(directory: Path) -> None:
    weights = load_file(directory / "model.safetensors")
    del weights["transformer.h.1.mlp.c_fc.weight"]
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})


def _no_weights(directory: Path) -> None:
    (directory / "model.safetensors").unlink()
    (directory / "tf_model.h5").write_bytes(b"")


@pytest.mark.parametrize(("kind", "error", "message"), [
    ("bert", ConversionError, "model_type='bert'.*accepted model_type: \\['gpt2'\\]"),
    ("gpt_neo", ConversionError, "model_type='gpt_neo'.*accepted model_type: \\['gpt2'\\]"),
    ("llama", ConversionError, "model_type='llama'.*accepted model_type: \\['gpt2'\\]"),
    ("missing_path", CheckpointNotFoundError, "no such directory"),
    ("corrupt_safetensors", ConversionError, "Cannot read the weights file .*model.safetensors.*corrupt or truncated"),
    ("corrupt_bin", ConversionError, "Cannot read the weights file .*pytorch_model.bin.*corrupt or truncated"),
    ("missing_tensor", ConversionError, "missing 1 tensor.*h.1.mlp.c_fc.weight"),
    ("no_weights", ConversionError, "No PyTorch weights .*found only \\['tf_model.h5'\\]"),
    ("energy_gpt_as_gpt2", ConversionError, "model_type='energy_gpt'.*accepted model_type: \\['gpt2'\\]"),
])
def test_bad_input_raises_a_clear_error_and_leaves_nothing(kind, error, message, checkpoints, tmp_path):
    source = tmp_path / "source"
    if kind in ("bert", "gpt_neo", "llama"):
        _other_architecture(kind).save_pretrained(source)
    elif kind == "energy_gpt_as_gpt2":
        convert_gpt2_checkpoint(checkpoints["save_pretrained"], source)
    elif kind != "missing_path":
        shutil.copytree(checkpoints["save_pretrained"], source)
        {"corrupt_safetensors": _corrupt_weights, "corrupt_bin": _garbage_bin, "missing_tensor": _missing_tensor,
         "no_weights": _no_weights}[kind](source)
    output = tmp_path / "nested" / "out"
    with pytest.raises(error, match=f"(?s){message}"):
        convert_gpt2_checkpoint(source, output, attention_solver="nag")
    assert not (tmp_path / "nested").exists()


def test_reverse_rejects_plain_gpt2_and_cli_reports_errors(checkpoints, tmp_path, capsys):
    with pytest.raises(ConversionError, match="not an EnergyGPT checkpoint: found model_type='gpt2'"):
        convert_energy_gpt_checkpoint_to_gpt2(checkpoints["save_pretrained"], tmp_path / "out")
    assert cli.main(["convert", "--model_name_or_path", str(tmp_path / "nowhere"), "--output_dir",
                     str(tmp_path / "out")]) == 1
    assert "no such directory" in capsys.readouterr().err
    assert_nothing_left(tmp_path, set())
