"""Translating a file end to end: the CLI on each backend against transformers' pipeline, sentences/s and BLEU.

    python benchmarks/translate_cli.py [MODEL] [--sentences 1000] [--json out.json]

MODEL (default `outputs/vanilla-transformer`, what `python train.py` writes) translates the embedded corpus's test
sentences (the same 1,000 `train.py` scores), one configuration after the other, nothing else running:

- the CLI (`hf_vanilla_transformer.translate`): torch backend; CTranslate2 on an fp32 and an int8 export of the model
  (each export is made beforehand and timed apart);
- `pipeline("translation")` one sentence at a time, and on the whole list with `batch_size=64`.

Every configuration decodes with the model's generation config (beam 4, α = 0.6; the CLI's torch backend and the
pipeline use GNMT's length penalty, CTranslate2 its |Y|^α). Time is the translation loop, model loading excluded
(reported apart); BLEU is sacreBLEU against the references.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import sacrebleu  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import hf_vanilla_transformer  # noqa: E402, F401  (registers the model and the pipeline)
from hf_vanilla_transformer import export_ctranslate2, translate  # noqa: E402
from hf_vanilla_transformer.corpus import SOURCE_LANG, TARGET_LANG, build_default_corpus  # noqa: E402


def run_cli(args: list[str], source: Path, output: Path, reference: Path) -> dict:
    with contextlib.redirect_stderr(io.StringIO()):
        summary = translate.run([*args, "--input", str(source), "--output", str(output), "--reference", str(reference)])
    return {"sentences_per_s": summary["sentences_per_s"], "seconds": summary["seconds"], "bleu": summary["bleu"]}


def run_pipeline(model: str, sources: list[str], references: list[str], batch_size: int | None) -> dict:
    started = time.perf_counter()
    translator = transformers.pipeline("translation", model=model)
    load = time.perf_counter() - started
    started = time.perf_counter()
    if batch_size is None:
        outputs = [translator(sentence)[0]["translation_text"] for sentence in sources]
    else:
        outputs = [row["translation_text"] for row in translator(sources, batch_size=batch_size)]
    seconds = time.perf_counter() - started
    bleu = sacrebleu.corpus_bleu([o.strip() for o in outputs], [references]).score
    return {"sentences_per_s": len(sources) / seconds, "seconds": seconds, "bleu": bleu, "load_s": load}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default=str(ROOT / "outputs" / "vanilla-transformer"))
    parser.add_argument("--sentences", type=int, default=1000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    corpus = build_default_corpus(seed=0)
    pairs = corpus["test"]["translation"][: args.sentences]
    sources, references = [p[SOURCE_LANG] for p in pairs], [p[TARGET_LANG] for p in pairs]
    results: dict = {
        "machine": {"cpu": platform.processor(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
        "model": args.model,
        "sentences": len(sources),
        "runs": {},
    }
    with tempfile.TemporaryDirectory() as work:
        work_dir = Path(work)
        source, reference = work_dir / "src.txt", work_dir / "ref.txt"
        source.write_text("".join(f"{s}\n" for s in sources), encoding="utf-8")
        reference.write_text("".join(f"{r}\n" for r in references), encoding="utf-8")
        runs = results["runs"]
        runs["cli, torch"] = run_cli([args.model], source, work_dir / "out.txt", reference)
        print("cli, torch", runs["cli, torch"], flush=True)
        model = transformers.AutoModelForSeq2SeqLM.from_pretrained(args.model).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
        for quantization in ("float32", "int8"):
            started = time.perf_counter()
            folder = export_ctranslate2.export(model, tokenizer, work_dir / quantization, quantization)
            export_s = time.perf_counter() - started
            options = [str(folder), "--backend", "ctranslate2", "--dtype", quantization]
            name = f"cli, ctranslate2 {quantization}"
            runs[name] = {**run_cli(options, source, work_dir / "out.txt", reference), "export_s": export_s}
            print(name, runs[name], flush=True)
        runs["pipeline, one at a time"] = run_pipeline(args.model, sources, references, None)
        print("pipeline, one at a time", runs["pipeline, one at a time"], flush=True)
        runs["pipeline, batch_size=64"] = run_pipeline(args.model, sources, references, 64)
        print("pipeline, batch_size=64", runs["pipeline, batch_size=64"], flush=True)
    base = runs["pipeline, one at a time"]["sentences_per_s"]
    lines = ["| how | sentences/s | vs pipeline one at a time | BLEU |", "|---|---|---|---|"]
    for name, row in runs.items():
        lines.append(
            f"| {name} | {row['sentences_per_s']:.1f} | {row['sentences_per_s'] / base:.2f} | {row['bleu']:.2f} |"
        )
    results["table"] = lines
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
