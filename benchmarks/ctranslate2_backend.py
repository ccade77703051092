"""CTranslate2 as an optional fourth implementation in the benchmarks: random-weight models with no tokenizer,
converted by the package's `export_ctranslate2.build_spec` with a synthetic vocabulary.

    from benchmarks import ctranslate2_backend as ct2
    if ct2.available():
        model_dir = ct2.convert(model, "/tmp/ct2-small")
        translator = ct2.load_translator(model_dir)
        ids = ct2.translate(translator, input_ids, attention_mask, num_beams=4, new_tokens=32)  # (B, 1 + 32)

A trained model with its tokenizer is exported with `python -m hf_vanilla_transformer.export_ctranslate2`, whose
vocabulary is the tokenizer's. Here, with only ids, the string of id i is a fixed function of i (special names for
the special ids, "t{i}" otherwise), so ids go through unchanged in both directions. The decoder starts from "<s>"
(our decoder start id 1) and stops on "</s>" (id 2); source rows already end with EOS, so CTranslate2 appends none.

Axes: B batch, S source length, T target length, D d_model, V vocabulary.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hf_vanilla_transformer import VanillaTransformerForConditionalGeneration, export_ctranslate2
from hf_vanilla_transformer.tokenization import BOS_ID, EOS_ID, PAD_ID, UNK_ID

if TYPE_CHECKING:  # ctranslate2 is optional: only imported when a function needs it
    import ctranslate2

# The names CTranslate2's SequenceToSequenceModelConfig expects by default (and the fairseq converter's "<blank>"
# for padding). The decoder start token is BOS_ID = our `decoder_start_token_id`.
SPECIAL_TOKENS = {PAD_ID: "<blank>", BOS_ID: "<s>", EOS_ID: "</s>", UNK_ID: "<unk>"}
_SPECIAL_IDS = {token: index for index, token in SPECIAL_TOKENS.items()}


def available() -> bool:
    """Whether the `ctranslate2` package imports (it is an optional dependency, in the `dev` extra)."""
    try:
        export_ctranslate2.import_ctranslate2()
    except ImportError:  # also a wheel whose shared library does not load
        return False
    return True


# ---------------------------------------------------------------------------------------------------- vocabulary


def token_string(index: int) -> str:
    """The synthetic vocabulary's string for id `index`."""
    return SPECIAL_TOKENS.get(index, f"t{index}")


def token_id(token: str) -> int:
    """Inverse of `token_string`."""
    special = _SPECIAL_IDS.get(token)
    return special if special is not None else int(token[1:])


def vocabulary(vocab_size: int) -> list[str]:
    """The V strings of the synthetic vocabulary, in id order: a 1:1 map between our ids and CTranslate2's tokens."""
    return [token_string(index) for index in range(vocab_size)]


# ---------------------------------------------------------------------------------------------------- conversion


def convert(
    model: VanillaTransformerForConditionalGeneration, output_dir: str | Path, max_positions: int | None = None
) -> Path:
    """Write `model` as a CTranslate2 model directory (model.bin, config.json, shared_vocabulary.json) with the
    synthetic vocabulary; returns it. The conversion itself is the package's (`export_ctranslate2.build_spec`)."""
    config = model.config
    expected = {"pad_token_id": PAD_ID, "decoder_start_token_id": BOS_ID, "eos_token_id": EOS_ID}
    problems = [f"{name}={getattr(config, name)!r} (expected {value})" for name, value in expected.items()
                if getattr(config, name) != value]  # fmt: skip
    if config.vocab_size <= UNK_ID:
        problems.append(f"vocab_size={config.vocab_size} (the special ids need at least {UNK_ID + 1})")
    if problems:  # the synthetic vocabulary names the special tokens by the tokenizer's fixed ids
        raise ValueError("Cannot convert to CTranslate2: " + "; ".join(problems))
    special = {"unk": SPECIAL_TOKENS[UNK_ID], "bos": SPECIAL_TOKENS[BOS_ID], "eos": SPECIAL_TOKENS[EOS_ID]}
    special["decoder_start"] = SPECIAL_TOKENS[BOS_ID]
    spec = export_ctranslate2.build_spec(model, vocabulary(config.vocab_size), special, max_positions)
    return export_ctranslate2.save_spec(spec, output_dir, "float32")


# ----------------------------------------------------------------------------------------------------- inference


def load_translator(model_dir: str | Path, threads: int | None = None) -> ctranslate2.Translator:
    """A CPU, fp32 Translator with `threads` OpenMP threads (default: torch's, so both engines get the same cores)
    and one translation at a time (inter_threads=1): one batch is one call, as for `generate()`."""
    import ctranslate2

    return ctranslate2.Translator(
        str(model_dir),
        device="cpu",
        compute_type="float32",
        inter_threads=1,
        intra_threads=threads if threads is not None else torch.get_num_threads(),
    )


def source_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[list[str]]:
    """(B, S) ids and mask -> B lists of token strings, padding dropped (CTranslate2 pads and masks itself)."""
    return [
        [token_string(index) for index in row[mask.bool()].tolist()]
        for row, mask in zip(input_ids.cpu(), attention_mask.cpu(), strict=True)
    ]


def translate_results(
    translator: ctranslate2.Translator,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    num_beams: int,
    new_tokens: int,
    length_penalty: float = 0.6,
    **options: Any,
) -> list[ctranslate2.TranslationResult]:
    """`translate_batch` with exactly `new_tokens` generated tokens per row, the start token not counted.

    min_decoding_length = max_decoding_length = new_tokens masks EOS until the last step and stops there, the
    counterpart of `fixed_length_generation_config`'s min_new_tokens = max_new_tokens. `max_input_length=0` turns
    off CTranslate2's silent truncation of sources longer than 1024 tokens. Extra `options` go to translate_batch
    (e.g. return_scores=True).
    """
    return translator.translate_batch(
        source_tokens(input_ids, attention_mask),
        beam_size=num_beams,
        num_hypotheses=1,
        length_penalty=length_penalty,
        min_decoding_length=new_tokens,
        max_decoding_length=new_tokens,
        max_input_length=0,
        **options,
    )


def translate(
    translator: ctranslate2.Translator,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    num_beams: int,
    new_tokens: int,
    length_penalty: float = 0.6,
) -> torch.Tensor:
    """Greedy (num_beams=1) or beam search on (B, S) source ids; returns (B, 1 + new_tokens) ids laid out as our
    `generate()` returns them: the decoder start token 1, then the generated tokens (right-padded with PAD if a
    row ever came back shorter)."""
    results = translate_results(translator, input_ids, attention_mask, num_beams, new_tokens, length_penalty)
    output = torch.full((len(results), 1 + new_tokens), PAD_ID, dtype=torch.long)
    output[:, 0] = BOS_ID
    for row, result in enumerate(results):
        hypothesis = [token_id(token) for token in result.hypotheses[0]]
        output[row, 1 : 1 + len(hypothesis)] = torch.tensor(hypothesis, dtype=torch.long)
    return output


def score(
    translator: ctranslate2.Translator, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Log-probabilities log p(y_t | y_<t, x) of given targets, from `score_batch`: (B, T), 0 where labels are PAD
    or -100.

    `labels` (B, T) are targets as our model's `labels` hold them, ending in EOS. CTranslate2 prepends the decoder
    start token itself and appends EOS to the target, so the trailing EOS is removed from each row before the call
    and its log-probability comes back as the row's last score.
    """
    targets = []
    lengths = []
    for row in labels.cpu():
        ids = row[(row != -100) & (row != PAD_ID)].tolist()
        if not ids or ids[-1] != EOS_ID:
            raise ValueError("each labels row must end in EOS, as our targets do")
        targets.append([token_string(index) for index in ids[:-1]])
        lengths.append(len(ids))
    results = translator.score_batch(source_tokens(input_ids, attention_mask), targets, max_input_length=0)
    output = torch.zeros(labels.shape, dtype=torch.float32)
    for row, (result, length) in enumerate(zip(results, lengths, strict=True)):
        output[row, :length] = torch.tensor(result.log_probs[:length], dtype=torch.float32)
    return output


__all__ = [
    "SPECIAL_TOKENS",
    "available",
    "convert",
    "load_translator",
    "score",
    "source_tokens",
    "token_id",
    "token_string",
    "translate",
    "translate_results",
    "vocabulary",
]
