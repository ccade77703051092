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
import pyarrow as pa
import pyarrow.compute as pc
from datasets.fingerprint import Hasher
from transformers import PreTrainedTokenizerBase

from .corpus import SOURCE_LANG, TARGET_LANG, build_default_corpus

logger = logging.getLogger(__name__)


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
    """One split from a local file (or a comma-separated pair of plain-text files), through `datasets`' own loaders:
    Arrow tables, memory-mapped and cached, so a large corpus never sits in Python lists, and a second process (or
    run) reuses the first one's cache.

    pyarrow's and pandas' errors do not say which line is bad. Where a loader fails, or the loaded records miss a
    language, the file is read again line by line to raise an error that names the file and the line; clean files
    are read once, by Arrow.
    """
    if "," in path:
        return _load_text_pair(*_split_pair(path), source_lang, target_lang)
    if not path.endswith((".json", ".jsonl", ".csv", ".tsv")):
        raise ValueError(f"{path}: unknown format; use .json/.jsonl, .csv/.tsv or a 'source.txt,target.txt' pair")
    _check_not_empty(path)
    if path.endswith((".json", ".jsonl")):
        try:
            ds = datasets.load_dataset("json", data_files=path, split="train")
        except Exception as error:  # pyarrow's parse errors, datasets' DatasetGenerationError
            _read_json_lines(path, source_lang, target_lang)  # raises, naming the line
            raise ValueError(f"{path}: not JSON lines: {error}") from error
        if _missing_a_language(ds, source_lang, target_lang):
            _read_json_lines(path, source_lang, target_lang)
    else:
        delimiter = "\t" if path.endswith(".tsv") else ","
        header = _read_header(path, delimiter)
        for lang in (source_lang, target_lang):
            if lang not in header:
                raise ValueError(f"{path}: no column {lang!r} in the header {header}")
        # Every column as text, and no pandas NA parsing: a sentence "NA" or "null" stays a sentence.
        features = datasets.Features({name: datasets.Value("string") for name in header})
        ds = datasets.load_dataset(
            "csv", data_files=path, split="train", delimiter=delimiter, features=features, keep_default_na=False
        )
        if _count_empty(ds, source_lang, target_lang):  # an empty cell, or a short row: only the file can tell
            _read_table(path, delimiter, source_lang, target_lang)
    if len(ds) == 0:
        raise ValueError(f"{path}: no sentence pairs (empty file)")
    return ds


def _load_text_pair(source_path: str, target_path: str, source_lang: str, target_lang: str) -> datasets.Dataset:
    """Line i of the source file translates to line i of the target file: one column per language."""
    sides = []
    for path, lang in ((source_path, source_lang), (target_path, target_lang)):
        _check_not_empty(path)
        sides.append(datasets.load_dataset("text", data_files=path, split="train").rename_column("text", lang))
    if len(sides[0]) != len(sides[1]):
        raise ValueError(
            f"{source_path} has {len(sides[0])} lines but {target_path} has {len(sides[1])}; "
            "a plain-text pair needs one sentence per line on both sides"
        )
    return datasets.concatenate_datasets(sides, axis=1)


def _check_not_empty(path: str) -> None:
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path}: empty file")


def _read_header(path: str, delimiter: str) -> list[str]:
    with open(path, encoding="utf-8", newline="") as f:
        header = next(csv.reader(f, delimiter=delimiter), None)
    if not header:
        raise ValueError(f"{path}: empty file")
    return header


def _missing_a_language(ds: datasets.Dataset, source_lang: str, target_lang: str) -> bool:
    """Whether some record lacks the `translation` field or one of the two languages, or has a non-text one
    (from Arrow's types and null counts)."""
    if "translation" not in ds.column_names:
        return True
    column = ds.data.column("translation")
    if column.null_count or not pa.types.is_struct(column.type):  # records of varying shape load as JSON objects
        return True
    for lang in (source_lang, target_lang):
        index = column.type.get_field_index(lang)
        if index < 0 or not pa.types.is_string(column.type.field(index).type):
            return True
        if pc.struct_field(column, [index]).null_count:
            return True
    return False


def _count_empty(ds: datasets.Dataset, source_lang: str, target_lang: str) -> int:
    return sum(pc.sum(pc.equal(ds.data.column(lang), "")).as_py() or 0 for lang in (source_lang, target_lang))


def _split_pair(path: str) -> tuple[str, str]:
    parts = [part.strip() for part in path.split(",")]
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"{path!r}: a plain-text pair is two paths joined by one comma: 'source.txt,target.txt'")
    return parts[0], parts[1]


def _read_json_lines(path: str, source_lang: str, target_lang: str) -> None:
    """Check a JSON-lines file line by line (streamed, one line in memory); raise a ValueError naming the first bad
    line."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: malformed JSON ({error.msg})") from None
            translation = record.get("translation") if isinstance(record, dict) else None
            if not isinstance(translation, dict):
                raise ValueError(f"{path}:{number}: expected an object with a 'translation' field")
            _check_pair(translation, source_lang, target_lang, f"{path}:{number}: field 'translation'")


def _read_table(path: str, delimiter: str, source_lang: str, target_lang: str) -> None:
    """Check a CSV or TSV file row by row: a short row (a language missing) raises a ValueError naming its line."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        for row in reader:  # a short row leaves a language as None; `_check_pair` reports it with its line number
            _check_pair(row, source_lang, target_lang, f"{path}:{reader.line_num}")


def _check_pair(record: dict, source_lang: str, target_lang: str, where: str) -> None:
    for lang in (source_lang, target_lang):
        if record.get(lang) is None:
            raise ValueError(f"{where}: missing language {lang!r} (found {sorted(map(str, record))})")
        if not isinstance(record[lang], str):
            raise ValueError(f"{where}: language {lang!r} is not text: {record[lang]!r}")


def _normalise(ds: datasets.Dataset, source_lang: str, target_lang: str, origin: str) -> datasets.Dataset:
    """Reduce a split to ``translation: {source_lang, target_lang}`` and drop pairs with an empty side."""
    nested = "translation" in ds.column_names  # WMT14 style; otherwise one column per language (CSV style)
    if nested:
        languages = _translation_languages(ds.features["translation"])
        for lang in (source_lang, target_lang):
            if languages is not None and lang not in languages:
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

    # Explicit features: the languages in (source, target) order, whatever order the input's struct had.
    features = datasets.Features(
        {"translation": {lang: datasets.Value("string") for lang in (source_lang, target_lang)}}
    )
    ds = ds.map(to_pairs, batched=True, remove_columns=ds.column_names, features=features, desc=f"normalising {origin}")
    before = len(ds)
    ds = ds.filter(non_empty, batched=True)
    if len(ds) < before:
        logger.warning("%s: dropped %d of %d pairs with an empty sentence", origin, before - len(ds), before)
    return ds


def _translation_languages(feature) -> list[str] | None:
    """Language codes of a ``translation`` column: a ``datasets.Translation`` or a struct of strings."""
    if isinstance(feature, datasets.Translation):
        return list(feature.languages)
    if isinstance(feature, dict):
        return list(feature)
    if isinstance(feature, datasets.Json):  # JSON lines whose records vary in shape, already checked line by line
        return None
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
    settings = (_tokenizer_identity(tokenizer), source_lang, target_lang, max_source_length, max_target_length)
    return datasets.DatasetDict(
        {
            split: ds.map(
                preprocess,
                batched=True,
                remove_columns=ds.column_names,
                num_proc=num_proc,
                new_fingerprint=None if settings[0] is None else Hasher.hash((ds._fingerprint, *settings)),
                desc=f"tokenizing {split}",
            )
            for split, ds in dataset.items()
        }
    )


def _tokenizer_identity(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """What decides a fast tokenizer's ids, the same in every process: its `tokenizers` JSON, parsed and re-written
    with sorted keys (the vocabulary is a hash map that each process writes in its own order), without the truncation
    and padding that the last call left in it. The tokenized splits' cache is named after it, so that every process
    of a run finds the main process's cache files. None for a slow tokenizer: `datasets` hashes the function."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    state = json.loads(backend.to_str())
    for transient in ("truncation", "padding"):  # set by the last call's arguments, not part of the vocabulary
        state.pop(transient, None)
    return json.dumps([state, tokenizer.model_max_length], sort_keys=True)
