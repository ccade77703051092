"""BLEU for `Seq2SeqTrainer(predict_with_generate=True)`, computed offline with sacreBLEU (§6.1, Table 2)."""

import os
from collections.abc import Callable

import evaluate
import numpy as np
from transformers import EvalPrediction, PreTrainedTokenizerBase

# `evaluate.load("sacrebleu")` needs the Hub (evaluate 0.4 bundles no metrics), so the metric script ships in the
# package and is loaded by absolute path; a bare name would also be looked up in the current directory first.
METRIC_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "metrics", "local_sacrebleu")


def load_bleu() -> evaluate.EvaluationModule:
    """The packaged sacreBLEU metric; works with ``HF_HUB_OFFLINE=1``."""
    return evaluate.load(METRIC_PATH)


def build_compute_metrics(tokenizer: PreTrainedTokenizerBase) -> Callable[[EvalPrediction], dict[str, float]]:
    """A ``compute_metrics`` returning ``{"bleu": corpus BLEU, "length_ratio": output length / reference length
    (sacreBLEU's tokens; below 1, BLEU's brevity penalty applies), "gen_len": mean generated length in tokens}``."""
    bleu = load_bleu()

    def compute_metrics(eval_prediction: EvalPrediction) -> dict[str, float]:
        predictions = _as_ids(eval_prediction.predictions, tokenizer.pad_token_id)
        labels = _as_ids(eval_prediction.label_ids, tokenizer.pad_token_id)
        hypotheses = decode(tokenizer, predictions)
        references = decode(tokenizer, labels)
        result = bleu.compute(predictions=hypotheses, references=[[ref] for ref in references])
        lengths = _generated_lengths(predictions, tokenizer)
        return {
            "bleu": float(result["score"]),
            "length_ratio": result["sys_len"] / max(result["ref_len"], 1),
            "gen_len": float(lengths.mean()) if lengths.size else 0.0,
        }

    return compute_metrics


def decode(tokenizer: PreTrainedTokenizerBase, ids: np.ndarray) -> list[str]:
    """Detokenized text without special tokens; stripped because byte-level decoding keeps the leading space."""
    return [text.strip() for text in tokenizer.batch_decode(ids, skip_special_tokens=True)]


def _as_ids(array, pad_token_id: int) -> np.ndarray:
    """-100 (label padding, and the Trainer's padding when it concatenates batches) -> pad, so it can be decoded."""
    if isinstance(array, tuple):  # some models return (generated ids, ...)
        array = array[0]
    array = np.asarray(array)
    return np.where(array < 0, pad_token_id, array)


def _generated_lengths(predictions: np.ndarray, tokenizer: PreTrainedTokenizerBase) -> np.ndarray:
    """Tokens up to and including the first eos, without the decoder start token and padding.

    Counting non-pad tokens is not enough: beam search pads finished rows with eos when pad_token_id is 0.
    """
    is_eos = predictions == tokenizer.eos_token_id
    after_first_eos = (np.cumsum(is_eos, axis=1) - is_eos) > 0
    special = (predictions == tokenizer.pad_token_id) | (predictions == tokenizer.bos_token_id)
    return (~after_first_eos & ~special).sum(axis=1)
