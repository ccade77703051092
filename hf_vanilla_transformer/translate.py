"""Translate a file, one sentence per line, with a trained model: fairseq-interactive / marian-decoder for this model.

    python -m hf_vanilla_transformer.translate MODEL [--input src.txt] [--output out.txt] [--reference ref.txt]
    vanilla-translate MODEL < src.txt > out.txt                        (the same, as a console script)

MODEL is a folder `train.py` wrote (or a Hub id). Lines are read as UTF-8 from `--input` (default stdin) and their
translations written in the same order to `--output` (default stdout); an empty line gives an empty line. Sentences
are sorted by length and batched by tokens (`--max_tokens` source tokens a batch, the project's token batching),
then put back in order. `--backend ctranslate2` translates with CTranslate2 on a conversion made on the fly (or on
a folder `export_ctranslate2` wrote). With `--reference`, sacreBLEU and its signature are printed at the end (and,
with `--paper_bleu`, BLEU as the paper's Table 2 counted it, for German targets).

Decoding follows the model's generation config: §6.1's beam 4, GNMT's length penalty and input length + 50, unless
`--num_beams` says otherwise. Bad input stops with an error naming the line: invalid UTF-8, or a sentence longer
than the model can encode (learned positions, or CTranslate2's fixed table) unless `--truncate`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from . import cpu_inference
from .batching import TokenBatchSampler
from .metrics import BLEU_SIGNATURE, PAPER_BLEU_SIGNATURE, paper_bleu

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CT2_COMPUTE_TYPES = ("float32", "bfloat16", "float16", "int8", "int8_float32")


def read_lines(path: str | None, what: str = "input") -> list[str]:
    """The lines of `path` (stdin if None) as text, without line endings; a ValueError names a line that is not
    valid UTF-8."""
    data = sys.stdin.buffer.read() if path in (None, "-") else Path(path).read_bytes()
    name = "stdin" if path in (None, "-") else str(path)
    raw_lines = data.split(b"\n")
    if raw_lines and raw_lines[-1] == b"":
        raw_lines.pop()  # the newline that ends the last line
    lines = []
    for number, raw in enumerate(raw_lines, 1):
        try:
            lines.append(raw.decode("utf-8").removesuffix("\r"))
        except UnicodeDecodeError as error:
            raise ValueError(
                f"{what} {name}, line {number}: not valid UTF-8 "
                f"(byte {raw[error.start]:#04x} at byte {error.start + 1})"
            ) from None
    return lines


def source_limit(config: Any, backend: str) -> int | None:
    """The most source tokens the model can encode: the rows of a learned position table, or of the sinusoid table
    CTranslate2 is given; None for sinusoids in torch, which extend to any length (§3.5)."""
    if backend == "ctranslate2" or config.position_embedding_type == "learned":
        return config.max_position_embeddings
    return None


def encode(tokenizer: Any, lines: Sequence[str], limit: int | None, truncate: bool) -> dict[int, list[int]]:
    """Token ids of each non-empty line, by line index (0-based), ending in EOS as in training. A line over `limit`
    tokens is an error naming it, or with `truncate` is cut to `limit` (its last token stays EOS)."""
    indices = [i for i, line in enumerate(lines) if line.strip()]
    ids = tokenizer([lines[i] for i in indices])["input_ids"] if indices else []
    encoded = {}
    for index, row in zip(indices, ids, strict=True):
        if limit is not None and len(row) > limit:
            if not truncate:
                raise ValueError(
                    f"line {index + 1} is {len(row)} tokens long, more than the {limit} this model can encode; "
                    "pass --truncate to cut such lines"
                )
            row = [*row[: limit - 1], row[-1]]
        encoded[index] = row
    return encoded


def batches(encoded: dict[int, list[int]], max_tokens: int) -> Iterator[list[int]]:
    """Line indices in batches of similar length, about `max_tokens` padded source tokens each (§5.1 batching)."""
    indices = list(encoded)
    if not indices:
        return
    sampler = TokenBatchSampler([len(encoded[i]) for i in indices], max_tokens, shuffle=False)
    for batch in sampler:
        yield [indices[position] for position in batch]


class TorchBackend:
    """`generate()` of the transformers model, with the model's generation config (§6.1 by default). The model, the
    command's own, is converted once for CPU inference (`cpu_inference.optimize_for_cpu_inference`; nothing changes
    off CPU or in bf16)."""

    def __init__(self, model: Any, tokenizer: Any, num_beams: int | None) -> None:
        self.model, self.tokenizer = cpu_inference.optimize_for_cpu_inference(model), tokenizer
        self.options = {} if num_beams is None else {"num_beams": num_beams}

    def translate(self, rows: list[list[int]]) -> list[str]:
        inputs = self.tokenizer.pad({"input_ids": rows}, return_tensors="pt").to(self.model.device)
        with torch.inference_mode():
            output = self.model.generate(**inputs, **self.options)
        return [text.strip() for text in self.tokenizer.batch_decode(output, skip_special_tokens=True)]


class CTranslate2Backend:
    """CTranslate2's `translate_batch` on token strings, with the beam size and α of the model's generation config
    (CTranslate2's length penalty is |Y|^α) and at most the longest source + 50 new tokens per batch. `num_beams`,
    the command line's, overrides the generation config's beam size, as it does for `TorchBackend`."""

    def __init__(
        self,
        model_dir: Path,
        tokenizer: Any,
        generation: Any,
        compute_type: str,
        device: str,
        num_beams: int | None = None,
    ) -> None:
        from .export_ctranslate2 import import_ctranslate2

        ctranslate2 = import_ctranslate2()
        threads = torch.get_num_threads()
        self.translator = ctranslate2.Translator(
            str(model_dir), device=device, compute_type=compute_type, inter_threads=1, intra_threads=threads
        )
        self.tokenizer, self.generation = tokenizer, generation
        self.num_beams = (generation.num_beams if num_beams is None else num_beams) or 1

    def translate(self, rows: list[list[int]]) -> list[str]:
        offset = getattr(self.generation, "max_length_offset", None) or 50
        results = self.translator.translate_batch(
            [self.tokenizer.convert_ids_to_tokens(row) for row in rows],
            beam_size=self.num_beams,
            length_penalty=self.generation.length_penalty if self.num_beams > 1 else 1.0,
            max_decoding_length=max(len(row) for row in rows) + offset,
            max_input_length=0,  # CTranslate2 would otherwise cut sources at 1024 tokens without a word
        )
        ids = [self.tokenizer.convert_tokens_to_ids(result.hypotheses[0]) for result in results]
        return [text.strip() for text in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]


def load_backend(args: argparse.Namespace, workdir: Path) -> tuple[Any, Any, Any]:
    """(backend, tokenizer, model config) for the command line's choices; converts to CTranslate2 on the fly when
    MODEL is a transformers folder rather than an exported one. Either backend decodes with the generation config
    it finds (the model's, or the one an export saved), overridden by `--num_beams`."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    exported = (Path(args.model) / "model.bin").is_file()
    if args.backend == "torch" or not exported:
        model = AutoModelForSeq2SeqLM.from_pretrained(args.model, dtype=DTYPES.get(args.dtype, torch.float32))
        model = model.to(args.device).eval()
        config, generation = model.config, model.generation_config
        if args.backend == "torch":
            return TorchBackend(model, tokenizer, args.num_beams), tokenizer, config
        from .export_ctranslate2 import export

        model_dir = export(model.float(), tokenizer, workdir / "ctranslate2")
    else:  # an export_ctranslate2 folder: the config and generation config it saved (or those of --model_config)
        from .configuration_vanilla_transformer import VanillaTransformerConfig
        from .export_ctranslate2 import MODEL_CONFIG_NAME

        model_dir = Path(args.model)
        if args.model_config:
            config = AutoConfig.from_pretrained(args.model_config)
            generation = GenerationConfig.from_pretrained(args.model_config)
        else:
            config = VanillaTransformerConfig.from_json_file(model_dir / MODEL_CONFIG_NAME)
            generation = GenerationConfig.from_pretrained(model_dir)
    compute_type = args.dtype if args.dtype in CT2_COMPUTE_TYPES else "float32"
    backend = CTranslate2Backend(model_dir, tokenizer, generation, compute_type, args.device, args.num_beams)
    return backend, tokenizer, config


def report_bleu(hypotheses: list[str], reference_path: str, with_paper: bool) -> dict[str, Any]:
    """sacreBLEU (and the paper's tokenised BLEU) of `hypotheses` against the reference file, with signatures."""
    import sacrebleu

    references = read_lines(reference_path, what="reference")
    if len(references) != len(hypotheses):
        raise ValueError(f"--reference {reference_path} has {len(references)} lines, the input {len(hypotheses)}.")
    scores: dict[str, Any] = {"bleu": sacrebleu.corpus_bleu(hypotheses, [references]).score}
    scores["bleu_signature"] = BLEU_SIGNATURE
    if with_paper:
        scores["bleu_paper"] = paper_bleu(hypotheses, references)
        scores["bleu_paper_signature"] = PAPER_BLEU_SIGNATURE
    return scores


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="vanilla-translate",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    parser.add_argument("model", help="a folder train.py or export_ctranslate2 wrote, or a Hub model id")
    parser.add_argument("--input", help="source sentences, one per line (default: stdin)")
    parser.add_argument("--output", help="where to write the translations (default: stdout)")
    parser.add_argument("--reference", help="reference translations: print BLEU and its signature at the end")
    parser.add_argument("--paper_bleu", action="store_true", help="also BLEU as Table 2 counted it (German targets)")
    parser.add_argument("--num_beams", type=int, help="beam size (default: the model's generation config, 4)")
    parser.add_argument("--max_tokens", type=int, default=4000, help="padded source tokens per batch")
    parser.add_argument("--backend", choices=("torch", "ctranslate2"), default="torch")
    parser.add_argument("--device", default="cpu", help="torch device, or CTranslate2's cpu/cuda")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=sorted({*DTYPES, *CT2_COMPUTE_TYPES}),
        help="weights and compute: float32, bfloat16, float16; CTranslate2 also int8, int8_float32",
    )
    parser.add_argument("--truncate", action="store_true", help="cut sentences longer than the model can encode")
    parser.add_argument("--model_config", help="with an exported CTranslate2 folder: take the config from this model")
    args = parser.parse_args(argv)
    if args.backend == "torch" and args.dtype not in DTYPES:
        parser.error(f"--dtype {args.dtype} needs --backend ctranslate2")
    if args.max_tokens <= 0:
        parser.error(f"--max_tokens must be positive, got {args.max_tokens}")
    return args


def main(argv: list[str] | None = None) -> int:
    """The command line (and the `vanilla-translate` console script): 0 on success."""
    run(argv)
    return 0


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Translate as the command line says; returns the counts, the time and, with `--reference`, the scores."""
    args = parse_args(argv)
    lines = read_lines(args.input)
    with tempfile.TemporaryDirectory() as workdir:
        backend, tokenizer, config = load_backend(args, Path(workdir))
        encoded = encode(tokenizer, lines, source_limit(config, args.backend), args.truncate)
        hypotheses = [""] * len(lines)
        started = time.perf_counter()
        progress = _progress(len(encoded))
        for batch in batches(encoded, args.max_tokens):
            for index, text in zip(batch, backend.translate([encoded[i] for i in batch]), strict=True):
                hypotheses[index] = text
            progress.update(len(batch))
        progress.close()
        seconds = time.perf_counter() - started
    text = "".join(f"{hypothesis}\n" for hypothesis in hypotheses)
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
        sys.stdout.flush()
    summary: dict[str, Any] = {"sentences": len(lines), "seconds": seconds}
    summary["sentences_per_s"] = len(lines) / seconds if seconds else 0.0
    print(f"{len(lines)} lines in {seconds:.1f} s ({summary['sentences_per_s']:.1f} lines/s)", file=sys.stderr)
    if args.reference:
        scores = report_bleu(hypotheses, args.reference, args.paper_bleu)
        summary.update(scores)
        print(f"BLEU = {scores['bleu']:.2f} ({scores['bleu_signature']})", file=sys.stderr)
        if "bleu_paper" in scores:
            print(f"BLEU as Table 2 = {scores['bleu_paper']:.2f} ({scores['bleu_paper_signature']})", file=sys.stderr)
    return summary


def _progress(total: int) -> Any:
    """A progress bar on an interactive terminal (stderr), nothing otherwise."""
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="line", disable=not sys.stderr.isatty(), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
