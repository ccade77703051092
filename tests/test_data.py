"""load_translation_dataset over every supported source, the bad-data errors, and tokenization for the collator."""

import csv
import json
import logging
from pathlib import Path

import datasets
import pytest
from transformers import DataCollatorForSeq2Seq

from hf_vanilla_transformer.data import load_translation_dataset, make_preprocess, tokenize_dataset
from hf_vanilla_transformer.tokenization import train_tokenizer

PAIRS = [("Hello world.", "Hallo Welt."), ("A cat sleeps.", "Eine Katze schläft."), ("Thank you!", "Danke!")]


def pairs_of(split: datasets.Dataset, src: str = "en", tgt: str = "de") -> list[tuple[str, str]]:
    return [(t[src], t[tgt]) for t in split["translation"]]


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return str(path)


def write_lines(path, lines) -> str:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


@pytest.fixture
def jsonl(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", [{"translation": {"en": s, "de": t}} for s, t in PAIRS])


# --- sources --------------------------------------------------------------------------------------------------------


def test_default_is_the_embedded_corpus():
    ds = load_translation_dataset()
    assert set(ds) == {"train", "validation", "test"}
    assert len(ds["train"]) == 30_000 and set(ds["train"][0]["translation"]) == {"xa", "xb"}


def test_embedded_corpus_only_in_its_own_languages():
    with pytest.raises(ValueError, match="embedded corpus is xa->xb"):
        load_translation_dataset(source_lang="en", target_lang="de")


def test_json_lines(jsonl, tmp_path):
    ds = load_translation_dataset(train_file=jsonl, validation_file=jsonl, source_lang="en", target_lang="de")
    assert set(ds) == {"train", "validation"}
    assert pairs_of(ds["train"]) == PAIRS


def test_direction_follows_the_language_codes(jsonl):
    ds = load_translation_dataset(train_file=jsonl, source_lang="de", target_lang="en")
    assert pairs_of(ds["train"], "de", "en") == [(t, s) for s, t in PAIRS]
    assert list(ds["train"][0]["translation"]) == ["de", "en"]


@pytest.mark.parametrize("suffix, delimiter", [(".csv", ","), (".tsv", "\t")])
def test_csv_and_tsv(tmp_path, suffix, delimiter):
    path = tmp_path / f"train{suffix}"
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(["id", "de", "en"])  # column order and extra columns do not matter
        writer.writerows([i, t, s] for i, (s, t) in enumerate(PAIRS))
    ds = load_translation_dataset(train_file=str(path), source_lang="en", target_lang="de")
    assert pairs_of(ds["train"]) == PAIRS
    assert ds["train"].column_names == ["translation"]


def test_plain_text_pair(tmp_path):
    src = write_lines(tmp_path / "train.en", [s for s, _ in PAIRS])
    tgt = write_lines(tmp_path / "train.de", [t for _, t in PAIRS])
    ds = load_translation_dataset(train_file=f"{src},{tgt}", source_lang="en", target_lang="de")
    assert pairs_of(ds["train"]) == PAIRS


def test_save_to_disk_directory(tmp_path):
    original = load_translation_dataset()
    small = datasets.DatasetDict({name: split.select(range(5)) for name, split in original.items()})
    small.save_to_disk(tmp_path / "saved")
    ds = load_translation_dataset(dataset_name=str(tmp_path / "saved"))
    assert {name: pairs_of(split, "xa", "xb") for name, split in ds.items()} == {
        name: pairs_of(split, "xa", "xb") for name, split in small.items()
    }


def test_saved_wmt14_style_dataset_with_translation_feature_and_columns(tmp_path):
    """The Hub's WMT14 schema: a `datasets.Translation` feature; a plain Dataset becomes the train split."""
    features = datasets.Features({"translation": datasets.Translation(languages=["de", "en"])})
    records = {"translation": [{"de": t, "en": s} for s, t in PAIRS]}
    datasets.Dataset.from_dict(records, features=features).save_to_disk(tmp_path / "wmt")
    ds = load_translation_dataset(dataset_name=str(tmp_path / "wmt"), source_lang="en", target_lang="de")
    assert list(ds) == ["train"] and pairs_of(ds["train"]) == PAIRS
    with pytest.raises(ValueError, match="missing language 'fr' in field 'translation'"):
        load_translation_dataset(dataset_name=str(tmp_path / "wmt"), source_lang="en", target_lang="fr")


def test_saved_dataset_with_one_column_per_language(tmp_path):
    records = {"id": [0, 1, 2], "de": [t for _, t in PAIRS], "en": [s for s, _ in PAIRS]}
    datasets.Dataset.from_dict(records).save_to_disk(tmp_path / "columns")
    ds = load_translation_dataset(dataset_name=str(tmp_path / "columns"), source_lang="en", target_lang="de")
    assert pairs_of(ds["train"]) == PAIRS and ds["train"].column_names == ["translation"]
    with pytest.raises(ValueError, match="no 'translation' column and no columns 'en'/'fr'"):
        load_translation_dataset(dataset_name=str(tmp_path / "columns"), source_lang="en", target_lang="fr")


def test_hub_name_goes_to_load_dataset(monkeypatch):
    """No network in tests: check that a Hub name and config reach `datasets.load_dataset` and are normalised."""
    calls = []

    def fake_load_dataset(name, config):
        calls.append((name, config))
        split = datasets.Dataset.from_dict({"translation": [{"de": t, "en": s} for s, t in PAIRS]})
        return datasets.DatasetDict(train=split, validation=split)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = load_translation_dataset(dataset_name="wmt14", dataset_config_name="de-en", source_lang="en", target_lang="de")
    assert calls == [("wmt14", "de-en")]
    assert pairs_of(ds["validation"]) == PAIRS


def test_empty_sentences_are_dropped_and_counted(tmp_path, caplog):
    records = [{"translation": {"en": s, "de": t}} for s, t in [*PAIRS, ("  ", "leer"), ("empty", "")]]
    path = write_jsonl(tmp_path / "train.jsonl", records)
    with caplog.at_level(logging.WARNING, logger="hf_vanilla_transformer.data"):
        ds = load_translation_dataset(train_file=path, source_lang="en", target_lang="de")
    assert pairs_of(ds["train"]) == PAIRS
    assert "dropped 2 of 5 pairs with an empty sentence" in caplog.text


# --- bad data -------------------------------------------------------------------------------------------------------


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"translation": {"en": "a", "de": "b"}}\n{"translation": {"en": "c", "de": \n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: malformed JSON"):
        load_translation_dataset(train_file=str(path), source_lang="en", target_lang="de")


def test_missing_language_names_file_line_and_field(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"translation": {"en": "a", "de": "b"}}, {"translation": {"en": "c"}}])
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: field 'translation': missing language 'de'"):
        load_translation_dataset(train_file=path, source_lang="en", target_lang="de")


def test_json_line_without_translation_field(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"en": "a", "de": "b"}])
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: expected an object with a 'translation' field"):
        load_translation_dataset(train_file=path, source_lang="en", target_lang="de")


def test_csv_missing_column_and_short_row(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("en,fr\na,b\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.csv: no column 'de'"):
        load_translation_dataset(train_file=str(path), source_lang="en", target_lang="de")
    path.write_text("en,de\na,b\nc\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.csv:3: missing language 'de'"):
        load_translation_dataset(train_file=str(path), source_lang="en", target_lang="de")


@pytest.mark.parametrize("name", ["empty.jsonl", "empty.csv", "empty.en"])
def test_empty_file(tmp_path, name):
    path = tmp_path / name
    path.write_text("", encoding="utf-8")
    train_file = f"{path},{write_lines(tmp_path / 'other.de', ['x'])}" if name.endswith(".en") else str(path)
    with pytest.raises(ValueError, match=rf"{name}: empty file"):
        load_translation_dataset(train_file=train_file, source_lang="en", target_lang="de")


def test_plain_text_pair_with_mismatched_line_counts(tmp_path):
    src = write_lines(tmp_path / "train.en", ["a", "b", "c"])
    tgt = write_lines(tmp_path / "train.de", ["x", "y"])
    with pytest.raises(ValueError, match=r"train\.en has 3 lines but .*train\.de has 2"):
        load_translation_dataset(train_file=f"{src},{tgt}", source_lang="en", target_lang="de")


def test_unknown_format_and_conflicting_sources(tmp_path, jsonl):
    with pytest.raises(ValueError, match="unknown format"):
        load_translation_dataset(train_file=str(tmp_path / "train.parquet"), source_lang="en", target_lang="de")
    with pytest.raises(ValueError, match="not both"):
        load_translation_dataset(dataset_name="wmt14", train_file=jsonl)
    with pytest.raises(ValueError, match="both 'en'"):
        load_translation_dataset(train_file=jsonl, source_lang="en", target_lang="en")


# --- tokenization ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([text for pair in PAIRS for text in pair] * 5, vocab_size=400)


def test_preprocess_tokenizes_without_padding(tokenizer):
    batch = {"translation": [{"en": s, "de": t} for s, t in PAIRS]}
    features = make_preprocess(tokenizer, "en", "de", max_source_length=64, max_target_length=64)(batch)
    assert features["input_ids"] == tokenizer([s for s, _ in PAIRS])["input_ids"]
    assert features["labels"] == tokenizer([t for _, t in PAIRS])["input_ids"]
    assert len({len(ids) for ids in features["labels"]}) > 1  # not padded to a common length
    assert all(ids[-1] == tokenizer.eos_token_id for ids in features["input_ids"] + features["labels"])


def test_preprocess_truncates_each_side_to_its_own_length(tokenizer):
    batch = {"translation": [{"en": "Hello world. " * 10, "de": "Hallo Welt. " * 10}]}
    features = make_preprocess(tokenizer, "en", "de", max_source_length=7, max_target_length=5)(batch)
    assert len(features["input_ids"][0]) == 7 and len(features["labels"][0]) == 5
    assert features["labels"][0][-1] == tokenizer.eos_token_id


def test_tokenize_dataset_feeds_the_seq2seq_collator(tokenizer, jsonl):
    raw = load_translation_dataset(train_file=jsonl, validation_file=jsonl, source_lang="en", target_lang="de")
    tokenized = tokenize_dataset(raw, tokenizer, "en", "de")
    assert set(tokenized) == {"train", "validation"}
    assert sorted(tokenized["train"].column_names) == ["attention_mask", "input_ids", "labels"]
    batch = DataCollatorForSeq2Seq(tokenizer)([tokenized["train"][i] for i in range(3)])
    lengths = [len(ids) for ids in tokenized["train"]["labels"]]
    assert batch["labels"].shape == (3, max(lengths))
    for row, n in zip(batch["labels"], lengths, strict=True):
        assert (row[n:] == -100).all() and (row[:n] != -100).all()
    assert (batch["input_ids"][batch["attention_mask"] == 0] == tokenizer.pad_token_id).all()


def test_local_files_are_arrow_tables_on_disk_not_python_lists(tmp_path, jsonl):
    """Through `datasets`' loaders: memory-mapped Arrow files in the cache (which a second process reuses), for each
    format; and a CSV cell that pandas would read as a number or as missing ("2", "NA") stays the sentence it is."""
    (tmp_path / "t.csv").write_text('en,de\n2,NA\n"a, b",null\n', encoding="utf-8")
    src, tgt = write_lines(tmp_path / "t.en", ["a", "b"]), write_lines(tmp_path / "t.de", ["x", "y"])
    for train_file in (jsonl, str(tmp_path / "t.csv"), f"{src},{tgt}"):
        split = load_translation_dataset(train_file=train_file, source_lang="en", target_lang="de")["train"]
        assert split.cache_files and all(Path(f["filename"]).exists() for f in split.cache_files), train_file
    pairs = load_translation_dataset(train_file=str(tmp_path / "t.csv"), source_lang="en", target_lang="de")["train"]
    assert pairs_of(pairs) == [("2", "NA"), ("a, b", "null")]


def test_a_sentence_that_is_not_text_names_its_line(tmp_path):
    records = [{"translation": {"en": "a", "de": "b"}}, {"translation": {"en": 7, "de": "c"}}]
    path = write_jsonl(tmp_path / "bad.jsonl", records)
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: field 'translation': language 'en' is not text: 7"):
        load_translation_dataset(train_file=path, source_lang="en", target_lang="de")
