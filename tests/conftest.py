"""Shared fixtures: tiny configs, GPT-2 weight transplant, the real GPT-2 tokenizer from ../shared/data (skipped
cleanly when absent). Everything runs offline."""

import os
import shutil
import sys
import tempfile
from pathlib import Path

# Never the user's Hugging Face cache: remote-code modules, datasets and fake Hub caches of the whole session go to a
# temporary HF_HOME (set before transformers / huggingface_hub read it at import). Tests that need their own set theirs.
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="energy-gpt-tests-hf-home-")
os.environ.pop("HF_HUB_CACHE", None)
os.environ.pop("HF_MODULES_CACHE", None)

import pytest  # noqa: E402
import torch  # noqa: E402

import transformers  # noqa: E402
from packaging.version import Version  # noqa: E402


# Tiny models: a second intra-op thread only adds synchronisation (5-10x slower on a shared 2-core machine). The
# variable also reaches every subprocess, so results compared bit for bit across processes use the same reductions.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("ENERGY_GPT_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
SOLVERS = ["gd", "momentum", "nag", "newton", "newton_light"]
ATTENTION_IMPLEMENTATIONS = ["eager", "sdpa"]
# GPT-2's own eager attention divides the scores by sqrt(d) before transformers 5.4 and multiplies by the scaling from
# 5.4 on, as EnergyGPT does: from 5.4 eager logits equal GPT2LMHeadModel's bit for bit, before only to rounding (sdpa is
# bit-exact on every release).
GPT2_EAGER_BIT_EXACT = Version(transformers.__version__) >= Version("5.4")


def assert_same_as_gpt2(actual: torch.Tensor, expected: torch.Tensor, attn: str = "sdpa",
                        real: torch.Tensor | None = None) -> None:
    """Bit for bit; on releases where GPT-2's eager attention rounds differently, to 1e-6 at the real (non-padding)
    positions `real` (batch, length) of (batch, length, ...) tensors (old GPT-2 fills fully masked rows differently)."""
    if attn == "eager" and not GPT2_EAGER_BIT_EXACT:
        if real is not None and actual.shape[:2] == real.shape:
            actual, expected = actual[real.bool()], expected[real.bool()]
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)
    else:
        assert torch.equal(actual, expected), (actual - expected).abs().max()
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

TINY = dict(
    vocab_size=101, n_positions=64, n_embd=32, n_layer=3, n_head=4,
    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
)


def tiny_config(**overrides):
    from energy_gpt import EnergyGPTConfig

    return EnergyGPTConfig(**{**TINY, **overrides})


def left_pad(prompts: list, pad: int) -> tuple:
    """Token-id prompts of different lengths as one left-padded batch: (input_ids, attention_mask), 0 on padding."""
    longest = max(len(prompt) for prompt in prompts)
    input_ids = torch.full((len(prompts), longest), pad)
    attention_mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(prompts):
        input_ids[row, longest - len(prompt):] = prompt
        attention_mask[row, longest - len(prompt):] = 1
    return input_ids, attention_mask


def tiny_gpt2_config(**overrides):
    from transformers import GPT2Config

    return GPT2Config(**{**TINY, **overrides})


def gpt2_to_energy_state_dict(gpt2_state_dict: dict) -> dict:
    """Test-side transplant (independent of `energy_gpt.conversion`): transpose the Conv1D weights only."""
    return {
        key: value.t().contiguous() if key.endswith(CONV1D_SUFFIXES) else value
        for key, value in gpt2_state_dict.items()
        if not key.endswith((".attn.bias", ".attn.masked_bias"))
    }


def shared_data_path(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data not available: {path}")
    return path


@pytest.fixture(scope="session")
def gpt2_tokenizer_dir(tmp_path_factory) -> Path:
    """The real GPT-2 tokenizer (shared/data/gpt2-tokenizer), saved once as a normal tokenizer directory."""
    source = shared_data_path("gpt2-tokenizer")
    from transformers import GPT2Tokenizer

    raw = tmp_path_factory.mktemp("gpt2-raw")
    shutil.copy(source / "encoder.json", raw / "vocab.json")
    shutil.copy(source / "vocab.bpe", raw / "merges.txt")
    out = tmp_path_factory.mktemp("gpt2-tokenizer")
    GPT2Tokenizer.from_pretrained(raw).save_pretrained(out)
    return out


# Code run in a subprocess where `energy_gpt` (and the repository's `modeling` folder) cannot be imported: the only
# way to the classes is the checkpoint's remote code.
BLOCK_ENERGY_GPT = """
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in ('energy_gpt', 'modeling', 'conversion'):
            raise ImportError(f'{name} is blocked in this test process')
        return None
sys.meta_path.insert(0, _Block())
sys.path = [p for p in sys.path if p not in ('', '.', %r) and not p.startswith(%r)]
""" % (str(REPO_ROOT), str(REPO_ROOT) + os.sep)  # the repository folder and below, not a sibling such as REPO_ROOTenv


def run_without_energy_gpt(code: str, cwd: Path, env_extra: dict | None = None):
    """Run `code` in a fresh interpreter that cannot import energy_gpt; return the CompletedProcess."""
    import subprocess

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": "", **(env_extra or {})}
    result = subprocess.run(
        [sys.executable, "-c", BLOCK_ENERGY_GPT + code], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


# Loads each folder given on the command line with AutoTokenizer and reports any remote-code prompt (transformers asks
# through `input`, and turns its failure into "no" by itself, so the prompt is recorded rather than raised).
TOKENIZER_PROBE = """
import builtins, sys, time
def prompted(*args, **kwargs):
    print("PROMPTED", str(args[:1])[:200], flush=True)
    raise EOFError
builtins.input = prompted
{import_package}
from transformers import AutoTokenizer
for folder in sys.argv[1:]:
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(folder{options})
    assert tokenizer.pad_token is not None and tokenizer.pad_token == tokenizer.eos_token, tokenizer
    print("LOADED", type(tokenizer).__name__, round(time.perf_counter() - start, 2), flush=True)
"""


def assert_autotokenizer_loads_without_a_prompt(*folders: Path) -> None:
    """Checkpoint folders load their tokenizer in a fresh process (offline, stdin closed) with no custom-code prompt
    and fast: with `import energy_gpt`, plain `AutoTokenizer.from_pretrained(folder)`; without the package (a Hub
    user), `AutoTokenizer.from_pretrained(folder, trust_remote_code=False)`. Without either, transformers 5 reads
    config.json's `auto_map` before the tokenizer files and asks whether to run the model's code."""
    import subprocess

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for prefix, import_package, options in (("", "import energy_gpt", ""),
                                            (BLOCK_ENERGY_GPT, "", ", trust_remote_code=False")):
        code = prefix + TOKENIZER_PROBE.format(import_package=import_package, options=options)
        result = subprocess.run([sys.executable, "-c", code, *map(str, folders)], capture_output=True, text=True,
                                env=env, timeout=120, stdin=subprocess.DEVNULL, cwd=Path(folders[0]).parent)
        assert result.returncode == 0, result.stderr[-4000:]
        output = result.stdout + result.stderr
        assert "PROMPTED" not in output and "Do you wish to run the custom code" not in output, output[-2000:]
        seconds = [float(line.split()[-1]) for line in result.stdout.splitlines() if line.startswith("LOADED")]
        assert len(seconds) == len(folders) and max(seconds) < 10, result.stdout  # the prompt alone waits 15 s


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
