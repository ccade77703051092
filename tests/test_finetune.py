"""examples/finetune.py: a user's own Seq2SeqTrainer script fine-tunes a saved checkpoint, and the result reloads."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from hf_vanilla_transformer import VanillaTransformerForConditionalGeneration
from hf_vanilla_transformer.corpus import build_default_corpus
from hf_vanilla_transformer.tokenization import train_tokenizer

ROOT = Path(__file__).resolve().parent.parent


def load_script():
    spec = importlib.util.spec_from_file_location("finetune", ROOT / "examples" / "finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    """A tiny saved checkpoint: random weights and a BPE tokenizer trained on the corpus it will fine-tune on."""
    texts = [text for pair in build_default_corpus(num_train=300)["train"]["translation"] for text in pair.values()]
    tokenizer = train_tokenizer(texts, vocab_size=300)
    folder = tmp_path / "checkpoint"
    tiny_model(seed=0, vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_finetuning_lowers_the_loss_and_the_result_reloads(checkpoint, tmp_path):
    out = tmp_path / "finetuned"
    args = [str(checkpoint), str(out), "--max_steps", "40", "--num_examples", "300", "--num_eval", "8"]
    result = load_script().main([*args, "--batch_size", "16", "--learning_rate", "3e-3"])

    losses = result["losses"]
    assert len(losses) == 10 and losses[-1] < losses[0] - 0.5, losses  # logged every 4 steps; ~6.2 -> ~5.0
    assert 0.0 <= result["eval_bleu"] <= 100.0 and result["eval_gen_len"] > 0

    # The fine-tuned folder is a complete checkpoint: it reloads to the model the script trained, which moved.
    assert {"model.safetensors", "tokenizer.json", "modeling_vanilla_transformer.py"} <= {p.name for p in out.iterdir()}
    assert "auto_map" in json.loads((out / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(out)
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(out).eval()
    assert type(reloaded) is VanillaTransformerForConditionalGeneration
    start = VanillaTransformerForConditionalGeneration.from_pretrained(checkpoint).eval()
    batch = tokenizer(["nu figi ke fomet", "ka lo"], text_target=["a b", "c"], padding=True, return_tensors="pt")
    decoder_input_ids = reloaded.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        logits = reloaded(**inputs, decoder_input_ids=decoder_input_ids).logits
        trained = result["model"].eval()(**inputs, decoder_input_ids=decoder_input_ids).logits
        before = start(**inputs, decoder_input_ids=decoder_input_ids).logits
    assert torch.equal(logits, trained)
    assert not torch.allclose(logits, before)
