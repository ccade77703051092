"""The Transformer of "Attention Is All You Need" (Vaswani et al., 2017) as a transformers model.

Read it beside the paper: the file runs bottom-up in the paper's sections, §3.5 positions, §3.4 embeddings,
§3.2.1 attention, §3.2.2 heads, §3.3 feed-forward, §3.1 layers and stacks, §3.4 output projection.

Axes used in shape comments: B batch, S source length, T target length (new tokens only when decoding with a
cache), P past target length held in the cache, D d_model, H heads, Dh = D / H (d_k = d_v), V vocabulary.

This file imports only transformers, torch and its sibling configuration file (by a relative import), so that
`save_pretrained` can copy both files next to the weights and `trust_remote_code=True` loads them anywhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache
from transformers.generation import LogitsProcessor, LogitsProcessorList
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput, Seq2SeqLMOutput, Seq2SeqModelOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_vanilla_transformer import VanillaTransformerConfig


def shift_tokens_right(input_ids: torch.Tensor, pad_token_id: int, decoder_start_token_id: int) -> torch.Tensor:
    """Teacher forcing (§3): the decoder sees the target shifted right by one, starting from the start token.

    Label positions set to -100 (ignored by the loss) become padding.
    """
    shifted = input_ids.new_empty(input_ids.shape)
    shifted[:, 1:] = input_ids[:, :-1]
    shifted[:, 0] = decoder_start_token_id
    return shifted.masked_fill(shifted == -100, pad_token_id)


# ---------------------------------------------------------------------------------------------------------------
# §3.5 Positional encoding
# ---------------------------------------------------------------------------------------------------------------


def sinusoidal_table(num_positions: int, dim: int, offset: int = 0) -> torch.Tensor:
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

    def forward(self, seq_len: int, past_length: int = 0) -> torch.Tensor:
        """Encodings of positions [past_length, past_length + seq_len): shape (seq_len, D)."""
        end = past_length + seq_len
        if end <= self.num_positions:
            return self.pe[past_length:end]
        return sinusoidal_table(seq_len, self.dim, offset=past_length).to(self.pe.device)


class VanillaTransformerLearnedPositionalEmbedding(nn.Embedding):
    """Learned positions, the paper's Table 3 row (E) variant. Refuses positions it has no row for."""

    def forward(self, seq_len: int, past_length: int = 0) -> torch.Tensor:  # type: ignore[override]
        end = past_length + seq_len
        if end > self.num_embeddings:
            raise ValueError(
                f"Sequence of length {end} is longer than the {self.num_embeddings} learned positions "
                "(`max_position_embeddings`); truncate the input or use position_embedding_type='sinusoidal'."
            )
        return self.weight[past_length:end]


# ---------------------------------------------------------------------------------------------------------------
# §5.4 Residual dropout
# ---------------------------------------------------------------------------------------------------------------


def apply_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """`F.dropout(x, p, training)`: each element is zeroed with probability p and the rest scaled by 1 / (1 - p).

    Why by hand on CPU: torch's CPU dropout draws its mask with `bernoulli_`, one double-precision sample at a time
    (serially: 7.9 ms for a 4096 x 256 mask on a 2-core AMD EPYC), against 3.3 ms for `rand_like`'s uniform floats.
    Keeping u >= p of a uniform u in [0, 1) is the same Bernoulli(1 - p) mask from another random stream (still
    torch's generator, so `torch.manual_seed` reproduces it), and forward + backward took 4.9-5.3 ms per such call
    against 8.3-9.0 ms. A whole small-size training step on 4096-token batches (17 such calls) was 1.055x faster
    under glibc's default allocator and 1.023x with `train.py`'s settings; at the base size 0.99x, within noise
    (alternating in one process). Elsewhere (CUDA has a fused kernel) and while compiling (inductor draws its own)
    it is `F.dropout`. The mask is drawn in fp32 whatever the dtype: a bf16 uniform would round p.
    """
    if not training or p == 0.0:
        return x
    if not x.is_cpu or not 0.0 < p < 1.0 or torch.compiler.is_compiling():
        return F.dropout(x, p=p, training=True)
    keep = torch.rand_like(x, dtype=torch.float32) >= p  # Bernoulli(1 - p), True where kept
    return x * keep.to(x.dtype).mul_(1.0 / (1.0 - p))


# ---------------------------------------------------------------------------------------------------------------
# The linear layer of every projection, with a faster CPU kernel for inference
# ---------------------------------------------------------------------------------------------------------------

# oneDNN's fp32 linear, the kernel torch.compile's CPU backend emits (absent from torch builds without oneDNN).
_ONEDNN_LINEAR = (
    torch.ops.mkldnn._linear_pointwise.default
    if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    else None
)
# oneDNN's reorder of a weight into the blocked layout its kernel reads (what inductor's weight freezing stores).
_ONEDNN_REORDER = (
    torch.ops.mkldnn._reorder_linear_weight.default
    if _ONEDNN_LINEAR is not None and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    else None
)


class VanillaTransformerLinear(nn.Linear):
    """`nn.Linear` (same parameters, same checkpoint names); without gradients on CPU in fp32 it runs oneDNN's linear
    instead of torch's default MKL GEMM.

    Why by hand: a decoding step multiplies each weight matrix by a few rows, once, after the rest of the model has
    pushed it out of cache, and there MKL is far from the memory-bandwidth bound. `benchmarks/linear_kernels.py`
    measures the kernels in that state; on a 2-core AMD EPYC, microseconds per call for 1, 4, 16 and 64 rows,
    `F.linear` / oneDNN / oneDNN on a weight reordered beforehand (see below; not done for one row):

        37000 x 512 (base output projection)   7199 / 2978, 12503 / 4488 / 2595, 13404 / 6318 / 3931,
                                               25408 / 16675 / 11845
        2048 x 512 (base fc1)                  406 / 201, 562 / 294 / 175, 589 / 406 / 253, 1110 / 835 / 690
        512 x 512 (base attention)             104 / 70, 143 / 97 / 65, 138 / 123 / 84, 259 / 232 / 196
        1024 x 256 (small fc1)                 129 / 75, 183 / 94 / 59, 165 / 125 / 82, 300 / 241 / 191
        256 x 256 (small attention)            35 / 34, 49 / 41 / 30, 44 / 50 / 36, 76 / 78 / 65

    The smallest matrices gain little or lose a little from oneDNN alone (it has a fixed cost of some 15 us a
    call), yet whole `generate()` calls took 1.00-1.15x less time with oneDNN for every layer than with matrices
    under 2**19 entries left on MKL below 64 rows (small and base sizes, batch 1 and 16, greedy and beam 4), so one
    rule serves all. Results agree to float rounding (tests hold them to 1e-5); training (gradients enabled) keeps
    `F.linear`, whose backward oneDNN's op lacks.

    Inside `reordered_linear_weights` (which `generate()` enters for the layers a decoding step runs), the layer also
    keeps the weight in oneDNN's own blocked layout once a call has more than one row: otherwise oneDNN reorders the
    weight inside every such call, reading it and writing a copy, which the third figures above leave out.
    """

    # Set only inside `reordered_linear_weights`; the copy lives no longer than that scope.
    reuse_reordered_weight: bool = False
    reordered_weight: torch.Tensor | None = None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # The cheapest checks first: this runs some 25 times per generated token, where each microsecond shows.
        weight = self.weight
        if (
            not torch.is_grad_enabled()
            and input.is_cpu
            and input.dtype is torch.float32
            and weight.dtype is torch.float32
            and _ONEDNN_LINEAR is not None
            and torch.backends.mkldnn.enabled  # a user who turned oneDNN off gets MKL
            and not torch.compiler.is_compiling()  # inductor cannot lower this op; it picks its own GEMM
        ):
            if self.reuse_reordered_weight:
                weight = self._reordered(weight, input)
            return _ONEDNN_LINEAR(input, weight, self.bias, "none", [], "")
        return F.linear(input, weight, self.bias)

    @classmethod
    def stack(cls, linears: list[nn.Linear]) -> VanillaTransformerLinear:
        """One linear that computes `linears` side by side (their outputs concatenated on the last dimension), from
        copies of their weights and biases (zeros for a linear without one), without gradients: for inference only."""
        if len({linear.in_features for linear in linears}) != 1:
            raise ValueError(f"Cannot stack linears of different input sizes {[m.in_features for m in linears]}.")
        weight = torch.cat([linear.weight.detach() for linear in linears])  # (sum of out_features, in_features)
        stacked = cls(weight.shape[1], weight.shape[0], bias=False, device="meta")
        stacked.weight = nn.Parameter(weight, requires_grad=False)
        if any(linear.bias is not None for linear in linears):
            biases = [m.bias.detach() if m.bias is not None else weight.new_zeros(m.out_features) for m in linears]
            stacked.bias = nn.Parameter(torch.cat(biases), requires_grad=False)
        return stacked

    def _reordered(self, weight: torch.Tensor, input: torch.Tensor) -> torch.Tensor:
        """The weight in oneDNN's layout for calls of as many rows as this first one with more than one row (the
        layout serves any row count; one-row calls read the plain weight as fast, so they reorder nothing)."""
        if self.reordered_weight is None:
            rows = input.numel() // self.in_features
            if rows <= 1 or _ONEDNN_REORDER is None:
                return weight
            self.reordered_weight = _ONEDNN_REORDER(weight, rows)
        return self.reordered_weight


@contextmanager
def reordered_linear_weights(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Within this scope, each `VanillaTransformerLinear` among `modules` reorders its weight for oneDNN once, at
    its first no-grad CPU call with more than one row, and reuses that copy; leaving the scope drops the copies.

    Why scoped: a kept copy is only right while the weight does not change, and nothing cheap tells when it does
    (fused AdamW writes parameters without bumping their version counter, nor does `weight.data.mul_`). Within one
    `generate()` call the weights are fixed. The price is a copy of those weights while the scope lasts, and one
    reorder per weight per call, which costs about as much as 2-6 calls at 16 rows that do not keep the copy.
    """
    linears = [module for module in modules if isinstance(module, VanillaTransformerLinear)]
    for linear in linears:
        linear.reuse_reordered_weight = True
    try:
        yield
    finally:
        for linear in linears:
            linear.reuse_reordered_weight = False
            linear.reordered_weight = None


@contextmanager
def stacked_step_projections(attentions: Iterable[nn.Module]) -> Iterator[None]:
    """Within this scope, each decoder self-attention among `attentions` computes Q, K and V of a decoding step as one
    linear over a stacked copy of W^Q, W^K and W^V, made at its first step; leaving the scope drops the copy.

    Why: a step multiplies each weight by a few rows, and on CPU each oneDNN call costs some 15 us besides reading
    its weight: one (3D, D) GEMV instead of three (D, D) ones. Whole greedy `generate()` calls, 41 pairs alternating
    with and without it (2-core AMD EPYC), median ratio: 1.05x faster at the small size at batch 1 (quartiles
    1.00-1.09) and 1.02x at batch 16, 1.00x at the base size, whose larger matrices amortise that cost already. A
    small gain, near this machine's noise (shorter runs gave 0.96-1.06x), for a copy of 3 D x D per layer.

    Scoped like `reordered_linear_weights`, for the same reason: the copy is right only while the weights do not
    change, as within one `generate()` call. It is made inside the first step, where the weights are in place even
    when a sharding wrapper gathers them only for the forward, and used only while the projections can be read
    directly (`VanillaTransformerAttention._fusable`, checked at every step: a projection hooked or replaced during
    the call gets its own call again).
    """
    attentions = [a for a in attentions if isinstance(a, VanillaTransformerAttention) and not a.is_cross]
    for attention in attentions:
        attention.stack_step_projections = True
    try:
        yield
    finally:
        for attention in attentions:
            attention.stack_step_projections = False
            attention.step_projections = ()


# The encoder skips padding in inference once at least this share of a batch's positions is padding. Measured on the
# encoder alone, batch 16 x 40, skipping against not: 10% padding 0.96x (small) and 1.06x (base), 20% padding 1.14x
# and 1.23x; below a fifth the gathers and scatters cost about what they save.
UNPADDED_MIN_PADDING = 0.2


class UnpaddedPositions:
    """Where the real tokens of a right- or left-padded (B, S) batch are, to run position-wise layers on them only.

    Why by hand: every layer but attention treats each position alone, so in inference the encoder can skip the
    padding rows and gather them back only around attention; a batch of unsorted sentences is often half padding.
    torch's `nn.TransformerEncoder` does the same in inference, with nested tensors.
    """

    def __init__(self, attention_mask: torch.Tensor) -> None:
        self.shape = tuple(attention_mask.shape)  # (B, S)
        self.index = attention_mask.reshape(-1).nonzero().squeeze(1)  # (N,) flat positions of the real tokens

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S, ...) -> (N, F): the real tokens' rows, in order, their trailing dimensions flattened."""
        batch, length = self.shape
        return x.reshape(batch * length, -1).index_select(0, self.index)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """(N, F) -> (B, S, F), with zeros at the padding positions."""
        batch, length = self.shape
        return x.new_zeros(batch * length, x.shape[-1]).index_copy_(0, self.index, x).view(batch, length, -1)


# ---------------------------------------------------------------------------------------------------------------
# §3.2.1 Scaled dot-product attention
# ---------------------------------------------------------------------------------------------------------------


def scaled_dot_product_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V, the "eager" implementation.

    query (B, H, Tq, Dh), key and value (B, H, Tk, Dh). `attention_mask` is None, an additive float mask (0 to
    attend, the dtype's minimum to block) or a boolean mask (True to attend), broadcastable to (B, H, Tq, Tk).
    Returns the output as (B, Tq, H, Dh), the layout transformers' other attention functions return, and the
    attention weights (B, H, Tq, Tk).
    """
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling  # (B, H, Tq, Tk)
    return _attend(module, scores, value, attention_mask, dropout)


def sdpa_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The same function through torch's fused kernel, `F.scaled_dot_product_attention`: the "sdpa" implementation.
    Same inputs and output layout as `scaled_dot_product_attention`; no attention weights.

    Why not transformers' `sdpa_attention_forward`: it also serves grouped-query, paged and position-bias attention,
    which this model has none of, and its checks run at every call, twice per decoder layer per generated token.
    """
    is_causal = False
    if attention_mask is None and module.is_causal and query.shape[2] > 1:
        if key.shape[2] == query.shape[2]:
            is_causal = True  # the kernel's own causal masking, no mask tensor
        else:  # new tokens after cached ones: the kernel's causal mask would align to the top left, not bottom right
            attention_mask = _causal_mask(query.shape[2], key.shape[2], query.device)
    output = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=is_causal
    )
    return output.transpose(1, 2).contiguous(), None


def additive_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
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


def _fused_kernel_applies(config: VanillaTransformerConfig) -> bool:
    """Scaled dot-product attention under the eager or sdpa implementation: exactly what torch's fused kernel
    computes, so the lean paths (decoding steps, the unpadded encoder) may call `F.scaled_dot_product_attention`
    directly. Additive attention has no fused kernel; other implementations (flash, flex) are the user's choice."""
    return config.attention_type != "additive" and config._attn_implementation in ("eager", "sdpa")


def _causal_mask(q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """(Tq, Tk) boolean, True where query i may attend: the Tq queries are the last Tq of the Tk positions (new
    tokens after cached ones), so the diagonal aligns to the bottom right."""
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)


def _attend(
    module: nn.Module, scores: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask the scores, softmax them over the keys, and take the weighted sum of the values."""
    if attention_mask is None and module.is_causal and scores.shape[-2] > 1:
        # sdpa-style masks leave plain causality implicit (mask None, is_causal set): make it explicit here.
        attention_mask = _causal_mask(*scores.shape[-2:], scores.device)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            # Clamp so that score + min cannot overflow to -inf in fp16, which would make a fully masked row NaN.
            scores = (scores + attention_mask).clamp(min=torch.finfo(scores.dtype).min)
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    weights = apply_dropout(weights, dropout, module.training)
    output = torch.matmul(weights, value)  # (B, H, Tq, Dh)
    return output.transpose(1, 2).contiguous(), weights


# ---------------------------------------------------------------------------------------------------------------
# §3.2.2 Multi-head attention
# ---------------------------------------------------------------------------------------------------------------


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
        self.is_causal = is_causal  # read by the sdpa backend when no mask is materialised
        self.is_cross = is_cross
        self.layer_idx = layer_idx
        self.dropout = config.attention_dropout
        # W^Q, W^K and W^V stacked into one linear for decoding steps, inside `stacked_step_projections` only.
        # A tuple, not a module attribute, so that the copy never joins the model's modules or its state dict.
        self.stack_step_projections = False
        self.step_projections: tuple[VanillaTransformerLinear, ...] = ()
        self.q_proj = VanillaTransformerLinear(config.d_model, config.d_model)
        self.k_proj = VanillaTransformerLinear(config.d_model, config.d_model)
        self.v_proj = VanillaTransformerLinear(config.d_model, config.d_model)
        self.out_proj = VanillaTransformerLinear(config.d_model, config.d_model)
        if config.attention_type == "additive":  # per-head W_q, W_k and w of `additive_attention`
            self.additive_query = nn.Parameter(torch.empty(num_heads, self.head_dim, self.head_dim))
            self.additive_key = nn.Parameter(torch.empty(num_heads, self.head_dim, self.head_dim))
            self.additive_score = nn.Parameter(torch.empty(num_heads, self.head_dim))

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:-1], self.num_heads, self.head_dim).transpose(1, 2)  # (B, L, D) -> (B, H, L, Dh)

    @staticmethod
    def _queries_per_source(query: torch.Tensor, group: int) -> torch.Tensor:
        """Cross-attention with `group` decoder rows per source: (B * g, H, Tq, Dh) -> (B, H, g * Tq, Dh), so that a
        source's g rows become more queries of its keys. Unchanged for g = 1."""
        return query.unflatten(0, (-1, group)).transpose(1, 2).flatten(2, 3) if group > 1 else query

    def _keys_values(
        self, key_value_states: torch.Tensor, past_key_values: EncoderDecoderCache | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
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

    def forward(
        self,
        hidden_states: torch.Tensor,
        key_value_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: EncoderDecoderCache | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden_states (B, Tq, D) give the queries; key_value_states (B, Tk, D), the encoder output, give keys
        and values for cross-attention. Returns (B, Tq, D) and, with `output_attentions`, (B, H, Tq, Tk)."""
        if past_key_values is None and torch.is_grad_enabled() and self._fusable():  # training: see the method
            query, key, value = self._fused_projections(hidden_states, key_value_states)
        else:
            query = self._split_heads(self.q_proj(hidden_states))  # (B, H, Tq, Dh)
            source = key_value_states if self.is_cross else hidden_states
            key, value = self._keys_values(source, past_key_values)
        implementation = self.config._attn_implementation
        if self.attention_type == "additive":  # no fused kernel computes additive scores
            attention_fn: Callable = additive_attention
        elif implementation == "sdpa":
            attention_fn = sdpa_attention
        else:
            attention_fn = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, scaled_dot_product_attention)
        group = query.shape[0] // key.shape[0]  # cross-attention with `rows_per_source` > 1: rows per source
        query = self._queries_per_source(query, group)
        output, weights = attention_fn(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.dropout if self.training else 0.0,
            scaling=self.scaling,
        )
        if group > 1:  # back to one row per decoder row: (B, g * Tq, H, Dh) -> (B * g, Tq, H, Dh)
            output = output.unflatten(1, (group, -1)).flatten(0, 1)
            if weights is not None:  # (B, H, g * Tq, Tk) -> (B * g, H, Tq, Tk)
                weights = weights.unflatten(2, (group, -1)).transpose(1, 2).flatten(0, 1)
        output = self.out_proj(output.reshape(*hidden_states.shape[:-1], -1))  # Concat(heads) W^O: (B, Tq, D)
        return output, (weights if output_attentions else None)

    def _fusable(self) -> bool:
        """The projections are this file's own linear layers, without hooks: not wrapped (LoRA adapters replace
        them with modules of their own), quantized, or watched, which reading their weights directly would bypass."""
        projections = (self.q_proj, self.k_proj, self.v_proj)
        return all(
            type(proj) is VanillaTransformerLinear
            and proj.bias is not None
            and not proj._forward_hooks
            and not proj._forward_pre_hooks
            for proj in projections
        )

    def _fused_projections(
        self, hidden_states: torch.Tensor, key_value_states: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Q, K and V as in `forward`, with the projections of one input as one GEMM: W^Q, W^K and W^V stacked into
        a (3D, D) weight for self-attention, W^K and W^V into (2D, D) for the encoder output in cross-attention.

        Why, in training only: backward then takes one GEMM for the input's gradient instead of three GEMMs and
        their sum, and fewer, wider buffers come and go. Whole training steps on 4096-token batches (alternating in
        one process, 2-core AMD EPYC) were 1.03x faster at the small size and 1.11x at the base size under glibc's
        default allocator, and 1.00x and 1.02x with the allocator settings `train.py` makes (`--keep_freed_memory`):
        much of the gain on CPU is fewer large allocations. The weights stay separate parameters (the checkpoint is
        unchanged): `torch.cat` is differentiable, and its backward splits the gradient. A decoding step would copy
        the stacked weight at every token, so `generate()` stacks a copy once per call (`stacked_step_projections`).
        """
        projections = [self.k_proj, self.v_proj] if self.is_cross else [self.q_proj, self.k_proj, self.v_proj]
        weight = torch.cat([proj.weight for proj in projections])  # (nD, D)
        bias = torch.cat([proj.bias for proj in projections])
        source = key_value_states if self.is_cross else hidden_states  # (B, L, D)
        fused = F.linear(source, weight, bias).chunk(len(projections), dim=-1)  # n x (B, L, D), views
        heads = [self._split_heads(part) for part in fused]  # n x (B, H, L, Dh)
        if self.is_cross:
            return self._split_heads(self.q_proj(hidden_states)), heads[0], heads[1]
        return heads[0], heads[1], heads[2]

    def forward_unpadded(
        self, hidden_states: torch.Tensor, positions: UnpaddedPositions, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Encoder self-attention over the real tokens only (see `UnpaddedPositions`): (N, D) -> (N, D). The
        projections run on the N real tokens; only the attention itself needs the (B, H, S, Dh) layout, where the
        padding rows are zeros and `attention_mask` keeps every query from reading them."""
        projections = (self.q_proj, self.k_proj, self.v_proj)
        query, key, value = (self._split_heads(positions.pad(proj(hidden_states))) for proj in projections)
        output = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=self.scaling)
        return self.out_proj(positions.unpad(output.transpose(1, 2)))  # (B, S, H, Dh) -> (N, D) -> (N, D)

    def _stacked_projection(self) -> VanillaTransformerLinear:
        """W^Q, W^K and W^V as one linear (see `stacked_step_projections`), made at the first call in its scope."""
        if not self.step_projections:
            stacked = VanillaTransformerLinear.stack([self.q_proj, self.k_proj, self.v_proj])
            # Inside `generate()` the step linears also keep oneDNN's layout of their weights: so does this one.
            stacked.reuse_reordered_weight = self.q_proj.reuse_reordered_weight
            self.step_projections = (stacked,)
        return self.step_projections[0]

    def decoding_step(
        self,
        hidden_states: torch.Tensor,
        key_value_states: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        past_key_values: EncoderDecoderCache,
    ) -> torch.Tensor:
        """`forward` for one new token per row, in inference with a cache: (B, 1, D) -> (B, 1, D), through torch's
        fused kernel (eager and sdpa compute the same function), no attention weights. See
        `VanillaTransformerDecoderLayer.is_decoding_step` for when it runs."""
        batch = hidden_states.shape[0]
        if self.stack_step_projections and self._fusable():  # self-attention in `generate()`: one GEMM for Q, K, V
            qkv = self._stacked_projection()(hidden_states).chunk(3, dim=-1)  # 3 x (B, 1, D)
            query, key, value = (self._split_heads(part) for part in qkv)  # 3 x (B, H, 1, Dh)
            key, value = past_key_values.self_attention_cache.update(key, value, self.layer_idx)
        else:
            query = self._split_heads(self.q_proj(hidden_states))  # (B, H, 1, Dh)
            key, value = self._keys_values(key_value_states if self.is_cross else hidden_states, past_key_values)
        query = self._queries_per_source(query, batch // key.shape[0])  # (B / g, H, g, Dh)
        output = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=self.scaling)
        return self.out_proj(output.transpose(1, 2).reshape(batch, 1, -1))  # Concat(heads) W^O


# ---------------------------------------------------------------------------------------------------------------
# §3.3 Position-wise feed-forward network
# ---------------------------------------------------------------------------------------------------------------


class VanillaTransformerFeedForward(nn.Module):
    """FFN(x) = max(0, x W_1 + b_1) W_2 + b_2, applied to each position alone (D -> d_ff -> D)."""

    def __init__(self, config: VanillaTransformerConfig, ffn_dim: int) -> None:
        super().__init__()
        self.fc1 = VanillaTransformerLinear(config.d_model, ffn_dim)
        self.fc2 = VanillaTransformerLinear(ffn_dim, config.d_model)
        self.activation_fn = ACT2FN[config.activation_function]
        self.activation_dropout = config.activation_dropout

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.activation_fn(self.fc1(hidden_states))
        hidden_states = apply_dropout(hidden_states, self.activation_dropout, self.training)
        return self.fc2(hidden_states)


# ---------------------------------------------------------------------------------------------------------------
# §3.1 Encoder and decoder layers
# ---------------------------------------------------------------------------------------------------------------


class VanillaTransformerMaskedBatchNorm(nn.Module):
    """BatchNorm over the feature dimension whose batch statistics use only real (non-padding) positions.

    The `norm_type="batchnorm"` alternative to LayerNorm, for the comparison the paper's choice invites: plain
    BatchNorm would mix padding into its statistics, which is unfair to it. Running statistics (momentum 0.1, as
    torch's BatchNorm) serve evaluation and incremental decoding.
    """

    def __init__(self, dim: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
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

    def norm(self, x: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
        if hasattr(self, "batch_norm"):
            return self.batch_norm(x, padding_mask)
        return self.layer_norm(x)

    def forward(
        self,
        x: torch.Tensor,
        sublayer: Callable[[torch.Tensor], torch.Tensor],
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.normalize_before:
            return x + self._dropout(sublayer(self.norm(x, padding_mask)))
        return self.norm(x + self._dropout(sublayer(x)), padding_mask)

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        return apply_dropout(x, self.dropout, self.training)


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
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
        padding_mask: torch.Tensor | None = None,
        unpadded: UnpaddedPositions | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden_states (B, S, D), or with `unpadded` the real tokens only, (N, D): see `UnpaddedPositions`."""
        if unpadded is not None:
            attend = self.self_attn.forward_unpadded
            hidden_states = self.self_attn_block(hidden_states, lambda x: attend(x, unpadded, attention_mask))
            return self.ffn_block(hidden_states, self.ffn), None
        weights = None

        def self_attention(x: torch.Tensor) -> torch.Tensor:
            nonlocal weights
            out, weights = self.self_attn(x, attention_mask=attention_mask, output_attentions=output_attentions)
            return out

        hidden_states = self.self_attn_block(hidden_states, self_attention, padding_mask)
        hidden_states = self.ffn_block(hidden_states, self.ffn, padding_mask)
        return hidden_states, weights


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
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        past_key_values: EncoderDecoderCache | None = None,
        output_attentions: bool = False,
        padding_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        if self.is_decoding_step(hidden_states, attention_mask, past_key_values, output_attentions):
            return self.decoding_step(hidden_states, encoder_hidden_states, encoder_attention_mask, past_key_values)
        self_weights = cross_weights = None

        def self_attention(x: torch.Tensor) -> torch.Tensor:
            nonlocal self_weights
            out, self_weights = self.self_attn(
                x, attention_mask=attention_mask, past_key_values=past_key_values, output_attentions=output_attentions
            )
            return out

        def cross_attention(x: torch.Tensor) -> torch.Tensor:
            nonlocal cross_weights
            out, cross_weights = self.encoder_attn(
                x,
                key_value_states=encoder_hidden_states,
                attention_mask=encoder_attention_mask,
                past_key_values=past_key_values,
                output_attentions=output_attentions,
            )
            return out

        hidden_states = self.self_attn_block(hidden_states, self_attention, padding_mask)
        hidden_states = self.encoder_attn_block(hidden_states, cross_attention, padding_mask)
        hidden_states = self.ffn_block(hidden_states, self.ffn, padding_mask)
        return hidden_states, self_weights, cross_weights

    def is_decoding_step(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        past_key_values: EncoderDecoderCache | None,
        output_attentions: bool,
    ) -> bool:
        """One new token per row with a cache, in inference, nothing masked in self-attention, no attention weights
        asked for, scaled dot-product attention computed by eager or sdpa, and LayerNorm: what `generate()` runs."""
        return (
            hidden_states.shape[1] == 1
            and past_key_values is not None
            and attention_mask is None
            and not self.training
            and not output_attentions
            and _fused_kernel_applies(self.self_attn.config)
            and hasattr(self.self_attn_block, "layer_norm")
        )

    def decoding_step(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None,
        past_key_values: EncoderDecoderCache,
    ) -> tuple[torch.Tensor, None, None]:
        """`forward` for a decoding step (see `is_decoding_step`): the same sub-layers, modules and weights, without
        what such a step never uses (dropout, attention weights, masks in self-attention, attention-implementation
        dispatch). Why: at batch 1 a small model's step is mostly per-call Python overhead; this path took the
        small model's cached step from 2.70 to 2.58 ms at batch 1 (measured; tests hold it to `forward`)."""
        hidden_states = self.self_attn_block(
            hidden_states, lambda x: self.self_attn.decoding_step(x, None, None, past_key_values)
        )
        cross_attention = self.encoder_attn.decoding_step
        hidden_states = self.encoder_attn_block(
            hidden_states, lambda x: cross_attention(x, encoder_hidden_states, encoder_attention_mask, past_key_values)
        )
        return self.ffn_block(hidden_states, self.ffn), None, None

    def decoding_step_linears(self) -> list[nn.Module]:
        """The linear layers every decoding step runs: all of this layer's but the cross-attention key and value
        projections, which run once per source (their output is cached). Within `stacked_step_projections` a step
        runs W^Q, W^K and W^V as one stacked copy instead, which takes its settings from W^Q."""
        attention = [self.self_attn.q_proj, self.self_attn.k_proj, self.self_attn.v_proj, self.self_attn.out_proj]
        return [*attention, self.encoder_attn.q_proj, self.encoder_attn.out_proj, self.ffn.fc1, self.ffn.fc2]


# ---------------------------------------------------------------------------------------------------------------
# Weights, initialisation and input checks
# ---------------------------------------------------------------------------------------------------------------


class VanillaTransformerPreTrainedModel(PreTrainedModel):
    """Initialisation, tying and the capabilities transformers reads off the class.

    Initialisation. The paper states none. By default (`init_std=0.02`) every Linear weight and every embedding is
    drawn from N(0, 0.02), as in BART, Marian and BERT, with zero biases, a zero padding row and LayerNorms that
    start as the identity. Chosen by measurement on real data (README, "Real data"): against fairseq's and
    tensor2tensor's scheme it trained to a much lower loss and higher BLEU at the small and the base size. Post-LN
    sums each sub-layer's output into the residual stream before normalising it; small initial sub-layer outputs
    leave each block close to the identity, which keeps the gradient to the lower layers intact early on (Liu et
    al., 2020, "Understanding the Difficulty of Training Transformers"). `init_std=None` restores that other
    scheme: Xavier-uniform Linears and N(0, d_model^-0.5) embeddings, which the sqrt(d_model) scaling of §3.4
    brings to unit size.
    """

    config_class = VanillaTransformerConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["VanillaTransformerEncoderLayer", "VanillaTransformerDecoderLayer"]
    # Loss is a mean over target tokens; tell Trainer not to expect `num_items_in_batch` (see notes: with **kwargs
    # it would otherwise skip dividing by gradient-accumulation steps).
    accepts_loss_kwargs = False

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
        The bare model is in the same code file, and `from_pretrained` strips the `model.` prefix for it."""
        if self._auto_class is not None:
            bare = f"{type(self).__module__.rsplit('.', 1)[-1]}.VanillaTransformerModel"
            self.config.auto_map = {"AutoModel": bare, **(getattr(self.config, "auto_map", None) or {})}
        return super().save_pretrained(save_directory, *args, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.init_std or self.config.d_model**-0.5
        if isinstance(module, nn.Linear):
            if self.config.init_std is None:
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


def _check_token_ids(name: str, ids: torch.Tensor, vocab_size: int) -> None:
    """Out-of-range ids would index past the embedding table. On CPU that is a cryptic IndexError; on CUDA a
    device-side assert. Checking needs a reduction and, on an accelerator, a host sync per step, so it runs on
    CPU only; accelerators keep torch's own device assert."""
    if ids.device.type != "cpu" or ids.numel() == 0 or torch.compiler.is_compiling():  # no graph break for it
        return
    low, high = (int(bound) for bound in torch.aminmax(ids))
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"`{name}` holds token id {bad}, outside the vocabulary [0, {vocab_size}).")


def _check_mask(name: str, mask: torch.Tensor | None, batch_size: int, length: int) -> None:
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


def _batch_and_length(ids: torch.Tensor | None, embeds: torch.Tensor | None, name: str) -> tuple[int, int]:
    if (ids is None) == (embeds is None):
        raise ValueError(f"Pass exactly one of `{name}` and `{name.replace('input_ids', 'inputs_embeds')}`.")
    tensor = ids if ids is not None else embeds
    expected_dim = 2 if ids is not None else 3
    if tensor.dim() != expected_dim:
        which = name if ids is not None else name.replace("input_ids", "inputs_embeds")
        raise ValueError(f"`{which}` must have {expected_dim} dimensions, got shape {tuple(tensor.shape)}.")
    return tensor.shape[0], tensor.shape[1]


# ---------------------------------------------------------------------------------------------------------------
# §3.1 The stacks, with §3.4 embeddings and §3.5 positions at their inputs
# ---------------------------------------------------------------------------------------------------------------


class VanillaTransformerStack(nn.Module):
    """What the encoder and decoder stacks share: N layers, and at their input the token embedding times
    sqrt(d_model) (§3.4) plus the positional encoding (§3.5), followed by dropout (§5.4)."""

    def __init__(self, config: VanillaTransformerConfig, layers: list[nn.Module]) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model, padding_idx=config.pad_token_id)
        self.embed_scale = math.sqrt(config.d_model) if config.scale_embedding else 1.0
        if config.position_embedding_type == "learned":
            self.embed_positions = VanillaTransformerLearnedPositionalEmbedding(
                config.max_position_embeddings, config.d_model
            )
        else:
            self.embed_positions = VanillaTransformerSinusoidalPositionalEncoding(
                config.max_position_embeddings, config.d_model
            )
        self.layers = nn.ModuleList(layers)
        # Pre-LN leaves the last residual sum unnormalised; post-LN ends in a LayerNorm already.
        self.layer_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps) if config.normalize_before else None

    def embed(
        self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None, past_length: int = 0
    ) -> torch.Tensor:
        if inputs_embeds is None:
            _check_token_ids("input_ids", input_ids, self.config.vocab_size)
            inputs_embeds = self.embed_tokens(input_ids)  # (B, L) -> (B, L, D)
        positions = self.embed_positions(inputs_embeds.shape[1], past_length)  # (L, D)
        hidden_states = inputs_embeds * self.embed_scale + positions.to(inputs_embeds.dtype)
        return apply_dropout(hidden_states, self.config.dropout, self.training)

    def norm_padding_mask(
        self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, length: int, from_ids: bool
    ) -> torch.Tensor | None:
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

    def final_norm(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.layer_norm(hidden_states) if self.layer_norm is not None else hidden_states


class VanillaTransformerEncoder(VanillaTransformerStack):
    """A stack of N encoder layers over the embedded source (Figure 1, left)."""

    def __init__(self, config: VanillaTransformerConfig) -> None:
        super().__init__(config, [VanillaTransformerEncoderLayer(config, i) for i in range(config.encoder_layers)])

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutput | tuple:
        """input_ids (B, S) and attention_mask (B, S; 1 for tokens, 0 for padding). Returns (B, S, D); in inference
        with a fifth or more of the positions padding, it computes the real tokens only and returns zeros at the
        padding positions (see `unpadded_positions`)."""
        batch_size, src_len = _batch_and_length(input_ids, inputs_embeds, "input_ids")
        _check_mask("attention_mask", attention_mask, batch_size, src_len)
        hidden_states = self.embed(input_ids, inputs_embeds)
        padding_mask = self.norm_padding_mask(input_ids, attention_mask, src_len, from_ids=False)  # (B, S)
        # (B, S) padding mask -> (B, 1, S, S) in the form the attention implementation wants (None if no padding).
        mask = create_bidirectional_mask(self.config, hidden_states, attention_mask)
        unpadded = self.unpadded_positions(attention_mask, bool(output_attentions))
        if unpadded is not None:
            hidden_states = unpadded.unpad(hidden_states)  # (B, S, D) -> (N, D)
        all_hidden, all_attentions = [], []
        for layer in self.layers:
            all_hidden.append(hidden_states)
            hidden_states, weights = layer(
                hidden_states,
                mask,
                output_attentions=bool(output_attentions),
                padding_mask=padding_mask,
                unpadded=unpadded,
            )
            all_attentions.append(weights)
        hidden_states = self.final_norm(hidden_states)
        all_hidden.append(hidden_states)
        if unpadded is not None:  # back to (B, S, D), zeros at the padding positions
            hidden_states = unpadded.pad(hidden_states)
            all_hidden = [unpadded.pad(hidden) for hidden in all_hidden] if output_hidden_states else []
        output = BaseModelOutput(
            last_hidden_state=hidden_states,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(all_attentions) if output_attentions else None,
        )
        return output if return_dict is not False else output.to_tuple()

    def unpadded_positions(
        self, attention_mask: torch.Tensor | None, output_attentions: bool
    ) -> UnpaddedPositions | None:
        """In inference, where at least `UNPADDED_MIN_PADDING` of the source positions are padding, the real tokens'
        positions: the layers then run on those alone, and the encoder's output is zero at padding positions
        (cross-attention never reads them). Training keeps the padded layout, so that dropout draws the same
        masks as ever; so do attention weights, additive attention and attention implementations other than
        eager and sdpa, whose kernels this path does not call, and compiling (torch.compile, torch.export), where
        the number of real tokens would be a data-dependent shape."""
        if (
            self.training
            or attention_mask is None
            or torch.compiler.is_compiling()
            or output_attentions
            or not _fused_kernel_applies(self.config)
        ):
            return None
        real = int(attention_mask.count_nonzero())
        if real == 0 or real > (1 - UNPADDED_MIN_PADDING) * attention_mask.numel():
            return None
        return UnpaddedPositions(attention_mask)


class VanillaTransformerDecoder(VanillaTransformerStack):
    """A stack of N decoder layers over the embedded, right-shifted target (Figure 1, right).

    With `use_cache`, keys and values of earlier steps live in an `EncoderDecoderCache`, so each generation step
    feeds only the new tokens; their positions continue from the cache length.
    """

    def __init__(self, config: VanillaTransformerConfig) -> None:
        super().__init__(config, [VanillaTransformerDecoderLayer(config, i) for i in range(config.decoder_layers)])

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """input_ids (B, T), attention_mask (B, P + T), encoder_hidden_states (B, S, D),
        encoder_attention_mask (B, S). Returns a dict with last_hidden_state (B, T, D) and the cache."""
        batch_size, tgt_len = _batch_and_length(input_ids, inputs_embeds, "decoder_input_ids")
        if use_cache and past_key_values is None:
            past_key_values = EncoderDecoderCache(DynamicCache(), DynamicCache())
        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
        _check_mask("decoder_attention_mask", attention_mask, batch_size, past_length + tgt_len)
        hidden_states = self.embed(input_ids, inputs_embeds, past_length)
        padding_mask = self.norm_padding_mask(input_ids, attention_mask, tgt_len, from_ids=True)  # (B, T)
        self_attn_cache = past_key_values.self_attention_cache if past_key_values is not None else None
        # Causal plus target padding, (B, 1, T, P + T); and source padding for cross-attention, (B, 1, T, S).
        if tgt_len == 1 and attention_mask is None:
            causal_mask = None  # one new token sees every position before it: nothing to mask
        else:
            causal_mask = create_causal_mask(self.config, hidden_states, attention_mask, self_attn_cache)
        cross_mask = self.cross_attention_mask(
            hidden_states, encoder_hidden_states, encoder_attention_mask, past_key_values
        )
        all_hidden, self_attentions, cross_attentions = [], [], []
        for layer in self.layers:
            all_hidden.append(hidden_states)
            hidden_states, self_weights, cross_weights = layer(
                hidden_states,
                causal_mask,
                encoder_hidden_states,  # positional: reentrant checkpointing only gives gradients to positional tensors
                encoder_attention_mask=cross_mask,
                past_key_values=past_key_values,
                output_attentions=bool(output_attentions),
                padding_mask=padding_mask,
            )
            self_attentions.append(self_weights)
            cross_attentions.append(cross_weights)
        hidden_states = self.final_norm(hidden_states)
        all_hidden.append(hidden_states)
        return {
            "last_hidden_state": hidden_states,
            "past_key_values": past_key_values if use_cache else None,
            "hidden_states": tuple(all_hidden) if output_hidden_states else None,
            "attentions": tuple(self_attentions) if output_attentions else None,
            "cross_attentions": tuple(cross_attentions) if output_attentions else None,
        }

    def cross_attention_mask(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None,
        past_key_values: Cache | None,
    ) -> torch.Tensor | None:
        """The source padding mask for cross-attention, (B, 1, T, S) (or (B, 1, 1, S) for several decoder rows per
        source), or None where there is no padding.

        A one-token decoding step gets the same mask at every step of one `generate()` call: it is built at the first
        such step and kept beside the cache (beam search's reordering cannot change it: all beams of an input share
        their source).
        """
        keep = past_key_values is not None and hidden_states.shape[1] == 1
        kept = getattr(past_key_values, "_vanilla_cross_mask", None) if keep else None
        if kept is not None and kept[0] is encoder_attention_mask:
            return kept[1]
        if hidden_states.shape[0] != encoder_hidden_states.shape[0]:
            # Several decoder rows per source (`rows_per_source`): one mask row per source, (B, 1, 1, S), which
            # broadcasts over all its queries. Only the batch size, dtype and device of the first argument are read.
            hidden_states = encoder_hidden_states[:, :1]
        mask = create_bidirectional_mask(
            self.config, hidden_states, encoder_attention_mask, encoder_hidden_states=encoder_hidden_states
        )
        if keep:
            past_key_values._vanilla_cross_mask = (encoder_attention_mask, mask)
        return mask


# ---------------------------------------------------------------------------------------------------------------
# The encoder-decoder model and §3.4 the output projection
# ---------------------------------------------------------------------------------------------------------------


class VanillaTransformerModel(VanillaTransformerPreTrainedModel):
    """The bare encoder-decoder: returns the decoder's last hidden states (no output projection).

    With `tie_word_embeddings` (the paper's choice, §3.4: one shared source/target vocabulary) the decoder's
    embedding is the encoder's matrix; the checkpoint stores it once. Without it the two are separate.
    """

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

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_outputs: BaseModelOutput | tuple | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        rows_per_source: int = 1,
        cache: Cache | None = None,
        **kwargs: Any,
    ) -> Seq2SeqModelOutput | tuple:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch, source_len)`): source token ids.
            attention_mask (`torch.Tensor` of shape `(batch, source_len)`, *optional*): 1 for tokens, 0 for padding.
            decoder_input_ids (`torch.LongTensor` of shape `(batch, target_len)`): the target shifted right.
            decoder_attention_mask (`torch.Tensor` of shape `(batch, past_len + target_len)`, *optional*).
            encoder_outputs (`BaseModelOutput`, *optional*): a precomputed encoder output (generate() passes it).
            past_key_values (`EncoderDecoderCache`, *optional*): the decoding cache; also accepted as `cache`, the name
                transformers uses from 5.24 on. Returned under the installed version's name (`CACHE_FIELD`).
            rows_per_source (`int`, defaults to 1): how many consecutive decoder rows each source row serves. With
                k > 1 the decoder batch is k times the source batch (beam search's layout: the beams of input i are
                rows i * k to i * k + k - 1), and cross-attention reads each source's keys and values once for all
                k rows instead of from k copies. `generate()` passes the beam count (times `num_return_sequences`)
                here rather than repeating the encoder output.
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
        decoder_outputs = self.decoder(
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
        output = Seq2SeqModelOutput(
            last_hidden_state=decoder_outputs["last_hidden_state"],
            **{CACHE_FIELD: decoder_outputs["past_key_values"]},
            decoder_hidden_states=decoder_outputs["hidden_states"],
            decoder_attentions=decoder_outputs["attentions"],
            cross_attentions=decoder_outputs["cross_attentions"],
            encoder_last_hidden_state=encoder_hidden_states,
            encoder_hidden_states=encoder_outputs.hidden_states,
            encoder_attentions=encoder_outputs.attentions,
        )
        return output if return_dict is not False else output.to_tuple()


# ---------------------------------------------------------------------------------------------------------------
# §5.4 Label smoothing: the training loss, fused with the §3.4 output projection
# ---------------------------------------------------------------------------------------------------------------


def label_smoothed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, epsilon: float) -> torch.Tensor:
    """The loss of §5.4 from full logits (B, T, V) and labels (B, T): the mean over positions not labelled -100 of
    (1 - epsilon) * -log p(y) + epsilon * mean_v -log p(v). Equal to transformers' `LabelSmoother`."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, label_smoothing=epsilon)


# Rows of logits materialised at once by the fused loss. Each chunk is one (rows, V) fp32 buffer: 8 MiB at V = 8000,
# 36 MiB at V = 37000, against 150 MB and more for a whole batch's logits, which glibc maps and unmaps every step.
FUSED_LOSS_CHUNK_ROWS = 256


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Output projection + label-smoothed cross-entropy, chunked over rows, with the gradients computed in the forward
    pass (as Liger-Kernel and cut-cross-entropy do; torch has no such op).

    Why by hand: the plain path keeps the (N, V) logits and log-probabilities for backward and writes two more (N, V)
    gradients there, five passes over V-wide memory per row; here one (chunk, V) buffer is turned in place into the
    gradient of the logits, softmax(z) - (1 - epsilon) onehot(y) - epsilon / V, and multiplied into both gradients
    at once. The matmul FLOPs are the same: z = h W^T, dL/dh = g W, dL/dW = g^T h.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,  # (N, D): only the positions that count
        weight: torch.Tensor,  # (V, D): the tied embedding matrix
        targets: torch.Tensor,  # (N,)
        epsilon: float,
        chunk_rows: int,
    ) -> torch.Tensor:
        device_type = hidden.device.type
        # Under autocast the matmuls run in its dtype, as nn.Linear's would; the softmax is always fp32.
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
        with torch.autocast(device_type, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            rows, vocab = h.shape[0], w.shape[0]
            grad_hidden = torch.empty_like(h)
            grad_weight = None
            if ctx.needs_input_grad[1]:
                grad_weight = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            for start in range(0, rows, chunk_rows):
                h_chunk, y = h[start : start + chunk_rows], targets[start : start + chunk_rows]
                z = torch.mm(h_chunk, w.t()).float()  # (c, V) logits
                lse = torch.logsumexp(z, dim=-1)  # (c,)
                nll = lse - z.gather(1, y[:, None]).squeeze(1)  # -log p(y)
                smooth = lse - z.mean(dim=-1)  # mean_v -log p(v)
                total += ((1.0 - epsilon) * nll + epsilon * smooth).sum()
                g = z.sub_(lse[:, None]).exp_().sub_(epsilon / vocab)  # in place: softmax(z) - epsilon / V
                g[torch.arange(g.shape[0], device=g.device), y] -= 1.0 - epsilon
                g = g.mul_(1.0 / rows).to(dtype)  # the loss is a mean over the N rows
                torch.mm(g, w, out=grad_hidden[start : start + chunk_rows])
                if grad_weight is not None and dtype == torch.float32:
                    grad_weight.addmm_(g.t(), h_chunk)  # (V, c) @ (c, D), accumulated in place
                elif grad_weight is not None:
                    grad_weight += torch.mm(g.t(), h_chunk).float()  # half-precision product, fp32 sum
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return total / rows

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        grad_hidden, grad_weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        grad_h = (grad_hidden * grad_loss).to(hidden_dtype) if ctx.needs_input_grad[0] else None
        grad_w = (grad_weight * grad_loss).to(weight_dtype) if grad_weight is not None else None
        return grad_h, grad_w, None, None, None


def fused_linear_cross_entropy(
    hidden_states: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, epsilon: float
) -> torch.Tensor:
    """`label_smoothed_cross_entropy(hidden_states @ weight.T, labels, epsilon)` without the (B, T, V) logits, and
    without projecting the positions labelled -100 at all (padding: about 10% of a token batch, more of a padded one).

    hidden_states (B, T, D), weight (V, D), labels (B, T). Same value and gradients as the plain path up to float
    rounding (tests hold them to 1e-5).
    """
    rows = (labels.flatten() != -100).nonzero().squeeze(1)  # the one data-dependent shape (a graph break under compile)
    hidden, targets = hidden_states.flatten(0, 1).index_select(0, rows), labels.flatten().index_select(0, rows)
    return _FusedLinearCrossEntropy.apply(hidden, weight, targets, epsilon, FUSED_LOSS_CHUNK_ROWS)


# ---------------------------------------------------------------------------------------------------------------
# §6.1 Decoding: beam 4, length penalty 0.6, output length at most input length + 50
# ---------------------------------------------------------------------------------------------------------------


class SourceLengthLimitLogitsProcessor(LogitsProcessor):
    """Ends each output at its own input's length + offset (§6.1), by forcing EOS as the last allowed token.

    `max_new_tokens` alone would give every input of a batch the longest input's limit; this applies the rule per
    input. `limits` has one entry per input; beams and returned sequences of an input are contiguous rows.
    """

    def __init__(self, limits: torch.Tensor, eos_token_id: int) -> None:
        self.limits = limits  # (B,) maximum number of generated tokens, EOS included
        self.eos_token_id = eos_token_id
        self.start_length: int | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
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


def paper_generation_config(config: VanillaTransformerConfig) -> GenerationConfig:
    """The decoding defaults of §6.1, saved as `generation_config.json`: beam size 4, GNMT's length penalty with
    alpha = 0.6 (`length_penalty_type`), and `max_length_offset` = 50, read by `generate()` as "input length + 50"
    whenever the caller gives no `max_length` or `max_new_tokens`. Beam search ends once an input has 4 finished
    hypotheses (`early_stopping=True`). tensor2tensor's rule, which ends only when no live hypothesis can still beat
    the finished ones, is `early_stopping="never"`: on real validation data it gave the same BLEU, 1.25-1.9x slower
    (README, "Real data")."""
    generation_config = GenerationConfig.from_model_config(config)
    generation_config.num_beams = 4
    generation_config.length_penalty = 0.6
    generation_config.length_penalty_type = "gnmt"  # not a GenerationConfig field: saved and loaded as an extra key
    generation_config.early_stopping = True
    generation_config.max_length_offset = 50  # not a GenerationConfig field: saved and loaded as an extra key
    generation_config._from_model_config = False  # ours, not derived from config.json: keep it as saved
    return generation_config


class VanillaTransformerForConditionalGeneration(VanillaTransformerPreTrainedModel, GenerationMixin):
    """The full model of the paper: encoder-decoder, then the pre-softmax linear projection (§3.4), whose weight
    is the shared embedding matrix when `tie_word_embeddings` is set. Given `labels`, returns the mean
    cross-entropy over the target tokens (positions labelled -100 are ignored), label-smoothed by
    `config.label_smoothing`.

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
    # and the fused loss skips the (B, T, V) logits. Off by default: a forward with labels returns logits, as in
    # every transformers model. train.py and the benchmarks turn it on.
    fused_training_loss: bool = False

    def __init__(self, config: VanillaTransformerConfig) -> None:
        super().__init__(config)
        self.model = VanillaTransformerModel(config)
        self.lm_head = VanillaTransformerLinear(
            config.d_model, config.vocab_size, bias=False
        )  # §3.4: no bias, tied weight
        self.post_init()
        self.generation_config = paper_generation_config(config)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head = new_embeddings

    @torch.no_grad()
    def generate(
        self,
        inputs: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        logits_processor: LogitsProcessorList | None = None,
        **kwargs: Any,
    ) -> Any:
        """`GenerationMixin.generate`, plus the per-input length rule of §6.1 (see `paper_generation_config`).

        The rule applies when the generation config has `max_length_offset` and the caller set neither
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
            eos = config.eos_token_id if config.eos_token_id is not None else self.config.eos_token_id
            eos = eos[0] if isinstance(eos, list) else eos
            logits_processor = LogitsProcessorList(
                [*(logits_processor or []), SourceLengthLimitLogitsProcessor(limits, eos)]
            )
            kwargs["max_new_tokens"] = int(limits.max())
            kwargs["max_length"] = None  # a max_length left in the config would only draw a warning
        # The layers run at every step keep oneDNN's layout of their weights for this call (see
        # `reordered_linear_weights`). Measured on whole calls against not keeping it: greedy at batch 16 1.15x
        # (small) and 1.14x (base) faster, beam 4 at batch 1 1.27x and 1.13x, beam 4 at batch 16 1.03x and 1.02x.
        # Each decoder self-attention also computes Q, K and V of a step as one linear (`stacked_step_projections`).
        penalty_type = getattr(config, "length_penalty_type", None) or "transformers"
        if penalty_type not in LENGTH_PENALTY_TYPES:
            raise ValueError(f"length_penalty_type must be one of {LENGTH_PENALTY_TYPES}, got {penalty_type!r}.")
        layers = self.model.decoder.layers
        step_linears = [self.lm_head] + [m for layer in layers for m in layer.decoding_step_linears()]
        token = _length_penalty_type.set(penalty_type)
        try:
            with stacked_step_projections(layer.self_attn for layer in layers), reordered_linear_weights(step_linears):
                return super().generate(inputs, generation_config, logits_processor, **kwargs)
        finally:
            _length_penalty_type.reset(token)

    def _update_finished_beams(self, **kwargs: Any) -> Any:
        """transformers' helper, with finished hypotheses scored by the call's length penalty (see `length_penalty`)."""
        length = kwargs["cur_len"] + 1 - kwargs["decoder_prompt_len"]
        kwargs["topk_log_probs"] = kwargs["topk_log_probs"] * _to_penalty_type(length, kwargs["length_penalty"])
        return super()._update_finished_beams(**kwargs)

    @staticmethod
    def _check_early_stop_heuristic(**kwargs: Any) -> torch.Tensor:
        """transformers' helper, with the best live score bounded by the call's length penalty. For
        `early_stopping="never"` and α > 0 the bound assumes the longest allowed output: tensor2tensor's rule."""
        if kwargs["early_stopping"] == "never" and kwargs["length_penalty"] > 0.0:
            length = kwargs["max_length"] - kwargs["decoder_prompt_len"]
        else:
            length = kwargs["cur_len"] - kwargs["decoder_prompt_len"]
        factor = _to_penalty_type(length, kwargs["length_penalty"])
        kwargs["running_beam_scores"] = kwargs["running_beam_scores"] * factor
        return GenerationMixin._check_early_stop_heuristic(**kwargs)

    def _source_lengths(self, inputs: torch.Tensor | None, kwargs: dict[str, Any]) -> torch.Tensor:
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

    def _expand_inputs_for_generation(
        self,
        expand_size: int = 1,
        is_encoder_decoder: bool = False,
        input_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor | None, dict[str, Any]]:
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

    def _reorder_cache(self, past_key_values: Cache, beam_idx: torch.Tensor) -> Cache:
        """Beam search: reorder only the decoder self-attention cache.

        All beams of one input hold the same cross-attention keys and values (one encoder output, repeated), and
        `beam_idx` only moves rows among one input's beams, so reordering those would copy identical rows: at the
        base size with batch 16, beam 4 and 30-token sources, about 47 MB per step.
        """
        if isinstance(past_key_values, EncoderDecoderCache):
            past_key_values.self_attention_cache.reorder_cache(beam_idx)
        else:
            past_key_values.reorder_cache(beam_idx)
        return past_key_values

    def prepare_decoder_input_ids_from_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Used by `DataCollatorForSeq2Seq(model=...)`: Trainer's label smoothing pops `labels` before forward."""
        return shift_tokens_right(labels, self.config.pad_token_id, self.config.decoder_start_token_id)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_outputs: BaseModelOutput | tuple | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        return_logits: bool | None = None,
        rows_per_source: int = 1,
        cache: Cache | None = None,
        **kwargs: Any,
    ) -> Seq2SeqLMOutput | tuple:
        r"""
        Args are those of [`VanillaTransformerModel.forward`], plus:
            labels (`torch.LongTensor` of shape `(batch, target_len)`, *optional*): target ids, -100 where ignored.
                Without `decoder_input_ids`, the decoder input is `labels` shifted right. The loss is label-smoothed
                by `config.label_smoothing` (§5.4).
            return_logits (`bool`, *optional*): `False` leaves the (batch, target_len, V) logits out (`logits` is
                None) and computes the loss from `labels` fused with the output projection, skipping ignored
                positions (`fused_linear_cross_entropy`): the same loss and gradients, faster and in less memory.
                By default the logits are computed, except in training steps (training mode, gradients enabled)
                when `fused_training_loss` is set on the model, as `train.py` does.
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
        logits = loss = None
        if return_logits is None:
            return_logits = not (self.fused_training_loss and self.training and torch.is_grad_enabled())
        if labels is not None and not return_logits and self.lm_head.bias is None:
            loss = fused_linear_cross_entropy(hidden_states, self.lm_head.weight, labels, epsilon)
        else:
            logits = self.lm_head(hidden_states)  # (B, T, D) -> (B, T, V)
            if labels is not None:
                loss = label_smoothed_cross_entropy(logits, labels, epsilon)
        output = Seq2SeqLMOutput(
            loss=loss,
            logits=logits,
            **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)},
            decoder_hidden_states=outputs.decoder_hidden_states,
            decoder_attentions=outputs.decoder_attentions,
            cross_attentions=outputs.cross_attentions,
            encoder_last_hidden_state=outputs.encoder_last_hidden_state,
            encoder_hidden_states=outputs.encoder_hidden_states,
            encoder_attentions=outputs.encoder_attentions,
        )
        return output if return_dict is not False else output.to_tuple()


__all__ = [
    "LENGTH_PENALTY_TYPES",
    "SourceLengthLimitLogitsProcessor",
    "VanillaTransformerForConditionalGeneration",
    "VanillaTransformerLinear",
    "VanillaTransformerModel",
    "VanillaTransformerPreTrainedModel",
    "fused_linear_cross_entropy",
    "label_smoothed_cross_entropy",
    "length_penalty",
    "paper_generation_config",
    "reordered_linear_weights",
    "shift_tokens_right",
    "sinusoidal_table",
]
