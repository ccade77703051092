"""Shared fixtures. Model sizes follow fairseq's "characteristic dimensions": no two sizes coincide, so a swapped
axis fails loudly (d_model 12, heads 3, d_ff 20, vocab 37, source length 7, target length 5, batch 2)."""

from __future__ import annotations

import os

# Before anything imports huggingface_hub, which reads HF_HUB_OFFLINE once, at import: set after it (as before), the
# variable reached only subprocesses, and loading by repo id from a Hub cache asked huggingface.co for an
# adapter_config.json with 5 retries (23 s without a network; a request to the Hub with one).
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the suite may reach the Hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from hf_vanilla_transformer import VanillaTransformerConfig, VanillaTransformerForConditionalGeneration
from hf_vanilla_transformer.modeling_vanilla_transformer import CACHE_FIELD

VOCAB, D_MODEL, HEADS, FFN, SRC_LEN, TGT_LEN, BATCH = 37, 12, 3, 20, 7, 5, 2
PAD, BOS, EOS = 0, 1, 2


# The tiny sizes, under the field names transformers' seq2seq configs share (tests build a MarianConfig from them too).
TINY_SIZES = dict(
    vocab_size=VOCAB,
    d_model=D_MODEL,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=HEADS,
    decoder_attention_heads=HEADS,
    encoder_ffn_dim=FFN,
    decoder_ffn_dim=FFN,
    max_position_embeddings=64,
    dropout=0.0,
)


def tiny_config(**overrides) -> VanillaTransformerConfig:
    return VanillaTransformerConfig(**{**TINY_SIZES, **overrides})


def tiny_model(seed: int = 0, **overrides) -> VanillaTransformerForConditionalGeneration:
    torch.manual_seed(seed)
    return VanillaTransformerForConditionalGeneration(tiny_config(**overrides)).eval()


def random_batch(seed: int = 0, batch: int = BATCH, src_len: int = SRC_LEN, tgt_len: int = TGT_LEN):
    """Source ids with right padding of varying length (row 0 full), its mask, and labels ending in EOS."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (batch, src_len), generator=g)
    attention_mask = torch.ones(batch, src_len, dtype=torch.long)
    for row in range(1, batch):
        keep = max(1, src_len - 2 * row)
        attention_mask[row, keep:] = 0
    input_ids = input_ids.masked_fill(attention_mask == 0, PAD)
    labels = torch.randint(3, VOCAB, (batch, tgt_len), generator=g)
    labels[:, -1] = EOS
    return input_ids, attention_mask, labels


def decode_step_by_step(model, input_ids, attention_mask, decoder_input_ids):
    """Run the decoder one token at a time through the cache (as generate() does); returns the (B, T, V) logits of
    all steps and the final cache."""
    with torch.no_grad():
        encoder_outputs = model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask)
        past, steps = None, []
        for t in range(decoder_input_ids.shape[1]):
            out = model(
                encoder_outputs=encoder_outputs,
                attention_mask=attention_mask,
                decoder_input_ids=decoder_input_ids[:, t : t + 1],
                **{CACHE_FIELD: past},  # the name generate() passes with the installed transformers
                use_cache=True,
            )
            past = getattr(out, CACHE_FIELD)
            steps.append(out.logits)
    return torch.cat(steps, dim=1), past


@pytest.fixture
def model() -> VanillaTransformerForConditionalGeneration:
    return tiny_model()


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory):
    """An uninterrupted 20-step `train.py` run (test_train.TINY_RUN, --do_train) that checkpoints every 10 steps, made
    once for the session: test_reliability.py (same seed, SIGKILL and resume) and test_train.py (resume from the last
    checkpoint) compare their runs with it. Tests only read it (copy a checkpoint out, load the weights)."""
    from test_train import TINY_RUN, run_train

    out = tmp_path_factory.mktemp("reference") / "run"
    run_train([*TINY_RUN, "--max_steps", "20", "--do_train", "--output_dir", str(out)])
    return out
