"""One benchmark run: ours vs MarianMTModel vs torch.nn.Transformer, same weights, same machine, same run.

    python benchmarks/run.py [--sizes small,base] [--quick] [--json out.json]

Measures, per size:
  (a) training step (forward, label-smoothed cross-entropy, backward, Adam) in tokens/s, where tokens = non-padding
      source tokens + non-padding target tokens of the batch; on a fixed 32 x 32 batch and on length-bucketed
      batches of up to --max-tokens padded tokens per side (sentence lengths ~ Gamma with mean 25);
  (b) achieved FLOP/s of that step (formula: `common.training_flops`) over the dense fp32 matmul speed (an
      n x n matmul, n = 3072) timed in the same alternating rounds as the steps, median over rounds: the machine's
      speed drifts within a run, and a peak taken once at the start gave more than 100% once it sped up (Run 9);
  (c) greedy and beam-4 generation tokens/s at batch 1 and 16, exactly --new-tokens tokens (ours vs Marian);
  (e) each speed lever beside the model, on against off on the cases it targets (`benchmarks/levers.py`);
  (d) peak memory of a training step: ru_maxrss of a fresh process per (size, implementation, allocator) that
      builds one model and runs two steps on the middle token batch; "step" = that peak minus the RSS just before
      the first step (model, batch and libraries already resident). torch's CPU allocator keeps no statistics, and
      tracemalloc cannot see its buffers.
Training runs twice per size, each time in a fresh process: with glibc's default malloc settings and with
`common.ALLOCATOR_ENV` (which glibc reads only at start-up, hence the re-exec). Within a process the three
implementations alternate (ours, marian, torch, ours, ...); every figure is a median over repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `python benchmarks/run.py` puts only benchmarks/ on the path

import torch  # noqa: E402
import transformers  # noqa: E402

from benchmarks import common, levers  # noqa: E402

ALLOCATORS = ("default", "tuned")
# (training repeats, generation repeats) per size: base steps take seconds each on 2 cores.
FULL_REPEATS = {"tiny": (5, 5), "small": (5, 5), "base": (3, 3)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="small,base", help="comma-separated: tiny, small, base")
    parser.add_argument("--quick", action="store_true", help="1 repeat, small batches, 8 new tokens (for CI)")
    parser.add_argument("--json", type=Path, help="write all results here")
    parser.add_argument("--repeats", type=int, help="override the timed repeats of every measurement")
    parser.add_argument("--max-tokens", type=int, help="padded tokens per side of a bucketed batch (default 4096)")
    parser.add_argument("--new-tokens", type=int, help="tokens generated per output (default 32)")
    parser.add_argument("--levers-only", action="store_true", help="measure only what each speed lever is worth")
    parser.add_argument("--readme-table", type=Path, help="print the README's speed table from a results JSON; no run")
    # Internal: the fresh processes this script starts for itself.
    parser.add_argument("--worker", choices=("train", "memory", "levers"), help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    parser.add_argument("--impl", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.sizes = [s for s in args.sizes.split(",") if s]
    for size in args.sizes:
        if size not in common.SIZES:
            parser.error(f"unknown size {size!r}; choose from {sorted(common.SIZES)}")
    if args.max_tokens is None:
        args.max_tokens = 512 if args.quick else 4096
    if args.new_tokens is None:
        args.new_tokens = 8 if args.quick else 32
    return args


# ----------------------------------------------------------------------------------------- worker processes


MATMUL = "matmul"  # the reference timed beside the training steps


def train_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Training-step throughput of all implementations in this process (alternating), fixed and bucketed batches."""
    models, diffs = common.build_models(args.size)
    config = models["ours"].config
    repeats = args.repeats or (1 if args.quick else FULL_REPEATS[args.size][0])
    fixed_shape = (4, 8) if args.quick else (32, 32)
    kinds = {
        f"fixed_{fixed_shape[0]}x{fixed_shape[1]}": [common.fixed_batch(config.vocab_size, *fixed_shape)],
        f"tokens_{args.max_tokens}": common.token_batches(config.vocab_size, args.max_tokens, count=repeats),
    }
    steps = {}
    for impl, model in models.items():
        model.train()
        steps[impl] = common.training_step(impl, model, common.make_optimizer(model))
    result: dict[str, Any] = {"max_logit_diff": diffs, "threads": torch.get_num_threads()}
    matmul, matmul_flops = common.square_matmul(1024 if args.quick else 3072)
    for kind, batches in kinds.items():

        def pick(index: int, batches: list[common.Batch] = batches) -> common.Batch:
            return batches[max(index, 0) % len(batches)]  # warm-up (-1) uses the first batch

        runs = {impl: (lambda i, step=step: step(pick(i))) for impl, step in steps.items()}
        runs[MATMUL] = matmul  # timed in the same rounds: the machine's speed drifts by more than 1.5x in a run
        times = common.alternate(runs, repeats)
        matmul_times = times.pop(MATMUL)
        tokens = [pick(i).tokens for i in range(repeats)]
        flops = [common.training_flops(config, pick(i)) for i in range(repeats)]
        result[kind] = {
            "matmul_flops_per_s": common.median([matmul_flops / t for t in matmul_times]),
            "batches": [[*pick(i).input_ids.shape, pick(i).labels.shape[1]] for i in range(repeats)],
            "tokens": tokens,
            "flops": flops,
            **{
                impl: {
                    "times_s": t,
                    "tokens_per_s": common.median([n / s for n, s in zip(tokens, t, strict=True)]),
                    "flops_per_s": common.median([f / s for f, s in zip(flops, t, strict=True)]),
                }
                for impl, t in times.items()
            },
        }
    return result


def memory_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Peak RSS of two training steps of one implementation, alone in this fresh process."""
    build = {
        "ours": lambda: common.build_ours(args.size),
        "ours_plain_loss": lambda: common.build_ours(args.size),  # the fused-loss lever off (levers.py)
        "marian": lambda: common.build_marian(None, args.size),
        "torch": lambda: common.build_torch(None, args.size),
    }[args.impl]
    model = build().train()
    batch = common.token_batches(common.model_config(args.size).vocab_size, args.max_tokens, count=3)[1]
    step = common.training_step(args.impl.removesuffix("_plain_loss"), model, common.make_optimizer(model))
    if args.impl == "ours_plain_loss":
        model.fused_training_loss = False
    before = common.current_rss_mib()
    for _ in range(2):  # the first step also allocates Adam's moments
        step(batch)
    peak = common.peak_rss_mib()
    return {"peak_rss_mib": peak, "rss_before_mib": before, "step_mib": peak - before}


def spawn(args: argparse.Namespace, worker: str, size: str, allocator: str, impl: str = "") -> dict[str, Any]:
    """Run a worker in a fresh interpreter (with the tuned allocator if asked) and read its JSON answer."""
    env = dict(os.environ)
    for name in common.ALLOCATOR_ENV:
        env.pop(name, None)
    if allocator == "tuned":
        env.update(common.ALLOCATOR_ENV)
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", worker, "--size", size]
    command += ["--max-tokens", str(args.max_tokens)]
    if impl:
        command += ["--impl", impl]
    if args.quick:
        command.append("--quick")
    if args.repeats:
        command += ["--repeats", str(args.repeats)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{worker} worker ({size}, {allocator}, {impl}) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------- report


def measure_levers(args: argparse.Namespace, size: str, batch_sizes: tuple[int, ...], repeats: int) -> dict[str, Any]:
    """Generation levers here (glibc's default allocator, as the generation benchmark). The fused loss: training speed
    in fresh processes under both allocators, and the peak memory of two steps with and without it, each alone in a
    fresh process (as the memory benchmark)."""
    generation = levers.generation_levers(size, batch_sizes, args.new_tokens, repeats)
    training = {}
    for allocator in ALLOCATORS:
        for kind, row in spawn(args, "levers", size, allocator).items():
            training[f"{kind}, {allocator} malloc"] = row
    peaks = {impl: spawn(args, "memory", size, "default", impl)["peak_rss_mib"] for impl in ("ours", "ours_plain_loss")}
    memory = {"peak RSS, default malloc": {"fused_loss": peaks["ours_plain_loss"] / peaks["ours"], "peaks_mib": peaks}}
    print(f"{size}: levers done", flush=True)
    return {"generation": generation, "training": training, "memory": memory}


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "-"


def table(results: dict[str, Any]) -> list[str]:
    """Markdown table: one row per measurement, the three implementations and our ratios to the others."""
    peak = results["matmul"]["peak_flops"]
    lines = list(common.TABLE_HEADER)
    for size, per_size in results["sizes"].items():
        if "train" not in per_size:  # --levers-only
            continue
        for allocator in ALLOCATORS:
            train = per_size["train"][allocator]
            for kind in (k for k in train if k.startswith(("fixed", "tokens"))):
                row = {impl: train[kind][impl]["tokens_per_s"] for impl in common.IMPLEMENTATIONS}
                lines.append(_row(size, f"train {kind}, {allocator} malloc (tok/s)", row, "{:.0f}"))
                matmul = train[kind].get("matmul_flops_per_s", peak)  # older JSON: the peak at the run's start
                mfu = {impl: 100 * train[kind][impl]["flops_per_s"] / matmul for impl in common.IMPLEMENTATIONS}
                lines.append(_row(size, f"train {kind}, {allocator} malloc (% of matmul peak)", mfu, "{:.1f}"))
        for kind in (k for k in per_size["train"]["default"] if k.startswith(("fixed", "tokens"))):
            speedup = {
                impl: per_size["train"]["tuned"][kind][impl]["tokens_per_s"]
                / per_size["train"]["default"][kind][impl]["tokens_per_s"]
                for impl in common.IMPLEMENTATIONS
            }
            lines.append(_row(size, f"train {kind}: tuned / default malloc speed", speedup, "{:.2f}"))
        for allocator, memory in per_size["memory"].items():
            lines.append(
                _row(size, f"train peak RSS, {allocator} malloc (MiB)", _pick(memory, "peak_rss_mib"), "{:.0f}")
            )
            lines.append(
                _row(size, f"train step RSS growth, {allocator} malloc (MiB)", _pick(memory, "step_mib"), "{:.0f}")
            )
        lines.extend(common.format_generation(size, per_size["generation"]))
    lever_results = {size: per_size["levers"] for size, per_size in results["sizes"].items() if "levers" in per_size}
    if lever_results:
        lines += ["", *levers.table(lever_results)]
    return lines


def _pick(per_impl: dict[str, dict], key: str) -> dict[str, float]:
    return {impl: values[key] for impl, values in per_impl.items()}


def _row(size: str, measure: str, values: dict[str, float], fmt: str) -> str:
    cells = [fmt.format(values[impl]) for impl in common.IMPLEMENTATIONS]
    ours = values["ours"]
    return (
        f"| {size} | {measure} | {' | '.join(cells)} | - | {ratio(ours, values['marian'])} | "
        f"{ratio(ours, values['torch'])} | - |"
    )


def readme_table(results: dict[str, Any]) -> list[str]:
    """The README's speed table, from a results JSON (so the README copies no figure by hand): per size, training on
    token batches and the fixed batch (glibc's default allocator) and with `train.py`'s allocator, peak memory, and
    generation tokens/s, ours against Marian and CTranslate2."""
    lines = [
        "| size | measure | ours | Marian | CTranslate2 | ours / Marian | ours / CTranslate2 |",
        "|---|---|---|---|---|---|---|",
    ]
    for size, per_size in results["sizes"].items():
        train = per_size["train"]
        for allocator, label in (("default", "glibc default malloc"), ("tuned", "train.py's malloc settings")):
            for kind in (k for k in train[allocator] if k.startswith(("tokens", "fixed"))):
                ours, marian = (train[allocator][kind][impl]["tokens_per_s"] for impl in ("ours", "marian"))
                name = f"{kind[7:]}-token" if kind.startswith("tokens_") else kind.replace("fixed_", "fixed ")
                row = f"training, {name} batch, {label} (tok/s)"
                lines.append(f"| {size} | {row} | {ours:.0f} | {marian:.0f} | - | {ours / marian:.2f} | - |")
        memory = per_size["memory"]["default"]
        ours, marian = memory["ours"]["peak_rss_mib"], memory["marian"]["peak_rss_mib"]
        lines.append(
            f"| {size} | training peak memory (MiB) | {ours:.0f} | {marian:.0f} | - | {ours / marian:.2f} | - |"
        )
        for case, row in per_size["generation"].items():
            if case == "setup":
                continue
            ct2 = row.get("ctranslate2")
            ct2_speed, ct2_ratio = (f"{ct2:.1f}", f"{row['ours'] / ct2:.2f}") if ct2 else ("-", "-")
            cells = f"{row['ours']:.1f} | {row['marian']:.1f} | {ct2_speed}"
            ratios = f"{row['ratio']:.2f} | {ct2_ratio}"
            lines.append(f"| {size} | {case.replace('_b', ', batch ')} (tok/s) | {cells} | {ratios} |")
    return lines


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.readme_table:
        results = json.loads(args.readme_table.read_text())
        print("\n".join(readme_table(results)))
        return results
    if args.worker:
        if args.worker == "levers":
            repeats = args.repeats or (1 if args.quick else FULL_REPEATS[args.size][0])
            answer = levers.training_levers(args.size, args.max_tokens, repeats)
        else:
            answer = train_worker(args) if args.worker == "train" else memory_worker(args)
        print(json.dumps(answer))
        return answer
    started = time.perf_counter()
    results: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            "cpu": _cpu_name(),
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,  # generate() and Marian change between releases
            "python": platform.python_version(),
        },
        "load_average_at_start": os.getloadavg(),
        "settings": {"quick": args.quick, "max_tokens": args.max_tokens, "new_tokens": args.new_tokens},
        "matmul": common.matmul_peak(n=1024 if args.quick else 3072, repeats=3 if args.quick else 5),
        "sizes": {},
    }
    print(f"matmul peak: {results['matmul']['peak_flops'] / 1e9:.1f} GFLOP/s", flush=True)
    for size in args.sizes:
        gen_repeats = args.repeats or (1 if args.quick else FULL_REPEATS[size][1])
        batch_sizes = (1, 2) if args.quick else (1, 16)
        if args.levers_only:
            results["sizes"][size] = {"levers": measure_levers(args, size, batch_sizes, gen_repeats)}
            continue
        per_size: dict[str, Any] = {"train": {}, "memory": {}}
        for allocator in ALLOCATORS:  # default first, then tuned, each in its own fresh process
            per_size["train"][allocator] = spawn(args, "train", size, allocator)
            print(f"{size}: training, {allocator} malloc done", flush=True)
        # --quick measures memory with the default allocator only: six fresh interpreters are most of its time.
        for allocator in ALLOCATORS[:1] if args.quick else ALLOCATORS:
            per_size["memory"][allocator] = {
                impl: spawn(args, "memory", size, allocator, impl) for impl in common.IMPLEMENTATIONS
            }
        print(f"{size}: memory done", flush=True)
        per_size["generation"] = common.generation_benchmark(size, batch_sizes, args.new_tokens, gen_repeats)
        print(f"{size}: generation done", flush=True)
        per_size["levers"] = measure_levers(args, size, batch_sizes, gen_repeats)
        results["sizes"][size] = per_size
    results["wall_s"] = time.perf_counter() - started
    results["load_average_at_end"] = os.getloadavg()
    lines = table(results)
    results["table"] = lines
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
