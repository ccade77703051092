"""Real data, side by side: train.py's defaults against a plain MarianMTModel recipe, for the same training time.

    python benchmarks/real_data.py TRAIN VAL --source_lang en --target_lang fr --minutes 30

Trains, each in a fresh process on this machine, once per ``--seeds`` seed, one after the other with all the threads
or, with ``--side_by_side``, a seed's systems at the same time with the cores split between them (``--report_only``
then, or later, puts runs made by separate invocations into one report):

- ``ours``: ``train.py`` with its defaults for the size (``--config_name small`` unless ``--size``), a tokenizer it
  trains itself, stopped by ``--max_train_minutes``;
- ``previous``: ``train.py`` with the small-model recipe it had before issue #27 (``PREVIOUS_RECIPE``, given as
  flags, so that it stays measurable whatever the defaults become);
- ``marian``: transformers' ``MarianMTModel`` configured as the same Transformer (post-LN, ReLU, sinusoidal
  positions, one tied embedding matrix scaled by sqrt(d_model), the same sizes), trained with a plain
  ``Seq2SeqTrainer`` recipe: Adam (0.9, 0.98), inverse square root schedule peaking at 1e-3 after 500 steps, label
  smoothing 0.1, dropout 0.1, 64 sentences a batch, and its own 8k BPE with NFKC normalisation and Metaspace
  pre-tokenization (SentencePiece-style, as OPUS-MT's Marian models use).

Both stop after ``--minutes`` of training time (evaluation time not counted: `TrainingTimeBudget`) and evaluate greedy
BLEU on the validation set every ``--eval_minutes`` for the learning curve. At the end each final model (ours:
checkpoint-averaged as train.py does by default) translates the validation set greedily and with its saved beam-4
settings, and the script reports sacreBLEU, the length ratio and training tokens per second (source tokens, padding
excluded), writes ``benchmarks/results/<date>_real_data_<size>_<minutes>min.json`` and a learning-curve PNG beside it.
The data is read from the given paths only; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

RESULTS = REPO / "benchmarks" / "results"
SYSTEMS = ("ours", "previous", "marian")
# train.py's small-model recipe before issue #27 (SMALL_RECIPE and the small preset at eb57137), as flags.
PREVIOUS_RECIPE = [
    "--vocab_size", "8000", "--max_tokens", "1400", "--warmup_steps", "500", "--learning_rate", "1e-3",
    "--lr_scheduler_type", "inverse_sqrt", "--save_steps", "300", "--checkpoint_average", "3",
    "--save_total_limit", "3", "--max_grad_norm", "1.0", "--label_smoothing_factor", "0.1", "--bf16", "false",
    "--config_overrides", "d_model=256,encoder_layers=3,decoder_layers=3,encoder_ffn_dim=1024,decoder_ffn_dim=1024,"
    "encoder_attention_heads=4,decoder_attention_heads=4,dropout=0.1,attention_dropout=0.0,activation_dropout=0.0",
]  # fmt: skip
# The plain recipe the Marian baseline trains with (issue #17), and its tokenizer's size.
MARIAN_RECIPE = {
    "learning_rate": 1e-3,
    "warmup_steps": 500,
    "lr_scheduler_type": "inverse_sqrt",
    "adam_beta1": 0.9,
    "adam_beta2": 0.98,
    "label_smoothing_factor": 0.1,
    "per_device_train_batch_size": 64,
}
MARIAN_VOCAB = 8000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("train_file")
    parser.add_argument("validation_file")
    parser.add_argument("--source_lang", required=True)
    parser.add_argument("--target_lang", required=True)
    parser.add_argument("--minutes", type=float, default=30.0, help="Training time of each system.")
    parser.add_argument("--eval_minutes", type=float, default=5.0, help="Learning-curve points every this often.")
    parser.add_argument("--size", default="small", help="The preset of both models (train.py --config_name).")
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[42], help="One run of each system per seed.")
    parser.add_argument("--seed", type=int, default=42, help=argparse.SUPPRESS)  # the child's
    parser.add_argument("--ours_args", default="", help="Extra train.py flags for ours (to measure a factor).")
    parser.add_argument("--work_dir", default="outputs/real_data", help="Where the runs write their models.")
    parser.add_argument("--name", default=None, help="Results file name (default: date, size and minutes).")
    parser.add_argument("--results_dir", default=str(RESULTS), help="Where the JSON and the PNG go.")
    parser.add_argument(
        "--side_by_side",
        action="store_true",
        help="Train one seed's systems at the same time, the CPU cores split evenly between them: each run gets "
        "fewer threads, but all of a seed's runs share the same machine conditions (and the seeds take less time).",
    )
    parser.add_argument(
        "--report_only",
        action="store_true",
        help="Train nothing: report the runs of --systems and --seeds already in --work_dir (made by earlier "
        "invocations, e.g. one seed per session or one system per terminal).",
    )
    parser.add_argument("--child", choices=SYSTEMS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for path in (args.train_file, args.validation_file):
        if not os.path.isfile(path):
            raise ValueError(f"{path}: no such file")
    cores = os.cpu_count() or 1
    if args.side_by_side and not args.report_only and len(args.systems) > cores:
        raise ValueError(
            f"--side_by_side with {len(args.systems)} systems needs {len(args.systems)} cores and this machine has "
            f"{cores}: the runs would not share it evenly; give fewer --systems"
        )
    if not args.minutes > 0 or not args.eval_minutes > 0:
        raise ValueError(f"--minutes ({args.minutes}) and --eval_minutes ({args.eval_minutes}) must be positive")
    return args


# ----------------------------------------------------------------------------------------------- evaluation


def read_pairs(path: str, source_lang: str, target_lang: str) -> tuple[list[str], list[str]]:
    from hf_vanilla_transformer.data import load_translation_dataset

    pairs = load_translation_dataset(validation_file=path, source_lang=source_lang, target_lang=target_lang)[
        "validation"
    ]["translation"]
    return [p[source_lang] for p in pairs], [p[target_lang] for p in pairs]


def translate(model, tokenizer, sources: list[str], num_beams: int, batch_size: int = 64) -> list[str]:
    """Translations in input order, decoded in batches of similar source length (less padding)."""
    import torch

    model.eval()
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    outputs: list[str] = [""] * len(sources)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = tokenizer([sources[i] for i in rows], return_tensors="pt", padding=True)
        with torch.no_grad():
            ids = model.generate(**batch, num_beams=num_beams)
        for i, text in zip(rows, tokenizer.batch_decode(ids, skip_special_tokens=True), strict=True):
            outputs[i] = text.strip()
    return outputs


def score(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    import sacrebleu

    bleu = sacrebleu.corpus_bleu(hypotheses, [references])
    return {"bleu": round(bleu.score, 2), "length_ratio": round(bleu.sys_len / bleu.ref_len, 4)}


def final_scores(model, tokenizer, sources, references, seconds_per_eval: dict) -> dict:
    result = {}
    for name, beams in (("greedy", 1), ("beam4", 4)):
        started = time.perf_counter()
        hypotheses = translate(model, tokenizer, sources, num_beams=beams)
        seconds_per_eval[name] = round(time.perf_counter() - started, 1)
        result[name] = {**score(hypotheses, references), "example": hypotheses[0]}
    return result


def training_summary(log_history: list[dict]) -> dict:
    """Steps, training minutes, source tokens per second and the learning curve from Trainer's log history."""
    train_logs = [e for e in log_history if "num_input_tokens_seen" in e and "training_minutes" in e]
    curve = [
        {"step": e["step"], "minutes": e["training_minutes"], "bleu": round(e["eval_bleu"], 2)}
        for e in log_history
        if "eval_bleu" in e and "training_minutes" in e
    ]
    last = train_logs[-1] if train_logs else {}
    minutes = last.get("training_minutes")
    return {
        "steps": max((e.get("step", 0) for e in log_history), default=0),
        "training_minutes": minutes,
        "source_tokens_per_second": round(last["num_input_tokens_seen"] / (60 * minutes)) if minutes else None,
        "loss": [(e["step"], round(e["loss"], 4)) for e in log_history if "loss" in e],
        "curve": curve,
    }


# ----------------------------------------------------------------------------------------------- the two systems


def eval_steps_for(minutes_between: float, steps_per_second: float) -> int:
    return max(50, int(minutes_between * 60 * steps_per_second))


def run_ours(args: argparse.Namespace, out: Path) -> dict:
    import shlex

    import train  # the repository's train.py

    flags = PREVIOUS_RECIPE if args.child == "previous" else shlex.split(args.ours_args)
    argv = [
        "--train_file", args.train_file, "--validation_file", args.validation_file,
        "--source_lang", args.source_lang, "--target_lang", args.target_lang,
        "--config_name", args.size, "--max_train_minutes", str(args.minutes),
        "--output_dir", str(out), "--overwrite_output_dir", "--do_train",
        "--eval_strategy", "steps", "--eval_steps", str(eval_steps_for(args.eval_minutes, 2.0)),
        "--generation_num_beams", "1", "--per_device_eval_batch_size", "64",
        "--logging_steps", "50", "--report_to", "none", "--disable_tqdm", "true", "--seed", str(args.seed),
        *flags,
    ]  # fmt: skip
    parse_args = train.parse_args

    def counting_tokens(argv_):  # HfArgumentParser reads this str-or-bool flag as a bool only
        model_args, data_args, training_args = parse_args(argv_)
        training_args.include_num_input_tokens_seen = "non_padding"
        return model_args, data_args, training_args

    train.parse_args = counting_tokens
    train.main(argv)
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from hf_vanilla_transformer.cpu_inference import optimize_for_cpu_inference

    model = optimize_for_cpu_inference(AutoModelForSeq2SeqLM.from_pretrained(out))  # as the pipelines translate
    tokenizer = AutoTokenizer.from_pretrained(out)
    state = json.loads((out / "trainer_state.json").read_text())
    return {"model": model, "tokenizer": tokenizer, "log_history": state["log_history"], "command": argv}


def run_marian(args: argparse.Namespace, out: Path) -> dict:
    import datasets
    from transformers import DataCollatorForSeq2Seq, MarianMTModel, Seq2SeqTrainer, Seq2SeqTrainingArguments

    from benchmarks.common import marian_config
    from hf_vanilla_transformer import VanillaTransformerConfig
    from hf_vanilla_transformer.callbacks import TrainingTimeBudget
    from hf_vanilla_transformer.data import load_translation_dataset, tokenize_dataset
    from hf_vanilla_transformer.metrics import build_compute_metrics
    from hf_vanilla_transformer.tokenization import train_tokenizer

    raw = load_translation_dataset(
        train_file=args.train_file,
        validation_file=args.validation_file,
        source_lang=args.source_lang,
        target_lang=args.target_lang,
    )
    texts = (p[lang] for p in raw["train"]["translation"] for lang in (args.source_lang, args.target_lang))
    tokenizer = train_tokenizer(texts, vocab_size=MARIAN_VOCAB, pre_tokenization="metaspace")
    tokenized = tokenize_dataset(raw, tokenizer, args.source_lang, args.target_lang, 256, 256)
    config = VanillaTransformerConfig.from_preset(args.size, vocab_size=len(tokenizer), dropout=0.1)
    model = MarianMTModel(marian_config(config))  # Marian's own initialisation: N(0, 0.02) everywhere
    model.generation_config.num_beams = 4  # transformers' defaults otherwise: length penalty 1.0, no early stop
    model.generation_config.max_length = 256
    training_args = Seq2SeqTrainingArguments(
        output_dir=str(out),
        max_steps=10**9,
        eval_strategy="steps",
        eval_steps=eval_steps_for(args.eval_minutes, 2.0),
        save_strategy="no",
        logging_steps=50,
        predict_with_generate=True,
        generation_num_beams=1,
        per_device_eval_batch_size=64,
        include_num_input_tokens_seen="non_padding",
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
        seed=args.seed,
        **MARIAN_RECIPE,
    )
    trainer = Seq2SeqTrainer(
        model=model,
        args=training_args,
        train_dataset=tokenized["train"],
        eval_dataset=tokenized["validation"],
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=model),
        processing_class=tokenizer,
        compute_metrics=build_compute_metrics(tokenizer),
        callbacks=[TrainingTimeBudget(args.minutes)],
    )
    datasets.disable_progress_bars()
    trainer.train()
    return {"model": model, "tokenizer": tokenizer, "log_history": trainer.state.log_history, "recipe": MARIAN_RECIPE}


def child(args: argparse.Namespace) -> None:
    """One system in this process: train, evaluate, write `<work_dir>/<system>.json`."""
    import torch

    out = Path(args.work_dir) / f"{args.child}-seed{args.seed}"
    started = time.perf_counter()
    run = (run_marian if args.child == "marian" else run_ours)(args, out)
    sources, references = read_pairs(args.validation_file, args.source_lang, args.target_lang)
    seconds: dict[str, float] = {}
    result = {
        "system": args.child,
        "seed": args.seed,
        "parameters": sum(p.numel() for p in run["model"].parameters()),
        **training_summary(run["log_history"]),
        **final_scores(run["model"], run["tokenizer"], sources, references, seconds),
        "evaluation_seconds": seconds,
        "wall_seconds": round(time.perf_counter() - started),
        "torch_threads": torch.get_num_threads(),
        "minutes": args.minutes,
        **{k: v for k, v in run.items() if k in ("command", "recipe")},
    }
    (Path(args.work_dir) / f"{args.child}-seed{args.seed}.json").write_text(json.dumps(result, indent=1))


# ----------------------------------------------------------------------------------------------- report


def threads_per_run(results: dict[str, list[dict]]) -> list[int]:
    """The torch threads the runs trained with (one value unless runs made apart are joined)."""
    return sorted({run["torch_threads"] for runs in results.values() for run in runs})


def plot_curves(results: dict[str, list[dict]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, runs in results.items():
        color = None
        for i, result in enumerate(runs):
            points = [(0.0, 0.0)] + [(p["minutes"], p["bleu"]) for p in result["curve"]]
            label = f"{name} (greedy during training)" if i == 0 else None
            (line,) = ax.plot(*zip(*points, strict=True), "o-", color=color, label=label, alpha=0.8, markersize=3)
            color = line.get_color()
            final = ([result["training_minutes"]], [result["beam4"]["bleu"]])
            label = f"{name}, final model, beam 4" if i == 0 else None
            ax.plot(*final, "*", color=color, markersize=12, label=label)
    ax.set_xlabel(f"training minutes ({' or '.join(map(str, threads_per_run(results)))} CPU thread(s) per run)")
    ax.set_ylabel("validation BLEU")
    seeds = len(next(iter(results.values()))) if results else 0
    ax.set_title(title + (f", {seeds} seed{'s' if seeds > 1 else ''}" if seeds else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summary(runs: list[dict]) -> dict:
    """The mean over seeds of each score, and the seeds' own values."""

    def mean(values: list[float]) -> float:
        return round(sum(values) / len(values), 2)

    return {
        decoding: {
            "bleu": mean([r[decoding]["bleu"] for r in runs]),
            "length_ratio": round(sum(r[decoding]["length_ratio"] for r in runs) / len(runs), 4),
            "per_seed": [r[decoding]["bleu"] for r in runs],
        }
        for decoding in ("greedy", "beam4")
    } | {
        "steps": round(sum(r["steps"] for r in runs) / len(runs)),
        "training_minutes": round(sum(r["training_minutes"] for r in runs) / len(runs), 2),
        "source_tokens_per_second": round(sum(r["source_tokens_per_second"] or 0 for r in runs) / len(runs)),
    }


def table(results: dict[str, list[dict]]) -> str:
    """Means over the seeds; with several seeds, each seed's beam-4 BLEU follows."""
    lines = [
        "| system | steps | training min | source tokens/s | greedy BLEU (ratio) | beam 4 BLEU (ratio) "
        "| beam 4 per seed |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, runs in results.items():
        r = summary(runs)
        lines.append(
            f"| {name} | {r['steps']:,} | {r['training_minutes']:.1f} | {r['source_tokens_per_second']:,} | "
            f"{r['greedy']['bleu']:.2f} ({r['greedy']['length_ratio']:.3f}) | "
            f"{r['beam4']['bleu']:.2f} ({r['beam4']['length_ratio']:.3f}) | "
            f"{' / '.join(f'{b:.2f}' for b in r['beam4']['per_seed'])} |"
        )
    return "\n".join(lines)


def train_systems(args: argparse.Namespace, forwarded: list[str], seed: int) -> None:
    """One run per system for this seed, each in a fresh process: one after the other with all the threads, or (with
    --side_by_side) all at once with the cores split between them. Never two timed runs competing unevenly."""
    groups = [list(args.systems)] if args.side_by_side else [[system] for system in args.systems]
    env = dict(os.environ)
    if args.side_by_side:
        threads = str(max(1, (os.cpu_count() or 1) // len(args.systems)))
        env |= {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    for group in groups:
        children = {
            system: subprocess.Popen(
                [sys.executable, __file__, *forwarded, "--child", system, "--seed", str(seed)], cwd=REPO, env=env
            )
            for system in group
        }
        codes = {system: child.wait() for system, child in children.items()}
        failed = {system: code for system, code in codes.items() if code}
        if failed:
            raise RuntimeError(f"seed {seed}: these runs failed (exit codes) {failed}; see their output above")


def read_run(args: argparse.Namespace, system: str, seed: int) -> dict:
    """A finished run's results, checked to belong to this comparison (--minutes)."""
    path = Path(args.work_dir) / f"{system}-seed{seed}.json"
    if not path.is_file():
        raise ValueError(
            f"{path}: no results for {system} with seed {seed}; run it first (the same command without --report_only)"
        )
    run = json.loads(path.read_text())
    if run.get("minutes", args.minutes) != args.minutes:  # runs made before the field was recorded pass unchecked
        raise ValueError(f"{path}: trained for --minutes {run['minutes']}, not the {args.minutes} of this report")
    return run


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.child:
        child(args)
        return {}
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    forwarded = [a for a in (argv if argv is not None else sys.argv[1:])]
    if not args.report_only:
        for seed in args.seeds:
            train_systems(args, forwarded, seed)
    results = {system: [read_run(args, system, seed) for seed in args.seeds] for system in args.systems}
    import torch
    import transformers

    name = args.name or f"{datetime.date.today()}_real_data_{args.size}_{args.minutes:g}min"
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "data": {
            "train": args.train_file,
            "validation": args.validation_file,
            "pair": f"{args.source_lang}-{args.target_lang}",
        },
        "minutes": args.minutes,
        "size": args.size,
        "ours_args": args.ours_args,
        "previous_recipe": PREVIOUS_RECIPE,
        "seeds": args.seeds,
        "threads_per_run": threads_per_run(results),
        "summary": {system: summary(runs) for system, runs in results.items()},
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "transformers": transformers.__version__},
        "results": results,
    }
    (results_dir / f"{name}.json").write_text(json.dumps(report, indent=1))
    plot_curves(
        results, results_dir / f"{name}.png", f"{args.source_lang}->{args.target_lang}, {args.size}, validation"
    )
    print(table(results))
    print(f"\nResults: {results_dir / name}.json and .png")
    return report


if __name__ == "__main__":
    main()
