"""Parallel data: load any supported source into the WMT14 ``translation`` format, then tokenize it (§5.1).

``load_translation_dataset`` takes exactly one kind of source:

- ``dataset_name`` (+ ``dataset_config_name``): a Hub dataset in the WMT14 format, e.g. ``("wmt14", "de-en")``, or a
  local directory written by ``Dataset(Dict).save_to_disk`` (a plain ``Dataset`` becomes the ``train`` split);
- ``train_file`` / ``validation_file`` / ``test_file``: local files, by extension:
  ``.json``/``.jsonl`` (JSON lines ``{"translation": {"en": ..., "de": ...}}``), ``.csv``/``.tsv`` (a header with one
  column per language code), or a pair of plain-text files, one sentence per line, given as
  ``"train.en,train.de"`` (source file first);
- nothing: the embedded synthetic corpus (`corpus.build_default_corpus`).

Every split comes back with one ``translation`` column of ``{source_lang: str, target_lang: str}``. Pairs with an
empty side are dropped and counted in the log; malformed data raises ``ValueError`` naming the file and line or field.
"""

import csv
import json
import logging
import os
from collections.abc import Callable

import datasets
from transformers import PreTrainedTokenizerBase

from .corpus import SOURCE_LANG, TARGET_LANG, build_default_corpus

logger = logging.getLogger(__name__)

Pairs = list[tuple[str, str]]


def load_translation_dataset(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_file: str | None = None,
    validation_file: str | None = None,
    test_file: str | None = None,
    source_lang: str = SOURCE_LANG,
    target_lang: str = TARGET_LANG,
    seed: int = 0,
) -> datasets.DatasetDict:
    """Load parallel data from a Hub name, a ``save_to_disk`` directory, local files or the embedded corpus."""
    if source_lang == target_lang:
        raise ValueError(f"source_lang and target_lang are both {source_lang!r}")
    files = {"train": train_file, "validation": validation_file, "test": test_file}
    files = {split: path for split, path in files.items() if path}
    if dataset_name and files:
        raise ValueError("give either dataset_name or local files (train_file/validation_file/test_file), not both")
    if dataset_name:
        raw = _load_named(dataset_name, dataset_config_name)
    elif files:
        raw = datasets.DatasetDict({split: _load_file(path, source_lang, target_lang) for split, path in files.items()})
    else:
        if (source_lang, target_lang) != (SOURCE_LANG, TARGET_LANG):
            raise ValueError(
                f"the embedded corpus is {SOURCE_LANG}->{TARGET_LANG}, not {source_lang}->{target_lang}; "
                "give dataset_name or train_file for other languages"
            )
        raw = build_default_corpus(seed)
    origin = dataset_name or ", ".join(files.values()) or "embedded corpus"
    return datasets.DatasetDict(
        {split: _normalise(ds, source_lang, target_lang, f"{origin} [{split}]") for split, ds in raw.items()}
    )


def _load_named(name: str, config: str | None) -> datasets.DatasetDict:
    """A ``save_to_disk`` directory if `name` is one, otherwise ``datasets.load_dataset(name, config)``."""
    if os.path.isdir(name) and any(
        os.path.exists(os.path.join(name, marker)) for marker in ("dataset_dict.json", "state.json")
    ):
        loaded = datasets.load_from_disk(name)
    else:
        loaded = datasets.load_dataset(name, config)
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict(train=loaded)
    return loaded


def _load_file(path: str, source_lang: str, target_lang: str) -> datasets.Dataset:
    """One split from a local file (or a comma-separated pair of plain-text files)."""
    # The files are parsed with the standard library rather than `load_dataset("json"/"csv")` because its pyarrow
    # and pandas errors do not say which line is bad; here every error names the file and line.
    if "," in path:
        pairs = _read_text_pair(*_split_pair(path))
    elif path.endswith((".json", ".jsonl")):
        pairs = _read_json_lines(path, source_lang, target_lang)
    elif path.endswith((".csv", ".tsv")):
        pairs = _read_table(path, source_lang, target_lang)
    else:
        raise ValueError(f"{path}: unknown format; use .json/.jsonl, .csv/.tsv or a 'source.txt,target.txt' pair")
    if not pairs:
        raise ValueError(f"{path}: no sentence pairs (empty file)")
    return datasets.Dataset.from_dict({"translation": [{source_lang: src, target_lang: tgt} for src, tgt in pairs]})


def _split_pair(path: str) -> tuple[str, str]:
    parts = [part.strip() for part in path.split(",")]
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"{path!r}: a plain-text pair is two paths joined by one comma: 'source.txt,target.txt'")
    return parts[0], parts[1]


def _read_lines(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    if not lines:
        raise ValueError(f"{path}: empty file")
    return lines


def _read_text_pair(source_path: str, target_path: str) -> Pairs:
    """Line i of the source file translates to line i of the target file."""
    sources, targets = _read_lines(source_path), _read_lines(target_path)
    if len(sources) != len(targets):
        raise ValueError(
            f"{source_path} has {len(sources)} lines but {target_path} has {len(targets)}; "
            "a plain-text pair needs one sentence per line on both sides"
        )
    return list(zip(sources, targets, strict=True))


def _read_json_lines(path: str, source_lang: str, target_lang: str) -> Pairs:
    pairs = []
    for number, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: malformed JSON ({error.msg})") from None
        translation = record.get("translation") if isinstance(record, dict) else None
        if not isinstance(translation, dict):
            raise ValueError(f"{path}:{number}: expected an object with a 'translation' field")
        pairs.append(_pair(translation, source_lang, target_lang, f"{path}:{number}: field 'translation'"))
    return pairs


def _read_table(path: str, source_lang: str, target_lang: str) -> Pairs:
    """CSV or TSV with a header row; the columns named by the language codes are used."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t" if path.endswith(".tsv") else ",")
        if reader.fieldnames is None:
            raise ValueError(f"{path}: empty file")
        for lang in (source_lang, target_lang):
            if lang not in reader.fieldnames:
                raise ValueError(f"{path}: no column {lang!r} in the header {reader.fieldnames}")
        # A short row leaves a language as None; `_pair` reports it with its line number.
        return [_pair(row, source_lang, target_lang, f"{path}:{reader.line_num}") for row in reader]


def _pair(record: dict, source_lang: str, target_lang: str, where: str) -> tuple[str, str]:
    for lang in (source_lang, target_lang):
        if not isinstance(record.get(lang), str):
            raise ValueError(f"{where}: missing language {lang!r} (found {sorted(map(str, record))})")
    return record[source_lang], record[target_lang]


def _normalise(ds: datasets.Dataset, source_lang: str, target_lang: str, origin: str) -> datasets.Dataset:
    """Reduce a split to ``translation: {source_lang, target_lang}`` and drop pairs with an empty side."""
    nested = "translation" in ds.column_names  # WMT14 style; otherwise one column per language (CSV style)
    if nested:
        languages = _translation_languages(ds.features["translation"])
        for lang in (source_lang, target_lang):
            if lang not in languages:
                raise ValueError(f"{origin}: missing language {lang!r} in field 'translation' (has {languages})")
    elif not {source_lang, target_lang} <= set(ds.column_names):
        raise ValueError(f"{origin}: no 'translation' column and no columns {source_lang!r}/{target_lang!r}")

    def to_pairs(batch: dict) -> dict:
        if nested:
            rows = [row or {} for row in batch["translation"]]
            sources, targets = [row.get(source_lang) for row in rows], [row.get(target_lang) for row in rows]
        else:
            sources, targets = batch[source_lang], batch[target_lang]
        pairs = zip(sources, targets, strict=True)
        return {"translation": [{source_lang: s or "", target_lang: t or ""} for s, t in pairs]}

    def non_empty(batch: dict) -> list[bool]:
        return [bool(t[source_lang].strip() and t[target_lang].strip()) for t in batch["translation"]]

    ds = ds.map(to_pairs, batched=True, remove_columns=ds.column_names, desc=f"normalising {origin}")
    before = len(ds)
    ds = ds.filter(non_empty, batched=True)
    if len(ds) < before:
        logger.warning("%s: dropped %d of %d pairs with an empty sentence", origin, before - len(ds), before)
    return ds


def _translation_languages(feature) -> list[str]:
    """Language codes of a ``translation`` column: a ``datasets.Translation`` or a struct of strings."""
    if isinstance(feature, datasets.Translation):
        return list(feature.languages)
    if isinstance(feature, dict):
        return list(feature)
    raise ValueError(f"field 'translation' has type {feature}, expected a dict of language -> text")


def make_preprocess(
    tokenizer: PreTrainedTokenizerBase,
    source_lang: str,
    target_lang: str,
    max_source_length: int = 128,
    max_target_length: int = 128,
) -> Callable[[dict], dict]:
    """A batched ``datasets.map`` function: source -> ``input_ids``/``attention_mask``, target -> ``labels``.

    No padding here: ``DataCollatorForSeq2Seq(tokenizer, model=model)`` pads per batch and sets label padding to -100.
    """

    def preprocess(batch: dict) -> dict:
        sources = [pair[source_lang] for pair in batch["translation"]]
        targets = [pair[target_lang] for pair in batch["translation"]]
        features = tokenizer(sources, max_length=max_source_length, truncation=True)
        labels = tokenizer(text_target=targets, max_length=max_target_length, truncation=True)
        features["labels"] = labels["input_ids"]
        return features

    return preprocess


def tokenize_dataset(
    dataset: datasets.DatasetDict,
    tokenizer: PreTrainedTokenizerBase,
    source_lang: str = SOURCE_LANG,
    target_lang: str = TARGET_LANG,
    max_source_length: int = 128,
    max_target_length: int = 128,
    num_proc: int | None = None,
) -> datasets.DatasetDict:
    """Tokenize every split with `make_preprocess`, keeping only ``input_ids``, ``attention_mask`` and ``labels``."""
    preprocess = make_preprocess(tokenizer, source_lang, target_lang, max_source_length, max_target_length)
    return datasets.DatasetDict(
        {
            split: ds.map(
                preprocess,
                batched=True,
                remove_columns=ds.column_names,
                num_proc=num_proc,
                desc=f"tokenizing {split}",
            )
            for split, ds in dataset.items()
        }
    )
