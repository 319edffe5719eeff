"""The fused Newton kernels on a GPU: correctness against the PyTorch reference, then speed and memory against the
PyTorch path and against GPT-2's attention (SDPA), forward + backward, at the head level.

    python -m benchmarks.kernels --device cuda                       # check, then time at T = 1024 and 4096
    python -m benchmarks.kernels --device cuda --check_only

Shapes: GPT-2 small heads (12 x 64), `--tokens` tokens per batch (batch = tokens / T). Timed per call (forward +
backward of a sum of the outputs), device synchronised, median of `--repeats` after warm-up; memory is the peak
allocated during one call above the memory before it.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from energy_gpt.modeling import newton_kernels_energy_gpt as kernels
from energy_gpt.modeling import solvers_energy_gpt as solvers

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Relative errors (norm of the difference / norm of the reference), as in tests/test_newton_kernels.py.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}
CHECK_CASES = [  # batch, heads, q_len, kv_len, head_dim, left padding
    (2, 3, 1, 1, 64, False),
    (2, 3, 200, 200, 64, True),
    (2, 3, 1, 777, 64, True),  # one decoding step against a cache
    (1, 2, 65, 1000, 64, False),  # a chunk of queries after a cache
    (2, 2, 129, 129, 32, True),
    (1, 2, 100, 300, 128, True),
]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-30)).item()


def _inputs(batch, heads, q_len, kv_len, head_dim, padding, dtype, device, seed=0):
    generator = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape, dtype=dtype):
        return torch.randn(*shape, generator=generator).to(device, dtype).requires_grad_()

    query, key, value = randn(batch, heads, q_len, head_dim), randn(batch, heads, kv_len, head_dim), \
        randn(batch, heads, kv_len, head_dim)
    mean = randn(batch, heads, q_len, head_dim, dtype=torch.float32)
    mask = None
    if padding:
        mask = torch.ones(batch, kv_len, dtype=torch.bool, device=device)
        mask[0, : kv_len // 3] = False
    return query, key, value, mean, mask


def check(device: str, dtypes: list[str], log: Callable[[str], None]) -> list[dict]:
    """Kernel vs reference, forward and every gradient; raises AssertionError (after logging) on a mismatch."""
    rows, failures = [], []
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        for case in CHECK_CASES:
            query, key, value, mean, mask = _inputs(*case, dtype=dtype, device=device)
            scaling = case[4] ** -0.5
            errors = {}
            products, second = kernels.newton_second_moments(query, key, value, mean, scaling, mask)
            ref_products, ref_second = kernels.newton_second_moments_reference(query, key, value, mean, scaling, mask)
            errors["newton products"] = relative_error(products, ref_products)
            errors["newton second"] = relative_error(second, ref_second)
            weights = torch.randn_like(products), torch.randn_like(second)
            inputs = (query, key, value, mean)
            grads = torch.autograd.grad((products * weights[0]).sum() + (second * weights[1]).sum(), inputs)
            ref_grads = torch.autograd.grad((ref_products * weights[0]).sum() + (ref_second * weights[1]).sum(), inputs)
            for name, grad, ref in zip(("dq", "dk", "dv", "dmu"), grads, ref_grads):
                errors[f"newton {name}"] = relative_error(grad, ref)
            squares = kernels.light_second_moment(query, key, value, scaling, mask)
            ref_squares = kernels.light_second_moment_reference(query, key, value, scaling, mask)
            errors["light squares"] = relative_error(squares, ref_squares)
            weight = torch.randn_like(squares)
            grads = torch.autograd.grad((squares * weight).sum(), inputs[:3])
            ref_grads = torch.autograd.grad((ref_squares * weight).sum(), inputs[:3])
            for name, grad, ref in zip(("dq", "dk", "dv"), grads, ref_grads):
                errors[f"light {name}"] = relative_error(grad, ref)
            worst = max(errors, key=errors.get)
            row = {"dtype": dtype_name, "case": list(case), "max_error": errors[worst], "worst": worst,
                   "tolerance": TOLERANCE[dtype], "ok": errors[worst] < TOLERANCE[dtype]}
            rows.append(row)
            log(f"  check {dtype_name} {case}: max relative error {errors[worst]:.2e} ({worst}) "
                f"{'ok' if row['ok'] else 'FAILED'}")
            if not row["ok"]:
                failures.append(row)
    if failures:
        raise AssertionError(f"fused Newton kernels disagree with the reference: {failures}")
    return rows


def _chunked_pytorch_newton(query, key, value, mean, scaling):
    """Today's PyTorch path for `newton`: query chunks through the solver module's `_ChunkSecondMoments` (recomputed
    probabilities, linear memory); the materialised reference where that function is not there."""
    function = getattr(solvers, "_ChunkSecondMoments", None)
    chunk = getattr(solvers, "NEWTON_QUERY_CHUNK", 256)
    if function is None:
        return kernels.newton_second_moments_reference(query, key, value, mean, scaling)
    value = value.float()
    norms = value.square().sum(-1, keepdim=True)
    q_len, kv_len = query.shape[2], key.shape[2]
    outputs = []
    for start in range(0, q_len, chunk):
        end = min(start + chunk, q_len)
        visible = kv_len - q_len + end
        outputs.append(function.apply(query[:, :, start:end], key[:, :, :visible], value[:, :, :visible],
                                      norms[:, :, :visible], mean[:, :, start:end], None, scaling))
    return torch.cat([o[0] for o in outputs], 2), torch.cat([o[1] for o in outputs], 2)


def pytorch_path_name() -> str:
    if getattr(solvers, "_ChunkSecondMoments", None) is None:
        return "PyTorch reference (materialised p)"
    return f"PyTorch path (query chunks of {getattr(solvers, 'NEWTON_QUERY_CHUNK', 256)}, recomputed p)"


def _measure(fn: Callable[[], torch.Tensor], device: torch.device, repeats: int) -> dict:
    """Median seconds of forward + backward, and the peak memory of one call above the memory before it (MiB)."""
    def call():
        fn().backward()

    for _ in range(2):
        call()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    peak = None
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        call()
        torch.cuda.synchronize(device)
        peak = (torch.cuda.max_memory_allocated(device) - before) / 2**20
    return {"ms": 1000 * statistics.median(times), "ms_min": 1000 * min(times), "peak_mib": peak}


def time_heads(device: str, dtype_name: str, seq_lens: list[int], tokens: int, repeats: int,
               log: Callable[[str], None]) -> list[dict]:
    """Forward + backward at the head level: GPT-2's attention (SDPA), then what each Newton rule adds to it."""
    dtype, torch_device = DTYPES[dtype_name], torch.device(device)
    rows = []
    for seq_len in seq_lens:
        batch = max(1, tokens // seq_len)
        query, key, value, _, _ = _inputs(batch, 12, seq_len, seq_len, 64, False, dtype, device)
        scaling = 64**-0.5

        def attention():
            return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)

        def newton(second_pass):
            def run():
                mean = attention().float()
                products, second = second_pass(query, key, value, mean, scaling)
                return mean.sum() + products.sum() + second.sum()
            return run

        def light(second_pass):
            def run():
                return attention().float().sum() + second_pass().sum()
            return run

        candidates = {
            "attention (SDPA, GPT-2)": lambda: attention().float().sum(),
            "newton, fused kernel": newton(kernels.newton_second_moments),
            f"newton, {pytorch_path_name()}": newton(_chunked_pytorch_newton),
            "newton_light, fused kernel": light(lambda: kernels.light_second_moment(query, key, value, scaling)),
            "newton_light, PyTorch path (fp32 SDPA with values v*v)": light(lambda: F.scaled_dot_product_attention(
                query.float(), key.float(), value.float().square(), is_causal=True, scale=scaling)),
        }
        baseline = None
        for name, fn in candidates.items():
            try:
                result = _measure(fn, torch_device, repeats)
            except Exception as error:  # noqa: BLE001 (reported)
                result = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
            if baseline is None:
                baseline = result["ms"]
            if "ms" in result:
                result["ratio_to_attention"] = baseline / result["ms"]
            rows.append({"seq_len": seq_len, "batch": batch, "dtype": dtype_name, "name": name, **result})
            log(f"  T={seq_len} batch {batch} {name}: " + (f"{result['ms']:.2f} ms, peak {result['peak_mib']} MiB"
                                                            if "ms" in result else result["error"]))
            query.grad = key.grad = value.grad = None
    return rows


def render_check(rows: list[dict]) -> str:
    lines = ["| dtype | batch, heads, q_len, kv_len, head_dim, padding | max relative error (where) | tolerance | ok |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['dtype']} | {r['case']} | {r['max_error']:.2e} ({r['worst']}) | {r['tolerance']:g} | "
              f"{'yes' if r['ok'] else 'NO'} |" for r in rows]
    return "\n".join(lines) + "\n"


def render_timings(rows: list[dict]) -> str:
    lines = ["| T | batch | head rule (forward + backward, 12 heads x 64) | ms (median) | attention's time / this "
             "| peak MiB |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['seq_len']} | {r['batch']} | {r['name']} | error: `{r['error']}` | | |")
        else:
            peak = "n/a" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
            lines.append(f"| {r['seq_len']} | {r['batch']} | {r['name']} | {r['ms']:.2f} | "
                         f"{r['ratio_to_attention']:.2f} | {peak} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kernels", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16", help="Dtype of the timings.")
    parser.add_argument("--check_dtypes", nargs="+", choices=list(DTYPES), default=["float32", "bfloat16"])
    parser.add_argument("--seq_lens", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--tokens", type=int, default=8192, help="Tokens per batch (batch = tokens / T).")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--check_only", action="store_true")
    parser.add_argument("--output", type=Path, help="Write the results as JSON here.")
    args = parser.parse_args(argv)
    if not kernels.fused_kernels_available(torch.empty(0, device=args.device)):
        raise SystemExit(f"The fused Newton kernels cannot run on {args.device!r} here (they need triton and CUDA, or "
                         "TRITON_INTERPRET=1 on CPU).")

    def log(message: str) -> None:
        print(message, flush=True)

    results = {"check": check(args.device, args.check_dtypes, log)}
    if not args.check_only:
        results["timings"] = time_heads(args.device, args.dtype, args.seq_lens, args.tokens, args.repeats, log)
    if args.output:
        args.output.write_text(json.dumps(results, indent=2))
    print(render_check(results["check"]))
    if "timings" in results:
        print(render_timings(results["timings"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
