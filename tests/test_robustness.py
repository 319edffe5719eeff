"""Bad input gets a clear error, numerics stay finite, checkpoints report mismatches, nothing is lost."""

import ast
import copy
import logging
import math
import re
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import energy_gpt
from energy_gpt import EnergyGPTConfig, EnergyGPTForCausalLM, EnergyGPTForSequenceClassification
from energy_gpt.io_utils import atomic_directory, atomic_write_json, atomic_write_text
from energy_gpt.modeling.modeling_energy_gpt import eager_attention_forward
from energy_gpt.modeling.solvers_energy_gpt import LightNewtonHeads, NewtonHeads

from conftest import REPO_ROOT, SOLVERS, run_without_energy_gpt, tiny_config


# ---------------------------------------------------------------------------------------------------------------
# Property-based: random valid configs keep shapes, causality, cache equivalence and the save / load round trip.
# ---------------------------------------------------------------------------------------------------------------

valid_configs = st.fixed_dictionaries(
    {
        "attention_solver": st.sampled_from(SOLVERS),
        "n_head": st.sampled_from([1, 2, 4]),
        "head_dim": st.sampled_from([2, 4, 8]),
        "n_layer": st.integers(1, 3),
        "momentum_beta": st.floats(0.0, 0.99),
        "newton_lambda": st.floats(-2.0, 2.0),
        "nag_lookahead": st.sampled_from(["qkv", "query"]),
        "learn_solver_params": st.booleans(),
        "attn_implementation": st.sampled_from(["eager", "sdpa"]),
    }
)
batches = st.fixed_dictionaries(
    {
        "batch": st.integers(1, 3),
        "length": st.integers(2, 10),
        "padding_side": st.sampled_from(["left", "right", "none"]),
        "seed": st.integers(0, 2**16),
    }
)


def _build(draw: dict) -> EnergyGPTForCausalLM:
    params = dict(draw)
    head_dim = params.pop("head_dim")
    implementation = params.pop("attn_implementation")
    config = tiny_config(n_embd=head_dim * params["n_head"], **params)
    config._attn_implementation = implementation
    return EnergyGPTForCausalLM(config).eval()


def _inputs(spec: dict, vocab_size: int):
    generator = torch.Generator().manual_seed(spec["seed"])
    ids = torch.randint(1, vocab_size, (spec["batch"], spec["length"]), generator=generator)
    mask = torch.ones_like(ids)
    if spec["padding_side"] != "none":
        for row in range(spec["batch"]):
            pad = int(torch.randint(0, spec["length"] - 1, (1,), generator=generator))
            if pad:
                span = slice(0, pad) if spec["padding_side"] == "left" else slice(spec["length"] - pad, None)
                mask[row, span] = 0
    return ids, mask


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(draw=valid_configs, spec=batches)
def test_random_valid_configs_keep_their_invariants(draw, spec, tmp_path_factory):
    model = _build(draw)
    ids, mask = _inputs(spec, model.config.vocab_size)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
        assert logits.shape == (*ids.shape, model.config.vocab_size)
        assert torch.isfinite(logits).all()

        # Causality: changing the last token leaves every earlier position unchanged (unpadded rows).
        changed = ids.clone()
        changed[:, -1] = (changed[:, -1] % (model.config.vocab_size - 1)) + 1
        full = torch.ones_like(ids)
        before, after = model(ids, attention_mask=full).logits, model(changed, attention_mask=full).logits
        torch.testing.assert_close(before[:, :-1], after[:, :-1], rtol=0, atol=1e-5)

        # Cache equivalence: prefix then one token at a time gives the logits of one full forward.
        split = max(1, spec["length"] // 2)
        out = model(ids[:, :split], attention_mask=mask[:, :split], use_cache=True)
        cache, steps = out.past_key_values, [out.logits]
        for position in range(split, spec["length"]):
            out = model(
                ids[:, position : position + 1],
                attention_mask=mask[:, : position + 1],
                past_key_values=cache,
                use_cache=True,
            )
            cache = out.past_key_values
            steps.append(out.logits)
        incremental = torch.cat(steps, dim=1)
        real = mask.bool()  # padded query positions carry no meaning
        torch.testing.assert_close(incremental[real], logits[real], rtol=1e-4, atol=1e-5)

    directory = tmp_path_factory.mktemp("roundtrip")
    model.save_pretrained(directory)
    reloaded = EnergyGPTForCausalLM.from_pretrained(
        directory, attn_implementation=model.config._attn_implementation
    ).eval()
    for (name, tensor), (name_back, tensor_back) in zip(
        model.state_dict().items(), reloaded.state_dict().items(), strict=True
    ):
        assert name == name_back and torch.equal(tensor, tensor_back), name
    with torch.no_grad():
        assert torch.equal(reloaded(ids, attention_mask=mask).logits, logits)


invalid_fields = st.sampled_from(
    [
        ("attention_solver", st.sampled_from(["adam", "GD", "", "newton-light"])),
        ("momentum_beta", st.one_of(st.floats(1.0, 10.0), st.floats(-10.0, -1e-6))),
        ("nag_lookahead", st.sampled_from(["keys", "q", "QKV"])),
        ("n_layer", st.integers(-5, 0)),
        ("n_embd", st.integers(-5, 0)),
        ("n_head", st.integers(-5, 0)),
        ("vocab_size", st.integers(-5, 0)),
        ("n_positions", st.integers(-5, 0)),
        ("attn_pdrop", st.floats(1.01, 5.0)),
        ("newton_step_bound", st.sampled_from([0.0, -0.1, math.inf, "big"])),
        ("momentum_form", st.sampled_from(["adam", "EMA", ""])),
        ("dense_init", st.sampled_from([math.nan, math.inf, "zero"])),
        ("num_loops", st.integers(-3, 0)),
        ("attention_energy", st.sampled_from(["cosine", "Linear"])),
        ("newton_lambda", st.sampled_from([math.inf, -math.inf, math.nan])),
        ("learn_solver_params", st.sampled_from(["yes", 1, None])),
        ("reorder_and_upcast_attn", st.just(True)),
        ("summary_type", st.sampled_from(["mean", "last", "attn"])),
        ("summary_use_proj", st.just(False)),
        ("summary_first_dropout", st.floats(0.0, 0.09)),
        ("activation_function", st.sampled_from(["gelu_old", "", "GELU"])),
        ("layer_norm_epsilon", st.sampled_from([0.0, -1e-5, math.nan])),
        ("scale_attn_weights", st.sampled_from([1, "yes", None])),
        ("initializer_range", st.sampled_from([-0.02, math.inf])),
    ]
)


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_invalid_configs_raise_value_error_naming_the_field(data):
    field, values = data.draw(invalid_fields)
    value = data.draw(values)
    with pytest.raises(ValueError, match=rf"`{field}`"):
        tiny_config(**{field: value})
    # A value assigned later (as a from_pretrained override is) fails the same check when the config is validated,
    # which loading and every model constructor do.
    config = tiny_config()
    setattr(config, field, value)
    with pytest.raises(ValueError, match=rf"`{field}`"):
        EnergyGPTForCausalLM(config)


def test_gpt2_fields_without_an_effect_here_are_refused_and_say_why():
    from transformers import GPT2Config

    from energy_gpt.conversion.gpt2 import _energy_gpt_config

    with pytest.raises(ValueError, match=r"`reorder_and_upcast_attn` must be False.*float32"):
        tiny_config(reorder_and_upcast_attn=True)
    with pytest.raises(ValueError, match=r"`summary_activation` must be None .*double-heads"):
        tiny_config(summary_activation="tanh")
    # Every GPT-2 config at its defaults (as the Hub's GPT-2 checkpoints are) is an EnergyGPT config ...
    EnergyGPTConfig(**GPT2Config().to_dict())
    # ... and conversion leaves the double-heads fields behind, whatever a checkpoint says about that head.
    source = GPT2Config(n_layer=1, n_embd=8, n_head=2, summary_type="mean", summary_activation="tanh").to_dict()
    converted = _energy_gpt_config(source, "gd", "causal-lm", None, {})
    assert (converted.summary_type, converted.summary_activation, converted.n_embd) == ("cls_index", None, 8)


@pytest.mark.parametrize(("n_embd", "n_head"), [(30, 4), (32, 3), (10, 20)])
def test_heads_must_divide_width(n_embd, n_head):
    with pytest.raises(ValueError, match=r"`n_embd` \(%d\) must be divisible by `n_head` \(%d\)" % (n_embd, n_head)):
        tiny_config(n_embd=n_embd, n_head=n_head)


def test_invalid_override_on_from_pretrained_and_from_config(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    EnergyGPTForCausalLM(tiny_config()).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="`attention_solver` must be one of"):
        AutoModelForCausalLM.from_pretrained(tmp_path, attention_solver="adam")
    with pytest.raises(ValueError, match=r"`momentum_beta` must be a float in \[0, 1\), got 1.5"):
        AutoConfig.from_pretrained(tmp_path, momentum_beta=1.5)
    config = AutoConfig.from_pretrained(tmp_path)
    object.__setattr__(config, "n_head", 5)  # bypasses the per-field check: the model constructor still catches it
    with pytest.raises(ValueError, match="`n_head`"):
        AutoModelForCausalLM.from_config(config)


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs: a clear error, not an index error deep in torch.
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm():
    return EnergyGPTForCausalLM(tiny_config(attention_solver="nag")).eval()


def test_token_ids_outside_the_vocabulary(lm):
    with pytest.raises(ValueError, match=r"token id 101, outside the vocabulary: ids must be in \[0, 100\]"):
        lm(torch.tensor([[1, 2, 101]]))
    with pytest.raises(ValueError, match="token id -1"):
        lm(torch.tensor([[1, -1]]))


def test_sequence_longer_than_n_positions(lm):
    with pytest.raises(ValueError, match=r"65 new tokens > `n_positions`=64"):
        lm(torch.ones(1, 65, dtype=torch.long))
    cache = lm(torch.ones(1, 60, dtype=torch.long), use_cache=True).past_key_values
    with pytest.raises(ValueError, match=r"60 cached \+ 5 new tokens"):
        lm(torch.ones(1, 5, dtype=torch.long), past_key_values=cache)


def test_empty_batch(lm):
    with pytest.raises(ValueError, match="Empty input"):
        lm(torch.ones(0, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="Empty input"):
        lm(torch.ones(2, 0, dtype=torch.long))


def test_mask_of_the_wrong_shape(lm):
    with pytest.raises(ValueError, match=r"`attention_mask` has shape \(2, 4\), expected \(2, 5\)"):
        lm(torch.ones(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 4, dtype=torch.long))


def test_labels_of_the_wrong_shape(lm):
    with pytest.raises(ValueError, match=r"`labels` has shape \(2, 4\), expected \(2, 5\)"):
        lm(torch.ones(2, 5, dtype=torch.long), labels=torch.ones(2, 4, dtype=torch.long))
    classifier = EnergyGPTForSequenceClassification(tiny_config(pad_token_id=0, num_labels=3)).eval()
    with pytest.raises(ValueError, match=r"`labels` has 3 rows for a batch of 2"):
        classifier(torch.ones(2, 5, dtype=torch.long), labels=torch.ones(3, dtype=torch.long))


def test_classification_batch_without_pad_token():
    classifier = EnergyGPTForSequenceClassification(tiny_config(pad_token_id=None)).eval()
    with pytest.raises(ValueError, match="without `config.pad_token_id`"):
        classifier(torch.ones(2, 5, dtype=torch.long))
    assert classifier(torch.ones(1, 5, dtype=torch.long)).logits.shape == (1, 2)  # batch 1 needs no pad token


def test_neither_or_both_inputs(lm):
    with pytest.raises(ValueError, match="exactly one of `input_ids` or `inputs_embeds`"):
        lm()
    with pytest.raises(ValueError, match="exactly one of `input_ids` or `inputs_embeds`"):
        lm(torch.ones(1, 2, dtype=torch.long), inputs_embeds=torch.zeros(1, 2, 32))


# ---------------------------------------------------------------------------------------------------------------
# Numerics.
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", ["newton", "newton_light"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_newton_stays_finite_at_full_context_with_large_activations(solver, dtype, implementation):
    config = tiny_config(
        attention_solver=solver, n_positions=512, n_layer=2, newton_lambda=5.0, attn_implementation=implementation
    )
    model = EnergyGPTForCausalLM(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(30.0)  # activations far outside the Neumann series' radius without the bound
    model = model.to(dtype)
    with torch.no_grad():
        logits = model(torch.randint(0, config.vocab_size, (1, config.n_positions))).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("solver_class", [NewtonHeads, LightNewtonHeads])
def test_newton_step_is_bounded(solver_class):
    """|o - mu| <= newton_step_bound * |mu| per token and head, however large lambda and the values are."""
    config = tiny_config(attention_solver="newton", newton_lambda=50.0, attn_implementation="eager")
    attention = EnergyGPTForCausalLM(config).transformer.h[0].attn
    solver = solver_class(config, 0)
    query, key, value = (torch.randn(2, config.n_head, 40, 8) * 10 for _ in range(3))
    mask = torch.full((40, 40), torch.finfo(torch.float32).min).triu(1)[None, None]
    output, weights = solver(attention, query, key, value, mask, attention_interface=eager_attention_forward,
                             scaling=8**-0.5, dropout=0.0)
    mean = torch.matmul(weights, value)
    step = (output.transpose(1, 2) - mean).norm(dim=-1)
    assert torch.isfinite(output).all()
    assert (step <= config.newton_step_bound * mean.norm(dim=-1) * (1 + 1e-4) + 1e-5).all()
    assert (step > 0).any()


@pytest.mark.parametrize("solver", ["momentum", "nag"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_momentum_near_one_stays_finite_over_deep_stacks(solver, dtype):
    config = tiny_config(attention_solver=solver, n_layer=32, momentum_beta=0.999)
    model = EnergyGPTForCausalLM(config).eval().to(dtype)
    with torch.no_grad():
        logits = model(torch.randint(0, config.vocab_size, (2, 64))).logits
    assert torch.isfinite(logits).all()
    model = model.float().train()
    loss = model(torch.randint(0, config.vocab_size, (2, 32)), labels=torch.randint(0, 101, (2, 32))).loss
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints.
# ---------------------------------------------------------------------------------------------------------------


def test_loading_another_solvers_checkpoint_reports_missing_and_unexpected(tmp_path):
    EnergyGPTForCausalLM(tiny_config(attention_solver="momentum", n_layer=2)).save_pretrained(tmp_path)
    model, info = EnergyGPTForCausalLM.from_pretrained(
        tmp_path, attention_solver="newton", output_loading_info=True
    )
    assert info["unexpected_keys"] == {"transformer.h.1.residual_rule.momentum_beta"}  # layer 0 has no beta
    assert info["missing_keys"] == {f"transformer.h.{i}.attn.head_rule.newton_lambda" for i in range(2)}
    # Missing solver parameters start at their config value, never as uninitialised memory.
    for block in model.transformer.h:
        assert torch.equal(block.attn.head_rule.newton_lambda, torch.full((4,), model.config.newton_lambda))


def test_loading_weights_of_the_wrong_shape_fails_and_names_them(tmp_path, caplog):
    EnergyGPTForCausalLM(tiny_config(n_layer=1)).save_pretrained(tmp_path)
    from transformers.utils import logging as hf_logging

    hf_logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING), pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
            EnergyGPTForCausalLM.from_pretrained(tmp_path, n_embd=64)
    finally:
        hf_logging.disable_propagation()
    assert "transformer.wte.weight" in caplog.text and "MISMATCH" in caplog.text


def test_atomic_writes_keep_the_previous_state(tmp_path, monkeypatch):
    target = tmp_path / "results.json"
    atomic_write_json(target, {"loss": 1.0})

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # an interrupt between writing and renaming

    monkeypatch.setattr("energy_gpt.io_utils.os.replace", crash)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(target, "half")
    monkeypatch.undo()
    assert target.read_text().strip().startswith("{") and '"loss": 1.0' in target.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]  # no temporary file left


def test_atomic_directory_leaves_nothing_on_failure_and_refuses_overwrite(tmp_path):
    output = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_directory(output) as staging:
        (staging / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("crash mid-way")
    assert not output.exists() and list(tmp_path.iterdir()) == []

    with atomic_directory(output) as staging:
        (staging / "a.txt").write_text("first")
    with pytest.raises(FileExistsError, match="--overwrite"):
        with atomic_directory(output):
            pass
    with pytest.raises(ValueError), atomic_directory(output, overwrite=True) as staging:
        (staging / "b.txt").write_text("second")
        raise ValueError
    assert (output / "a.txt").read_text() == "first" and not (output / "b.txt").exists()
    with atomic_directory(output, overwrite=True) as staging:
        (staging / "b.txt").write_text("second")
    assert sorted(p.name for p in output.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ---------------------------------------------------------------------------------------------------------------
# Remote code is the user's trust decision.
# ---------------------------------------------------------------------------------------------------------------


def test_package_never_trusts_remote_code_on_its_own():
    """No call in the package passes `trust_remote_code=True` by itself (user-facing flags may forward a value)."""
    package_files = [*Path(energy_gpt.__file__).parent.rglob("*.py"), *(REPO_ROOT / "modeling").glob("*.py")]
    package_files += list((REPO_ROOT / "conversion").glob("*.py"))
    offenders = [
        f"{path}:{node.lineno}"
        for path in package_files
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call)
        for keyword in node.keywords
        if keyword.arg == "trust_remote_code" and isinstance(keyword.value, ast.Constant) and keyword.value.value
    ]
    assert offenders == []


def test_checkpoint_code_runs_only_with_the_users_consent(tmp_path):
    """The installed package never runs a checkpoint's own .py files; without the package, transformers asks first."""
    from transformers import AutoModelForCausalLM

    EnergyGPTForCausalLM(tiny_config(n_layer=1)).save_pretrained(tmp_path)
    booby_trap = "raise RuntimeError('checkpoint code was executed')\n"
    for name in ("modeling_energy_gpt.py", "configuration_energy_gpt.py", "solvers_energy_gpt.py"):
        (tmp_path / name).write_text(booby_trap)
    # In-process the registered classes are used, with or without the flag.
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path)) is EnergyGPTForCausalLM
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True)) is EnergyGPTForCausalLM
    # Where energy_gpt is not installed, loading without the flag refuses before running anything.
    result = run_without_energy_gpt(
        "from transformers import AutoModelForCausalLM\n"
        "try:\n"
        f"    AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, trust_remote_code=False)\n"
        "except ValueError as error:\n"
        "    assert 'trust_remote_code' in str(error), error\n"
        "    print('refused')\n",
        cwd=tmp_path,
    )
    assert result.stdout.strip() == "refused"


@pytest.mark.parametrize("padded", [False, True])
def test_newton_chunked_backward_matches_autograd(padded):
    """sdpa newton runs Sigma*mu through query chunks with a hand-written backward; eager newton goes through plain
    autograd on the same formula. Both must give the same gradients (two chunks at T = 300)."""
    from energy_gpt.modeling.solvers_energy_gpt import NEWTON_QUERY_CHUNK

    length = NEWTON_QUERY_CHUNK + 44
    # Wide init so the Sigma*mu term carries a real share of the gradient (a 1 % error in its backward must show).
    config = tiny_config(attention_solver="newton", n_positions=length, n_layer=2, newton_lambda=0.3, initializer_range=0.2)
    models = {}
    for implementation in ("eager", "sdpa"):
        torch.manual_seed(0)
        models[implementation] = EnergyGPTForCausalLM(copy.deepcopy(config)).train()
        models[implementation].set_attn_implementation(implementation)
    assert {m.config._attn_implementation for m in models.values()} == {"eager", "sdpa"}
    ids = torch.randint(1, config.vocab_size, (2, length))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :7] = 0
    gradients = {}
    for implementation, model in models.items():
        # The first real token's label is scored from the last padding position, whose (meaningless) output
        # differs between eager and sdpa: leave it out.
        labels = ids.masked_fill(mask == 0, -100)
        labels[1, :8] = -100
        model(ids, attention_mask=mask, labels=labels).loss.backward()
        gradients[implementation] = {name: p.grad for name, p in model.named_parameters()}
    for name, gradient in gradients["eager"].items():
        torch.testing.assert_close(gradients["sdpa"][name], gradient, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert any(name.endswith("newton_lambda") and g.abs().sum() > 0 for name, g in gradients["sdpa"].items())


@pytest.mark.parametrize("solver", ["momentum", "newton"])
def test_checkpoints_of_version_0_1_load_their_solver_scalars(solver, tmp_path, monkeypatch):
    """EnergyGPT 0.1 stored beta / lambda under `attn.solver.`; loading one must not silently re-initialise them, and
    takes one pass over the weights."""
    from safetensors.torch import load_file, save_file
    from transformers import PreTrainedModel

    model = EnergyGPTForCausalLM(tiny_config(attention_solver=solver, initializer_range=0.2)).eval()
    with torch.no_grad():
        for layer, block in enumerate(model.transformer.h):
            for rule in (block.residual_rule, block.attn.head_rule):
                for parameter in rule.parameters(recurse=False):
                    parameter.fill_(0.1 + 0.2 * layer)
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    legacy = {key.replace("residual_rule.", "attn.solver.").replace("attn.head_rule.", "attn.solver."): value
              for key, value in weights.items()}
    assert any(".attn.solver." in key for key in legacy)
    save_file(legacy, tmp_path / "model.safetensors", metadata={"format": "pt"})

    loads = []
    load = PreTrainedModel.from_pretrained.__func__

    def counted_load(cls, *args, **kwargs):
        loads.append(kwargs.get("key_mapping"))
        return load(cls, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(counted_load))
    reloaded, info = EnergyGPTForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert len(loads) == 1 and loads[0], "the legacy names are renamed in the one and only pass over the weights"
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, reloaded.state_dict()[name]), name
    # Saved again, the checkpoint has today's names (not the ones it was loaded from).
    reloaded.save_pretrained(tmp_path / "resaved")
    assert sorted(load_file(tmp_path / "resaved" / "model.safetensors")) == sorted(weights)
