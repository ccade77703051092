"""Each CPU speed lever of the modeling file at commit 5a803b8, measured on against off on the cases it targets.

    python benchmarks/levers_before.py --part generation --json out.json          (default glibc malloc)
    env MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 MALLOC_TOP_PAD_=1073741824 \
        python benchmarks/levers_before.py --part training --json out.json        (train.py's allocator)

"all" runs the code as it is; each other variant turns exactly one lever off (by patching the module), and all
variants alternate in one process (all, v1, v2, ..., all, v1, ...). A lever's worth is the median over rounds of
time(lever off) / time(all on) in the same round. Generation: `benchmarks/common.py`'s fixed-length cases (32 new
tokens, right-padded sources of mean length ~25). Training: a full step as train.py runs it (fused loss, AdamW) on
`common.token_batches` of 4096 tokens per side.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402

from benchmarks import common  # noqa: E402
from hf_vanilla_transformer import modeling_vanilla_transformer as modeling  # noqa: E402

M = modeling
GENERATION_LEVERS = {
    "onednn_linear": lambda: mock.patch.object(M, "_ONEDNN_LINEAR", None),  # MKL F.linear, hence no reorder either
    "reordered_weights": lambda: mock.patch.object(M, "reordered_linear_weights", lambda m: contextlib.nullcontext()),
    "stacked_qkv_step": lambda: mock.patch.object(M, "stacked_step_projections", lambda a: contextlib.nullcontext()),
    "decoding_step_copy": lambda: mock.patch.object(
        M.VanillaTransformerDecoderLayer, "is_decoding_step", lambda *a, **k: False
    ),
    "unpadded_encoder": lambda: mock.patch.object(M, "UNPADDED_MIN_PADDING", 2.0),
    "own_sdpa_function": lambda: mock.patch.object(M, "sdpa_attention", sdpa_attention_forward),
}
TRAINING_LEVERS = {
    "dropout_by_hand": lambda: mock.patch.object(M, "apply_dropout", lambda x, p, training: F.dropout(x, p, training)),
    "fused_qkv_training": lambda: mock.patch.object(M.VanillaTransformerAttention, "_fusable", lambda self: False),
    "fused_loss": None,  # model.fused_training_loss = False
}


def alternate(variants: dict, run, repeats: int) -> dict[str, list[float]]:
    for name in variants:  # warm-up
        with variants[name]():
            run(-1)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for index in range(repeats):
        for name, patch in variants.items():
            with patch():
                start = time.perf_counter()
                run(index)
                times[name].append(time.perf_counter() - start)
    return times


def summarise(times: dict[str, list[float]]) -> dict:
    base = times["all"]
    out = {"times_s": times}
    for name, ts in times.items():
        if name != "all":
            out[name] = {
                "speedup_median_of_round_ratios": statistics.median(t / b for t, b in zip(ts, base, strict=True)),
                "speedup_ratio_of_medians": statistics.median(ts) / statistics.median(base),
            }
    return out


def generation(sizes: list[str], repeats: dict[str, int]) -> dict:
    results = {}
    for size in sizes:
        model = common.build_ours(size).eval()
        variants = {"all": contextlib.nullcontext, **GENERATION_LEVERS}
        for mode, beams in common.GENERATION_CASES:
            for batch_size in (1, 16):
                config = common.fixed_length_generation_config(beams, 32)
                ids, mask = common.source_batch(model.config.vocab_size, batch_size, seed=batch_size)
                outputs = {}

                def run(_i, ids=ids, mask=mask, config=config):
                    outputs.setdefault("x", []).append(
                        model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
                    )

                with torch.inference_mode():
                    times = alternate(variants, run, repeats[size])
                same = all(torch.equal(o, outputs["x"][0]) for o in outputs["x"])
                case = f"{mode}_b{batch_size}"
                results[f"{size}/{case}"] = {
                    **summarise(times),
                    "same_output": same,
                    "padding_share": float(1 - mask.float().mean()),
                }
                print(
                    size,
                    case,
                    {
                        k: round(v["speedup_median_of_round_ratios"], 3)
                        for k, v in summarise(times).items()
                        if k != "times_s"
                    },
                    flush=True,
                )
    return results


def training(sizes: list[str], repeats: dict[str, int]) -> dict:
    results = {}
    for size in sizes:
        model = common.build_ours(size).train()
        step = common.training_step("ours", model, common.make_optimizer(model))
        batches = common.token_batches(model.config.vocab_size, 4096, count=repeats[size])

        @contextlib.contextmanager
        def no_fused_loss():
            model.fused_training_loss = False
            try:
                yield
            finally:
                model.fused_training_loss = True

        variants = {"all": contextlib.nullcontext}
        variants.update({k: (v if v is not None else no_fused_loss) for k, v in TRAINING_LEVERS.items()})
        times = alternate(variants, lambda i: step(batches[max(i, 0)]), repeats[size])
        results[f"{size}/tokens_4096"] = summarise(times)
        print(
            size,
            {k: round(v["speedup_median_of_round_ratios"], 3) for k, v in summarise(times).items() if k != "times_s"},
            flush=True,
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", choices=("generation", "training"), required=True)
    parser.add_argument("--sizes", default="small,base")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    sizes = args.sizes.split(",")
    started = time.perf_counter()
    if args.part == "generation":
        results = generation(sizes, {"tiny": 3, "small": 7, "base": 5})
    else:
        results = training(sizes, {"tiny": 3, "small": 7, "base": 4})
    results["_meta"] = {
        "commit": "5a803b8",
        "allocator_env": {k: os.environ.get(k) for k in common.ALLOCATOR_ENV},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "wall_s": time.perf_counter() - started,
        "load_average": os.getloadavg(),
    }
    args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
