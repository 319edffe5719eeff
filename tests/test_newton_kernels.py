"""The fused Newton kernels (modeling/newton_kernels_energy_gpt.py) against their PyTorch reference, on CPU through
Triton's interpreter (TRITON_INTERPRET=1): forward and gradients for query, key, value and mean, causal with and
without a cache offset, left padding, lengths that are not multiples of the tile size, head dims 16 / 32 / 64,
fp32 / fp16 / bf16. Shapes are tiny: the interpreter runs every tile in numpy.

Triton fixes the interpreter mode when it is imported (its own `tl.sum`, `tl.max` ... are jit functions) and when the
kernels are decorated, so the kernel tests need TRITON_INTERPRET=1 before anything imports Triton. Run as part of the
suite (variable unset), `test_kernels_under_triton_interpreter` runs them in one child pytest process with the
variable set; `TRITON_INTERPRET=1 pytest tests/test_newton_kernels.py` runs them in-process. The kernel module is
loaded from its file under a private name, independent of `energy_gpt.modeling`.
"""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch


REPO_ROOT = Path(__file__).resolve().parents[1]
KERNELS_FILE = REPO_ROOT / "modeling" / "newton_kernels_energy_gpt.py"

IN_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"


def triton_interpreter(test):
    """Kernel tests: marked (deselect with `-m "not triton_interpreter"`), run only where the interpreter is on."""
    skip = pytest.mark.skipif(not IN_INTERPRETER, reason="runs in the TRITON_INTERPRET=1 child process of "
                                                         "test_kernels_under_triton_interpreter")
    return pytest.mark.triton_interpreter(skip(test))


def _load_kernels(name: str, interpret: bool):
    with mock.patch.dict(os.environ, {"TRITON_INTERPRET": "1" if interpret else "0"}):
        spec = importlib.util.spec_from_file_location(name, KERNELS_FILE)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def interpreter():
    pytest.importorskip("triton", reason="triton is not installed (pip install triton)")
    return _load_kernels("_newton_kernels_interpreted", interpret=True)


@pytest.mark.triton_interpreter
@pytest.mark.skipif(IN_INTERPRETER, reason="already under the interpreter: the kernel tests run in this process")
def test_kernels_under_triton_interpreter():
    """Every kernel test of this file, in one child pytest process with TRITON_INTERPRET=1 set before Triton loads."""
    pytest.importorskip("triton", reason="triton is not installed (pip install triton)")
    completed = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "triton_interpreter", __file__],
        capture_output=True, text=True, env={**os.environ, "TRITON_INTERPRET": "1"}, cwd=REPO_ROOT, check=False,
    )
    assert completed.returncode == 0, completed.stdout[-6000:] + completed.stderr[-2000:]
    summary = completed.stdout.strip().splitlines()[-1]
    passed, skipped = (re.search(rf"(\d+) {word}", summary) for word in ("passed", "skipped"))
    # Only this test itself is skipped there; every parametrised kernel case ran.
    assert passed and int(passed.group(1)) >= 2 * len(CASES) + 4 and (not skipped or skipped.group(1) == "1"), summary


def _inputs(batch, heads, q_len, kv_len, head_dim, dtype, padding, seed=0, mean_dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, dtype=dtype):
        return torch.randn(*shape, generator=generator).to(dtype).requires_grad_()

    query, key, value = randn(batch, heads, q_len, head_dim), randn(batch, heads, kv_len, head_dim), \
        randn(batch, heads, kv_len, head_dim)
    mean = randn(batch, heads, q_len, head_dim, dtype=mean_dtype)
    key_padding_mask = None
    if padding:  # left padding of different lengths; with q_len == kv_len the first rows of sequence 0 see no key
        key_padding_mask = torch.ones(batch, kv_len, dtype=torch.bool)
        key_padding_mask[0, :5] = False
        key_padding_mask[-1, :2] = False
    return query, key, value, mean, key_padding_mask


def _relative_error(actual, expected):
    return ((actual.float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-30)).item()


# fp32: as in flash-attention practice, a relative error of 1e-4 (the kernel sums in another order);
# fp16 / bf16: the tiles go through the tensor-core dtype (p, v . mu, incoming gradients rounded) while the reference
# works in fp32 from the same rounded inputs, so errors of the dtype's precision are expected.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}

CASES = [  # batch, heads, q_len, kv_len, head_dim, dtype, left padding
    pytest.param(1, 2, 20, 20, 16, torch.float32, False, id="fp32-square-d16"),
    pytest.param(2, 2, 37, 37, 32, torch.float32, True, id="fp32-padded-d32"),
    pytest.param(2, 1, 7, 45, 64, torch.float32, True, id="fp32-cache-offset-d64"),
    pytest.param(2, 1, 1, 33, 32, torch.float32, True, id="fp32-decode-step"),
    pytest.param(2, 1, 19, 40, 64, torch.float16, True, id="fp16-cache-offset-d64"),
    pytest.param(2, 2, 37, 37, 64, torch.bfloat16, True, id="bf16-padded-d64"),
    pytest.param(2, 1, 9, 40, 32, torch.bfloat16, False, id="bf16-cache-offset-d32"),
]


@triton_interpreter
@pytest.mark.parametrize(("batch", "heads", "q_len", "kv_len", "head_dim", "dtype", "padding"), CASES)
def test_newton_second_moments_match_reference(interpreter, batch, heads, q_len, kv_len, head_dim, dtype, padding):
    query, key, value, mean, mask = _inputs(batch, heads, q_len, kv_len, head_dim, dtype, padding)
    scaling = head_dim**-0.5
    products, second = interpreter.newton_second_moments(query, key, value, mean, scaling, mask)
    expected_products, expected_second = interpreter.newton_second_moments_reference(query, key, value, mean, scaling,
                                                                                      mask)
    assert products.dtype == second.dtype == torch.float32
    assert products.shape == query.shape and second.shape == (*query.shape[:3], 1)
    tolerance = TOLERANCE[dtype]
    assert _relative_error(products, expected_products) < tolerance
    assert _relative_error(second, expected_second) < tolerance

    grad_products, grad_second = torch.randn_like(products), torch.randn_like(second)
    inputs = (query, key, value, mean)
    grads = torch.autograd.grad((products * grad_products).sum() + (second * grad_second).sum(), inputs)
    expected = torch.autograd.grad(
        (expected_products * grad_products).sum() + (expected_second * grad_second).sum(), inputs)
    for name, tensor, grad, reference in zip(("query", "key", "value", "mean"), inputs, grads, expected):
        assert grad.dtype == tensor.dtype and grad.shape == tensor.shape, name
        assert torch.isfinite(grad).all(), name
        assert _relative_error(grad, reference) < tolerance, name


@triton_interpreter
@pytest.mark.parametrize(("batch", "heads", "q_len", "kv_len", "head_dim", "dtype", "padding"), CASES)
def test_light_second_moment_matches_reference(interpreter, batch, heads, q_len, kv_len, head_dim, dtype, padding):
    query, key, value, _, mask = _inputs(batch, heads, q_len, kv_len, head_dim, dtype, padding, seed=1)
    scaling = head_dim**-0.5
    squares = interpreter.light_second_moment(query, key, value, scaling, mask)
    expected = interpreter.light_second_moment_reference(query, key, value, scaling, mask)
    assert squares.dtype == torch.float32 and squares.shape == query.shape
    assert _relative_error(squares, expected) < TOLERANCE[dtype]
    grad_squares = torch.randn_like(squares)
    inputs = (query, key, value)
    grads = torch.autograd.grad((squares * grad_squares).sum(), inputs)
    expected_grads = torch.autograd.grad((expected * grad_squares).sum(), inputs)
    for name, grad, reference in zip(("query", "key", "value"), grads, expected_grads):
        assert _relative_error(grad, reference) < TOLERANCE[dtype], name


@triton_interpreter
@pytest.mark.parametrize("blocks", [((16, 32), (16, 32), (32, 16)), ((32, 16), (32, 16), (16, 32))],
                         ids=["wide-keys", "wide-queries"])
def test_unequal_tiles_and_strided_inputs(interpreter, monkeypatch, blocks):
    """Tiles of unequal sizes (as on the GPU: the causal split of the loops must not depend on block_m == block_n)
    and inputs in transformers' layout (a transposed view of (batch, length, heads, head_dim), not contiguous)."""
    monkeypatch.setattr(interpreter, "INTERPRETER_BLOCKS", dict(zip(("forward", "backward_kv", "backward_q"), blocks)))
    generator = torch.Generator().manual_seed(2)

    def strided(length):
        return torch.randn(2, length, 2, 32, generator=generator).transpose(1, 2).requires_grad_()

    query, key, value, mean = strided(29), strided(53), strided(53), strided(29)
    mask = torch.ones(2, 60, dtype=torch.bool)  # longer than kv_len: only the first kv_len columns are read
    mask[1, :7] = False
    products, second = interpreter.newton_second_moments(query, key, value, mean, 0.2, mask)
    expected = interpreter.newton_second_moments_reference(query, key, value, mean, 0.2, mask)
    assert _relative_error(products, expected[0]) < 1e-5 and _relative_error(second, expected[1]) < 1e-5
    grads = torch.autograd.grad(products.sum() + second.sum(), (query, key, value, mean))
    expected_grads = torch.autograd.grad(expected[0].sum() + expected[1].sum(), (query, key, value, mean))
    for grad, reference in zip(grads, expected_grads):
        assert _relative_error(grad, reference) < 1e-4
    squares = interpreter.light_second_moment(query, key, value, 0.2, mask)
    assert _relative_error(squares, interpreter.light_second_moment_reference(query, key, value, 0.2, mask)) < 1e-5


@triton_interpreter
def test_queries_that_see_no_key_give_zero_and_no_gradient(interpreter):
    """Left padding with q_len == kv_len: the padded queries see no key. Kernel and reference give 0 there (not NaN),
    and nothing flows back from those rows."""
    query, key, value, mean, mask = _inputs(2, 1, 12, 12, 16, torch.float32, padding=True)
    products, second = interpreter.newton_second_moments(query, key, value, mean, 0.25, mask)
    squares = interpreter.light_second_moment(query, key, value, 0.25, mask)
    for output in (products, second, squares):
        assert torch.isfinite(output).all()
        assert output[0, :, :5].abs().max() == 0  # sequence 0 has 5 padding positions
        assert output[0, :, 5:].abs().amax() > 0
    grads = torch.autograd.grad(products.sum() + second.sum() + squares.sum(), (query, key, mean))
    assert all(torch.isfinite(grad).all() for grad in grads)
    assert grads[0][0, :, :5].abs().max() == 0 and grads[2][0, :, :5].abs().max() == 0
    assert grads[1][0, :, :5].abs().max() == 0  # padded keys get no gradient


@triton_interpreter
def test_availability_and_refusals(interpreter, monkeypatch):
    assert interpreter.KERNELS_INTERPRETED and interpreter.fused_kernels_available(torch.zeros(1))
    query = torch.zeros(1, 1, 4, 16)
    with pytest.raises(ValueError, match="key_padding_mask must be"):
        interpreter.newton_second_moments(query, query, query, query, 1.0, torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="at least as many positions as queries"):
        interpreter.light_second_moment(query, query[:, :, :2], query[:, :, :2], 1.0)
    with pytest.raises(ValueError, match="mean must have the query's shape"):
        interpreter.newton_second_moments(query, query, query, query[:, :, :2], 1.0)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # interpreted kernels cannot launch without the interpreter
    assert not interpreter.fused_kernels_available(torch.zeros(1))
    with pytest.raises(RuntimeError, match="fused Newton kernels need Triton"):
        interpreter.newton_second_moments(query, query, query, query, 1.0)


# --------------------------------------------------------------------------------------- no Triton needed from here


@pytest.fixture(scope="module")
def plain_kernels():
    return _load_kernels("_newton_kernels_plain", interpret=False)


def test_causal_key_padding_mask_recognises_transformers_masks(plain_kernels):
    from transformers.masking_utils import causal_mask_function, sdpa_mask, sliding_window_causal_mask_function

    recognise = plain_kernels.causal_key_padding_mask
    padding = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    assert recognise(None, 4, 6) == (True, None)
    ok, mask = recognise(padding.long(), 4, 6)
    assert ok and torch.equal(mask, padding)
    # A 4D mask as transformers builds it for SDPA: causal with a cache offset, left padding.
    built = sdpa_mask(batch_size=2, q_length=4, kv_length=6, q_offset=2, mask_function=causal_mask_function,
                      attention_mask=padding, allow_is_causal_skip=False)
    ok, mask = recognise(built, 4, 6)
    assert ok and torch.equal(mask, padding)
    additive = torch.zeros(built.shape).masked_fill(~built, torch.finfo(torch.float32).min)
    ok, mask = recognise(additive, 4, 6)
    assert ok and torch.equal(mask, padding)
    full = sdpa_mask(batch_size=2, q_length=4, kv_length=6, q_offset=2, mask_function=causal_mask_function,
                     attention_mask=torch.ones_like(padding), allow_is_causal_skip=False)
    assert recognise(full, 4, 6) == (True, None)
    window = sdpa_mask(batch_size=2, q_length=6, kv_length=6, mask_function=sliding_window_causal_mask_function(3),
                       attention_mask=torch.ones_like(padding), allow_is_causal_skip=False)
    assert recognise(window, 6, 6) == (False, None)
    assert recognise(built, 3, 6) == (False, None)  # not this query length
    assert recognise(additive * 0.5, 4, 6) == (False, None)  # a soft bias is not a mask


def test_reference_probabilities_are_causal_softmax(plain_kernels):
    query, key, _, _, mask = _inputs(2, 1, 3, 8, 16, torch.float32, padding=True)
    probs = plain_kernels.reference_probabilities(query, key, 0.25, mask)
    scores = (query @ key.transpose(-1, -2)).detach() * 0.25
    # Query t (absolute position 5 + t) of sequence 1 sees keys 2 .. 5 + t.
    for t in range(3):
        expected = torch.softmax(scores[1, 0, t, 2: 6 + t], -1)
        assert torch.allclose(probs[1, 0, t, 2: 6 + t], expected)
        assert probs[1, 0, t, :2].abs().sum() == 0 and probs[1, 0, t, 6 + t:].abs().sum() == 0


def test_module_loads_without_triton_and_passes_the_remote_code_import_check():
    """The file ships as remote code: it must import without Triton (the kernels then report unavailable and the
    references still work), and transformers' remote-code import check must not demand Triton."""
    code = f"""
import importlib.abc, importlib.util, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] == 'triton':
            raise ImportError('triton blocked')
sys.meta_path.insert(0, Block())
spec = importlib.util.spec_from_file_location('kernels', {str(KERNELS_FILE)!r})
kernels = importlib.util.module_from_spec(spec); spec.loader.exec_module(kernels)
import torch
x = torch.randn(1, 1, 3, 8)
assert kernels.triton is None and not kernels.fused_kernels_available(x)
assert kernels.newton_second_moments_reference(x, x, x, x, 1.0)[0].shape == x.shape
try:
    kernels.light_second_moment(x, x, x, 1.0)
except RuntimeError as error:
    assert 'Triton not installed' in str(error), error
else:
    raise AssertionError('no error without triton')
print('ok')
"""
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert completed.returncode == 0 and completed.stdout.strip() == "ok", completed.stderr
    from transformers.dynamic_module_utils import get_imports

    assert "triton" not in get_imports(str(KERNELS_FILE))
