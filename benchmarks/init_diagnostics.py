"""Why the initialisation matters for post-LN: measured at initialisation on one real batch.

    python benchmarks/init_diagnostics.py TRAIN --source_lang en --target_lang fr
    python benchmarks/init_diagnostics.py demo          # the embedded synthetic corpus, at train.py's demo size too

For the small and base presets (and the demo's size on the embedded corpus), with `init_std=None` (Xavier-uniform
linears, N(0, d^-0.5) embeddings) and `init_std=0.02` (N(0, 0.02) everywhere), prints the loss of the untrained model,
the mean ratio of each sub-layer's output standard deviation to its input's (how far a post-LN block starts from the
identity), and the gradient norm of the first and last encoder and decoder layers after one backward pass (whether the
gradient reaches the lower layers).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import train
from hf_vanilla_transformer import VanillaTransformerConfig, VanillaTransformerForConditionalGeneration
from hf_vanilla_transformer.corpus import SOURCE_LANG, TARGET_LANG, build_default_corpus
from hf_vanilla_transformer.data import load_translation_dataset
from hf_vanilla_transformer.tokenization import train_tokenizer


def layer_grad_norm(model, stack: str, index: int) -> float:
    squares = [p.grad.norm() ** 2 for n, p in model.named_parameters() if f"{stack}.layers.{index}." in n]
    return float(sum(squares) ** 0.5)


def measure(config: VanillaTransformerConfig, batch: dict, labels: torch.Tensor) -> dict[str, float]:
    torch.manual_seed(0)
    model = VanillaTransformerForConditionalGeneration(config)
    ratios: dict[str, list[float]] = {"encoder": [], "decoder": []}

    def record(stack: str):
        def hook(module, inputs, output):
            out = output if torch.is_tensor(output) else output[0]
            ratios[stack].append((out.std() / inputs[0].std()).item())

        return hook

    for name, module in model.named_modules():
        if name.endswith(("self_attn", "encoder_attn", ".ffn")):
            module.register_forward_hook(record("encoder" if ".encoder." in name else "decoder"))
    loss = model(**batch, labels=labels).loss
    loss.backward()
    last = config.encoder_layers - 1
    return {
        "loss": loss.item(),
        "encoder sub-layer out/in std": sum(ratios["encoder"]) / len(ratios["encoder"]),
        "decoder sub-layer out/in std": sum(ratios["decoder"]) / len(ratios["decoder"]),
        "encoder grad norm, first layer": layer_grad_norm(model, "encoder", 0),
        "encoder grad norm, last layer": layer_grad_norm(model, "encoder", last),
        "decoder grad norm, first layer": layer_grad_norm(model, "decoder", 0),
        "decoder grad norm, last layer": layer_grad_norm(model, "decoder", last),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("train_file", help="A translation file, or 'demo' for the embedded synthetic corpus.")
    parser.add_argument("--source_lang", default=SOURCE_LANG)
    parser.add_argument("--target_lang", default=TARGET_LANG)
    parser.add_argument("--vocab_size", type=int, default=None, help="Default: 8000; the demo's 4000 for 'demo'.")
    parser.add_argument("--batch_size", type=int, default=64)
    args = parser.parse_args(argv)
    demo = args.train_file == "demo"
    if demo:
        pairs = build_default_corpus(seed=0)["train"]["translation"][:4000]
        args.vocab_size = args.vocab_size or train.DEMO_RECIPE["vocab_size"]
    else:
        pairs = load_translation_dataset(
            train_file=args.train_file, source_lang=args.source_lang, target_lang=args.target_lang
        )["train"]["translation"][:4000]
        args.vocab_size = args.vocab_size or 8000
    tokenizer = train_tokenizer((p[k] for p in pairs for k in (args.source_lang, args.target_lang)), args.vocab_size)
    batch = tokenizer([p[args.source_lang] for p in pairs[: args.batch_size]], return_tensors="pt", padding=True)
    target = tokenizer([p[args.target_lang] for p in pairs[: args.batch_size]], return_tensors="pt", padding=True)
    labels = target["input_ids"].masked_fill(target["attention_mask"] == 0, -100)
    demo_size = train._parse_overrides(train.DEMO_RECIPE["config_overrides"])  # init_std is set below
    sizes = {"small": ("small", {}), "base": ("base", {})}
    if demo:
        sizes = {"demo": (train.DEMO_RECIPE["config_name"], {k: v for k, v in demo_size.items() if k != "init_std"})}
    for size, (preset, overrides) in sizes.items():
        for init_std in (None, 0.02):
            config = VanillaTransformerConfig.from_preset(
                preset,
                **{"dropout": 0.0, **overrides},
                vocab_size=len(tokenizer),
                init_std=init_std,
                label_smoothing=0.1,
            )
            result = measure(config, dict(batch), labels)
            print(f"{size}, init_std={init_std}: " + ", ".join(f"{k} {v:.3f}" for k, v in result.items()))


if __name__ == "__main__":
    main()
