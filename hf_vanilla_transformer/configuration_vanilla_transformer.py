"""Configuration of the Transformer of "Attention Is All You Need" (Vaswani et al., 2017).

`VanillaTransformerConfig()` with no arguments is the paper's base model (Table 3, row "base");
`VanillaTransformerConfig.from_preset("big")` is the big one. Field names follow transformers' seq2seq models
(BART, Marian) so that Trainer, accelerate and DeepSpeed find what they look for; each field's docstring gives the
paper's symbol.

This file imports nothing but transformers: `trust_remote_code` copies it next to the weights as it is.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

POSITION_EMBEDDING_TYPES = ("sinusoidal", "learned")
# Switches for the design-choice experiments (experiments/): the defaults are the paper's.
ATTENTION_TYPES = ("scaled_dot_product", "dot_product", "additive")
NORM_TYPES = ("layernorm", "batchnorm")
# §3.3 uses ReLU; the others are here because fine-tuners ask for them, not because the paper does.
ACTIVATION_FUNCTIONS = ("relu", "gelu", "gelu_new", "silu", "swish", "tanh")

# Table 3 of the paper, plus two sizes for CPU runs and tests. Each preset only lists what differs from base.
PRESETS: dict[str, dict[str, Any]] = {
    "base": {},
    "big": {
        "d_model": 1024,
        "encoder_ffn_dim": 4096,
        "decoder_ffn_dim": 4096,
        "encoder_attention_heads": 16,
        "decoder_attention_heads": 16,
        "dropout": 0.3,
    },
    "small": {
        "d_model": 256,
        "encoder_ffn_dim": 1024,
        "decoder_ffn_dim": 1024,
        "encoder_attention_heads": 4,
        "decoder_attention_heads": 4,
        "encoder_layers": 3,
        "decoder_layers": 3,
    },
    "tiny": {
        "d_model": 64,
        "encoder_ffn_dim": 256,
        "decoder_ffn_dim": 256,
        "encoder_attention_heads": 4,
        "decoder_attention_heads": 4,
        "encoder_layers": 2,
        "decoder_layers": 2,
    },
}


SMALL_INIT = "small_init"  # init_std scaled with the width: sqrt(2 / (5 d_model))


class VanillaTransformerConfig(PretrainedConfig):
    r"""
    Configuration of [`VanillaTransformerModel`] and [`VanillaTransformerForConditionalGeneration`].

    Args:
        vocab_size (`int`, *optional*, defaults to 37000):
            Size of the one shared source/target BPE vocabulary (§5.1: "about 37000 tokens").
        d_model (`int`, *optional*, defaults to 512):
            Model width, d_model (§3).
        encoder_layers (`int`, *optional*, defaults to 6):
            Encoder depth, N (§3.1).
        decoder_layers (`int`, *optional*, defaults to 6):
            Decoder depth, N (§3.1).
        encoder_attention_heads (`int`, *optional*, defaults to 8):
            Heads h of encoder self-attention (§3.2.2); d_k = d_v = d_model / h.
        decoder_attention_heads (`int`, *optional*, defaults to 8):
            Heads h of decoder self- and cross-attention.
        encoder_ffn_dim (`int`, *optional*, defaults to 2048):
            Inner size d_ff of the encoder's position-wise feed-forward networks (§3.3).
        decoder_ffn_dim (`int`, *optional*, defaults to 2048):
            Inner size d_ff of the decoder's feed-forward networks.
        dropout (`float`, *optional*, defaults to 0.1):
            P_drop: applied to each sub-layer's output before the residual sum, and to the sums of embeddings and
            positional encodings (§5.4).
        attention_dropout (`float`, *optional*, defaults to 0.0):
            Dropout on the attention weights. Not in the paper (its tensor2tensor code added it later).
        activation_dropout (`float`, *optional*, defaults to 0.0):
            Dropout after the FFN's activation. Not in the paper.
        label_smoothing (`float`, *optional*, defaults to 0.0):
            epsilon_ls of §5.4 for the loss the model returns when given `labels`: the target distribution puts
            1 - epsilon_ls on the reference token and spreads epsilon_ls evenly over the vocabulary (the paper
            trains with 0.1; `train.py` sets it from `--label_smoothing_factor`). With `return_logits=False`, or in
            training steps of a model with `fused_training_loss` set, the loss is fused with the output projection
            and skips padded positions (see `fused_linear_cross_entropy`).
        activation_function (`str`, *optional*, defaults to `"relu"`):
            The FFN's non-linearity; ReLU in §3.3.
        max_position_embeddings (`int`, *optional*, defaults to 1024):
            Rows of the learned position table. Sinusoidal encodings precompute this many positions but serve
            any length.
        position_embedding_type (`str`, *optional*, defaults to `"sinusoidal"`):
            `"sinusoidal"` (§3.5) or `"learned"` (Table 3, row (E)).
        scale_embedding (`bool`, *optional*, defaults to `True`):
            Multiply token embeddings by sqrt(d_model) (§3.4).
        tie_word_embeddings (`bool`, *optional*, defaults to `True`):
            Share one matrix between the source embedding, the target embedding and the pre-softmax projection
            (§3.4). With `False` the three are separate.
        attention_bias (`bool`, *optional*, defaults to `False`):
            Bias terms in the attention projections W^Q, W^K, W^V and W^O. §3.2.2 defines them as matrices, and
            tensor2tensor builds them without biases; only the FFN has b_1 and b_2 (§3.3). `True` gives the layout of
            `torch.nn.Transformer`, fairseq and Marian, which all add biases (the parity tests set it to copy their
            weights). A config saved before this field existed loads as `True`: those checkpoints have biases.
        attention_type (`str`, *optional*, defaults to `"scaled_dot_product"`):
            The attention score (§3.2.1): `"scaled_dot_product"` (the paper's), `"dot_product"` (no 1/sqrt(d_k)) or
            `"additive"` (Bahdanau-style, per head). For experiments; the paper uses the first.
        norm_type (`str`, *optional*, defaults to `"layernorm"`):
            The normalisation of each sub-layer: `"layernorm"` (the paper's) or `"batchnorm"` over the feature
            dimension, with statistics computed over non-padding positions only. For experiments.
        normalize_before (`bool`, *optional*, defaults to `False`):
            Deviation, off by default: pre-LN sub-layers `x + Sublayer(LayerNorm(x))` with a final LayerNorm on
            each stack, which trains deep stacks without warm-up tricks. The paper is post-LN.
        layer_norm_eps (`float`, *optional*, defaults to 1e-5):
            LayerNorm epsilon (the paper does not give one; 1e-5 is PyTorch's and fairseq's).
        init_std (`float`, `"small_init"` or `None`, *optional*, defaults to 0.02):
            Standard deviation of the normal initialisation of every Linear weight and embedding (BART's and
            Marian's scheme; the paper states none, and this one measured best on real data). `"small_init"` scales
            it with the width, sqrt(2 / (5 d_model)) (Nguyen & Salazar, 2019: 0.056 at d_model 128, 0.028 at 512,
            0.02 at about 1000), which a fixed 0.02 leaves too small in narrow models (`init_std_value`). `None` gives
            fairseq's and tensor2tensor's: Xavier-uniform Linears and N(0, d_model^-0.5) embeddings.
        use_cache (`bool`, *optional*, defaults to `True`):
            Whether the decoder returns its key/value cache for incremental decoding.
        pad_token_id, bos_token_id, eos_token_id, decoder_start_token_id (`int`, *optional*):
            Special token ids; the defaults (0, 1, 2, 1) match the tokenizer this package trains.

    Example:

    ```python
    >>> from hf_vanilla_transformer import VanillaTransformerConfig, VanillaTransformerForConditionalGeneration
    >>> base = VanillaTransformerConfig()                  # the paper's base model
    >>> big = VanillaTransformerConfig.from_preset("big")  # d_model 1024, d_ff 4096, h 16, P_drop 0.3
    >>> model = VanillaTransformerForConditionalGeneration(VanillaTransformerConfig.from_preset("tiny"))
    ```
    """

    model_type = "vanilla_transformer"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]  # the cache's output field before and from 5.24
    attribute_map = {
        "hidden_size": "d_model",
        "num_attention_heads": "encoder_attention_heads",
        "num_hidden_layers": "encoder_layers",
    }

    vocab_size: int = 37000
    d_model: int = 512
    encoder_layers: int = 6
    decoder_layers: int = 6
    encoder_attention_heads: int = 8
    decoder_attention_heads: int = 8
    encoder_ffn_dim: int = 2048
    decoder_ffn_dim: int = 2048
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    label_smoothing: float = 0.0
    activation_function: str = "relu"
    max_position_embeddings: int = 1024
    position_embedding_type: str = "sinusoidal"
    scale_embedding: bool = True
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    normalize_before: bool = False
    attention_type: str = "scaled_dot_product"
    norm_type: str = "layernorm"
    layer_norm_eps: float = 1e-5
    init_std: float | str | None = 0.02
    use_cache: bool = True
    is_encoder_decoder: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    decoder_start_token_id: int | None = 1

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        self._check()

    def _check(self) -> None:
        """Refuse values that would only fail later, deep inside torch, with a message naming the value."""
        for name in (
            "vocab_size",
            "d_model",
            "encoder_layers",
            "decoder_layers",
            "encoder_attention_heads",
            "decoder_attention_heads",
            "encoder_ffn_dim",
            "decoder_ffn_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        for name in ("encoder_attention_heads", "decoder_attention_heads"):
            heads = getattr(self, name)
            if self.d_model % heads:
                raise ValueError(
                    f"`d_model` ({self.d_model}) must be divisible by `{name}` ({heads}): §3.2.2 splits d_model "
                    f"into h heads of d_k = d_model / h."
                )
        for name in ("dropout", "attention_dropout", "activation_dropout", "label_smoothing"):
            p = getattr(self, name)
            if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= p < 1.0:
                raise ValueError(f"`{name}` must be a probability in [0, 1), got {p!r}.")
        if self.position_embedding_type not in POSITION_EMBEDDING_TYPES:
            raise ValueError(
                f"`position_embedding_type` must be one of {POSITION_EMBEDDING_TYPES}, "
                f"got {self.position_embedding_type!r}."
            )
        for name, allowed in (("attention_type", ATTENTION_TYPES), ("norm_type", NORM_TYPES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"`{name}` must be one of {allowed}, got {getattr(self, name)!r}.")
        if self.activation_function not in ACTIVATION_FUNCTIONS:
            raise ValueError(
                f"`activation_function` must be one of {ACTIVATION_FUNCTIONS}, got {self.activation_function!r}."
            )
        for name in ("attention_bias", "scale_embedding", "normalize_before"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be True or False, got {getattr(self, name)!r}.")
        if self.init_std not in (None, SMALL_INIT) and (
            not isinstance(self.init_std, (int, float)) or isinstance(self.init_std, bool) or not self.init_std > 0
        ):
            raise ValueError(f"`init_std` must be positive, {SMALL_INIT!r} or None, got {self.init_std!r}.")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
            token_id = getattr(self, name)
            if token_id is not None and not 0 <= token_id < self.vocab_size:
                raise ValueError(f"`{name}` ({token_id}) must lie in the vocabulary [0, {self.vocab_size}).")

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> Any:
        """`PretrainedConfig.from_dict`, reading a saved config without `attention_bias` as the code that saved it
        built the model: with biases in every attention projection (the field and its paper default came later)."""
        if "attention_bias" not in config_dict and "attention_bias" not in kwargs:
            config_dict = {**config_dict, "attention_bias": True}
        return super().from_dict(config_dict, **kwargs)

    def init_std_value(self) -> float | None:
        """The standard deviation `init_std` stands for (None: Xavier). `"small_init"` is sqrt(2 / (5 d_model)): a
        sub-layer's output then starts at about 0.4 of its input's size at any width, where N(0, 0.02) gives 0.05 at
        d_model 128 and starves the encoder of gradient (benchmarks/init_diagnostics.py; README, "Use")."""
        if self.init_std == SMALL_INIT:
            return (2 / (5 * self.d_model)) ** 0.5
        return self.init_std

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> VanillaTransformerConfig:
        """A named size: `"base"` and `"big"` are Table 3's; `"small"` and `"tiny"` are for CPU runs and tests."""
        if name not in PRESETS:
            raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
        return cls(**{**PRESETS[name], **overrides})


__all__ = ["PRESETS", "SMALL_INIT", "VanillaTransformerConfig"]
