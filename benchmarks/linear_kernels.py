"""The linear layers of a decoding step: torch's default (`F.linear`, MKL) against oneDNN's fp32 linear, the kernel
`cpu_inference.OneDNNLinear` runs on CPU in a model converted by `optimize_for_cpu_inference`.

    python benchmarks/linear_kernels.py [--sizes small,base] [--rows 1,4,16,64] [--rounds 25]

A decoding step reads every weight matrix once, for a few rows, after the rest of the model has pushed it out of
cache. This measures the kernels in that state: each round runs one decoder's worth of distinct weight matrices
(N layers x the linears of a step: six D x D attention matrices and the two FFN matrices), then the output
projection, and so on
for `--rounds` rounds; the kernels alternate round by round. It prints microseconds per call (median over rounds)
for each matrix shape: `F.linear`; oneDNN on the plain weight, which it reorders into its blocked layout inside
every call of more than one row; oneDNN on a weight reordered beforehand, as `OneDNNLinear` keeps it; and the
ratios.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # make `benchmarks` importable as a script

from benchmarks import common

Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def reorder(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """oneDNN's blocked layout of `weight` for calls of `rows` rows (an opaque tensor only its kernel reads)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, rows)


def decoder_shapes(size: str) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """The (out, in) shapes of one decoder's linear layers, in call order, and the output projection's."""
    config = common.model_config(size)
    d, ff = config.d_model, config.decoder_ffn_dim
    layer = [(d, d)] * 6 + [(ff, d), (d, ff)]  # self q, k, v, o; cross q, o; fc1, fc2
    return layer * config.decoder_layers, (config.vocab_size, d)


def measure(size: str, rows: int, rounds: int) -> dict[str, dict[tuple[int, int], float]]:
    """Median microseconds per call of each kernel, per weight shape (the output projection included)."""
    shapes, head_shape = decoder_shapes(size)
    torch.manual_seed(0)
    weights = [(torch.randn(shape), torch.randn(shape[0])) for shape in shapes] + [(torch.randn(head_shape), None)]
    inputs = {shape[1]: torch.randn(rows, shape[1]) for shape in [*shapes, head_shape]}
    reordered = [(reorder(weight, rows), bias) for weight, bias in weights]
    kernels: dict[str, tuple[Kernel, list]] = {
        "F.linear": (F.linear, weights),
        "oneDNN": (onednn_linear, weights),
        "oneDNN reordered": (onednn_linear, reordered),
    }
    times: dict[str, dict[tuple[int, int], list[float]]] = {name: {} for name in kernels}
    with torch.inference_mode():
        for _ in range(rounds):
            for name, (kernel, kernel_weights) in kernels.items():
                for weight, bias in kernel_weights:
                    x = inputs[weight.shape[1]]
                    start = time.perf_counter()
                    kernel(x, weight, bias)
                    times[name].setdefault(tuple(weight.shape), []).append(time.perf_counter() - start)
    return {name: {shape: 1e6 * common.median(ts) for shape, ts in per.items()} for name, per in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="small,base")
    parser.add_argument("--rows", default="1,4,16,64")
    parser.add_argument("--rounds", type=int, default=25)
    args = parser.parse_args(argv)
    if not torch.backends.mkldnn.is_available():
        raise SystemExit("This torch build has no oneDNN: nothing to compare.")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; microseconds per call")
    print(
        "| size | weight (out x in) | rows | F.linear (us) | oneDNN (us) | oneDNN reordered (us) "
        "| F.linear / oneDNN | oneDNN / oneDNN reordered |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for size in args.sizes.split(","):
        for rows in (int(r) for r in args.rows.split(",")):
            result = measure(size, rows, args.rounds)
            for shape, mkl in result["F.linear"].items():
                onednn, kept = result["oneDNN"][shape], result["oneDNN reordered"][shape]
                print(
                    f"| {size} | {shape[0]} x {shape[1]} | {rows} | {mkl:.0f} | {onednn:.0f} | {kept:.0f} "
                    f"| {mkl / onednn:.2f} | {onednn / kept:.2f} |"
                )


if __name__ == "__main__":
    main()
