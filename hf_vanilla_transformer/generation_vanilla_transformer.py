"""How `generate()` applies the decoding rules of §6.1 inside transformers' beam search, and decodes beams cheaply.

The rules themselves (beam 4, GNMT's length penalty with α = 0.6, output length at most input length + 50) are
`paper_generation_config` in the modeling file. transformers has no setting for two of them, so this mixin adds
them to `GenerationMixin`, as transformers' own Whisper keeps its decoding logic in `generation_whisper.py`:

- the per-input length limit, as a logits processor (`SourceLengthLimitLogitsProcessor`);
- GNMT's length penalty, by rescaling what transformers divides by |Y|^α in its two beam-search helpers;
- one copy of the encoder output per input for all its beams (`rows_per_source`), and a beam reorder that leaves
  the cross-attention cache alone.

This file imports only torch, transformers and its siblings; `save_pretrained` copies it with the modeling file.
"""

from __future__ import annotations

import copy
import inspect
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers
from torch import Tensor
from transformers import GenerationConfig, GenerationMixin
from transformers.cache_utils import Cache, EncoderDecoderCache
from transformers.generation import LogitsProcessor, LogitsProcessorList


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
# in a context variable, which concurrent calls from other threads do not see.
#
# The helpers are private: a transformers release may rename them or stop calling them, and beam search would then
# rank by |Y|^α without a word. `generate()` therefore checks both ends: before the call, that transformers still
# has the helpers with the arguments the overrides read; after it, that both overrides ran. Either failure is a
# `RuntimeError` naming the installed transformers version (`length_penalty_type="transformers"` still decodes).
LENGTH_PENALTY_TYPES = ("gnmt", "transformers")
# The custom keys of §6.1 in a generation config (`paper_generation_config`); transformers carries them through its
# merge of the caller's config with the model's saved one as it carries any custom key.
PAPER_GENERATION_KEYS = ("length_penalty_type", "max_length_offset")
_BEAM_HELPERS = {
    "_update_finished_beams": {"topk_log_probs", "cur_len", "decoder_prompt_len", "length_penalty"},
    "_check_early_stop_heuristic": {
        "running_beam_scores",
        "cur_len",
        "max_length",
        "decoder_prompt_len",
        "early_stopping",
        "length_penalty",
    },
}


@dataclass
class _PenaltyCall:
    """The length penalty form of one `generate()` call, and which beam-search overrides applied it."""

    penalty_type: str = "transformers"
    applied: set[str] = field(default_factory=set)


_penalty_call: ContextVar[_PenaltyCall | None] = ContextVar("penalty_call", default=None)  # None: not in generate()


def length_penalty(length: int, alpha: float, penalty_type: str = "gnmt") -> float:
    """The divisor of a beam hypothesis' summed log-probability: GNMT's ((5 + |Y|) / 6)^α or transformers' |Y|^α;
    |Y| counts the generated tokens, EOS included."""
    if penalty_type == "gnmt":
        return ((5 + length) / 6) ** alpha
    return float(length) ** alpha


def _to_penalty_type(helper: str, length: int, alpha: float) -> float:
    """The factor that turns transformers' division by |Y|^α into one by the current call's length penalty."""
    call = _penalty_call.get()
    if call is None:  # beam search run outside `generate()`: transformers' own form
        return 1.0
    call.applied.add(helper)
    if call.penalty_type == "transformers" or length <= 0:
        return 1.0
    return length_penalty(length, alpha, "transformers") / length_penalty(length, alpha, call.penalty_type)


def _beam_helpers_missing() -> list[str]:
    """The beam-search helpers (or the arguments of them) that the GNMT overrides need and transformers lacks."""
    missing = []
    for name, arguments in _BEAM_HELPERS.items():
        helper = getattr(GenerationMixin, name, None)
        have = set(inspect.signature(helper).parameters) if callable(helper) else set()
        missing += [f"{name}({', '.join(sorted(arguments - have))})"] if arguments - have else []
    return missing


def _gnmt_penalty_error(problem: str) -> RuntimeError:
    return RuntimeError(
        f"GNMT's length penalty (length_penalty_type='gnmt', §6.1) cannot be applied with transformers "
        f"{transformers.__version__}: {problem}. Install a transformers version this package declares, or pass "
        "length_penalty_type='transformers' to rank beams by transformers' |Y|^alpha instead."
    )


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
        `paper_generation_config`).

        Every setting is read from the generation config as transformers merges it for the call (`generate()`'s
        keyword arguments over the caller's `generation_config` over the model's saved one, custom keys included),
        so `length_penalty_type` and `max_length_offset` may be passed in any of those ways, like any setting.
        The length rule (input length + `max_length_offset`) applies unless a length limit is set: `max_new_tokens`
        anywhere, or a `max_length` by the caller (an argument or in their `generation_config`). The model's own
        `generation_config.max_length` does not count (see below); `max_length_offset=None` turns the rule off.
        """
        config, _ = self._prepare_generation_config(generation_config, **kwargs)
        offset = getattr(config, "max_length_offset", None)
        # A `max_length` in the model's own config does not count: Seq2SeqTrainer saves every default of a
        # generation config, `max_length: 20` included, so a trained checkpoint has one it never chose.
        caller_max_length = kwargs.get("max_length") is not None or (
            generation_config is not None and generation_config.max_length is not None
        )
        if offset is not None and config.max_new_tokens is None and not caller_max_length:
            limits = self._source_lengths(inputs, kwargs) + offset
            if self.config.position_embedding_type == "learned":  # the decoder has no position past its table
                limits = limits.clamp(max=self.config.max_position_embeddings)
            eos = config.eos_token_id if config.eos_token_id is not None else self.config.eos_token_id
            eos = eos[0] if isinstance(eos, list) else eos
            logits_processor = LogitsProcessorList(
                [*(logits_processor or []), SourceLengthLimitLogitsProcessor(limits, eos)]
            )
            if generation_config is not None:  # set where the caller's settings are, not beside them
                generation_config = copy.deepcopy(generation_config)
                generation_config.max_new_tokens = int(limits.max())
            else:
                kwargs["max_new_tokens"] = int(limits.max())
        call = _PenaltyCall(config.length_penalty_type)
        gnmt_beams = call.penalty_type == "gnmt" and (config.num_beams or 1) > 1 and config.length_penalty != 0
        missing = _beam_helpers_missing() if gnmt_beams else []
        if missing:
            raise _gnmt_penalty_error(f"GenerationMixin lacks {', '.join(missing)}")
        token = _penalty_call.set(call)
        try:
            output = super().generate(inputs, generation_config, logits_processor, **kwargs)
        finally:
            _penalty_call.reset(token)
        if gnmt_beams and call.applied != set(_BEAM_HELPERS):
            not_called = ", ".join(sorted(set(_BEAM_HELPERS) - call.applied))
            raise _gnmt_penalty_error(f"its beam search did not call {not_called}, so beams were ranked by |Y|^alpha")
        return output

    def _prepare_generation_config(
        self, generation_config: GenerationConfig | None, **kwargs: Any
    ) -> tuple[GenerationConfig, dict[str, Any]]:
        """transformers' merge of the call's settings, and §6.1's keys checked. transformers moves a keyword
        argument into the config only where the config already has that key; one of §6.1's keys given to a model
        whose saved config lacks it (saved before the key existed) is moved here, rather than passed on to
        `forward()`, which would ignore it."""
        generation_config, model_kwargs = super()._prepare_generation_config(generation_config, **kwargs)
        for key in PAPER_GENERATION_KEYS:
            if key in model_kwargs:
                setattr(generation_config, key, model_kwargs.pop(key))
        penalty_type = getattr(generation_config, "length_penalty_type", None) or "transformers"
        if penalty_type not in LENGTH_PENALTY_TYPES:
            raise ValueError(f"length_penalty_type must be one of {LENGTH_PENALTY_TYPES}, got {penalty_type!r}.")
        generation_config.length_penalty_type = penalty_type
        offset = getattr(generation_config, "max_length_offset", None)
        if offset is not None and (isinstance(offset, bool) or not isinstance(offset, int) or offset < 1):
            raise ValueError(f"max_length_offset must be a positive integer or None, got {offset!r}.")
        if generation_config.cache_implementation not in (None, "dynamic"):
            # A static cache hands the decoder 4-D masks sized for the whole cache, and beam search here shares one
            # encoder output per input (`rows_per_source`); neither is built for it, so it is refused, not run.
            raise ValueError(
                f"cache_implementation={generation_config.cache_implementation!r} is not supported by this model: "
                "it decodes with transformers' dynamic cache (cache_implementation=None or 'dynamic')."
            )
        return generation_config, model_kwargs

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
        factor = _to_penalty_type("_update_finished_beams", length, kwargs["length_penalty"])
        kwargs["topk_log_probs"] = kwargs["topk_log_probs"] * factor
        return super()._update_finished_beams(**kwargs)

    @staticmethod
    def _check_early_stop_heuristic(**kwargs: Any) -> Tensor:
        """transformers' helper, with the best live score bounded by the call's length penalty. For
        `early_stopping="never"` and α > 0 the bound assumes the longest allowed output: tensor2tensor's rule."""
        if kwargs["early_stopping"] == "never" and kwargs["length_penalty"] > 0.0:
            length = kwargs["max_length"] - kwargs["decoder_prompt_len"]
        else:
            length = kwargs["cur_len"] - kwargs["decoder_prompt_len"]
        factor = _to_penalty_type("_check_early_stop_heuristic", length, kwargs["length_penalty"])
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
    "PAPER_GENERATION_KEYS",
    "SourceLengthLimitLogitsProcessor",
    "VanillaTransformerGenerationMixin",
    "length_penalty",
]
