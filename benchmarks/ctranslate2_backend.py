"""CTranslate2 as an optional fourth implementation: our weights converted to a CTranslate2 model directory.

CTranslate2 (https://github.com/OpenNMT/CTranslate2) is a C++ inference engine for Transformer models. Its
`TransformerSpec` describes the paper's architecture directly, so the conversion builds that spec from our config
and copies OUR weights into it; no other framework's checkpoint is involved.

    from benchmarks import ctranslate2_backend as ct2
    if ct2.available():
        model_dir = ct2.convert(model, "/tmp/ct2-small")
        translator = ct2.load_translator(model_dir)
        ids = ct2.translate(translator, input_ids, attention_mask, num_beams=4, new_tokens=32)  # (B, 1 + 32)

Three things differ from the obvious conversion and are handled here:

- Positions: CTranslate2's built-in sinusoid puts all sines before all cosines; ours interleaves them (§3.5:
  sin at even dimensions, cos at odd ones). `PositionEncoderSpec.encodings` takes an explicit (positions, D)
  table, so we hand it `sinusoidal_table`, the one our model adds.
- Vocabulary: CTranslate2 speaks token strings, not ids. The model directory gets a synthetic vocabulary in which
  the string of id i is a fixed function of i (special names for the special ids, "t{i}" otherwise), so ids go
  through unchanged in both directions.
- Special tokens: the decoder starts from "<s>" (our decoder start id 1) and stops on "</s>" (id 2). Our source
  rows already end with EOS, so the model is saved with `add_source_eos=False` and CTranslate2 appends nothing.

Axes: B batch, S source length, T target length, D d_model, V vocabulary.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from hf_vanilla_transformer import VanillaTransformerConfig, VanillaTransformerForConditionalGeneration
from hf_vanilla_transformer.modeling_vanilla_transformer import sinusoidal_table
from hf_vanilla_transformer.tokenization import BOS_ID, EOS_ID, PAD_ID, UNK_ID

if TYPE_CHECKING:  # ctranslate2 is optional: only imported when a function needs it
    import ctranslate2

# The names CTranslate2's SequenceToSequenceModelConfig expects by default (and the fairseq converter's "<blank>"
# for padding). The decoder start token is BOS_ID = our `decoder_start_token_id`.
SPECIAL_TOKENS = {PAD_ID: "<blank>", BOS_ID: "<s>", EOS_ID: "</s>", UNK_ID: "<unk>"}
_SPECIAL_IDS = {token: index for index, token in SPECIAL_TOKENS.items()}
# Our `activation_function` -> the name of CTranslate2's `common_spec.Activation` member. transformers' "gelu" is
# the exact (erf) GELU and "gelu_new" the tanh approximation; CTranslate2's SWISH is x * sigmoid(x), i.e. SiLU.
_ACTIVATIONS = {
    "relu": "RELU",
    "gelu": "GELU",
    "gelu_new": "GELUTanh",
    "silu": "SWISH",
    "swish": "SWISH",
    "tanh": "Tanh",
}


def available() -> bool:
    """Whether the `ctranslate2` package imports (it is an optional dependency, in the `dev` extra)."""
    try:
        import ctranslate2  # noqa: F401
    except (ImportError, OSError):  # OSError: the wheel is there but its shared library does not load
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


def _check_supported(config: VanillaTransformerConfig) -> None:
    """Refuse the design-choice variants CTranslate2's Transformer cannot compute, naming the field."""
    problems = []
    if config.norm_type != "layernorm":
        problems.append(f"norm_type={config.norm_type!r} (CTranslate2 has LayerNorm only)")
    if config.attention_type not in ("scaled_dot_product", "dot_product"):
        problems.append(f"attention_type={config.attention_type!r} (CTranslate2 has dot-product attention only)")
    if config.activation_function not in _ACTIVATIONS:
        problems.append(f"activation_function={config.activation_function!r}")
    # The synthetic vocabulary names the special tokens by the tokenizer's fixed ids (tokenization.py).
    expected = {"pad_token_id": PAD_ID, "decoder_start_token_id": BOS_ID, "eos_token_id": EOS_ID}
    for name, value in expected.items():
        if getattr(config, name) != value:
            problems.append(f"{name}={getattr(config, name)!r} (expected {value})")
    if config.vocab_size <= UNK_ID:
        problems.append(f"vocab_size={config.vocab_size} (the special ids need at least {UNK_ID + 1})")
    if problems:
        raise NotImplementedError("Cannot convert to CTranslate2: " + "; ".join(problems))


def _array(tensor: torch.Tensor) -> np.ndarray:
    """A float32, contiguous CPU copy: CTranslate2 serialises numpy arrays byte for byte."""
    return tensor.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy().copy()


def _set_linear(spec: Any, linears: list[nn.Linear]) -> None:
    """One CTranslate2 LinearSpec from one or more of our Linears, stacked along the output axis (fused Q/K/V).

    Both store the weight as (out_features, in_features), so no transpose is needed.
    """
    spec.weight = np.concatenate([_array(linear.weight) for linear in linears])
    if any(linear.bias is not None for linear in linears):
        spec.bias = np.concatenate(
            [
                _array(linear.bias) if linear.bias is not None else np.zeros(linear.out_features, np.float32)
                for linear in linears
            ]
        )


def _set_layer_norm(spec: Any, norm: nn.LayerNorm) -> None:
    spec.gamma = _array(norm.weight)
    spec.beta = _array(norm.bias)


def _set_self_attention(spec: Any, attention: nn.Module, norm: nn.LayerNorm) -> None:
    """Self-attention: CTranslate2 fuses Q, K, V into linear[0] (3D x D) and keeps the output projection apart."""
    _set_linear(spec.linear[0], [attention.q_proj, attention.k_proj, attention.v_proj])
    _set_linear(spec.linear[1], [attention.out_proj])
    _set_layer_norm(spec.layer_norm, norm)


def _set_cross_attention(spec: Any, attention: nn.Module, norm: nn.LayerNorm) -> None:
    """Encoder-decoder attention: queries from the decoder (linear[0]), fused K, V of the encoder output
    (linear[1], 2D x D), output projection (linear[2])."""
    _set_linear(spec.linear[0], [attention.q_proj])
    _set_linear(spec.linear[1], [attention.k_proj, attention.v_proj])
    _set_linear(spec.linear[2], [attention.out_proj])
    _set_layer_norm(spec.layer_norm, norm)


def _set_ffn(spec: Any, layer: nn.Module) -> None:
    _set_linear(spec.linear_0, [layer.ffn.fc1])
    _set_linear(spec.linear_1, [layer.ffn.fc2])
    _set_layer_norm(spec.layer_norm, layer.ffn_block.layer_norm)


def _position_table(stack: nn.Module, config: VanillaTransformerConfig, max_positions: int | None) -> np.ndarray:
    """(P, D) positional encodings, exactly the rows this stack adds: the interleaved sinusoid of §3.5 (not
    CTranslate2's sines-then-cosines), or the stack's learned table. CTranslate2 cannot extend a table, so sinusoids
    get `max_positions` rows (default `max_position_embeddings`), which bounds S and 1 + new tokens."""
    if config.position_embedding_type == "learned":
        return _array(stack.embed_positions.weight)
    return _array(sinusoidal_table(max_positions or config.max_position_embeddings, config.d_model))


def _set_stack_inputs(spec: Any, stack: nn.Module, config: VanillaTransformerConfig, max_positions: int | None) -> None:
    """Token embedding (V, D), its scale, the (P, D) position table and, pre-LN only, the stack's final LayerNorm."""
    embeddings = spec.embeddings[0] if isinstance(spec.embeddings, list) else spec.embeddings
    embeddings.weight = _array(stack.embed_tokens.weight)
    # A float, as the fairseq converter sets it: CTranslate2 multiplies the embedding by it before adding positions.
    spec.scale_embeddings = float(stack.embed_scale)
    spec.position_encodings.encodings = _position_table(stack, config, max_positions)
    if config.normalize_before:
        _set_layer_norm(spec.layer_norm, stack.layer_norm)


def convert(
    model: VanillaTransformerForConditionalGeneration, output_dir: str | Path, max_positions: int | None = None
) -> Path:
    """Write `model` as a CTranslate2 model directory (model.bin, config.json, shared_vocabulary.json); returns it.

    Weight map (ours -> CTranslate2 `TransformerSpec`, per layer i; E = encoder, D = decoder):
        model.{E,D}.embed_tokens.weight (V, D)        -> {encoder.embeddings_0, decoder.embeddings}.weight
        lm_head.weight (V, D)                          -> decoder.projection.weight (no bias)
        sinusoidal_table(P, D) / {E,D}.embed_positions -> {encoder,decoder}.position_encodings.encodings
        embed_scale (sqrt(D) or 1)                     -> {encoder,decoder}.scale_embeddings
        layers.i.self_attn.{q,k,v}_proj (D, D) each    -> layer_i.self_attention.linear_0 (3D, D), fused
        layers.i.self_attn.out_proj                    -> layer_i.self_attention.linear_1
        layers.i.self_attn_block.layer_norm            -> layer_i.self_attention.layer_norm
        D.layers.i.encoder_attn.q_proj                 -> layer_i.attention.linear_0
        D.layers.i.encoder_attn.{k,v}_proj             -> layer_i.attention.linear_1 (2D, D), fused
        D.layers.i.encoder_attn.out_proj               -> layer_i.attention.linear_2
        D.layers.i.encoder_attn_block.layer_norm       -> layer_i.attention.layer_norm
        layers.i.ffn.fc1 / fc2                         -> layer_i.ffn.linear_0 / linear_1
        layers.i.ffn_block.layer_norm                  -> layer_i.ffn.layer_norm
        (pre-LN only) {E,D}.layer_norm                 -> {encoder,decoder}.layer_norm
    With tied embeddings the three (V, D) matrices are one tensor; `spec.optimize` stores it once and aliases the
    others, and likewise the sinusoid table both stacks get.
    """
    from ctranslate2.specs import common_spec, transformer_spec

    config = model.config
    _check_supported(config)
    activation = common_spec.Activation[_ACTIVATIONS[config.activation_function]]
    # pre_norm=False is the paper's post-LN, LayerNorm(x + Sublayer(x)), with no final stack LayerNorm.
    encoder_spec = transformer_spec.TransformerEncoderSpec(
        config.encoder_layers, config.encoder_attention_heads, pre_norm=config.normalize_before, activation=activation
    )
    decoder_spec = transformer_spec.TransformerDecoderSpec(
        config.decoder_layers, config.decoder_attention_heads, pre_norm=config.normalize_before, activation=activation
    )
    spec = transformer_spec.TransformerSpec(encoder_spec, decoder_spec)

    encoder, decoder = model.model.encoder, model.model.decoder
    _set_stack_inputs(spec.encoder, encoder, config, max_positions)
    _set_stack_inputs(spec.decoder, decoder, config, max_positions)
    for layer_spec, layer in zip(spec.encoder.layer, encoder.layers, strict=True):
        _set_self_attention(layer_spec.self_attention, layer.self_attn, layer.self_attn_block.layer_norm)
        _set_ffn(layer_spec.ffn, layer)
    for layer_spec, layer in zip(spec.decoder.layer, decoder.layers, strict=True):
        _set_self_attention(layer_spec.self_attention, layer.self_attn, layer.self_attn_block.layer_norm)
        _set_cross_attention(layer_spec.attention, layer.encoder_attn, layer.encoder_attn_block.layer_norm)
        _set_ffn(layer_spec.ffn, layer)
    _set_linear(spec.decoder.projection, [model.lm_head])
    if config.attention_type == "dot_product":  # no 1/sqrt(d_k); CTranslate2's default queries_scale is 1/sqrt(d_k)
        for layer_spec in [*spec.encoder.layer, *spec.decoder.layer]:
            for attention in (layer_spec.self_attention, getattr(layer_spec, "attention", None)):
                if attention is not None:
                    attention.queries_scale = np.float32(1.0)

    tokens = vocabulary(config.vocab_size)
    spec.register_source_vocabulary(tokens)
    spec.register_target_vocabulary(tokens)
    spec.config.unk_token = SPECIAL_TOKENS[UNK_ID]
    spec.config.bos_token = SPECIAL_TOKENS[BOS_ID]
    spec.config.eos_token = SPECIAL_TOKENS[EOS_ID]
    spec.config.decoder_start_token = SPECIAL_TOKENS[BOS_ID]  # the decoder's first input, our id 1
    spec.config.add_source_bos = False
    spec.config.add_source_eos = False  # our rows end in EOS already: one more would change the encoder's input
    spec.config.layer_norm_epsilon = float(config.layer_norm_eps)

    spec.validate()
    spec.optimize(quantization="float32")  # aliases the tied matrices; keeps fp32
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    spec.save(str(output_dir))
    return output_dir


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
