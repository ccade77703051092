"""Generation speed, ours vs MarianMTModel with the same weights: greedy and beam-4 tokens/s.

    python benchmarks/generation.py [--sizes small,base] [--batch-sizes 1,16] [--new-tokens 32] [--repeats 3]

Both models generate exactly --new-tokens tokens per output (min = max new tokens, so EOS cannot end a row early),
beam search with length penalty 0.6 (§6.1). The two models alternate (ours, marian, ours, ...) and each figure is
the median over repeats; tokens/s counts returned tokens (batch x new tokens). `run.py` runs the same measurement
as part of the full benchmark.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # make `benchmarks` importable as a script

from benchmarks import common


def main(argv: list[str] | None = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="small,base", help="comma-separated: tiny, small, base")
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    batch_sizes = tuple(int(b) for b in args.batch_sizes.split(","))
    results = {}
    for size in args.sizes.split(","):
        results[size] = common.generation_benchmark(size, batch_sizes, args.new_tokens, args.repeats)
        print(f"{size}: max |logit diff| to Marian {results[size]['setup']['max_logit_diff_marian']:.2g}", flush=True)
    print("\n".join(common.TABLE_HEADER))
    for size, per_size in results.items():
        print("\n".join(common.format_generation(size, per_size)))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
