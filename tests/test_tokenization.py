"""The shared BPE tokenizer: fixed special ids, eos appended, reversible, save/load, labels from text_target."""

import time

import pytest
from transformers import AutoTokenizer

from hf_vanilla_transformer.corpus import build_default_corpus
from hf_vanilla_transformer.tokenization import train_tokenizer

NORMAL_TEXT = [
    "Resumption of the session.",
    "Wiederaufnahme der Sitzungsperiode – übermorgen, 3,5 % mehr!",
    'He said: "it\'s 10:30" (roughly).',
    "naïve café, smörgåsbord; 東京",
]


def corpus_texts(num_train: int) -> list[str]:
    pairs = build_default_corpus(seed=0, num_train=num_train, num_validation=1, num_test=1)["train"]["translation"]
    return [text for pair in pairs for text in pair.values()]


@pytest.fixture(scope="module")
def texts():
    return corpus_texts(2000) + NORMAL_TEXT


@pytest.fixture(scope="module")
def tokenizer(texts):
    return train_tokenizer(texts, vocab_size=3000)


def test_special_token_ids_match_the_model_defaults(tokenizer):
    ids = (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id)
    assert ids == (0, 1, 2, 3)
    assert tokenizer.convert_ids_to_tokens([0, 1, 2, 3]) == ["<pad>", "<s>", "</s>", "<unk>"]


def test_eos_appended_and_no_bos(tokenizer):
    ids = tokenizer("nu naro nofa")["input_ids"]
    assert ids[-1] == 2
    assert 1 not in ids and ids.count(2) == 1


def test_vocab_size_is_respected(tokenizer):
    assert len(tokenizer) == 3000


@pytest.mark.parametrize("index", range(len(NORMAL_TEXT)))
def test_round_trip_normal_text(tokenizer, index):
    text = NORMAL_TEXT[index]
    ids = tokenizer(text)["input_ids"]
    assert 3 not in ids  # byte-level: nothing is unknown, not even unseen characters
    assert tokenizer.decode(ids, skip_special_tokens=True).strip() == text


def test_round_trip_corpus(tokenizer, texts):
    encoded = tokenizer(texts[:500])["input_ids"]
    assert [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in encoded] == texts[:500]


def test_words_of_the_training_text_become_single_tokens():
    texts = corpus_texts(2000)
    tokenizer = train_tokenizer(texts)  # 37000 > number of words: every frequent word is merged whole
    word = texts[0].split()[1]
    assert len(tokenizer(word)["input_ids"]) == 2  # the word and </s>


def test_text_target_gives_labels_and_truncation_keeps_eos(tokenizer):
    batch = tokenizer(["nu naro nofa ta vele"] * 2, text_target=["hijuku ke kuhoma"] * 2, truncation=True, max_length=3)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    for ids in batch["input_ids"] + batch["labels"]:
        assert len(ids) <= 3 and ids[-1] == 2


def test_save_and_reload(tokenizer, tmp_path, texts):
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded(texts[:50])["input_ids"] == tokenizer(texts[:50])["input_ids"]
    assert (reloaded.pad_token_id, reloaded.bos_token_id, reloaded.eos_token_id, reloaded.unk_token_id) == (0, 1, 2, 3)


@pytest.mark.slow
def test_training_a_37k_vocabulary_on_300k_sentences_takes_seconds():
    texts = corpus_texts(150_000)  # 300k sentences: both sides
    start = time.perf_counter()
    train_tokenizer(texts, vocab_size=37000)
    assert time.perf_counter() - start < 30
