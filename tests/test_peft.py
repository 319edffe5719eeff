"""PEFT without friction: `import energy_gpt` registers EnergyGPT's default adapter targets (so `LoraConfig(task_type=
...)` alone works), and the solver scalars train next to LoRA (`modules_to_save=solver_modules_to_save(model)`),
surviving adapter save / load and merging. Written against the generic helper, not against module or parameter
names, so it holds for every layout of the solver modules. Offline, tiny random models."""

import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import REPO_ROOT, tiny_config

peft = pytest.importorskip("peft")


def test_import_registers_energy_gpt_in_every_peft_mapping_that_knows_gpt2():
    import peft.tuners
    from peft.utils import constants

    import energy_gpt  # noqa: F401
    from energy_gpt.peft_utils import LORA_TARGET_MODULES

    assert constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING["energy_gpt"] == LORA_TARGET_MODULES
    # What the tuners actually look up (`BaseTuner.target_module_mapping`), not only the constants module.
    tuner_classes = [getattr(peft.tuners, name) for name in dir(peft.tuners) if name.endswith("Model")]
    mappings = [cls.target_module_mapping for cls in tuner_classes
                if isinstance(getattr(cls, "target_module_mapping", None), dict)]
    with_gpt2 = [mapping for mapping in mappings if "gpt2" in mapping]
    assert len(with_gpt2) > 10  # LoRA, LoHa, LoKr, AdaLoRA, IA3, VeRA, ... (peft 0.21 has ~30)
    assert all("energy_gpt" in mapping for mapping in with_gpt2)
    # IA3 looks its two mappings up itself; EnergyGPT gets GPT-2's entries (same module names).
    assert constants.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING["energy_gpt"] == ["c_attn", "mlp.c_proj"]
    assert constants.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING["energy_gpt"] == ["mlp.c_proj"]


def test_energy_gpt_imports_without_peft(tmp_path):
    code = textwrap.dedent("""
        import importlib.abc, sys
        class NoPeft(importlib.abc.MetaPathFinder):  # as if PEFT were not installed
            def find_spec(self, name, path, target=None):
                if name == "peft":
                    raise ModuleNotFoundError("No module named 'peft'", name="peft")
        sys.meta_path.insert(0, NoPeft())
        import energy_gpt
        from energy_gpt.peft_utils import register_peft_target_modules
        assert register_peft_target_modules() is False
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
    assert "PEFT could not be imported" not in result.stderr  # not installed is not an error


@pytest.mark.parametrize("solver", ["nag", "newton", "gd", "momentum_frozen"])
def test_solver_modules_to_save_finds_exactly_the_trainable_solver_parameters(solver):
    from energy_gpt import EnergyGPTForCausalLM
    from energy_gpt.peft_utils import solver_modules_to_save

    fields = {"attention_solver": "momentum", "learn_solver_params": False} if solver == "momentum_frozen" else {
        "attention_solver": solver}
    model = EnergyGPTForCausalLM(tiny_config(**fields))
    names = solver_modules_to_save(model)
    owned = {f"{name}.{parameter}" for name in names
             for parameter, _ in model.get_submodule(name).named_parameters(recurse=False)}
    # Every parameter that is not one of GPT-2's (embeddings, LayerNorms, Linear layers) is a solver parameter.
    gpt2_suffixes = (".weight", ".bias")
    solver_parameters = {name for name, _ in model.named_parameters() if not name.endswith(gpt2_suffixes)}
    assert owned == solver_parameters
    if solver in ("gd", "momentum_frozen"):
        assert names == []
    else:
        assert names and len(names) <= tiny_config().n_layer * 2


def train_a_few_steps(model, steps: int = 5) -> None:
    torch.manual_seed(1)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    model.train()
    for _ in range(steps):
        input_ids = torch.randint(1, 101, (4, 16))
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def solver_values(model, module_names: list[str]) -> dict[str, torch.Tensor]:
    """The solver parameters of `model` (a base, PEFT or merged model) under the base model's module names."""
    if isinstance(model, peft.PeftModel):
        model = model.base_model.model
    values = {}
    for name in module_names:
        module = model.get_submodule(name)
        if isinstance(module, peft.utils.other.ModulesToSaveWrapper):
            module = module.modules_to_save["default"]  # the trained copy
        for parameter_name, parameter in module.named_parameters(recurse=False):
            values[f"{name}.{parameter_name}"] = parameter.detach().clone()
    return values


@pytest.mark.parametrize("solver", ["nag", "newton_light"])
def test_lora_from_task_type_alone_with_solver_scalars_trains_saves_reloads_and_merges(solver, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from energy_gpt import EnergyGPTForCausalLM
    from energy_gpt.peft_utils import solver_modules_to_save

    torch.manual_seed(0)
    base = EnergyGPTForCausalLM(tiny_config(attention_solver=solver, momentum_beta=0.3, newton_lambda=0.05)).eval()
    base.save_pretrained(tmp_path / "base")
    solver_modules = solver_modules_to_save(base)
    assert solver_modules
    initial_solver = solver_values(base, solver_modules)
    initial_base = {name: tensor.clone() for name, tensor in base.state_dict().items()}

    # No target_modules: PEFT finds energy_gpt's default in its mapping.
    model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0,
                                            modules_to_save=solver_modules))
    lora_targets = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if hasattr(module, "lora_A")}
    assert lora_targets == {"c_attn", "c_proj"}
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert trainable and all("lora_" in name or ".modules_to_save." in name for name in trainable)

    train_a_few_steps(model)
    trained_solver = solver_values(model, solver_modules)
    assert trained_solver.keys() == initial_solver.keys()
    assert all(not torch.equal(trained_solver[name], initial_solver[name]) for name in initial_solver)  # they moved
    lora_b = [parameter for name, parameter in model.named_parameters() if "lora_B" in name]
    assert any(bool(parameter.ne(0).any()) for parameter in lora_b)  # LoRA B starts at 0: training moved it

    input_ids = torch.randint(1, 101, (2, 12))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0
    with torch.no_grad():
        trained_logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        base_model_logits = EnergyGPTForCausalLM.from_pretrained(tmp_path / "base").eval()(
            input_ids=input_ids, attention_mask=attention_mask).logits
    assert not torch.allclose(trained_logits, base_model_logits, atol=1e-4)

    # The adapter folder holds the LoRA weights and the solver modules; on a fresh base it gives the same logits.
    model.save_pretrained(tmp_path / "adapter")
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert any("lora_A" in key for key in saved)
    assert {key for key in saved if "lora_" not in key}, "the solver modules are saved with the adapter"
    fresh = EnergyGPTForCausalLM.from_pretrained(tmp_path / "base").eval()
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    assert solver_values(reloaded, solver_modules).keys() == trained_solver.keys()
    for name, value in solver_values(reloaded, solver_modules).items():
        torch.testing.assert_close(value, trained_solver[name], rtol=0, atol=0, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=input_ids, attention_mask=attention_mask).logits,
                                   trained_logits, rtol=0, atol=0)

    # Merged: a plain EnergyGPT model with the trained solver scalars, same logits, saved and reloaded as usual.
    merged = reloaded.merge_and_unload()
    assert type(merged) is EnergyGPTForCausalLM and not any("lora" in key for key in merged.state_dict())
    for name, value in solver_values(merged, solver_modules).items():
        torch.testing.assert_close(value, trained_solver[name], rtol=0, atol=0, msg=name)
    merged.save_pretrained(tmp_path / "merged")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert again.state_dict().keys() == initial_base.keys()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=input_ids, attention_mask=attention_mask).logits,
                                   trained_logits, rtol=1e-5, atol=1e-5)
    # The base checkpoint on disk was never touched by training.
    untouched = EnergyGPTForCausalLM.from_pretrained(tmp_path / "base").state_dict()
    assert all(torch.equal(untouched[name], initial_base[name]) for name in initial_base)


def test_readme_shows_the_tested_peft_calls():
    readme = (REPO_ROOT / "README.md").read_text()
    assert 'LoraConfig(task_type="CAUSAL_LM"' in readme
    assert "solver_modules_to_save(model)" in readme
    assert 'target_modules=["c_attn", "c_proj"]' in readme  # for users who load with trust_remote_code only
