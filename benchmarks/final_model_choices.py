"""The choices made after training, measured on finished runs: how many of the last checkpoints to average (§6.1
averages the last 5 or 20; the small recipe the last 3) and the beam size (§6.1: 4; the published small-data model: 5).

    python benchmarks/final_model_choices.py VAL --source_lang en --target_lang fr RUN_DIR [RUN_DIR ...] \
        [--windows 1 2 3] [--beams 4 5] [--json out.json]

Each RUN_DIR is a `train.py` output directory that still holds its checkpoints (`--save_total_limit` of them). For
each window k the model is the element-wise mean of the last k checkpoints (`checkpoints.average_checkpoints`, as
`train.py --checkpoint_average k` makes it), converted for CPU inference as the pipelines run it, and translates the
validation set with its saved generation settings and each beam size; the table gives sacreBLEU, the length ratio and
the seconds of each pass. No training: minutes per run, not hours, so the choices can be screened on every run that
the side-by-side comparisons leave behind.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # make `benchmarks` importable as a script

from benchmarks.real_data import read_pairs, score, translate


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("validation_file")
    parser.add_argument("run_dirs", nargs="+", help="train.py output directories with their checkpoint-* folders")
    parser.add_argument("--source_lang", required=True)
    parser.add_argument("--target_lang", required=True)
    parser.add_argument("--windows", type=int, nargs="+", default=[1, 2, 3], help="last k checkpoints averaged")
    parser.add_argument("--beams", type=int, nargs="+", default=[4, 5])
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    for name in ("windows", "beams"):
        bad = [v for v in getattr(args, name) if v < 1]
        if bad:
            parser.error(f"--{name} must be at least 1, got {bad}")
    return args


def averaged_model(run_dir: str | Path, window: int):
    """The run's model with the mean of its last `window` checkpoints, ready for CPU translation."""
    from transformers import AutoModelForSeq2SeqLM

    from hf_vanilla_transformer.checkpoints import average_checkpoints, checkpoint_folders, load_weights
    from hf_vanilla_transformer.cpu_inference import optimize_for_cpu_inference

    if len(checkpoint_folders(run_dir, window)) < window:  # average_checkpoints would only warn and use fewer
        raise ValueError(f"{run_dir} has fewer than {window} checkpoints: cannot average the last {window}")
    model = AutoModelForSeq2SeqLM.from_pretrained(run_dir)
    load_weights(model, average_checkpoints(run_dir, window))
    return optimize_for_cpu_inference(model.eval())


def measure(args: argparse.Namespace) -> list[dict]:
    from transformers import AutoTokenizer

    sources, references = read_pairs(args.validation_file, args.source_lang, args.target_lang)
    rows = []
    for run_dir in args.run_dirs:
        tokenizer = AutoTokenizer.from_pretrained(run_dir)
        for window in args.windows:
            model = averaged_model(run_dir, window)
            for beams in args.beams:
                started = time.perf_counter()
                hypotheses = translate(model, tokenizer, sources, num_beams=beams)
                seconds = round(time.perf_counter() - started, 1)
                row = {"run": str(run_dir), "window": window, "beams": beams, **score(hypotheses, references)}
                rows.append({**row, "seconds": seconds})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    """One line per (window, beams): the BLEU of each run and their mean."""
    runs = list(dict.fromkeys(r["run"] for r in rows))
    bleu_of = {(r["run"], r["window"], r["beams"]): r["bleu"] for r in rows}
    lines = [
        f"| window | beams | {' | '.join(Path(r).name for r in runs)} | mean |",
        "|---" * (len(runs) + 3) + "|",
    ]
    for window, beams in dict.fromkeys((r["window"], r["beams"]) for r in rows):
        bleu = [bleu_of[run, window, beams] for run in runs]
        lines.append(f"| {window} | {beams} | {' | '.join(f'{b:.2f}' for b in bleu)} | {sum(bleu) / len(bleu):.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    rows = measure(args)
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"command": sys.argv, "results": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
