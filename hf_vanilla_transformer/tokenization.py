"""One shared BPE vocabulary for source and target text (§5.1), trained with the `tokenizers` library."""

from collections.abc import Callable, Iterable

import torch.distributed as dist
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

# Fixed ids: the model config defaults are pad 0, bos/decoder_start 1, eos 2. BpeTrainer gives special tokens the
# first ids in list order, and `train_tokenizer` checks that they landed there.
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
PRE_TOKENIZATIONS = ("byte_level", "metaspace")


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 37000, min_frequency: int = 2, pre_tokenization: str = "byte_level"
) -> PreTrainedTokenizerFast:
    """Train a BPE on `texts` (source and target sentences together, §5.1) and wrap it for transformers.

    `pre_tokenization` picks how text becomes the symbols BPE merges:

    - ``"byte_level"`` (GPT-2's): UTF-8 bytes, so nothing is ever unknown and
      ``decode(encode(x), skip_special_tokens=True).strip() == x`` for any text; a non-ASCII letter starts as two or
      more byte symbols.
    - ``"metaspace"`` (SentencePiece's, and Marian's): NFKC-normalised Unicode characters, spaces as ``▁``; a
      character never seen in training becomes ``<unk>``, and decoding gives back the NFKC form of the text.

    Every encoded sequence ends in ``</s>``; ``<s>`` is not prepended, it is the decoder start token.
    """
    if pre_tokenization not in PRE_TOKENIZATIONS:
        raise ValueError(f"pre_tokenization must be one of {PRE_TOKENIZATIONS}, got {pre_tokenization!r}.")
    tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    if pre_tokenization == "byte_level":
        # add_prefix_space: a word gets the same tokens at the start of a sentence as in the middle.
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tokenizer.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()  # all 256 bytes, so no input is ever unknown
    else:
        tokenizer.normalizer = normalizers.NFKC()
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
        alphabet = []
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    _check_special_ids(tokenizer)
    eos = SPECIAL_TOKENS["eos_token"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {eos}", pair=f"$A {eos} $B {eos}", special_tokens=[(eos, EOS_ID)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)


def train_tokenizer_once(texts: Callable[[], Iterable[str]], **kwargs) -> PreTrainedTokenizerFast:
    """`train_tokenizer(texts(), **kwargs)` on the main process only; every other data-parallel process receives
    the result, the tokenizer's JSON, in one broadcast, and waits there meanwhile.

    BPE training over a WMT-sized corpus takes minutes; done on every process it would cost that many times the CPU,
    and the processes would agree only if training were bit-identical everywhere, which nothing checks. Every
    process, the main one included, builds its tokenizer from the same JSON (`tokenizer_from_json`), the same way.
    (Their JSON still differs in the order of the vocabulary, a hash map: the tokenized data's cache is named by
    `data._tokenizer_identity`, which sorts it.)
    """
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    main = not distributed or dist.get_rank() == 0
    payload = [train_tokenizer(texts(), **kwargs).backend_tokenizer.to_str() if main else None]
    if distributed:
        dist.broadcast_object_list(payload, src=0)
    return tokenizer_from_json(payload[0])


def tokenizer_from_json(text: str) -> PreTrainedTokenizerFast:
    """A tokenizer of this package (special tokens at their fixed ids) from its `tokenizers` JSON."""
    tokenizer = Tokenizer.from_str(text)
    _check_special_ids(tokenizer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)


def _check_special_ids(tokenizer: Tokenizer) -> None:
    expected = dict(zip(SPECIAL_TOKENS.values(), (PAD_ID, BOS_ID, EOS_ID, UNK_ID), strict=True))
    actual = {token: tokenizer.token_to_id(token) for token in expected}
    if actual != expected:
        raise RuntimeError(f"special token ids {actual} differ from the model defaults {expected}")
