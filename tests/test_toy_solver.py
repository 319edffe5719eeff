"""A solver declares itself once: a toy solver, written here and nowhere else, gets config validation,
flags, save / load, remote code, GPT-2 conversion both ways, the model card and `solver_report` without touching any
other file of the project. A toy energy, declared with the same `Solver(...)` form, gets its config field and its
per-head parameter (initialised by a function of the config, the layer and the shape) created, initialised, saved and
loaded.

The toy's source is exactly what a contributor would append to `modeling/solvers_energy_gpt.py`: one rule class and one
`register_solver(...)` line (the toy energy's: `modeling/energies_energy_gpt.py`). In this process it is executed in
that module's namespace (as if appended); for the remote-code check it is appended to the checkpoint's copy of the
file, which is what `save_pretrained` would have copied had the contributor edited the repository.
"""

import torch
import pytest
from conftest import run_without_energy_gpt, tiny_config, tiny_gpt2_config
from transformers import GPT2LMHeadModel

import energy_gpt.modeling.energies_energy_gpt as energies
import energy_gpt.modeling.solvers_energy_gpt as solvers
from energy_gpt import EnergyGPTConfig, EnergyGPTForCausalLM, solver_report

TOY_SOURCE = '''

class ScaledResidual(nn.Module):
    """`toy`: x' = x + gamma_l * A(LN1(x)); gamma = 1 is GPT-2."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        add_solver_parameters(self, config, layer_idx)

    def forward(self, hidden_states, state, attn_output=None):
        if attn_output is None:
            return hidden_states
        return hidden_states + self.toy_gamma * attn_output, state


register_solver(Solver(
    "toy", RESIDUAL, ScaledResidual, "ToyMHA", "A learned per-layer step size on the attention output.",
    update_rule="x' = x + gamma_l * A(LN1(x))",
    fields=(SolverField("toy_gamma_init", 1.0, check_number_in("toy_gamma_init", 0.0, 10.0),
                        "Initial step size gamma of every layer.", gpt2_value=1.0),),
    parameters=(SolverParameter("toy_gamma", "toy_gamma_init", lambda config, layer_idx: (1,), "gamma_l"),),
))
'''


@pytest.fixture
def toy_solver():
    namespace = vars(solvers)
    exec(compile(TOY_SOURCE, solvers.__file__, "exec"), namespace)  # as if appended to the solvers file
    yield solvers.ATTENTION_SOLVERS["toy"]
    del solvers.ATTENTION_SOLVERS["toy"]


def toy_model(**overrides) -> EnergyGPTForCausalLM:
    model = EnergyGPTForCausalLM(tiny_config(attention_solver="toy", initializer_range=0.2, **overrides)).eval()
    with torch.no_grad():
        for layer, block in enumerate(model.transformer.h):
            block.residual_rule.toy_gamma.fill_(0.5 + 0.25 * layer)
    return model


def test_config_fields_and_validation(toy_solver):
    config = tiny_config(attention_solver="toy")
    assert config.toy_gamma_init == 1.0  # the declared default
    with pytest.raises(ValueError, match=r"`toy_gamma_init` must be a float in \[0, 10\], got -1"):
        tiny_config(attention_solver="toy", toy_gamma_init=-1)
    assert tiny_config(attention_solver=["gd", "toy", "toy"]).attention_solver == ["gd", "toy", "toy"]
    with pytest.raises(ValueError, match="toy"):  # the error lists the registered solvers, the toy included
        tiny_config(attention_solver="adam")

    from energy_gpt.conversion.convert import build_parser

    args = build_parser().parse_args(["--model_name_or_path", "x", "--output_dir", "y", "--toy_gamma_init", "0.5"])
    assert args.toy_gamma_init == 0.5  # the convert command has a flag for the new field


def test_save_load_and_report(toy_solver, tmp_path):
    model = toy_model()
    model.save_pretrained(tmp_path)
    reloaded = EnergyGPTForCausalLM.from_pretrained(tmp_path).eval()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, reloaded.state_dict()[name]), name
    assert solver_report(reloaded)["parameters"]["toy_gamma"] == [[0.5], [0.75], [1.0]]
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
    # Gamma matters: at gamma = 1 the model is another function.
    with torch.no_grad():
        for block in reloaded.transformer.h:
            block.residual_rule.toy_gamma.fill_(1.0)
        assert (reloaded(ids).logits - model(ids).logits).abs().max() > 1e-3


REMOTE_CHECK = """
import torch
from transformers import AutoModelForCausalLM

expected = torch.load("expected.pt")
model = AutoModelForCausalLM.from_pretrained("checkpoint", trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules")
with torch.no_grad():
    assert torch.equal(model(expected["ids"]).logits, expected["logits"])
print("toy", model.config.attention_solver, model.config.toy_gamma_init)
"""


def test_remote_code_with_the_solver_in_the_shipped_file(toy_solver, tmp_path):
    model = toy_model(toy_gamma_init=0.5)
    model.save_pretrained(tmp_path / "checkpoint")
    shipped = tmp_path / "checkpoint" / "solvers_energy_gpt.py"
    shipped.write_text(shipped.read_text() + TOY_SOURCE)  # the contributor's one-file change, as it would ship
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        torch.save({"ids": ids, "logits": model(ids).logits}, tmp_path / "expected.pt")
    result = run_without_energy_gpt(REMOTE_CHECK, cwd=tmp_path, env_extra={"HF_HOME": str(tmp_path / "hf-home")})
    assert "toy toy 0.5" in result.stdout


def test_conversion_both_ways_and_card(toy_solver, tmp_path):
    from energy_gpt.conversion import convert_gpt2_checkpoint, energy_gpt_to_gpt2, gpt2_to_energy_gpt
    from energy_gpt.conversion.gpt2 import ConversionError
    from energy_gpt.model_card import render_model_card

    gpt2 = GPT2LMHeadModel(tiny_gpt2_config()).eval()
    converted = gpt2_to_energy_gpt(gpt2, attention_solver="toy")
    assert converted.config.toy_gamma_init == 1.0  # the declared function-preserving value
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        assert torch.equal(converted(ids).logits, gpt2(ids).logits)
        back = energy_gpt_to_gpt2(converted)
        assert torch.equal(back(ids).logits, gpt2(ids).logits)
        converted.transformer.h[2].residual_rule.toy_gamma.fill_(0.9)  # as if trained
    with pytest.raises(ConversionError, match=r"h\.2\.residual_rule\.toy_gamma"):
        energy_gpt_to_gpt2(converted)

    folder = convert_gpt2_checkpoint(gpt2, tmp_path / "toy", attention_solver="toy", toy_gamma_init=0.5)
    card = render_model_card(folder)
    assert "**`toy`** (ToyMHA): A learned per-layer step size" in card
    assert "x' = x + gamma_l * A(LN1(x))" in card and "`toy_gamma_init`" in card
    assert "Solver parameter `toy_gamma`" in card and "| 2 | 0.5 |" in card


def test_compare_trains_and_reports_the_toy(toy_solver, tmp_path):
    import json

    from test_compare import SHORT_BUDGET

    from energy_gpt.recipes.compare import main

    assert main(["--output_dir", str(tmp_path / "cmp"), "--solvers", "gd,toy:toy_gamma_init=0.5", "--seeds", "1",
                 *SHORT_BUDGET]) == 0
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| toy:toy_gamma_init=0.5 |" in table and "toy_gamma" in table  # trained, compared, and what it learned
    run = json.loads(next((tmp_path / "cmp" / "runs").glob("toy*/seed-1/run.json")).read_text())
    assert len(run["solver_report"]["parameters"]["toy_gamma"]) == 2


TOY_ENERGY_SOURCE = '''

class ScaledSoftmaxHeads(nn.Module):
    """`toy_energy`: softmax attention with a learned output scale per head, o = s_h * softmax(q . k / sqrt(d)) v."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        add_solver_parameters(self, config, layer_idx)

    def forward(self, attention, query, key, value, attention_mask, attention_interface=None, cache=None,
                cache_index=None, key_padding_mask=None, **kwargs):
        output, weights = attention_interface(attention, query, key, value, attention_mask, **kwargs)
        return output * self.toy_head_scale.to(output.dtype).view(1, 1, -1, 1), weights


def toy_head_scales(config, layer_idx: int, shape: tuple[int, ...]) -> torch.Tensor:
    """s_h = toy_energy_scale / (h + 1 + layer_idx): a function of the config, the layer and the head."""
    return config.toy_energy_scale / (torch.arange(shape[0], dtype=torch.float32) + 1.0 + layer_idx)


register_solver(Solver(
    "toy_energy", HEAD, ScaledSoftmaxHeads, "ToyEnergy", "Softmax attention with a learned output scale per head.",
    update_rule="per head: o = s_h * sum_i softmax_i(q . k_i / sqrt(d)) v_i",
    fields=(SolverField("toy_energy_scale", 0.5, check_positive("toy_energy_scale"),
                        "Initial output scale of the first head of the first layer."),),
    parameters=(SolverParameter("toy_head_scale", toy_head_scales, lambda config, layer_idx: (config.n_head,),
                                "s_{l,h}, one per head.", per_head=True),),
    reduces_to_gpt2=False,
), registry=ATTENTION_ENERGIES)
'''


@pytest.fixture
def toy_energy():
    exec(compile(TOY_ENERGY_SOURCE, energies.__file__, "exec"), vars(energies))  # as if appended to the energies file
    yield solvers.ATTENTION_ENERGIES["toy_energy"]
    del solvers.ATTENTION_ENERGIES["toy_energy"]


def test_an_energy_declares_its_field_and_per_head_parameter_the_same_way(toy_energy, tmp_path):
    from energy_gpt.conversion import energy_gpt_to_gpt2
    from energy_gpt.conversion.gpt2 import ConversionError

    config = tiny_config(attention_energy="toy_energy")
    assert config.toy_energy_scale == 0.5  # the declared default
    with pytest.raises(ValueError, match=r"`toy_energy_scale` must be a finite number > 0, got -1"):
        tiny_config(attention_energy="toy_energy", toy_energy_scale=-1)
    with pytest.raises(ValueError, match="'newton' does not exist for `attention_energy`='toy_energy'"):
        tiny_config(attention_energy="toy_energy", attention_solver="newton")
    assert toy_energy.parameters[0].per_head  # tensor-parallel plans read this declaration

    model = EnergyGPTForCausalLM(tiny_config(attention_energy="toy_energy", toy_energy_scale=0.8)).eval()
    heads = model.config.n_head
    for layer, block in enumerate(model.transformer.h):
        scale = block.attn.head_rule.toy_head_scale
        assert isinstance(scale, torch.nn.Parameter) and scale.shape == (heads,)
        expected = 0.8 / (torch.arange(heads, dtype=torch.float32) + 1.0 + layer)  # the declared initialiser
        torch.testing.assert_close(scale.detach(), expected, rtol=0, atol=0)
    reported = solver_report(model)["parameters"]["toy_head_scale"]
    assert reported[1] == pytest.approx([0.8 / (h + 2) for h in range(heads)])

    with torch.no_grad():  # as if trained: loading must keep these, not re-initialise them
        for block in model.transformer.h:
            block.attn.head_rule.toy_head_scale.copy_(torch.linspace(0.3, 1.7, heads))
    model.save_pretrained(tmp_path)
    reloaded = EnergyGPTForCausalLM.from_pretrained(tmp_path).eval()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, reloaded.state_dict()[name]), name
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        logits = model(ids).logits
        assert torch.equal(reloaded(ids).logits, logits)
        # The scale matters: with the declared initial values the model is another function.
        for layer, block in enumerate(reloaded.transformer.h):
            block.attn.head_rule.toy_head_scale.copy_(0.8 / (torch.arange(heads) + 1.0 + layer))
        assert (reloaded(ids).logits - logits).abs().max() > 1e-3
    with pytest.raises(ConversionError, match="toy_energy"):  # declared `reduces_to_gpt2=False`
        energy_gpt_to_gpt2(model)
