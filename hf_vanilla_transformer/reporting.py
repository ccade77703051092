"""What a training run reports about itself: the learning-curve and cross-attention figures, and the facts the
model card states (filled into `model_card.md`, this package's template, by `model_card.render_model_card`).

`train.py` calls these at the end of a run; they read only the finished trainer's model, its log history, the
parsed arguments and the metrics, so that each number on the card is one the run produced.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, metadata
from pathlib import Path
from typing import Any

import torch


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display is needed, or present on servers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_learning_curve(
    log_history: list[dict], path: Path, during_training: str = "greedy", final: str = "final model"
) -> Path | None:
    """Training loss and validation BLEU over steps, as a PNG. The validation scores during training and those of
    the final model (scored after training, often with other settings: beam search, averaged checkpoints) are drawn
    apart and labelled with `during_training` and `final`: Trainer logs its end-of-training summary
    (`train_runtime`) between the two."""
    plt = _pyplot()
    losses = [(e["step"], e["loss"]) for e in log_history if "loss" in e]
    if not losses:
        return None
    end = next((i for i, e in enumerate(log_history) if "train_runtime" in e), len(log_history))
    during = [(e["step"], e["eval_bleu"]) for e in log_history[:end] if "eval_bleu" in e]
    after = [(e["step"], e["eval_bleu"]) for e in log_history[end:] if "eval_bleu" in e]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*losses, strict=True), color="tab:blue", label="training loss (label-smoothed)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss", color="tab:blue")
    if during or after:
        ax2 = ax.twinx()
        if during:
            ax2.plot(*zip(*during, strict=True), "o-", color="tab:red", label=f"validation BLEU, {during_training}")
        if after:
            ax2.plot(*zip(*after, strict=True), "*", color="tab:red", markersize=13, label=f"validation BLEU, {final}")
        ax2.set_ylabel("BLEU", color="tab:red")
        ax2.legend(loc="center right", fontsize=8)
    ax.set_title("Learning curve")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@dataclass
class AttentionMaps:
    """The attention weights of one translation, for the three uses of §3.2.3, one tensor per layer, each (H, rows,
    columns): `encoder` (H, S, S), `decoder` the masked self-attention (H, T, T), `cross` (H, T, S).

    Decoder row t is the position that predicts output token t (`target_tokens[t]`); its columns are what the decoder
    was fed, `decoder_input_tokens` (the start token, then the output shifted right), so the masked self-attention is
    lower-triangular: row t sees columns 0..t."""

    encoder: list[torch.Tensor]
    decoder: list[torch.Tensor]
    cross: list[torch.Tensor]
    source_tokens: list[str]
    decoder_input_tokens: list[str]
    target_tokens: list[str]
    output_ids: torch.Tensor  # (1, 1 + T): the start token, the translation, its end token


def attention_maps(model, tokenizer, source: str, output_ids: torch.Tensor | None = None) -> AttentionMaps:
    """Every layer's and head's attention weights on `source` and a translation of it: `output_ids` as `generate()`
    returned it (one row, e.g. the beam's best), or by default the model's own greedy translation. The weights are
    the model's own `output_attentions`, read from a teacher-forced forward on that translation, which computes the
    same weights as the decoding steps did. Under FSDP or ZeRO-3, every process must call it (generate and forward
    gather the weights collectively)."""
    model.eval()
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")  # only eager attention returns its weights
    try:
        inputs = tokenizer(source, return_tensors="pt").to(model.device)
        with torch.no_grad():
            if output_ids is None:
                output_ids = model.generate(**inputs, num_beams=1)
            out = model(**inputs, decoder_input_ids=output_ids[:, :-1], output_attentions=True)
    finally:
        model.set_attn_implementation(previous)

    def first_row(layers: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        return [weights[0].float().cpu() for weights in layers]  # (1, H, rows, columns) -> (H, rows, columns)

    return AttentionMaps(
        encoder=first_row(out.encoder_attentions),
        decoder=first_row(out.decoder_attentions),
        cross=first_row(out.cross_attentions),
        source_tokens=tokenizer.convert_ids_to_tokens(inputs["input_ids"][0]),
        decoder_input_tokens=tokenizer.convert_ids_to_tokens(output_ids[0, :-1]),
        target_tokens=tokenizer.convert_ids_to_tokens(output_ids[0, 1:]),
        output_ids=output_ids.cpu(),
    )


def cross_attention(model, tokenizer, source: str) -> tuple[torch.Tensor, list[str], list[str]]:
    """Cross-attention weights of the last decoder layer (H, T, S) for the model's own greedy translation of
    `source`, with the source and output tokens: `attention_maps`, cut to what `plot_cross_attention` draws."""
    maps = attention_maps(model, tokenizer, source)
    return maps.cross[-1], maps.source_tokens, maps.target_tokens


def plot_cross_attention(weights: torch.Tensor, src_tokens: list[str], tgt_tokens: list[str], path: Path) -> Path:
    """`cross_attention`'s weights, one panel per head."""
    plt = _pyplot()
    heads = weights.shape[0]
    cols = min(heads, 4)
    rows = math.ceil(heads / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    for h, ax in enumerate(axes.flat):
        if h >= heads:
            ax.axis("off")
            continue
        ax.imshow(weights[h], cmap="viridis", aspect="auto")
        ax.set_title(f"head {h + 1}")
        ax.set_xticks(range(len(src_tokens)), [t.lstrip("Ġ") for t in src_tokens], rotation=90, fontsize=6)
        ax.set_yticks(range(len(tgt_tokens)), [t.lstrip("Ġ") for t in tgt_tokens], fontsize=6)
    fig.suptitle("Cross-attention, last decoder layer (rows: output tokens, columns: source tokens)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def card_values(model, training_args, model_args, data_args, metrics, raw, train_result) -> dict[str, Any]:
    """The model card's values for one run; None where the run does not know a value (its block is left out)."""
    config = model.config
    generation = model.generation_config
    repo_id = training_args.hub_model_id or str(Path(training_args.output_dir).resolve())
    dataset = dataset_facts(data_args, raw)
    sizes = ", ".join(f"{split} {len(ds)}" for split, ds in raw.items())
    heads = config.encoder_attention_heads
    return {
        "model_name": Path(repo_id).name,
        "code_reference": code_reference(getattr(model_args, "code_url", None)),
        "repo_id": repo_id,
        "source_lang": data_args.source_lang,
        "target_lang": data_args.target_lang,
        **{key: value for key, value in dataset.items() if key.startswith("dataset_")},
        "encoder_layers": config.encoder_layers,
        "decoder_layers": config.decoder_layers,
        "d_model": config.d_model,
        "ffn_dim": config.encoder_ffn_dim,
        "heads": heads,
        "position_embedding_type": config.position_embedding_type,
        "vocab_size": config.vocab_size,
        "dropout": config.dropout,
        "num_parameters": f"{model.num_parameters() / 1e6:.1f}M",
        "data_description": f"{dataset['description']}; sentence pairs: {sizes}.",
        "adam_beta1": training_args.adam_beta1,
        "adam_beta2": training_args.adam_beta2,
        "adam_epsilon": training_args.adam_epsilon,
        "warmup_steps": int(training_args.warmup_steps),
        "learning_rate": f"{training_args.learning_rate:.3g}",
        "label_smoothing": getattr(config, "label_smoothing", 0.0) or training_args.label_smoothing_factor,
        "train_steps": train_result.global_step if train_result else "no",
        "num_processes": training_args.world_size,
        "batching": f", batches of about {data_args.max_tokens} tokens" if data_args.max_tokens else "",
        "train_runtime": f"{train_result.metrics['train_runtime']:.0f} s" if train_result else "no time (no training)",
        "averaged_checkpoints": model_args.checkpoint_average or None,
        "num_beams": generation.num_beams,
        "length_penalty": _describe_length_penalty(generation),
        "max_length_offset": getattr(generation, "max_length_offset", 50),
        "bleu_signature": metrics.get("predict_bleu_signature", metrics.get("eval_bleu_signature")),
        "paper_bleu_signature": metrics.get("predict_bleu_paper_signature", metrics.get("eval_bleu_paper_signature")),
        "eval_bleu_paper": _fmt(metrics.get("eval_bleu_paper")),
        "test_bleu_paper": _fmt(metrics.get("predict_bleu_paper")),
        "eval_bleu": _fmt(metrics.get("eval_bleu")),
        "eval_samples": metrics.get("eval_samples"),
        "test_bleu": _fmt(metrics.get("predict_bleu")),
        "test_samples": metrics.get("predict_samples"),
    }


LOCAL_FILE = "local file"  # the model-index's dataset type for data that is not on the Hub
LOCAL_FOLDER = "local folder"


def dataset_facts(data_args, raw) -> dict[str, Any]:
    """The data of a run as the card names it: `description` (what it trained on, for the prose), `dataset_id`
    (the Hub dataset, if one), and the model-index's evaluation dataset, the test split: `dataset_name`,
    `dataset_type` (the Hub id, or that the data is local), `dataset_config`, `dataset_split`. Local files and folders
    go by their base names only: their paths are the training machine's."""
    split = "test"
    test, limit = raw.get("test"), data_args.max_predict_samples
    if test is not None and limit is not None and len(test) == limit:  # train.py keeps the first `limit` pairs
        split = f"test[:{limit}]"
    name, config = data_args.dataset_name, data_args.dataset_config_name
    facts = {"dataset_id": None, "dataset_config": config if name else None, "dataset_split": split}
    files = {key: getattr(data_args, f"{key}_file") for key in ("train", "validation", "test")}
    if name and os.path.isdir(name):  # data.load_translation_dataset reads a local folder, not the Hub's
        folder = Path(name).resolve().name
        facts |= {"dataset_name": " ".join(filter(None, (folder, config))), "dataset_type": LOCAL_FOLDER}
        facts["description"] = f"the local dataset folder `{folder}`" + (f", config `{config}`" if config else "")
    elif name:
        facts |= {"dataset_id": name, "dataset_name": " ".join(filter(None, (name, config))), "dataset_type": name}
        facts["description"] = f"the Hub dataset `{name}`, " + (f"config `{config}`" if config else "default config")
    elif any(files.values()):
        names = {key: _file_names(path) for key, path in files.items() if path}
        facts |= {"dataset_name": names.get("test"), "dataset_type": LOCAL_FILE}
        facts["description"] = "local files: " + ", ".join(f"{key} `{value}`" for key, value in names.items())
    else:
        facts |= {"dataset_name": "embedded synthetic corpus", "dataset_type": "synthetic"}
        facts["description"] = (
            "the embedded synthetic corpus of hf-vanilla-transformer (`hf_vanilla_transformer.corpus`, seed "
            f"{data_args.corpus_seed}): a verb-final target language with case and agreement morphology"
        )
    return facts


def _file_names(path: str) -> str:
    """The base name of a data file, or of each file of a 'source.txt,target.txt' pair."""
    return ",".join(Path(part.strip()).name for part in path.split(","))


def code_reference(url: str | None = None) -> str:
    """The package's name, linked to `url` if given, else to the project URL in the installed package's metadata
    if it has one; unlinked otherwise (the card links only to an address someone stated)."""
    if url is None:
        try:
            urls = metadata("hf-vanilla-transformer").get_all("Project-URL") or []
        except PackageNotFoundError:
            urls = []
        url = urls[0].split(",", 1)[1].strip() if urls else None
    return f"[hf-vanilla-transformer]({url})" if url else "hf-vanilla-transformer"


def _describe_length_penalty(generation) -> str:
    if getattr(generation, "length_penalty_type", None) == "gnmt":
        return f"α = {generation.length_penalty} (GNMT's ((5 + |Y|) / 6)^α)"
    return f"α = {generation.length_penalty} (|Y|^α)"


def _fmt(value: float | None) -> str | None:
    return None if value is None else f"{value:.2f}"
