"""Remote-code round trip: a saved checkpoint loads with `trust_remote_code=True` in a fresh interpreter where
`energy_gpt` (and the repository's `modeling/` folder) cannot be imported, and computes the same logits."""

import torch
from conftest import run_without_energy_gpt, tiny_config

from energy_gpt import EnergyGPTForCausalLM, EnergyGPTForSequenceClassification

PAD = 100

REMOTE_CHECK = """
import sys
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

expected = torch.load("expected.pt")
for auto_class, directory in ((AutoModelForCausalLM, "causal-lm"), (AutoModelForSequenceClassification, "classifier")):
    config = AutoConfig.from_pretrained(directory, trust_remote_code=True)
    model = auto_class.from_pretrained(directory, trust_remote_code=True, attn_implementation="sdpa").eval()
    module = type(model).__module__
    assert module.startswith("transformers_modules"), module
    assert type(config).__module__.startswith("transformers_modules"), type(config).__module__
    with torch.no_grad():
        logits = model(expected["input_ids"], attention_mask=expected["attention_mask"]).logits
    assert torch.equal(logits, expected[directory]), (logits - expected[directory]).abs().max()
    print(directory, type(model).__name__, module, config.attention_solver)
assert not any(name.split(".")[0] in ("energy_gpt", "modeling") for name in sys.modules)
"""


def test_remote_code_round_trip_in_clean_process(tmp_path):
    causal_lm = EnergyGPTForCausalLM(tiny_config(attention_solver="newton", newton_lambda=0.3)).eval()
    classifier = EnergyGPTForSequenceClassification(
        tiny_config(attention_solver="nag", nag_lookahead="query", momentum_beta=0.6, pad_token_id=PAD, num_labels=3)
    ).eval()
    input_ids = torch.randint(0, PAD, (2, 7))
    input_ids[1, :2] = PAD
    attention_mask = (input_ids != PAD).long()
    expected = {"input_ids": input_ids, "attention_mask": attention_mask}
    for name, model in (("causal-lm", causal_lm), ("classifier", classifier)):
        assert model.config._attn_implementation == "sdpa"
        model.save_pretrained(tmp_path / name)
        with torch.no_grad():
            expected[name] = model(input_ids, attention_mask=attention_mask).logits
    torch.save(expected, tmp_path / "expected.pt")

    result = run_without_energy_gpt(REMOTE_CHECK, cwd=tmp_path, env_extra={"HF_HOME": str(tmp_path / "hf-home")})
    assert "causal-lm EnergyGPTForCausalLM transformers_modules" in result.stdout
    assert "classifier EnergyGPTForSequenceClassification transformers_modules" in result.stdout
