"""BLEU for `Seq2SeqTrainer(predict_with_generate=True)`, computed offline with sacreBLEU (§6.1, Table 2).

Two scores, both legitimate, for two purposes:
- `bleu`: sacreBLEU on detokenised output (13a tokenisation), the score to publish with its signature
  (`BLEU_SIGNATURE`, which names the settings, so that others can compare).
- `bleu_paper` (English-German): BLEU as the paper's Table 2 counted it, the tensor2tensor / fairseq
  `compound_split_bleu.sh` procedure: Moses-tokenise both sides, split hyphenated compounds as `##AT##-##AT##`, and
  score the tokens as they are (`multi-bleu.perl`: no further tokenisation, no smoothing). Only this one is
  comparable with the paper's 27.3 / 28.4.
"""

import os
import re
from collections.abc import Callable, Sequence

import evaluate
import numpy as np
import sacrebleu
from transformers import EvalPrediction, PreTrainedTokenizerBase

# `evaluate.load("sacrebleu")` needs the Hub (evaluate 0.4 bundles no metrics), so the metric script ships in the
# package and is loaded by absolute path; a bare name would also be looked up in the current directory first.
METRIC_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "metrics", "local_sacrebleu")


def load_bleu() -> evaluate.EvaluationModule:
    """The packaged sacreBLEU metric; works with ``HF_HUB_OFFLINE=1``."""
    return evaluate.load(METRIC_PATH)


def _signature(bleu: sacrebleu.BLEU) -> str:
    """sacreBLEU's signature of `bleu` with one reference per sentence (it names nrefs only once it has scored)."""
    bleu.corpus_score(["a"], [["a"]])
    return str(bleu.get_signature())


# The settings of `bleu` (what `load_bleu` computes: sacreBLEU's defaults, one reference), as sacreBLEU writes them.
BLEU_SIGNATURE = _signature(sacrebleu.BLEU())
# The last step of the paper's procedure: BLEU on the tokens as given, without smoothing (multi-bleu.perl's).
_TOKENIZED_BLEU = sacrebleu.BLEU(tokenize="none", smooth_method="none", force=True)
PAPER_BLEU_SIGNATURE = f"moses-tok:de|compound-split:##AT##|{_signature(_TOKENIZED_BLEU)}"


def split_compounds(text: str) -> str:
    """Hyphenated compounds as the paper's scoring script splits them (`s{(\\S)-(\\S)}{$1 ##AT##-##AT## $2}g`):
    "rich-text format" -> "rich ##AT##-##AT## text format"."""
    return re.sub(r"(\S)-(\S)", r"\1 ##AT##-##AT## \2", text)


def paper_bleu(hypotheses: Sequence[str], references: Sequence[str], lang: str = "de") -> float:
    """Tokenised BLEU with compound splitting, as Table 2 counted it (see the module docstring). Moses tokenisation
    by `sacremoses`, with `tokenizer.perl`'s defaults (special characters escaped, no aggressive hyphen splitting)."""
    from sacremoses import MosesTokenizer  # imported here: about 0.4 s, which runs without German targets need not pay

    moses = MosesTokenizer(lang=lang)

    def tokenize(text: str) -> str:
        return split_compounds(moses.tokenize(text, return_str=True))

    scored = _TOKENIZED_BLEU.corpus_score([tokenize(h) for h in hypotheses], [[tokenize(r) for r in references]])
    return float(scored.score)


def build_compute_metrics(
    tokenizer: PreTrainedTokenizerBase, paper_style: bool = False
) -> Callable[[EvalPrediction], dict[str, float]]:
    """A ``compute_metrics`` returning ``{"bleu": corpus BLEU, "length_ratio": output length / reference length
    (sacreBLEU's tokens; below 1, BLEU's brevity penalty applies), "gen_len": mean generated length in tokens}``,
    and with `paper_style` (German targets) ``"bleu_paper"``, BLEU as the paper counted it."""
    bleu = load_bleu()

    def compute_metrics(eval_prediction: EvalPrediction) -> dict[str, float]:
        predictions = _as_ids(eval_prediction.predictions, tokenizer.pad_token_id)
        labels = _as_ids(eval_prediction.label_ids, tokenizer.pad_token_id)
        hypotheses = decode(tokenizer, predictions)
        references = decode(tokenizer, labels)
        result = bleu.compute(predictions=hypotheses, references=[[ref] for ref in references])
        lengths = _generated_lengths(predictions, tokenizer)
        scores = {
            "bleu": float(result["score"]),
            "length_ratio": result["sys_len"] / max(result["ref_len"], 1),
            "gen_len": float(lengths.mean()) if lengths.size else 0.0,
        }
        if paper_style:
            scores["bleu_paper"] = paper_bleu(hypotheses, references)
        return scores

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
