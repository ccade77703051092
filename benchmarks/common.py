"""Shared pieces of the benchmarks: the three implementations with one set of weights, batches, the FLOP count,
the matmul peak, alternating timers and the generation benchmark.

The three implementations of the same post-LN Transformer (§3) compared here:

- ``ours``: `VanillaTransformerForConditionalGeneration`.
- ``marian``: transformers' `MarianMTModel` configured as the paper's model (ReLU, post-LN, sinusoids, scaled
  embeddings, one tied matrix, `final_logits_bias` zero) with our weights copied in. Marian's sinusoid puts all sines
  before all cosines; its table is a frozen parameter, so we overwrite it with our interleaved table and the two
  models then compute the same function (checked in `build_models`, to ~1e-5 on the logits).
- ``torch``: `torch.nn.Transformer` with embeddings, our sinusoids and the tied output projection around it, final
  stack LayerNorms removed (post-LN needs none), attention and FFN-inner dropout set to 0 as in our config. Only
  used for the training step: it has no incremental decoding.

Axes: B batch, S source length, T target length, D d_model, V vocabulary, L_e / L_d layers, F d_ff.
"""

from __future__ import annotations

import gc
import math
import random
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig, MarianConfig, MarianMTModel

from benchmarks import ctranslate2_backend
from hf_vanilla_transformer import VanillaTransformerConfig, VanillaTransformerForConditionalGeneration, cpu_inference
from hf_vanilla_transformer.modeling_vanilla_transformer import shift_tokens_right, sinusoidal_table

PAD, BOS, EOS = 0, 1, 2
FIRST_REAL_TOKEN = 3  # ids below are special: random batches never contain them
IMPLEMENTATIONS = ("ours", "marian", "torch")
# glibc knobs that keep freed large buffers in the heap instead of munmap-ing them (and re-faulting them on the next
# step). They are read once at process start, so they only take effect in a freshly exec'd process.
ALLOCATOR_ENV = {
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": "68719476736",
    "MALLOC_TOP_PAD_": "1073741824",
}
# The brief's sizes: "small" for CPU runs, "base" = Table 3 of the paper (vocab 37000, §5.1). "tiny" is for tests.
SIZES: dict[str, dict[str, int]] = {
    "tiny": {"vocab_size": 1000},
    "small": {"vocab_size": 8000},
    "base": {"vocab_size": 37000},
}
LOGITS_ATOL = 1e-4  # measured differences are ~1e-6..1e-5; the bound leaves room for other BLAS builds


def model_config(size: str) -> VanillaTransformerConfig:
    """The preset of that name with the benchmark's vocabulary; dropout as the preset sets it (0.1). With attention
    biases, as Marian and `nn.Transformer` have them, so that the three hold the same weights."""
    return VanillaTransformerConfig.from_preset(size, attention_bias=True, **SIZES[size])


# --------------------------------------------------------------------------------------------- the three models


def build_ours(size: str, seed: int = 0) -> VanillaTransformerForConditionalGeneration:
    torch.manual_seed(seed)
    return VanillaTransformerForConditionalGeneration(model_config(size))


def marian_config(config: VanillaTransformerConfig) -> MarianConfig:
    """Marian set up as the paper's model, with our special ids and no forced EOS (Marian's default forces id 0)."""
    return MarianConfig(
        vocab_size=config.vocab_size,
        decoder_vocab_size=config.vocab_size,
        d_model=config.d_model,
        encoder_layers=config.encoder_layers,
        decoder_layers=config.decoder_layers,
        encoder_attention_heads=config.encoder_attention_heads,
        decoder_attention_heads=config.decoder_attention_heads,
        encoder_ffn_dim=config.encoder_ffn_dim,
        decoder_ffn_dim=config.decoder_ffn_dim,
        activation_function=config.activation_function,
        dropout=config.dropout,
        attention_dropout=config.attention_dropout,
        activation_dropout=config.activation_dropout,
        max_position_embeddings=config.max_position_embeddings,
        scale_embedding=config.scale_embedding,
        share_encoder_decoder_embeddings=True,
        tie_word_embeddings=True,
        pad_token_id=PAD,
        eos_token_id=EOS,
        bos_token_id=BOS,
        decoder_start_token_id=BOS,
        forced_eos_token_id=None,
    )


# Our sub-module names -> Marian's, per layer (the projections inside attention share names).
_MARIAN_NAMES = {
    "self_attn_block.layer_norm": "self_attn_layer_norm",
    "encoder_attn_block.layer_norm": "encoder_attn_layer_norm",
    "ffn_block.layer_norm": "final_layer_norm",
    "ffn.fc1": "fc1",
    "ffn.fc2": "fc2",
}


def marian_state_dict(ours: VanillaTransformerForConditionalGeneration) -> dict[str, torch.Tensor]:
    """Our weights under Marian's names. Positions are not weights in either model; see `build_marian`."""
    state = {}
    for name, tensor in ours.state_dict().items():
        if ".layers." not in name:
            continue
        for old, new in _MARIAN_NAMES.items():
            name = name.replace(f".{old}.", f".{new}.")
        state[name] = tensor
    embedding = ours.model.encoder.embed_tokens.weight
    for name in ("model.shared.weight", "model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight"):
        state[name] = embedding
    state["lm_head.weight"] = embedding
    return state


def build_marian(ours: VanillaTransformerForConditionalGeneration | None, size: str = "") -> MarianMTModel:
    """MarianMTModel with our weights (or its own init when `ours` is None: memory runs need no copy)."""
    config = marian_config(ours.config if ours is not None else model_config(size))
    marian = MarianMTModel(config)
    with torch.no_grad():
        if ours is not None:
            result = marian.load_state_dict(marian_state_dict(ours), strict=False)
            unexpected_missing = [
                k for k in result.missing_keys if "embed_positions" not in k and "final_logits" not in k
            ]
            if unexpected_missing or result.unexpected_keys:
                raise RuntimeError(f"Weight mapping incomplete: {unexpected_missing} {result.unexpected_keys}")
        marian.final_logits_bias.zero_()
        # Marian's table is sines-then-cosines; ours interleaves (§3.5). Both are fixed, so use ours in both.
        table = sinusoidal_table(config.max_position_embeddings, config.d_model)
        marian.model.encoder.embed_positions.weight.copy_(table)
        marian.model.decoder.embed_positions.weight.copy_(table)
    shared = marian.model.shared.weight
    if not (marian.lm_head.weight is shared and marian.model.decoder.embed_tokens.weight is shared):
        raise RuntimeError("Marian's embeddings are not tied: the comparison would count three matrices.")
    return marian


class TorchTransformerLM(nn.Module):
    """`torch.nn.Transformer` + tied embeddings * sqrt(D) + our sinusoids + output projection (training only)."""

    def __init__(self, config: VanillaTransformerConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model, padding_idx=PAD)
        self.scale = math.sqrt(config.d_model)
        self.register_buffer("pe", sinusoidal_table(config.max_position_embeddings, config.d_model), persistent=False)
        self.dropout = config.dropout
        self.transformer = nn.Transformer(
            d_model=config.d_model,
            nhead=config.encoder_attention_heads,
            num_encoder_layers=config.encoder_layers,
            num_decoder_layers=config.decoder_layers,
            dim_feedforward=config.encoder_ffn_dim,
            dropout=config.dropout,
            activation="relu",
            batch_first=True,
            norm_first=False,
        )
        # Post-LN stacks end in a LayerNorm already: nn.Transformer's extra final norms are not the paper's.
        self.transformer.encoder.norm = None
        self.transformer.decoder.norm = None
        # nn.Transformer uses one dropout everywhere; ours has none on attention weights or inside the FFN.
        for layer in [*self.transformer.encoder.layers, *self.transformer.decoder.layers]:
            layer.dropout.p = config.activation_dropout
            for attention in (layer.self_attn, getattr(layer, "multihead_attn", None)):
                if attention is not None:
                    attention.dropout = config.attention_dropout

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(ids) * self.scale + self.pe[: ids.shape[1]]
        return F.dropout(hidden, p=self.dropout, training=self.training)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, decoder_input_ids: torch.Tensor
    ) -> torch.Tensor:
        """Logits (B, T, V) of the target given the source; the target side is only causally masked, as in ours."""
        source_padding = attention_mask == 0  # (B, S), True where padded
        causal = nn.Transformer.generate_square_subsequent_mask(decoder_input_ids.shape[1])
        hidden = self.transformer(
            self._embed(input_ids),
            self._embed(decoder_input_ids),
            tgt_mask=causal,
            src_key_padding_mask=source_padding,
            memory_key_padding_mask=source_padding,
            tgt_is_causal=True,
        )
        return F.linear(hidden, self.embed_tokens.weight)  # tied pre-softmax projection (§3.4)


def build_torch(ours: VanillaTransformerForConditionalGeneration | None, size: str = "") -> TorchTransformerLM:
    """The nn.Transformer wrapper, with our weights when given."""
    model = TorchTransformerLM(ours.config if ours is not None else model_config(size))
    if ours is None:
        return model
    with torch.no_grad():
        model.embed_tokens.weight.copy_(ours.model.encoder.embed_tokens.weight)
        stacks = model.transformer.encoder.layers, model.transformer.decoder.layers
        ours_stacks = ours.model.encoder.layers, ours.model.decoder.layers
        for theirs_layers, our_layers in zip(stacks, ours_stacks, strict=True):
            for theirs, layer in zip(theirs_layers, our_layers, strict=True):
                _copy_torch_layer(theirs, layer)
    return model


def _copy_torch_layer(theirs: nn.Module, ours: nn.Module) -> None:
    def copy_attention(target: nn.MultiheadAttention, source: nn.Module) -> None:
        target.in_proj_weight.copy_(torch.cat([source.q_proj.weight, source.k_proj.weight, source.v_proj.weight]))
        target.in_proj_bias.copy_(torch.cat([source.q_proj.bias, source.k_proj.bias, source.v_proj.bias]))
        target.out_proj.load_state_dict(source.out_proj.state_dict())

    copy_attention(theirs.self_attn, ours.self_attn)
    theirs.linear1.load_state_dict(ours.ffn.fc1.state_dict())
    theirs.linear2.load_state_dict(ours.ffn.fc2.state_dict())
    norms = [ours.self_attn_block.layer_norm]
    if hasattr(theirs, "multihead_attn"):
        copy_attention(theirs.multihead_attn, ours.encoder_attn)
        norms.append(ours.encoder_attn_block.layer_norm)
    norms.append(ours.ffn_block.layer_norm)
    for index, norm in enumerate(norms, start=1):
        getattr(theirs, f"norm{index}").load_state_dict(norm.state_dict())


def logits(impl: str, model: nn.Module, batch: Batch) -> torch.Tensor:
    """The (B, T, V) logits of one implementation; no labels go in, so every loss is computed the same way."""
    if impl == "torch":
        return model(batch.input_ids, batch.attention_mask, batch.decoder_input_ids)
    return model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, decoder_input_ids=batch.decoder_input_ids
    ).logits


def build_models(size: str, impls: tuple[str, ...] = IMPLEMENTATIONS, seed: int = 0) -> tuple[dict, dict]:
    """The requested implementations with one set of weights, and the max |logit difference| of each to ours.

    Raises if a copy does not reproduce our logits to LOGITS_ATOL on a padded batch: a timing of a different
    function would be meaningless.
    """
    ours = build_ours(size, seed)
    builders = {"marian": build_marian, "torch": build_torch}
    models = {"ours": ours, **{impl: builders[impl](ours) for impl in impls if impl != "ours"}}
    check = token_batches(ours.config.vocab_size, max_tokens=256, count=1, seed=seed + 1)[0]
    diffs = {}
    with torch.no_grad():
        for model in models.values():
            model.eval()
        reference = logits("ours", ours, check)
        for impl, model in models.items():
            if impl == "ours":
                continue
            diffs[impl] = float((logits(impl, model, check) - reference).abs().max())
            if not diffs[impl] <= LOGITS_ATOL:
                raise AssertionError(f"{impl} with our weights differs from ours by {diffs[impl]:.3g} in the logits.")
    return {impl: models[impl] for impl in impls}, diffs


# ------------------------------------------------------------------------------------------------------- batches


@dataclass
class Batch:
    """A padded training batch. Token counts exclude padding; shapes include it."""

    input_ids: torch.Tensor  # (B, S)
    attention_mask: torch.Tensor  # (B, S)
    decoder_input_ids: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T), -100 on padding

    @property
    def tokens(self) -> int:
        """Non-padding source tokens + non-padding target tokens (labels, EOS included): the throughput unit."""
        return int(self.attention_mask.sum()) + int((self.labels != -100).sum())


def make_batch(pairs: list[tuple[int, int]], vocab_size: int, generator: torch.Generator) -> Batch:
    """Random ids for (source length, target length) pairs, right-padded; each sequence ends in EOS."""
    batch_size = len(pairs)
    src_len, tgt_len = max(s for s, _ in pairs), max(t for _, t in pairs)
    input_ids = torch.full((batch_size, src_len), PAD)
    labels = torch.full((batch_size, tgt_len), -100)
    for row, (s, t) in enumerate(pairs):
        input_ids[row, :s] = torch.randint(FIRST_REAL_TOKEN, vocab_size, (s,), generator=generator)
        input_ids[row, s - 1] = EOS
        labels[row, :t] = torch.randint(FIRST_REAL_TOKEN, vocab_size, (t,), generator=generator)
        labels[row, t - 1] = EOS
    decoder_input_ids = shift_tokens_right(labels, PAD, BOS)
    return Batch(input_ids, (input_ids != PAD).long(), decoder_input_ids, labels)


def fixed_batch(vocab_size: int, batch_size: int = 32, length: int = 32, seed: int = 0) -> Batch:
    """B x L source and target with no padding."""
    generator = torch.Generator().manual_seed(seed)
    return make_batch([(length, length)] * batch_size, vocab_size, generator)


def sentence_lengths(count: int, seed: int, mean: float = 25.0) -> list[tuple[int, int]]:
    """(source, target) lengths of sentence pairs: source ~ Gamma(k=4, mean 25) in [3, 150], target = source *
    U(0.8, 1.25): a WMT-like spread of BPE lengths with related source and target lengths."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(count):
        source = min(150, max(3, round(rng.gammavariate(4.0, mean / 4.0))))
        target = min(150, max(3, round(source * rng.uniform(0.8, 1.25))))
        pairs.append((source, target))
    return pairs


def token_batches(vocab_size: int, max_tokens: int = 4096, count: int = 3, seed: int = 0) -> list[Batch]:
    """`count` batches as a length-bucketing loader makes them: pairs sorted by length, then cut so that each side's
    padded size (rows x longest) stays within `max_tokens` (fairseq's --max-tokens, per side). The batches are taken
    evenly across the length range, so repeats see short, medium and long sentences."""
    pairs = sorted(sentence_lengths(20 * max_tokens // 25 + 50, seed))
    chunks, current = [], []
    for pair in pairs:
        rows = len(current) + 1
        if current and rows * max(max(p[0], p[1]) for p in [*current, pair]) > max_tokens:
            chunks.append(current)
            current = []
        current.append(pair)
    chunks.append(current)
    chunks = chunks[1:-1] or chunks  # the extremes are ragged leftovers, not typical batches
    picks = [chunks[round(i * (len(chunks) - 1) / max(1, count - 1))] for i in range(count)]
    generator = torch.Generator().manual_seed(seed)
    return [make_batch(pairs, vocab_size, generator) for pairs in picks]


# ------------------------------------------------------------------------------------------------- training step


LABEL_SMOOTHING = 0.1  # §5.4, train.py's default


def training_step(impl: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> Callable[[Batch], float]:
    """One step as train.py runs it: forward, label-smoothed (0.1, §5.4) cross-entropy, backward, the optimizer.

    Each model computes the loss its own best way. Ours takes `labels` and returns the loss it computes fused
    with the output projection, skipping padding (train.py moves `--label_smoothing_factor` into the config for this).
    Marian and `nn.Transformer` return the full (B, T, V) logits, smoothed by `F.cross_entropy(label_smoothing=0.1)`:
    one op, and faster than Trainer's `LabelSmoother`, which train.py would use for them.
    """

    if impl == "ours":  # as train.py sets them
        model.config.label_smoothing = LABEL_SMOOTHING
        model.fused_training_loss = True

    def step(batch: Batch) -> float:
        if impl == "ours":
            loss = model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                decoder_input_ids=batch.decoder_input_ids,
                labels=batch.labels,
            ).loss
        else:
            output = logits(impl, model, batch)
            loss = F.cross_entropy(
                output.flatten(0, 1), batch.labels.flatten(), label_smoothing=LABEL_SMOOTHING, ignore_index=-100
            )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """train.py's optimizer for every implementation: Trainer's default `adamw_torch_fused` with weight decay 0, which
    is Adam (§5.3), with the paper's betas and epsilon."""
    return torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-9, weight_decay=0.0, fused=True)


def training_flops(config: VanillaTransformerConfig, batch: Batch) -> float:
    """Matmul FLOPs of one training step on the padded batch (backward = 2 x forward, so 3 x forward in all).

    Per padded token, a Linear of n weights costs 2n FLOPs forward, so 6n for a training step:
      encoder, per source token:  6 * L_e * (4 D^2 + 2 D F)          (Q, K, V, out; fc1, fc2)
      decoder, per target token:  6 * L_d * (6 D^2 + 2 D F)          (self Q, K, V, out; cross Q, out; fc1, fc2)
      cross K, V, per source tok: 6 * L_d * 2 D^2                    (projected from the encoder output)
      output projection, per target token: 6 * D * V                 (the tied lm_head)
    Attention (scores Q K^T and weights x V, 2 * 2 * Lq * Lk * D FLOPs per row forward, full square even where
    the causal mask zeroes half):
      12 * B * D * (L_e * S^2 + L_d * (T^2 + T * S))
    Not counted: embedding lookups, biases, LayerNorm, softmax, dropout, the loss and Adam (elementwise work).
    """
    batch_size, src_len = batch.input_ids.shape
    tgt_len = batch.decoder_input_ids.shape[1]
    d, v = config.d_model, config.vocab_size
    le, ld = config.encoder_layers, config.decoder_layers
    src_tokens, tgt_tokens = batch_size * src_len, batch_size * tgt_len
    linear = (
        src_tokens * le * (4 * d * d + 2 * d * config.encoder_ffn_dim)
        + tgt_tokens * ld * (6 * d * d + 2 * d * config.decoder_ffn_dim)
        + src_tokens * ld * 2 * d * d
        + tgt_tokens * d * v
    )
    attention = 2 * batch_size * d * (le * src_len**2 + ld * (tgt_len**2 + tgt_len * src_len))
    return 6.0 * (linear + attention)


def square_matmul(n: int) -> tuple[Callable[..., object], float]:
    """The reference of "% of matmul peak": C = A @ B with n x n fp32 matrices, as a callable (any arguments are
    ignored, so `alternate` can time it beside the training steps) and its 2 n^3 FLOPs."""
    a, b, out = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
    return (lambda *_: torch.matmul(a, b, out=out)), 2.0 * n**3


def matmul_peak(n: int = 3072, repeats: int = 5) -> dict[str, float]:
    """Dense fp32 matmul FLOP/s of this machine (`square_matmul`), best of `repeats` (one warm-up first). Same
    threads as the benchmarks (torch's default)."""
    matmul, flops = square_matmul(n)
    matmul()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul()
        times.append(time.perf_counter() - start)
    return {"n": n, "peak_flops": flops / min(times), "median_flops": flops / statistics.median(times)}


# ------------------------------------------------------------------------------------------------------ timing


def alternate(runs: dict[str, Callable[[int], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Time each callable `repeats` times, interleaved (a, b, c, a, b, c, ...), so that drift in the machine's speed
    (other jobs, thermal state) hits all of them alike. Each gets `warmup` untimed calls first. The callable receives
    the repeat index (so all implementations see the same input in one round); -1 for warm-up."""
    for _ in range(warmup):
        for run in runs.values():
            run(-1)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for index in range(repeats):
        for name, run in runs.items():
            gc.collect()  # collect between calls, not during one
            start = time.perf_counter()
            run(index)
            times[name].append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def peak_rss_mib() -> float:
    """The process's high-water resident set (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        resident_pages = int(handle.read().split()[1])
    return resident_pages * resource.getpagesize() / 2**20


# -------------------------------------------------------------------------------------------------- generation


def fixed_length_generation_config(num_beams: int, new_tokens: int) -> GenerationConfig:
    """The same decoding settings for both models: exactly `new_tokens` tokens (min = max, so EOS is masked out
    until the end and nothing stops early), length penalty 0.6 (§6.1), no sampling, no forced tokens."""
    beam_settings = {"length_penalty": 0.6, "early_stopping": True} if num_beams > 1 else {}
    return GenerationConfig(
        num_beams=num_beams,
        **beam_settings,
        do_sample=False,
        min_new_tokens=new_tokens,
        max_new_tokens=new_tokens,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        decoder_start_token_id=BOS,
        use_cache=True,
    )


def source_batch(vocab_size: int, batch_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Source ids and mask for generation: lengths from `sentence_lengths` (mean ~25), right-padded."""
    pairs = [(s, s) for s, _ in sentence_lengths(batch_size, seed)]
    batch = make_batch(pairs, vocab_size, torch.Generator().manual_seed(seed))
    return batch.input_ids, batch.attention_mask


GENERATION_CASES = (("greedy", 1), ("beam4", 4))


def generation_benchmark(
    size: str,
    batch_sizes: tuple[int, ...] = (1, 16),
    new_tokens: int = 32,
    repeats: int = 3,
    with_ctranslate2: bool = True,
) -> dict[str, dict]:
    """Greedy and beam-4 decoding, ours vs Marian with the same weights, `new_tokens` tokens per output; plus
    CTranslate2 running a conversion of our weights when the `ctranslate2` package is installed.

    Ours runs converted by `cpu_inference.optimize_for_cpu_inference`, as the pipelines run it.
    Tokens/s counts returned tokens (batch x new_tokens), not the beam x batch rows beam search computes.
    Returns {"<mode>_b<batch>": {"ours": tok/s, "marian": tok/s, "ratio": ours/marian, "times": ...}}, plus
    "setup" with the logit difference and whether the greedy outputs agree.
    """
    models, diffs = build_models(size, ("ours", "marian"))
    cpu_inference.optimize_for_cpu_inference(models["ours"])  # after Marian took a copy of its weights
    vocab_size = models["ours"].config.vocab_size
    results: dict[str, dict] = {"setup": {"max_logit_diff_marian": diffs["marian"]}}
    cases = [
        (f"{mode}_b{batch_size}", fixed_length_generation_config(beams, new_tokens), batch_size)
        for mode, beams in GENERATION_CASES
        for batch_size in batch_sizes
    ]
    outputs: dict[str, dict[str, torch.Tensor]] = {}
    with torch.inference_mode():
        for case, config, batch_size in cases:
            input_ids, attention_mask = source_batch(vocab_size, batch_size, seed=batch_size)
            times, outputs[case] = _time_generation(models, config, input_ids, attention_mask, repeats)
            if outputs[case]["ours"].shape[1] != new_tokens + 1 or outputs[case]["marian"].shape != (
                outputs[case]["ours"].shape
            ):
                raise AssertionError(f"Not a fixed-length run: {tuple(outputs[case]['ours'].shape)}")
            results[case] = {"times_s": times}
    # CTranslate2 is timed after every torch case, not between them: once it has run, the torch models timed after it
    # in the same process were slower, even seconds later in the next case (small size, greedy batch 16, timed after
    # CTranslate2 had run the batch-1 case: 9.3-11.3 ms per token, against 6.6-7.0 without CTranslate2).
    if with_ctranslate2 and ctranslate2_backend.available():
        with tempfile.TemporaryDirectory() as directory, torch.inference_mode():
            models["ctranslate2"] = ctranslate2_backend.load_translator(
                ctranslate2_backend.convert(models["ours"], directory)
            )
            for case, config, batch_size in cases:
                input_ids, attention_mask = source_batch(vocab_size, batch_size, seed=batch_size)
                times, ct2_outputs = _time_generation(
                    {"ctranslate2": models["ctranslate2"]}, config, input_ids, attention_mask, repeats
                )
                results[case]["times_s"].update(times)
                outputs[case].update(ct2_outputs)
            del models["ctranslate2"]  # its threads go with it, before the next size's torch models are timed
    for case, _config, batch_size in cases:
        row = results[case]
        times = row.pop("times_s")
        row.update({impl: batch_size * new_tokens / median(ts) for impl, ts in times.items()})
        row["ratio"] = row["ours"] / row["marian"]
        for impl in times:
            if impl != "ours":
                row[f"same_output_{impl}"] = bool(torch.equal(outputs[case]["ours"], outputs[case][impl]))
        row["same_output"] = row["same_output_marian"]
        row["times_s"] = times
    return results


def _time_generation(
    models: dict[str, Any], config: GenerationConfig, input_ids: torch.Tensor, mask: torch.Tensor, repeats: int
) -> tuple[dict[str, list[float]], dict[str, torch.Tensor]]:
    """Alternating timings of `generate` for each model (`translate_batch` for CTranslate2), and each last output."""
    outputs: dict[str, torch.Tensor] = {}

    def runner(impl: str) -> Callable[[int], None]:
        def run(_index: int) -> None:
            if impl == "ctranslate2":
                beams, new_tokens = config.num_beams, config.max_new_tokens
                penalty = 1.0 if config.length_penalty is None else config.length_penalty  # greedy: unused
                outputs[impl] = ctranslate2_backend.translate(models[impl], input_ids, mask, beams, new_tokens, penalty)
            else:
                outputs[impl] = models[impl].generate(
                    input_ids=input_ids, attention_mask=mask, generation_config=config
                )

        return run

    return alternate({impl: runner(impl) for impl in models}, repeats), outputs


def format_generation(size: str, results: dict[str, dict]) -> list[str]:
    """Table lines: tokens/s of each engine and our ratios to them, per decoding case."""
    lines = []
    for case, row in results.items():
        if case == "setup":
            continue
        ct2 = row.get("ctranslate2")
        ct2_speed, ct2_ratio = (f"{ct2:.1f}", f"{row['ours'] / ct2:.2f}") if ct2 else ("-", "-")
        speeds = f"{row['ours']:.1f} | {row['marian']:.1f} | - | {ct2_speed}"
        lines.append(f"| {size} | gen {case} (tok/s) | {speeds} | {row['ratio']:.2f} | - | {ct2_ratio} |")
    return lines


TABLE_HEADER = [
    "| size | measure | ours | marian | torch | ctranslate2 | ours/marian | ours/torch | ours/ctranslate2 |",
    "|---|---|---|---|---|---|---|---|---|",
]
