"""BLEU through `evaluate` offline: same score as plain sacreBLEU, -100 handled, gen_len and length ratio counted."""

import os
import subprocess
import sys

import numpy as np
import pytest
import sacrebleu
from transformers import EvalPrediction

from hf_vanilla_transformer.metrics import (
    BLEU_SIGNATURE,
    PAPER_BLEU_SIGNATURE,
    build_compute_metrics,
    load_bleu,
    paper_bleu,
    split_compounds,
)
from hf_vanilla_transformer.tokenization import train_tokenizer

HYPOTHESES = ["the cat sat on the mat", "a dog barks loudly at night", "hello there world"]
REFERENCES = ["the cat sat on a mat", "a dog barks loudly at night", "hello world"]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(HYPOTHESES + REFERENCES, vocab_size=300)


def padded(rows: list[list[int]], value: int) -> np.ndarray:
    width = max(map(len, rows))
    return np.array([row + [value] * (width - len(row)) for row in rows])


def test_metric_equals_plain_sacrebleu():
    expected = sacrebleu.corpus_bleu(HYPOTHESES, [REFERENCES]).score
    result = load_bleu().compute(predictions=HYPOTHESES, references=[[r] for r in REFERENCES])
    assert 0 < expected < 100
    assert result["score"] == pytest.approx(expected, abs=1e-9)
    assert load_bleu().compute(predictions=HYPOTHESES, references=REFERENCES)["score"] == pytest.approx(expected)


def test_multiple_references_use_the_best_match():
    refs = [[r, h] for r, h in zip(REFERENCES, HYPOTHESES, strict=True)]
    assert load_bleu().compute(predictions=HYPOTHESES, references=refs)["score"] == pytest.approx(100.0)


def test_compute_metrics_decodes_ids_with_minus_100(tokenizer):
    # As Seq2SeqTrainer hands them over: generated ids start with the decoder start token <s> (1), end in </s>,
    # and are padded with pad (greedy), eos (beam search, pad id 0) or -100 (concatenation across batches).
    generated = [[1, *tokenizer(h)["input_ids"]] for h in HYPOTHESES]
    generated[1] += [2, 2]
    predictions = padded(generated, -100)
    labels = padded([tokenizer(r)["input_ids"] for r in REFERENCES], -100)
    result = build_compute_metrics(tokenizer)(EvalPrediction(predictions=predictions, label_ids=labels))
    assert result["bleu"] == pytest.approx(sacrebleu.corpus_bleu(HYPOTHESES, [REFERENCES]).score)
    expected_len = np.mean([len(tokenizer(h)["input_ids"]) for h in HYPOTHESES])  # tokens + one </s>
    assert result["gen_len"] == pytest.approx(expected_len)
    plain = sacrebleu.corpus_bleu(HYPOTHESES, [REFERENCES])
    # 6 + 6 + 3 hypothesis words against 6 + 6 + 2 reference words (sacreBLEU's 13a tokens)
    assert (plain.sys_len, plain.ref_len) == (15, 14)
    assert result["length_ratio"] == pytest.approx(15 / 14)


def test_perfect_predictions_score_100(tokenizer):
    ids = padded([tokenizer(r)["input_ids"] for r in REFERENCES], -100)
    result = build_compute_metrics(tokenizer)(EvalPrediction(predictions=(ids,), label_ids=ids))
    assert result["bleu"] == pytest.approx(100.0)


def test_loads_offline_from_any_working_directory(tmp_path):
    code = (
        "import sacrebleu; from hf_vanilla_transformer.metrics import load_bleu;"
        f"h, r = {HYPOTHESES!r}, {REFERENCES!r};"
        "s = load_bleu().compute(predictions=h, references=[[x] for x in r])['score'];"
        "assert abs(s - sacrebleu.corpus_bleu(h, [r]).score) < 1e-9, s; print('ok', s)"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env.get("PYTHONPATH", "")]
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("ok")


# ----------------------------------------------------------------------------------------------- the paper's BLEU


@pytest.mark.parametrize(
    ("text", "split"),
    [
        ("rich-text format", "rich ##AT##-##AT## text format"),  # the example the procedure documents
        ("die Nord-Süd-Achse", "die Nord ##AT##-##AT## Süd ##AT##-##AT## Achse"),
        ("a-b-c", "a ##AT##-##AT## b-c"),  # Perl's s///g does not rescan a replaced match: neither does this
        ("Preis - Leistung", "Preis - Leistung"),  # a dash between spaces is no compound
        ("-5 und x-", "-5 und x-"),
    ],
)
def test_compounds_are_split_as_the_papers_scoring_script_splits_them(text, split):
    assert split_compounds(text) == split


def test_paper_bleu_scores_the_split_tokens_without_smoothing():
    """Worked by hand. Split, both sides are 8 tokens (die, Nord, ##AT##-##AT##, Süd, ##AT##-##AT##, Achse, ist,
    lang|kurz), all equal but the last: n-gram precisions 7/8, 6/7, 5/6, 4/5, no brevity penalty, so BLEU =
    (7/8 * 6/7 * 5/6 * 4/5)^(1/4) = 0.5^(1/4). Unsplit, there would be no matching 4-gram at all: BLEU 0."""
    hypothesis, reference = ["die Nord-Süd-Achse ist lang"], ["die Nord-Süd-Achse ist kurz"]
    assert paper_bleu(hypothesis, reference) == pytest.approx(100 * 0.5**0.25, abs=1e-9)
    unsplit = sacrebleu.BLEU(tokenize="none", smooth_method="none").corpus_score(hypothesis, [reference])
    assert unsplit.score == 0.0
    assert paper_bleu(["Tom & Jerry sagen „ hallo “ ."], ["Tom & Jerry sagen „ hallo “ ."]) == pytest.approx(100.0)


def test_compute_metrics_adds_the_paper_score_for_german_targets_only(tokenizer):
    ids = padded([tokenizer(r)["input_ids"] for r in REFERENCES], -100)
    prediction = EvalPrediction(predictions=ids, label_ids=ids)
    assert "bleu_paper" not in build_compute_metrics(tokenizer)(prediction)
    result = build_compute_metrics(tokenizer, paper_style=True)(prediction)
    assert result["bleu_paper"] == pytest.approx(100.0) and result["bleu"] == pytest.approx(100.0)


def test_the_signatures_name_the_settings():
    assert "tok:13a" in BLEU_SIGNATURE and "nrefs:1" in BLEU_SIGNATURE and "smooth:exp" in BLEU_SIGNATURE
    assert f"version:{sacrebleu.__version__}" in BLEU_SIGNATURE
    assert PAPER_BLEU_SIGNATURE.startswith("moses-tok:de|compound-split:##AT##|")
    assert "tok:none" in PAPER_BLEU_SIGNATURE and "smooth:none" in PAPER_BLEU_SIGNATURE
