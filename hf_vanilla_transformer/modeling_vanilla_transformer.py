"""The Transformer of "Attention Is All You Need" (Vaswani et al., 2017) as a transformers model.

Read it beside the paper, top to bottom: §3, §3.1 stacks and layers, §3.2 attention, §3.3 feed-forward networks,
§3.4 shared embeddings and output projection (with the model classes), §3.5 positions, §6.1 decoding; input checks
last. Axes in shape comments: B batch, S source length, T target length (new tokens only when decoding with a
cache), P past target length in the cache, D d_model, H heads, Dh = D / H (d_k = d_v), V vocabulary.

Imported beside it (`save_pretrained` copies them too): `losses.py` (the §5.4 loss, plain and fused with the
output projection) and `generation_vanilla_transformer.py` (how `generate()` applies §6.1 inside transformers' beam
search). CPU speed is not here: `cpu_inference.optimize_for_cpu_inference` converts a finished model, on purpose.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import Tensor, nn
from transformers import GenerationConfig, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache
from transformers.dynamic_module_utils import custom_object_save
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutput,
    BaseModelOutputWithPastAndCrossAttentions,
    Seq2SeqLMOutput,
    Seq2SeqModelOutput,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils.generic import can_return_tuple
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_vanilla_transformer import VanillaTransformerConfig
from .generation_vanilla_transformer import VanillaTransformerGenerationMixin
from .losses import can_fuse, fused_linear_cross_entropy, label_smoothed_cross_entropy

# §3 Model architecture: an encoder-decoder, auto-regressive on the target ---------------------------------------------


def shift_tokens_right(input_ids: Tensor, pad_token_id: int, decoder_start_token_id: int) -> Tensor:
    """Teacher forcing (§3): the decoder sees the target shifted right by one, starting from the start token.

    Label positions set to -100 (ignored by the loss) become padding.
    """
    shifted = input_ids.new_empty(input_ids.shape)
    shifted[:, 1:] = input_ids[:, :-1]
    shifted[:, 0] = decoder_start_token_id
    return shifted.masked_fill(shifted == -100, pad_token_id)


# transformers' base class: initialisation, tying, strict loading, capabilities --------------------------------------


class VanillaTransformerPreTrainedModel(PreTrainedModel):
    """Initialisation, tying, strict loading and the capabilities transformers reads off the class.

    Deviation: the paper states no initialisation. By default (`init_std=0.02`) every Linear weight and embedding is
    drawn from N(0, 0.02), as in BART and Marian, with zero biases, a zero padding row and identity LayerNorms: on
    real data it trained far better than fairseq's scheme (README, "Real data"), as small sub-layer outputs leave
    each post-LN block near the identity early on (Liu et al., 2020). `init_std="small_init"` scales the deviation
    with the width, sqrt(2 / (5 d_model)), for narrow models, where 0.02 is too small. `init_std=None` gives fairseq's
    scheme:
    Xavier-uniform Linears and N(0, d_model^-0.5) embeddings, which the sqrt(d_model) of §3.4 brings to unit size.
    """

    config_class = VanillaTransformerConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["VanillaTransformerEncoderLayer", "VanillaTransformerDecoderLayer"]
    # Trainer passes `num_items_in_batch`, the target tokens of the whole update (all accumulation steps and processes);
    # the loss is their summed losses over it, and Trainer then neither divides by the accumulation steps nor lets DDP's
    # average shrink it: every token of the update weighs the same (§5.1), as in one forward over the whole batch.
    accepts_loss_kwargs = True

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> Any:
        """`PreTrainedModel.from_pretrained`, made strict: weights only from safetensors (never unpickled from
        `pytorch_model.bin`), and a config that does not match the weights is an error naming the parameters,
        not a logged report beside a half-random model."""
        kwargs.setdefault("use_safetensors", True)
        want_info = kwargs.pop("output_loading_info", False)
        where = pretrained_model_name_or_path
        try:
            model, info = super().from_pretrained(where, *args, output_loading_info=True, **kwargs)
        except SafetensorError as error:
            raise OSError(
                f"Cannot read the weights in {where}: model.safetensors is damaged or truncated ({error})."
            ) from error
        except RuntimeError as error:
            if "ignore_mismatched_sizes" not in str(error):
                raise
            _, info = super().from_pretrained(
                where, *args, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs
            )
            raise ValueError(f"The config in {where} does not match its weights: {_describe(info)}") from None
        problems = "" if kwargs.get("ignore_mismatched_sizes") else _describe(info)
        if problems:
            raise ValueError(f"The config in {where} does not match its weights: {problems}")
        return (model, info) if want_info else model

    def save_pretrained(self, save_directory: Any, *args: Any, **kwargs: Any) -> Any:
        """`PreTrainedModel.save_pretrained`, with `AutoModel` in the saved `auto_map` as well.

        transformers maps only the class being saved, so a checkpoint of the seq2seq model would load with
        `AutoModelForSeq2SeqLM` but not `AutoModel` where the package is not installed (`trust_remote_code=True`).
        The bare model is in the same code file, and `from_pretrained` strips the `model.` prefix for it.

        A model sharded with FSDP2 (`fully_shard`) is an instance of a subclass that torch defines (`FSDP<Name>`, see
        `is_remote_code`): its code, copied here, is this package's. Give its gathered weights as `state_dict`
        (`Accelerator.get_state_dict`)."""
        if self._auto_class is not None:
            own = _own_class(type(self))
            bare = f"{own.__module__.rsplit('.', 1)[-1]}.VanillaTransformerModel"
            self.config.auto_map = {"AutoModel": bare, **(getattr(self.config, "auto_map", None) or {})}
            if own is not type(self) and kwargs.get("is_main_process", True):
                os.makedirs(save_directory, exist_ok=True)
                # Only the class is read (its module, name and `_auto_class`): an instance without `__init__`.
                custom_object_save(object.__new__(own), save_directory, config=self.config)
        return super().save_pretrained(save_directory, *args, **kwargs)

    @classmethod
    def is_remote_code(cls) -> bool:
        """Whether transformers copies the class's code beside its weights. Not for a subclass that torch defines
        (FSDP2's `FSDP<Name>`): transformers would copy torch's files as the model's code; `save_pretrained`
        copies this package's for it."""
        return super().is_remote_code() and _own_class(cls) is cls

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        normal_std = self.config.init_std_value()
        std = normal_std or self.config.d_model**-0.5
        if isinstance(module, nn.Linear):
            if normal_std is None:
                init.xavier_uniform_(module.weight)
            else:
                init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None and not getattr(module.weight, "_is_hf_initialized", False):
                init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, (nn.LayerNorm, VanillaTransformerMaskedBatchNorm)):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            if isinstance(module, VanillaTransformerMaskedBatchNorm):
                init.zeros_(module.running_mean)
                init.ones_(module.running_var)
        elif isinstance(module, VanillaTransformerAttention) and module.attention_type == "additive":
            for weight in (module.additive_query, module.additive_key, module.additive_score):
                init.normal_(weight, mean=0.0, std=module.head_dim**-0.5)
        elif isinstance(module, VanillaTransformerSinusoidalPositionalEncoding):
            # from_pretrained builds on the meta device and leaves non-persistent buffers empty: refill it here.
            init.copy_(module.pe, sinusoidal_table(module.num_positions, module.dim))


# §3.1 Encoder and decoder stacks --------------------------------------------------------------------------------------


class VanillaTransformerStack(VanillaTransformerPreTrainedModel):
    """What the encoder and decoder stacks share: N layers, and at their input the token embedding times
    sqrt(d_model) (§3.4) plus the positional encoding (§3.5), followed by dropout (§5.4). Each stack is a
    `PreTrainedModel`, as in Marian and BART, so that transformers' output recording (`capture_outputs`, which reads
    `_can_record_outputs`) collects its hidden states and attention weights with hooks, not hand-wired tuples.
    Unlike Marian's, a stack does not call `post_init` itself: the model that holds it initialises every module once
    (a stack's own pass would also draw the decoder's embedding, which tying then discards, and shift every later
    draw, so the same seed would no longer give the weights the recipes were measured with)."""

    def __init__(self, config: VanillaTransformerConfig, layers: list[nn.Module]) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model, padding_idx=config.pad_token_id)
        self.embed_scale = math.sqrt(config.d_model) if config.scale_embedding else 1.0
        learned = config.position_embedding_type == "learned"
        positions = (
            VanillaTransformerLearnedPositionalEmbedding if learned else VanillaTransformerSinusoidalPositionalEncoding
        )
        self.embed_positions = positions(config.max_position_embeddings, config.d_model)
        self.layers = nn.ModuleList(layers)
        # Pre-LN leaves the last residual sum unnormalised; post-LN ends in a LayerNorm already.
        self.layer_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps) if config.normalize_before else None

    def embed(self, input_ids: Tensor | None, inputs_embeds: Tensor | None, past_length: int = 0) -> Tensor:
        if inputs_embeds is None:
            _check_token_ids("input_ids", input_ids, self.config.vocab_size)
            inputs_embeds = self.embed_tokens(input_ids)  # (B, L) -> (B, L, D)
        positions = self.embed_positions(inputs_embeds.shape[1], past_length)  # (L, D)
        hidden_states = inputs_embeds * self.embed_scale + positions.to(inputs_embeds.dtype)
        return F.dropout(hidden_states, self.config.dropout, self.training)

    def norm_padding_mask(
        self, input_ids: Tensor | None, attention_mask: Tensor | None, length: int, from_ids: bool
    ) -> Tensor | None:
        """Real positions (B, L) for BatchNorm's batch statistics; None when nothing needs them (LayerNorm, or
        evaluation, which uses running statistics). The mask's last L columns, or, with `from_ids` (the decoder:
        Trainer passes no decoder mask), the non-padding ids of the right-shifted labels."""
        if self.config.norm_type != "batchnorm" or not self.training:
            return None
        if attention_mask is not None:
            return attention_mask[:, -length:].bool()
        if from_ids and input_ids is not None and self.config.pad_token_id is not None:
            mask = input_ids != self.config.pad_token_id
            mask[:, 0] = True  # the start token, even where it shares the pad id
            return mask
        return None

    def final_norm(self, hidden_states: Tensor) -> Tensor:
        return self.layer_norm(hidden_states) if self.layer_norm is not None else hidden_states


class VanillaTransformerEncoder(VanillaTransformerStack):
    """A stack of N encoder layers over the embedded source (Figure 1, left)."""

    @property
    def _can_record_outputs(self) -> dict[str, Any]:  # a property: the classes it names come later in the file
        """`output_hidden_states`: each layer's input, then the last output; `output_attentions`: each layer's
        attention weights."""
        return {"hidden_states": VanillaTransformerEncoderLayer, "attentions": VanillaTransformerAttention}

    def __init__(self, config: VanillaTransformerConfig) -> None:
        super().__init__(config, [VanillaTransformerEncoderLayer(config, i) for i in range(config.encoder_layers)])

    @capture_outputs
    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        **kwargs: Any,
    ) -> BaseModelOutput:
        """input_ids (B, S) and attention_mask (B, S; 1 for tokens, 0 for padding). Returns (B, S, D); with
        `output_hidden_states` / `output_attentions` (keyword arguments), those of every layer too."""
        batch_size, src_len = _batch_and_length(input_ids, inputs_embeds, "input_ids")
        _check_mask("attention_mask", attention_mask, batch_size, src_len)
        hidden_states = self.embed(input_ids, inputs_embeds)
        padding_mask = self.norm_padding_mask(input_ids, attention_mask, src_len, from_ids=False)  # (B, S)
        # (B, S) padding mask -> (B, 1, S, S) in the form the attention implementation wants (None if no padding).
        mask = create_bidirectional_mask(self.config, hidden_states, attention_mask)
        for layer in self.layers:
            hidden_states = layer(hidden_states, mask, padding_mask=padding_mask)
        return BaseModelOutput(last_hidden_state=self.final_norm(hidden_states))


class VanillaTransformerDecoder(VanillaTransformerStack):
    """A stack of N decoder layers over the embedded, right-shifted target (Figure 1, right). With `use_cache`, keys
    and values of earlier steps live in an `EncoderDecoderCache`; each step feeds only the new tokens."""

    @property
    def _can_record_outputs(self) -> dict[str, Any]:
        """As the encoder's, with the masked self-attention and the cross-attention weights recorded apart."""
        return {
            "hidden_states": VanillaTransformerDecoderLayer,
            "attentions": OutputRecorder(VanillaTransformerAttention, index=1, layer_name="self_attn"),
            "cross_attentions": OutputRecorder(VanillaTransformerAttention, index=1, layer_name="encoder_attn"),
        }

    def __init__(self, config: VanillaTransformerConfig) -> None:
        super().__init__(config, [VanillaTransformerDecoderLayer(config, i) for i in range(config.decoder_layers)])

    @capture_outputs
    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        encoder_hidden_states: Tensor | None = None,
        encoder_attention_mask: Tensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPastAndCrossAttentions:
        """input_ids (B, T), attention_mask (B, P + T), encoder_hidden_states (B, S, D) or, with several decoder rows
        per source, (B / g, S, D); encoder_attention_mask likewise (B or B / g, S). Returns last_hidden_state
        (B, T, D) and the cache."""
        batch_size, tgt_len = _batch_and_length(input_ids, inputs_embeds, "decoder_input_ids")
        if use_cache and past_key_values is None:
            past_key_values = EncoderDecoderCache(DynamicCache(), DynamicCache())
        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
        _check_mask("decoder_attention_mask", attention_mask, batch_size, past_length + tgt_len)
        hidden_states = self.embed(input_ids, inputs_embeds, past_length)
        padding_mask = self.norm_padding_mask(input_ids, attention_mask, tgt_len, from_ids=True)  # (B, T)
        # Causal plus target padding, (B, 1, T, P + T): a single new token may see everything before it.
        causal_mask = None
        if tgt_len > 1 or attention_mask is not None:
            self_cache = past_key_values.self_attention_cache if past_key_values is not None else None
            causal_mask = create_causal_mask(self.config, hidden_states, attention_mask, self_cache)
        # Source padding for cross-attention, (B, 1, T, S); with g decoder rows per source, one mask row per source,
        # (B / g, 1, 1, S), which broadcasts over all its queries (only the batch size, dtype and device are read).
        grouped = hidden_states.shape[0] != encoder_hidden_states.shape[0]
        queries = encoder_hidden_states[:, :1] if grouped else hidden_states
        cross_mask = create_bidirectional_mask(
            self.config, queries, encoder_attention_mask, encoder_hidden_states=encoder_hidden_states
        )
        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                causal_mask,
                encoder_hidden_states,  # positional: reentrant checkpointing only gives gradients to positional tensors
                encoder_attention_mask=cross_mask,
                past_key_values=past_key_values,
                padding_mask=padding_mask,
            )
        return BaseModelOutputWithPastAndCrossAttentions(
            last_hidden_state=self.final_norm(hidden_states), **{CACHE_FIELD: past_key_values if use_cache else None}
        )


class VanillaTransformerEncoderLayer(GradientCheckpointingLayer):
    """Self-attention, then the feed-forward network, each inside a residual sub-layer (Figure 1, left)."""

    def __init__(self, config: VanillaTransformerConfig, layer_idx: int) -> None:
        super().__init__()
        heads = config.encoder_attention_heads
        self.self_attn = VanillaTransformerAttention(
            config, heads, is_causal=False, is_cross=False, layer_idx=layer_idx
        )
        self.self_attn_block = VanillaTransformerSublayer(config)
        self.ffn = VanillaTransformerFeedForward(config, config.encoder_ffn_dim)
        self.ffn_block = VanillaTransformerSublayer(config)

    def forward(
        self, hidden_states: Tensor, attention_mask: Tensor | None = None, padding_mask: Tensor | None = None
    ) -> Tensor:
        """hidden_states (B, S, D) -> (B, S, D)."""
        self_attention = partial(self.self_attn, attention_mask=attention_mask)
        hidden_states = self.self_attn_block(hidden_states, self_attention, padding_mask)
        return self.ffn_block(hidden_states, self.ffn, padding_mask)


class VanillaTransformerDecoderLayer(GradientCheckpointingLayer):
    """Masked self-attention, encoder-decoder attention, then the feed-forward network (Figure 1, right)."""

    def __init__(self, config: VanillaTransformerConfig, layer_idx: int) -> None:
        super().__init__()
        heads = config.decoder_attention_heads
        self.self_attn = VanillaTransformerAttention(config, heads, is_causal=True, is_cross=False, layer_idx=layer_idx)
        self.self_attn_block = VanillaTransformerSublayer(config)
        self.encoder_attn = VanillaTransformerAttention(
            config, heads, is_causal=False, is_cross=True, layer_idx=layer_idx
        )
        self.encoder_attn_block = VanillaTransformerSublayer(config)
        self.ffn = VanillaTransformerFeedForward(config, config.decoder_ffn_dim)
        self.ffn_block = VanillaTransformerSublayer(config)

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Tensor | None,
        encoder_hidden_states: Tensor,
        encoder_attention_mask: Tensor | None = None,
        past_key_values: EncoderDecoderCache | None = None,
        padding_mask: Tensor | None = None,
    ) -> Tensor:
        """hidden_states (B, T, D) -> (B, T, D)."""
        self_attention = partial(self.self_attn, attention_mask=attention_mask, past_key_values=past_key_values)
        hidden_states = self.self_attn_block(hidden_states, self_attention, padding_mask)
        cross_attention = partial(
            self.encoder_attn,
            key_value_states=encoder_hidden_states,
            attention_mask=encoder_attention_mask,
            past_key_values=past_key_values,
        )
        hidden_states = self.encoder_attn_block(hidden_states, cross_attention, padding_mask)
        return self.ffn_block(hidden_states, self.ffn, padding_mask)


class VanillaTransformerSublayer(nn.Module):
    """The residual connection around each sub-layer, followed by layer normalisation (§3.1, §5.4):

    post-LN (the paper): LayerNorm(x + Dropout(Sublayer(x)))
    pre-LN (`normalize_before`, a deviation): x + Dropout(Sublayer(LayerNorm(x)))

    With `norm_type="batchnorm"` the normalisation is `VanillaTransformerMaskedBatchNorm` instead.
    """

    def __init__(self, config: VanillaTransformerConfig) -> None:
        super().__init__()
        self.normalize_before = config.normalize_before
        self.dropout = config.dropout
        if config.norm_type == "batchnorm":
            self.batch_norm = VanillaTransformerMaskedBatchNorm(config.d_model, eps=config.layer_norm_eps)
        else:
            self.layer_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)

    def norm(self, x: Tensor, padding_mask: Tensor | None) -> Tensor:
        if hasattr(self, "batch_norm"):
            return self.batch_norm(x, padding_mask)
        return self.layer_norm(x)

    def forward(self, x: Tensor, sublayer: Callable[[Tensor], Any], padding_mask: Tensor | None = None) -> Tensor:
        """The new residual stream. (An attention sub-layer also returns its weights, which the decoder or encoder
        records from the attention module itself when asked for them.)"""
        output = sublayer(self.norm(x, padding_mask) if self.normalize_before else x)
        output = output[0] if isinstance(output, tuple) else output
        x = x + F.dropout(output, self.dropout, self.training)
        return x if self.normalize_before else self.norm(x, padding_mask)


class VanillaTransformerMaskedBatchNorm(nn.Module):
    """`norm_type="batchnorm"`, the comparison the paper's LayerNorm invites: BatchNorm over the features whose
    batch statistics use real (non-padding) positions only, as padding would be unfair to it. Running statistics
    (momentum 0.1, as torch's BatchNorm) serve evaluation and incremental decoding."""

    def __init__(self, dim: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """x (B, L, D); padding_mask (B, L), True at real tokens (None: all real)."""
        mean, var = self.running_mean, self.running_var
        if self.training:
            rows = x[padding_mask] if padding_mask is not None else x.reshape(-1, x.shape[-1])  # (real tokens, D)
            if rows.shape[0] > 1:
                mean, var = rows.mean(0), rows.var(0, unbiased=False)
                with torch.no_grad():
                    unbiased = var * rows.shape[0] / (rows.shape[0] - 1)
                    self.running_mean.lerp_(mean.detach(), self.momentum)
                    self.running_var.lerp_(unbiased.detach(), self.momentum)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias


# §3.2.1 Scaled dot-product attention ----------------------------------------------------------------------------------


def scaled_dot_product_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Tensor, Tensor]:
    """Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V, the "eager" implementation.

    query (B, H, Tq, Dh), key and value (B, H, Tk, Dh). `attention_mask` is None, an additive float mask (0 to
    attend, the dtype's minimum to block) or a boolean mask (True to attend), broadcastable to (B, H, Tq, Tk).
    Returns the output as (B, Tq, H, Dh), the layout transformers' other attention functions return, and the
    attention weights (B, H, Tq, Tk). The "sdpa" implementation (transformers' call of torch's fused kernel)
    computes the same function.
    """
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling  # (B, H, Tq, Tk)
    return _attend(module, scores, value, attention_mask, dropout)


def additive_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Tensor, Tensor]:
    """Additive attention (Bahdanau et al., 2015), the alternative §3.2.1 compares against, per head:
    score(q, k) = w^T tanh(W_q q + W_k k), with W_q, W_k of size Dh x Dh and w of size Dh for each head.

    Same inputs, masks and outputs as `scaled_dot_product_attention`. It materialises a (B, H, Tq, Tk, Dh) tensor,
    which is why the paper calls dot-product attention "much faster and more space-efficient in practice".
    """
    q = torch.einsum("bhqd,hde->bhqe", query, module.additive_query)  # (B, H, Tq, Dh)
    k = torch.einsum("bhkd,hde->bhke", key, module.additive_key)  # (B, H, Tk, Dh)
    hidden = torch.tanh(q.unsqueeze(3) + k.unsqueeze(2))  # (B, H, Tq, Tk, Dh)
    scores = torch.einsum("bhqke,he->bhqk", hidden, module.additive_score)  # (B, H, Tq, Tk)
    return _attend(module, scores, value, attention_mask, dropout)


def _attend(
    module: nn.Module, scores: Tensor, value: Tensor, attention_mask: Tensor | None, dropout: float
) -> tuple[Tensor, Tensor]:
    """Mask the scores, softmax them over the keys, and take the weighted sum of the values."""
    if attention_mask is None and module.is_causal and scores.shape[-2] > 1:
        # sdpa-style masks leave plain causality implicit (mask None, is_causal set): make it explicit here. The
        # Tq queries are the last Tq of the Tk positions, so the diagonal aligns to the bottom right.
        q_len, k_len = scores.shape[-2:]
        attention_mask = torch.ones(q_len, k_len, dtype=torch.bool, device=scores.device).tril(k_len - q_len)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            # Clamp so that score + min cannot overflow to -inf in fp16, which would make a fully masked row NaN.
            scores = (scores + attention_mask).clamp(min=torch.finfo(scores.dtype).min)
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    weights = F.dropout(weights, dropout, module.training)
    output = torch.matmul(weights, value)  # (B, H, Tq, Dh)
    return output.transpose(1, 2).contiguous(), weights


# §3.2.2 Multi-head attention, and §3.2.3 its three uses ---------------------------------------------------------------


class VanillaTransformerAttention(nn.Module):
    """MultiHead(Q, K, V) = Concat(head_1..head_h) W^O, head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V).

    One class serves the three uses of §3.2.3: encoder self-attention, masked decoder self-attention
    (`is_causal=True`) and encoder-decoder attention (`is_cross=True`: queries from the decoder, keys and values
    from the encoder output). The h per-head projections are stored as one D x D matrix each, as is standard.
    """

    def __init__(
        self, config: VanillaTransformerConfig, num_heads: int, is_causal: bool, is_cross: bool, layer_idx: int
    ) -> None:
        super().__init__()
        self.config = config
        self.num_heads = num_heads
        self.head_dim = config.d_model // num_heads
        self.attention_type = config.attention_type
        # §3.2.1: "for large values of d_k, the dot products grow large in magnitude, pushing the softmax function
        # into regions where it has extremely small gradients", hence 1/sqrt(d_k); "dot_product" leaves it out.
        self.scaling = self.head_dim**-0.5 if config.attention_type == "scaled_dot_product" else 1.0
        self.is_causal = is_causal  # read by the sdpa implementation when no mask is materialised
        self.is_cross = is_cross
        self.layer_idx = layer_idx
        self.dropout = config.attention_dropout
        # §3.2.2: W^Q, W^K, W^V and W^O are matrices; `attention_bias` adds the biases other implementations have.
        self.q_proj = nn.Linear(config.d_model, config.d_model, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.d_model, config.d_model, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.d_model, config.d_model, bias=config.attention_bias)
        self.out_proj = nn.Linear(config.d_model, config.d_model, bias=config.attention_bias)
        if config.attention_type == "additive":  # per-head W_q, W_k and w of `additive_attention`
            self.additive_query = nn.Parameter(torch.empty(num_heads, self.head_dim, self.head_dim))
            self.additive_key = nn.Parameter(torch.empty(num_heads, self.head_dim, self.head_dim))
            self.additive_score = nn.Parameter(torch.empty(num_heads, self.head_dim))

    def forward(
        self,
        hidden_states: Tensor,
        key_value_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        past_key_values: EncoderDecoderCache | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """hidden_states (B, Tq, D) give the queries; key_value_states (B, Tk, D), the encoder output, give keys
        and values for cross-attention. Returns (B, Tq, D) and the attention weights (B, H, Tq, Tk) where the
        implementation computes them (eager; "sdpa" returns None), which `output_attentions` records."""
        query = self._split_heads(self.q_proj(hidden_states))  # (B, H, Tq, Dh)
        key, value = self._keys_values(key_value_states if self.is_cross else hidden_states, past_key_values)
        group = query.shape[0] // key.shape[0]  # decoder rows per source (`rows_per_source`); 1 but in beam search
        query = self._queries_per_source(query, group)
        # One dispatch through transformers' table of implementations of the same function ("sdpa", "flex_attention",
        # "flash_attention_2", whatever a user registers), chosen by `attn_implementation`; "eager" is
        # `scaled_dot_product_attention`. Additive attention is another function with its own parameters (a model
        # variant, chosen by `attention_type`), not an implementation: it is not registered there.
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, scaled_dot_product_attention
        )
        if self.attention_type == "additive":
            attention = additive_attention
        dropout = self.dropout if self.training else 0.0
        output, weights = attention(self, query, key, value, attention_mask, dropout=dropout, scaling=self.scaling)
        if group > 1:  # back to one row per decoder row: (B, g * Tq, H, Dh) -> (B * g, Tq, H, Dh)
            output = output.unflatten(1, (group, -1)).flatten(0, 1)
            if weights is not None:  # (B, H, g * Tq, Tk) -> (B * g, H, Tq, Tk)
                weights = weights.unflatten(2, (group, -1)).transpose(1, 2).flatten(0, 1)
        output = self.out_proj(output.reshape(*hidden_states.shape[:-1], -1))  # Concat(heads) W^O: (B, Tq, D)
        return output, weights

    def _split_heads(self, x: Tensor) -> Tensor:
        return x.view(*x.shape[:-1], self.num_heads, self.head_dim).transpose(1, 2)  # (B, L, D) -> (B, H, L, Dh)

    def _keys_values(
        self, key_value_states: Tensor, past_key_values: EncoderDecoderCache | None
    ) -> tuple[Tensor, Tensor]:
        """Keys and values, through the cache: self-attention appends the new step; cross-attention projects the
        encoder output once per sequence and reuses it for every later step."""
        cache = None
        if past_key_values is not None:
            cache = past_key_values.cross_attention_cache if self.is_cross else past_key_values.self_attention_cache
            if self.is_cross and past_key_values.is_updated.get(self.layer_idx):
                layer = cache.layers[self.layer_idx]
                return layer.keys, layer.values
        key = self._split_heads(self.k_proj(key_value_states))  # (B, Tk, D) -> (B, H, Tk, Dh)
        value = self._split_heads(self.v_proj(key_value_states))
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)  # self-attention: (B, H, P + T, Dh)
            if self.is_cross:
                past_key_values.is_updated[self.layer_idx] = True
        return key, value

    @staticmethod
    def _queries_per_source(query: Tensor, group: int) -> Tensor:
        """Cross-attention with `group` decoder rows per source: (B * g, H, Tq, Dh) -> (B, H, g * Tq, Dh), so that a
        source's g rows become more queries of its one copy of keys and values. Unchanged for g = 1."""
        return query.unflatten(0, (-1, group)).transpose(1, 2).flatten(2, 3) if group > 1 else query


# §3.3 Position-wise feed-forward networks -----------------------------------------------------------------------------


class VanillaTransformerFeedForward(nn.Module):
    """FFN(x) = max(0, x W_1 + b_1) W_2 + b_2, applied to each position alone (D -> d_ff -> D)."""

    def __init__(self, config: VanillaTransformerConfig, ffn_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.d_model, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, config.d_model)
        self.activation_fn = ACT2FN[config.activation_function]
        self.activation_dropout = config.activation_dropout

    def forward(self, hidden_states: Tensor) -> Tensor:
        hidden_states = self.activation_fn(self.fc1(hidden_states))
        hidden_states = F.dropout(hidden_states, self.activation_dropout, self.training)
        return self.fc2(hidden_states)


# §3.4 Embeddings and softmax: one shared matrix, and the model classes that tie it ------------------------------------


class VanillaTransformerModel(VanillaTransformerPreTrainedModel):
    """The bare encoder-decoder: returns the decoder's last hidden states (no output projection). With
    `tie_word_embeddings` (§3.4: one shared vocabulary) the decoder's embedding is the encoder's matrix."""

    _tied_weights_keys = {"decoder.embed_tokens.weight": "encoder.embed_tokens.weight"}

    def __init__(self, config: VanillaTransformerConfig) -> None:
        super().__init__(config)
        self.encoder = VanillaTransformerEncoder(config)
        self.decoder = VanillaTransformerDecoder(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.encoder.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.encoder.embed_tokens = value
        if self.config.tie_word_embeddings:
            self.decoder.embed_tokens = value

    @can_return_tuple
    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        decoder_input_ids: Tensor | None = None,
        decoder_attention_mask: Tensor | None = None,
        encoder_outputs: BaseModelOutput | tuple | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: Tensor | None = None,
        decoder_inputs_embeds: Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        rows_per_source: int = 1,
        cache: Cache | None = None,
        **kwargs: Any,
    ) -> Seq2SeqModelOutput:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(B, S)`), attention_mask (`(B, S)`, 1 for tokens, 0 for padding).
            decoder_input_ids (`torch.LongTensor` of shape `(B, T)`): the target shifted right.
            decoder_attention_mask (`torch.Tensor` of shape `(B, P + T)`, *optional*).
            encoder_outputs (`BaseModelOutput`, *optional*): a precomputed encoder output (generate() passes it).
            past_key_values (`EncoderDecoderCache`, *optional*): the decoding cache, also accepted as `cache` (its
                name from transformers 5.24); returned under the installed version's name (`CACHE_FIELD`).
            rows_per_source (`int`, defaults to 1): consecutive decoder rows per source row. With k > 1 (beam search:
                `generate()` passes the beam count) cross-attention reads each source's keys and values once for its
                k rows instead of from k copies of the encoder output.
        """
        past_key_values = _one_cache(cache, past_key_values, kwargs)
        if use_cache is None:  # a training forward (Trainer passes decoder_input_ids, no labels) caches nothing
            use_cache = self.config.use_cache and not self.training
        if output_attentions and self.config._attn_implementation != "eager":
            raise ValueError(
                f"output_attentions=True needs the eager attention implementation, not "
                f"{self.config._attn_implementation!r}: call model.set_attn_implementation('eager') or load with "
                "attn_implementation='eager'."
            )
        # Input checks before any compute: a bad batch should not cost an encoder pass first.
        if decoder_input_ids is None and decoder_inputs_embeds is None:
            raise ValueError("Pass `decoder_input_ids` (or `labels`, from which they are made) to run the decoder.")
        decoder_batch = (decoder_input_ids if decoder_input_ids is not None else decoder_inputs_embeds).shape[0]
        if not isinstance(rows_per_source, int) or rows_per_source < 1:
            raise ValueError(f"`rows_per_source` must be a positive integer, got {rows_per_source!r}.")
        if encoder_outputs is None:
            source_batch, _ = _batch_and_length(input_ids, inputs_embeds, "input_ids")
            _check_batches(source_batch, decoder_batch, rows_per_source)
            encoder_outputs = self.encoder(
                input_ids=input_ids,
                attention_mask=attention_mask,
                inputs_embeds=inputs_embeds,
                output_attentions=output_attentions,
                output_hidden_states=output_hidden_states,
                return_dict=True,
            )
        elif not isinstance(encoder_outputs, BaseModelOutput):
            encoder_outputs = BaseModelOutput(*encoder_outputs)
        encoder_hidden_states = encoder_outputs.last_hidden_state
        _check_mask("attention_mask", attention_mask, *encoder_hidden_states.shape[:2])
        _check_batches(encoder_hidden_states.shape[0], decoder_batch, rows_per_source)
        if rows_per_source > 1 and self.config._attn_implementation not in ("eager", "sdpa"):
            # Other kernels (flash, flex) take masks in their own formats, one row per query row: repeat instead.
            encoder_hidden_states = encoder_hidden_states.repeat_interleave(rows_per_source, dim=0)
            if attention_mask is not None:
                attention_mask = attention_mask.repeat_interleave(rows_per_source, dim=0)
        decoder_outputs: BaseModelOutputWithPastAndCrossAttentions = self.decoder(
            input_ids=decoder_input_ids,
            attention_mask=decoder_attention_mask,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=attention_mask,
            past_key_values=past_key_values,
            inputs_embeds=decoder_inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        return Seq2SeqModelOutput(
            last_hidden_state=decoder_outputs.last_hidden_state,
            **{CACHE_FIELD: getattr(decoder_outputs, CACHE_FIELD)},
            decoder_hidden_states=decoder_outputs.hidden_states,
            decoder_attentions=decoder_outputs.attentions,
            cross_attentions=decoder_outputs.cross_attentions,
            encoder_last_hidden_state=encoder_hidden_states,
            encoder_hidden_states=encoder_outputs.hidden_states,
            encoder_attentions=encoder_outputs.attentions,
        )


class VanillaTransformerForConditionalGeneration(VanillaTransformerPreTrainedModel, VanillaTransformerGenerationMixin):
    """The full model of the paper: encoder-decoder, then the pre-softmax linear projection (§3.4), whose weight
    is the shared embedding matrix when `tie_word_embeddings` is set. Given `labels`, returns the mean
    cross-entropy over the target tokens (positions labelled -100 are ignored), label-smoothed by
    `config.label_smoothing` (§5.4). `generate()` decodes by the rules of §6.1 (see `paper_generation_config`).

    Example:

    ```python
    >>> from hf_vanilla_transformer import VanillaTransformerConfig, VanillaTransformerForConditionalGeneration
    >>> model = VanillaTransformerForConditionalGeneration(VanillaTransformerConfig.from_preset("tiny", vocab_size=100))
    >>> out = model(input_ids=torch.tensor([[5, 6, 7, 2]]), labels=torch.tensor([[8, 9, 2]]))
    >>> out.logits.shape
    torch.Size([1, 3, 100])
    ```
    """

    _tied_weights_keys = {"lm_head.weight": "model.encoder.embed_tokens.weight"}
    # Set on a model (not saved with it) to make training steps return only the loss: Trainer reads nothing else,
    # and the fused loss (losses.py) skips the (B, T, V) logits. Off by default: a forward with labels returns
    # logits, as in every transformers model. train.py and the benchmarks turn it on.
    fused_training_loss: bool = False

    def __init__(self, config: VanillaTransformerConfig) -> None:
        super().__init__(config)
        self.model = VanillaTransformerModel(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)  # §3.4: no bias, tied weight
        self.post_init()
        self.generation_config = paper_generation_config(config)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head = new_embeddings

    @can_return_tuple
    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        decoder_input_ids: Tensor | None = None,
        decoder_attention_mask: Tensor | None = None,
        encoder_outputs: BaseModelOutput | tuple | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: Tensor | None = None,
        decoder_inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_logits: bool | None = None,
        rows_per_source: int = 1,
        cache: Cache | None = None,
        **kwargs: Any,
    ) -> Seq2SeqLMOutput:
        r"""
        Args are those of [`VanillaTransformerModel.forward`], plus:
            labels (`torch.LongTensor` of shape `(B, T)`, *optional*): target ids, -100 where ignored. Without
                `decoder_input_ids` the decoder input is `labels` shifted right. Label-smoothed by
                `config.label_smoothing` (§5.4).
            return_logits (`bool`, *optional*): `False` leaves the (B, T, V) logits out and computes the same loss
                fused with the output projection (`losses.fused_linear_cross_entropy`). By default logits are
                computed, except in training steps of a model with `fused_training_loss` set, as `train.py` does.
            num_items_in_batch (`int` or `torch.Tensor`, *optional*, keyword): passed by Trainer, the count of target
                tokens (labels not -100) of the whole update, over its accumulation steps and processes. The loss is
                then the sum of this batch's token losses divided by it, not their mean, so the update's gradient is
                the one of its whole batch's mean loss. Without it (direct calls) the loss is the mean over tokens.
        """
        past_key_values = _one_cache(cache, past_key_values, kwargs)
        if labels is not None:
            _check_token_ids("labels", torch.where(labels == -100, 0, labels), self.config.vocab_size)
            if decoder_input_ids is None and decoder_inputs_embeds is None:
                decoder_input_ids = self.prepare_decoder_input_ids_from_labels(labels)
                use_cache = False  # training: nothing to cache
            decoder_shape = (decoder_input_ids if decoder_input_ids is not None else decoder_inputs_embeds).shape[:2]
            if tuple(labels.shape) != tuple(decoder_shape):
                raise ValueError(
                    f"`labels` has shape {tuple(labels.shape)} but the decoder input has {tuple(decoder_shape)}."
                )
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
            encoder_outputs=encoder_outputs,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            decoder_inputs_embeds=decoder_inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            rows_per_source=rows_per_source,
        )
        hidden_states = outputs.last_hidden_state  # (B, T, D)
        epsilon = self.config.label_smoothing
        num_items = kwargs.get("num_items_in_batch")  # Trainer's token count of the update; None: the mean
        logits = loss = None
        if return_logits is None:
            return_logits = not (self.fused_training_loss and self.training and torch.is_grad_enabled())
        if labels is not None and not return_logits and can_fuse(self.lm_head):
            loss = fused_linear_cross_entropy(hidden_states, self.lm_head.weight, labels, epsilon, num_items)
        else:  # also where the fused loss steps aside (a wrapped, hooked or sharded output projection)
            logits = self.lm_head(hidden_states)  # (B, T, D) -> (B, T, V)
            if labels is not None:
                loss = label_smoothed_cross_entropy(logits, labels, epsilon, num_items)
            logits = logits if return_logits or labels is None else None  # no loss to return instead
        rest = {key: value for key, value in outputs.items() if key != "last_hidden_state"}  # cache, states, weights
        return Seq2SeqLMOutput(loss=loss, logits=logits, **rest)

    def prepare_decoder_input_ids_from_labels(self, labels: Tensor) -> Tensor:
        """Used by `DataCollatorForSeq2Seq(model=...)`: Trainer's label smoothing pops `labels` before forward."""
        return shift_tokens_right(labels, self.config.pad_token_id, self.config.decoder_start_token_id)


# §3.5 Positional encoding ---------------------------------------------------------------------------------------------


def sinusoidal_table(num_positions: int, dim: int, offset: int = 0) -> Tensor:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d)), for pos in [offset, offset+n).

    Sines and cosines interleave as the formula has them (Marian and fairseq put all sines first instead).
    Returns a float32 tensor of shape (num_positions, dim).
    """
    position = torch.arange(offset, offset + num_positions, dtype=torch.float32).unsqueeze(1)  # (n, 1)
    inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))  # (ceil(d/2),)
    angles = position * inv_freq  # (n, ceil(d/2))
    table = torch.zeros(num_positions, dim)
    table[:, 0::2] = torch.sin(angles)
    table[:, 1::2] = torch.cos(angles[:, : dim // 2])
    return table


class VanillaTransformerSinusoidalPositionalEncoding(nn.Module):
    """Fixed sinusoids (§3.5): no parameters, not saved in checkpoints, any length.

    The first `max_position_embeddings` rows are precomputed in a non-persistent buffer; longer inputs get their
    rows computed on the fly, so there is no hard cap on length (the reason §3.5 gives for choosing sinusoids).
    """

    def __init__(self, num_positions: int, dim: int) -> None:
        super().__init__()
        self.num_positions = num_positions
        self.dim = dim
        self.register_buffer("pe", sinusoidal_table(num_positions, dim), persistent=False)

    def forward(self, seq_len: int, past_length: int = 0) -> Tensor:
        """Encodings of positions [past_length, past_length + seq_len): shape (seq_len, D)."""
        end = past_length + seq_len
        if end <= self.num_positions:
            return self.pe[past_length:end]
        return sinusoidal_table(seq_len, self.dim, offset=past_length).to(self.pe.device)


class VanillaTransformerLearnedPositionalEmbedding(nn.Embedding):
    """Learned positions, the paper's Table 3 row (E) variant. Refuses positions it has no row for."""

    def forward(self, seq_len: int, past_length: int = 0) -> Tensor:  # type: ignore[override]
        end = past_length + seq_len
        if end > self.num_embeddings:
            raise ValueError(
                f"Sequence of length {end} is longer than the {self.num_embeddings} learned positions "
                "(`max_position_embeddings`); truncate the input or use position_embedding_type='sinusoidal'."
            )
        return self.weight[past_length:end]


# §6.1 Decoding: beam 4, length penalty α = 0.6, output length at most input length + 50 -------------------------------


def paper_generation_config(config: VanillaTransformerConfig) -> GenerationConfig:
    """The decoding defaults of §6.1, saved as `generation_config.json`: beam size 4, GNMT's length penalty with
    alpha = 0.6 (`length_penalty_type`), and `max_length_offset` = 50, read by `generate()` as "input length + 50"
    whenever the caller gives no `max_length` or `max_new_tokens`. Beam search ends once an input has 4 finished
    hypotheses (`early_stopping=True`). tensor2tensor's rule, which ends only when no live hypothesis can still beat
    the finished ones, is `early_stopping="never"`; the README's "Real data" section compares the two."""
    generation_config = GenerationConfig.from_model_config(config)
    generation_config.num_beams = 4
    generation_config.length_penalty = 0.6
    generation_config.length_penalty_type = "gnmt"  # not a GenerationConfig field: saved and loaded as an extra key
    generation_config.early_stopping = True
    generation_config.max_length_offset = 50  # not a GenerationConfig field: saved and loaded as an extra key
    generation_config._from_model_config = False  # ours, not derived from config.json: keep it as saved
    return generation_config


# Input checks and loading reports: clear errors instead of torch's or silent garbage ----------------------------------

# transformers 5.24 renamed the decoding cache from `past_key_values` to `cache`, as the forward argument that
# `generate()` passes (the old name stays accepted until 5.40) and as the output field it reads back. The forwards here
# take either name and return the cache under the installed version's field, so the model works with both.
CACHE_FIELD = "cache" if "cache" in Seq2SeqLMOutput.__dataclass_fields__ else "past_key_values"


def _one_cache(cache: Cache | None, past_key_values: Cache | None, extra: dict[str, Any]) -> Cache | None:
    """The decoding cache, under either name. A cache under any other name is an error: `**kwargs` would otherwise
    drop it without a word, as it dropped `cache` before this model knew that name, and decode without context."""
    stray = sorted(name for name, value in extra.items() if isinstance(value, Cache))
    if stray:
        raise ValueError(f"Unknown cache argument {stray}: pass the decoding cache as `cache` or `past_key_values`.")
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("Pass the decoding cache once, as `cache` or as `past_key_values` (its name before 5.24).")
    return cache if cache is not None else past_key_values


def _own_class(cls: type) -> type:
    """The class itself, or, for a subclass that torch made of it (FSDP2's `FSDP<Name>`), the class it was made of."""
    return next(base for base in cls.__mro__ if not base.__module__.startswith("torch."))


def _check_token_ids(name: str, ids: Tensor, vocab_size: int) -> None:
    """Out-of-range ids would index past the embedding table. On CPU that is a cryptic IndexError; on CUDA a
    device-side assert. Checking needs a reduction and, on an accelerator, a host sync per step, so it runs on
    CPU only; accelerators keep torch's own device assert."""
    if ids.device.type != "cpu" or ids.numel() == 0 or torch.compiler.is_compiling():  # no graph break for it
        return
    low, high = (int(bound) for bound in torch.aminmax(ids))
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"`{name}` holds token id {bad}, outside the vocabulary [0, {vocab_size}).")


def _check_mask(name: str, mask: Tensor | None, batch_size: int, length: int) -> None:
    if mask is not None and tuple(mask.shape) != (batch_size, length):
        raise ValueError(
            f"`{name}` has shape {tuple(mask.shape)}, expected (batch, length) = ({batch_size}, {length})."
        )


def _check_batches(source_batch: int, decoder_batch: int, rows_per_source: int) -> None:
    if decoder_batch != source_batch * rows_per_source:
        per_source = f" times rows_per_source={rows_per_source}" if rows_per_source != 1 else ""
        raise ValueError(
            f"Batch sizes differ: the source has {source_batch} rows{per_source}, the decoder input {decoder_batch}."
        )


def _batch_and_length(ids: Tensor | None, embeds: Tensor | None, name: str) -> tuple[int, int]:
    if (ids is None) == (embeds is None):
        raise ValueError(f"Pass exactly one of `{name}` and `{name.replace('input_ids', 'inputs_embeds')}`.")
    tensor = ids if ids is not None else embeds
    expected_dim = 2 if ids is not None else 3
    if tensor.dim() != expected_dim:
        which = name if ids is not None else name.replace("input_ids", "inputs_embeds")
        raise ValueError(f"`{which}` must have {expected_dim} dimensions, got shape {tuple(tensor.shape)}.")
    return tensor.shape[0], tensor.shape[1]


def _describe(info: dict[str, Any]) -> str:
    """The missing, unexpected and wrongly shaped weights of a loading report, or "" if it is clean."""
    parts = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(
            f"{key[0]} (checkpoint {tuple(key[1])}, config {tuple(key[2])})" if isinstance(key, tuple) else str(key)
            for key in info.get(kind) or []
        )
        if keys:
            shown = ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")
            parts.append(f"{kind.replace('_', ' ')}: {shown}")
    return "; ".join(parts)
