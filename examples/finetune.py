#!/usr/bin/env python
"""Fine-tune a saved hf-vanilla-transformer checkpoint with a plain Seq2SeqTrainer script, the way you would any
transformers translation model.

    python examples/finetune.py outputs/vanilla-transformer my-finetuned --max_steps 500
    python examples/finetune.py user/vanilla-transformer my-finetuned --train_file pairs.jsonl --source_lang en \
        --target_lang de   # one {"en": "...", "de": "..."} object per line

Without a --train_file it fine-tunes on the package's embedded synthetic corpus (no network needed). BLEU is
computed offline with the packaged sacreBLEU metric on generated text (`predict_with_generate=True`).
"""

from __future__ import annotations

import argparse

import datasets
from transformers import (
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    PreTrainedTokenizerBase,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
)

from hf_vanilla_transformer.corpus import SOURCE_LANG, TARGET_LANG, build_default_corpus
from hf_vanilla_transformer.metrics import build_compute_metrics


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="Saved model folder or Hub repo id (weights, config, tokenizer).")
    parser.add_argument("output_dir", help="Where the fine-tuned model is saved.")
    parser.add_argument("--max_steps", type=int, default=500)
    parser.add_argument("--train_file", help='JSON lines, one {"<source_lang>": ..., "<target_lang>": ...} per line.')
    parser.add_argument("--source_lang", default=SOURCE_LANG)
    parser.add_argument("--target_lang", default=TARGET_LANG)
    parser.add_argument("--num_examples", type=int, default=2000, help="Training pairs of the embedded corpus.")
    parser.add_argument("--num_eval", type=int, default=64, help="Pairs held out for BLEU.")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trust_remote_code", action="store_true", help="Load without hf_vanilla_transformer.")
    return parser.parse_args(argv)


def load_pairs(args: argparse.Namespace) -> datasets.DatasetDict:
    """train / validation splits of {"translation": {source_lang: ..., target_lang: ...}} rows."""
    if args.train_file is None:
        corpus = build_default_corpus(args.seed, args.num_examples, args.num_eval, num_test=1)
        return datasets.DatasetDict(train=corpus["train"], validation=corpus["validation"])
    rows = datasets.load_dataset("json", data_files=args.train_file, split="train")
    src, tgt = args.source_lang, args.target_lang
    rows = rows.map(lambda row: {"translation": {src: row[src], tgt: row[tgt]}}, remove_columns=rows.column_names)
    split = rows.train_test_split(test_size=args.num_eval, seed=args.seed)
    return datasets.DatasetDict(train=split["train"], validation=split["test"])


def tokenize(pairs: datasets.DatasetDict, tokenizer: PreTrainedTokenizerBase, args: argparse.Namespace):
    def preprocess(batch: dict) -> dict:
        sources = [pair[args.source_lang] for pair in batch["translation"]]
        targets = [pair[args.target_lang] for pair in batch["translation"]]
        return tokenizer(sources, text_target=targets, max_length=128, truncation=True)  # labels from text_target

    return pairs.map(preprocess, batched=True, remove_columns=["translation"])


def main(argv: list[str] | None = None) -> dict:
    """Fine-tune, report BLEU, save; returns the fine-tuned model, its logged training losses and eval metrics."""
    args = parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint, trust_remote_code=args.trust_remote_code)
    model = AutoModelForSeq2SeqLM.from_pretrained(args.checkpoint, trust_remote_code=args.trust_remote_code)
    data = tokenize(load_pairs(args), tokenizer, args)
    training_args = Seq2SeqTrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        warmup_steps=min(100, args.max_steps // 10),
        adam_beta2=0.98,  # the paper's Adam (§5.3)
        adam_epsilon=1e-9,
        label_smoothing_factor=0.1,  # §5.4
        logging_steps=max(1, args.max_steps // 10),
        save_strategy="no",
        predict_with_generate=True,  # BLEU on generated text, with the checkpoint's generation config (beam 4)
        generation_max_length=64,
        report_to="none",
        seed=args.seed,
    )
    trainer = Seq2SeqTrainer(
        model=model,
        args=training_args,
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=model),  # pads; labels -> -100; decoder_input_ids
        processing_class=tokenizer,
        compute_metrics=build_compute_metrics(tokenizer),
    )
    trainer.train()
    metrics = trainer.evaluate()
    print(f"BLEU after fine-tuning: {metrics['eval_bleu']:.2f}")
    trainer.save_model(args.output_dir)  # weights, config with auto_map, model code, tokenizer, generation config
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {"model": trainer.model, "losses": losses, **metrics}


if __name__ == "__main__":
    main()
