"""How `generate()` applies the decoding rules of §6.1 inside transformers' beam search, and decodes beams cheaply.

The rules themselves (beam 4, GNMT's length penalty with α = 0.6, output length at most input length + 50) are
`paper_generation_config` in the modeling file. transformers has no setting for two of them, so this mixin adds
them to `GenerationMixin`, as transformers' own Whisper keeps its decoding logic in `generation_whisper.py`:

- the per-input length limit, as a logits processor (`SourceLengthLimitLogitsProcessor`);
- GNMT's length penalty, by rescaling what transformers divides by |Y|^α in its two beam-search helpers;
- one copy of the encoder output per input for all its beams (`rows_per_source`), and a beam reorder that leaves
  the cross-attention cache alone.

`generate()` is also the one point where CPU speed is applied: `cpu_inference.onednn_decoding` for the call.
This file imports only torch, transformers and its siblings; `save_pretrained` copies it with the modeling file.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

import torch
from torch import Tensor
from transformers import GenerationConfig, GenerationMixin
from transformers.cache_utils import Cache, EncoderDecoderCache
from transformers.generation import LogitsProcessor, LogitsProcessorList

from .cpu_inference import onednn_decoding


class SourceLengthLimitLogitsProcessor(LogitsProcessor):
    """Ends each output at its own input's length + offset (§6.1), by forcing EOS as the last allowed token.

    `max_new_tokens` alone would give every input of a batch the longest input's limit; this applies the rule per
    input. `limits` has one entry per input; beams and returned sequences of an input are contiguous rows.
    """

    def __init__(self, limits: Tensor, eos_token_id: int) -> None:
        self.limits = limits  # (B,) maximum number of generated tokens, EOS included
        self.eos_token_id = eos_token_id
        self.start_length: int | None = None

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self.start_length is None:  # first step: what is there already is the decoder prompt
            self.start_length = input_ids.shape[1]
        generated = input_ids.shape[1] - self.start_length
        limits = self.limits.to(scores.device).repeat_interleave(input_ids.shape[0] // self.limits.shape[0])
        at_limit = (generated >= limits - 1).unsqueeze(1)  # (rows, 1): the next token is the last one allowed
        if not at_limit.any():
            return scores
        only_eos = torch.full_like(scores, -float("inf"))
        only_eos[:, self.eos_token_id] = 0.0
        return torch.where(at_limit, only_eos, scores)


# §6.1: "beam search with a beam size of 4 and length penalty α = 0.6", citing GNMT (Wu et al., 2016, eq. 14), which
# divides a hypothesis' log-probability by lp(Y) = ((5 + |Y|) / 6)^α. transformers divides by |Y|^α and has no hook
# for another form, so the model overrides the two beam-search helpers that apply it (`_update_finished_beams` and
# `_check_early_stop_heuristic`), each in one line: it rescales what transformers is about to divide by |Y|^α so
# that the result is divided by lp(Y) instead. The generation config's `length_penalty_type` picks the form:
# "gnmt" (the paper's, saved by `paper_generation_config`) or "transformers" (|Y|^α; also what a generation config
# without the key means, so checkpoints saved before it decode as they did). `generate()` sets the form for its call
# in a context variable, which concurrent calls from other threads do not see. tests/test_generation.py pins the
# ranking and the scores of both forms, so a transformers release that changes these helpers fails it loudly.
LENGTH_PENALTY_TYPES = ("gnmt", "transformers")
_length_penalty_type: ContextVar[str] = ContextVar("length_penalty_type", default="transformers")


def length_penalty(length: int, alpha: float, penalty_type: str = "gnmt") -> float:
    """The divisor of a beam hypothesis' summed log-probability: GNMT's ((5 + |Y|) / 6)^α or transformers' |Y|^α;
    |Y| counts the generated tokens, EOS included."""
    if penalty_type == "gnmt":
        return ((5 + length) / 6) ** alpha
    return float(length) ** alpha


def _to_penalty_type(length: int, alpha: float) -> float:
    """The factor that turns transformers' division by |Y|^α into one by the current call's length penalty."""
    penalty_type = _length_penalty_type.get()
    if penalty_type == "transformers" or length <= 0:
        return 1.0
    return length_penalty(length, alpha, "transformers") / length_penalty(length, alpha, penalty_type)


class VanillaTransformerGenerationMixin(GenerationMixin):
    """`GenerationMixin` with §6.1's per-input length limit, GNMT's length penalty and one encoder output per input
    for all its beams. `VanillaTransformerForConditionalGeneration` inherits it."""

    @torch.no_grad()
    def generate(
        self,
        inputs: Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        logits_processor: LogitsProcessorList | None = None,
        **kwargs: Any,
    ) -> Any:
        """`GenerationMixin.generate`, plus §6.1's per-input length limit and GNMT's length penalty (see
        `paper_generation_config`), and on CPU in fp32 the oneDNN linears of `cpu_inference.onednn_decoding`.

        The length rule applies when the generation config has `max_length_offset` and the caller set neither
        `max_length` nor `max_new_tokens`, as arguments or in a `generation_config` they pass. The model's own
        `generation_config.max_length` does not count: transformers writes its default (20) there on its own
        (Seq2SeqTrainer does, for one), so only `max_new_tokens` there, or `max_length_offset = None`, replaces
        the rule with a fixed cap.
        """
        config = generation_config if generation_config is not None else self.generation_config
        offset = getattr(config, "max_length_offset", None)
        caller_set_length = (
            kwargs.get("max_length") is not None
            or kwargs.get("max_new_tokens") is not None
            or config.max_new_tokens is not None
            or (generation_config is not None and generation_config.max_length is not None)
        )
        if offset is not None and not caller_set_length:
            limits = self._source_lengths(inputs, kwargs) + offset
            if self.config.position_embedding_type == "learned":  # the decoder has no position past its table
                limits = limits.clamp(max=self.config.max_position_embeddings)
            eos = config.eos_token_id if config.eos_token_id is not None else self.config.eos_token_id
            eos = eos[0] if isinstance(eos, list) else eos
            logits_processor = LogitsProcessorList(
                [*(logits_processor or []), SourceLengthLimitLogitsProcessor(limits, eos)]
            )
            kwargs["max_new_tokens"] = int(limits.max())
            kwargs["max_length"] = None  # a max_length left in the config would only draw a warning
        penalty_type = getattr(config, "length_penalty_type", None) or "transformers"
        if penalty_type not in LENGTH_PENALTY_TYPES:
            raise ValueError(f"length_penalty_type must be one of {LENGTH_PENALTY_TYPES}, got {penalty_type!r}.")
        token = _length_penalty_type.set(penalty_type)
        try:
            with onednn_decoding(self):  # the one point where CPU speed is applied; a no-op elsewhere
                return super().generate(inputs, generation_config, logits_processor, **kwargs)
        finally:
            _length_penalty_type.reset(token)

    def _source_lengths(self, inputs: Tensor | None, kwargs: dict[str, Any]) -> Tensor:
        """Tokens per source row: from the attention mask, else the non-padding ids, else the encoder output."""
        if kwargs.get("attention_mask") is not None:
            return kwargs["attention_mask"].sum(dim=1).long()
        input_ids = inputs if inputs is not None else kwargs.get("input_ids")
        if input_ids is not None:
            if self.config.pad_token_id is None:
                return torch.full((input_ids.shape[0],), input_ids.shape[1], device=input_ids.device)
            return (input_ids != self.config.pad_token_id).sum(dim=1)
        hidden = kwargs["encoder_outputs"].last_hidden_state  # (B, S, D)
        return torch.full((hidden.shape[0],), hidden.shape[1], device=hidden.device)

    def _update_finished_beams(self, **kwargs: Any) -> Any:
        """transformers' helper, with finished hypotheses scored by the call's length penalty (see `length_penalty`)."""
        length = kwargs["cur_len"] + 1 - kwargs["decoder_prompt_len"]
        kwargs["topk_log_probs"] = kwargs["topk_log_probs"] * _to_penalty_type(length, kwargs["length_penalty"])
        return super()._update_finished_beams(**kwargs)

    @staticmethod
    def _check_early_stop_heuristic(**kwargs: Any) -> Tensor:
        """transformers' helper, with the best live score bounded by the call's length penalty. For
        `early_stopping="never"` and α > 0 the bound assumes the longest allowed output: tensor2tensor's rule."""
        if kwargs["early_stopping"] == "never" and kwargs["length_penalty"] > 0.0:
            length = kwargs["max_length"] - kwargs["decoder_prompt_len"]
        else:
            length = kwargs["cur_len"] - kwargs["decoder_prompt_len"]
        factor = _to_penalty_type(length, kwargs["length_penalty"])
        kwargs["running_beam_scores"] = kwargs["running_beam_scores"] * factor
        return GenerationMixin._check_early_stop_heuristic(**kwargs)

    def _expand_inputs_for_generation(
        self, expand_size: int = 1, is_encoder_decoder: bool = False, input_ids: Tensor | None = None, **kwargs: Any
    ) -> tuple[Tensor | None, dict[str, Any]]:
        """Beam search and `num_return_sequences` decode `expand_size` rows per input. transformers repeats the
        encoder output and the source mask that many times; here they stay one row per input and the forward gets
        `rows_per_source=expand_size`. Cross-attention then projects and reads each source's keys and values once
        for all its rows: with beam 4 that is a quarter of the cross-attention keys and values to compute, to hold
        and to read at every step. (`return_dict_in_generate` therefore returns encoder states per input, not per
        beam.)"""
        if expand_size == 1 or not is_encoder_decoder or kwargs.get("encoder_outputs") is None:
            return super()._expand_inputs_for_generation(expand_size, is_encoder_decoder, input_ids, **kwargs)
        per_source = {key: kwargs.pop(key) for key in ("encoder_outputs", "attention_mask") if key in kwargs}
        input_ids, kwargs = super()._expand_inputs_for_generation(expand_size, False, input_ids, **kwargs)
        return input_ids, {**kwargs, **per_source, "rows_per_source": expand_size}

    def _reorder_cache(self, past_key_values: Cache, beam_idx: Tensor) -> Cache:
        """Beam search: reorder only the decoder self-attention cache. All beams of one input hold the same
        cross-attention keys and values (one encoder output), and `beam_idx` only moves rows among one input's
        beams, so reordering those would copy identical rows at every step."""
        if isinstance(past_key_values, EncoderDecoderCache):
            past_key_values.self_attention_cache.reorder_cache(beam_idx)
        else:
            past_key_values.reorder_cache(beam_idx)
        return past_key_values


__all__ = [
    "LENGTH_PENALTY_TYPES",
    "SourceLengthLimitLogitsProcessor",
    "VanillaTransformerGenerationMixin",
    "length_penalty",
]
