"""E3, LayerNorm vs BatchNorm on variable-length padded batches (§3.1, §5.1): how much BatchNorm's batch statistics
move from one token batch to the next, how far its train-mode (batch statistics) and eval-mode (running statistics)
outputs differ at lengths longer than trained on, and BLEU. Both models train on short sentences only."""

from __future__ import annotations

import copy
import sys
from collections.abc import Sequence

import torch

from experiments import common
from hf_vanilla_transformer.modeling_vanilla_transformer import VanillaTransformerMaskedBatchNorm

NAME = "e3_norms"
NORMS = ("layernorm", "batchnorm")


class BatchStats:
    """Forward hook on one MaskedBatchNorm: per training batch, the feature-wise mean and variance of its real tokens
    (what the layer normalises with) and the batch's padded length."""

    def __init__(self) -> None:
        self.means: list[torch.Tensor] = []
        self.vars: list[torch.Tensor] = []
        self.lengths: list[int] = []

    def __call__(self, module, inputs, output) -> None:
        if not module.training:
            return
        x, mask = inputs[0].detach(), inputs[1] if len(inputs) > 1 else None
        rows = x[mask] if mask is not None else x.reshape(-1, x.shape[-1])
        self.means.append(rows.mean(0))
        self.vars.append(rows.var(0, unbiased=False))
        self.lengths.append(x.shape[1])


@torch.no_grad()
def train_eval_gap(model, tokenizer, sources: Sequence[str], batch_size: int = 32) -> float:
    """Relative difference ‖h_train − h_eval‖ / ‖h_eval‖ of the encoder output over real tokens, train mode (batch
    statistics) against eval mode (running statistics); the model's buffers are restored afterwards. No dropout, so
    with LayerNorm the two modes compute the same function."""
    encoder = model.get_encoder()
    saved = copy.deepcopy(model.state_dict())
    diffs, norms = 0.0, 0.0
    for start in range(0, len(sources), batch_size):
        inputs = tokenizer(list(sources[start : start + batch_size]), return_tensors="pt", padding=True)
        mask = inputs["attention_mask"].bool()
        model.eval()
        h_eval = encoder(**inputs).last_hidden_state[mask]
        model.train()
        h_train = encoder(**inputs).last_hidden_state[mask]
        diffs += float((h_train - h_eval).pow(2).sum())
        norms += float(h_eval.pow(2).sum())
    model.load_state_dict(saved)
    model.eval()
    return (diffs / norms) ** 0.5


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = common.training_parser(__doc__, default_steps=400)
    p.add_argument("--max_train_words", type=int, default=15)
    args = p.parse_args(argv)
    out = common.out_dir(args, NAME)
    common.setup_threads()
    smoke = args.smoke
    steps, max_tokens = common.training_budget(args)
    data, short, long = common.length_split(
        400 if smoke else 12000, 300 if smoke else 1500, args.max_train_words, args.seed, 500 if smoke else 2000
    )
    n_eval = 10 if smoke else 200
    short, long = short[:n_eval], long[:n_eval]
    train_longest = max(common.num_words(s) for s, _ in data.train)
    # Length buckets (source words) of the test pool for the train/eval gap; each is at most 64 sentences.
    edges = [(3, 8), (9, 15), (16, 22), (23, 30), (31, 40)]
    buckets = {
        f"{lo}-{hi}": [s for s, _ in data.test if lo <= common.num_words(s) <= hi][: 16 if smoke else 64]
        for lo, hi in edges
    }

    results = {}
    for norm in NORMS:
        model = common.build_model(common.small_config(data.tokenizer, norm_type=norm), seed=args.seed)
        stats = BatchStats()
        if norm == "batchnorm":
            # Encoder layer 0, the norm after self-attention: the first place batch statistics act.
            layer0 = model.get_encoder().layers[0]
            bn = next(m for m in layer0.modules() if isinstance(m, VanillaTransformerMaskedBatchNorm))
            bn.register_forward_hook(stats)
        run = common.train(model, data.tokenizer, data.train, steps, max_tokens=max_tokens, seed=args.seed,
                           log_every=2 if smoke else 10)  # fmt: skip
        results[norm] = {
            "run": run,
            "stats": stats,
            "bleu_short": common.evaluate_bleu(model, data.tokenizer, short),
            "bleu_long": common.evaluate_bleu(model, data.tokenizer, long),
            "gap": {name: train_eval_gap(model, data.tokenizer, srcs) for name, srcs in buckets.items() if srcs},
        }
        r = results[norm]
        print(f"{norm}: BLEU short {r['bleu_short']:.2f} long {r['bleu_long']:.2f} gap {r['gap']}", flush=True)

    # Spread of the batch statistics over the second half of training (after the early drift of the weights).
    st = results["batchnorm"]["stats"]
    half = len(st.means) // 2
    means, variances = torch.stack(st.means[half:]), torch.stack(st.vars[half:])
    typical_std = variances.mean(0).sqrt()
    mean_spread = float((means.std(0) / typical_std).mean())  # batch-to-batch std of the mean, in units of std
    var_spread = float((variances.std(0) / variances.mean(0)).mean())  # coefficient of variation of the variance
    per_batch_var = (variances / variances.mean(0)).mean(1).tolist()  # each batch's variance relative to typical
    lengths = st.lengths[half:]
    corr = float(torch.corrcoef(torch.tensor([lengths, per_batch_var], dtype=torch.float64))[0, 1]) if half > 1 else 0.0

    fig, axes = common.plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].scatter(lengths, per_batch_var, s=6)
    axes[0].set(xlabel="padded batch length (tokens)", ylabel="batch variance / mean variance",
                title="BatchNorm batch statistics (enc. layer 0)")  # fmt: skip
    names = list(buckets)
    for norm, marker in zip(NORMS, "os", strict=True):
        gaps = results[norm]["gap"]
        axes[1].plot([n for n in names if n in gaps], [gaps[n] for n in names if n in gaps], marker + "-", label=norm)
    axes[1].axvline(1.5, color="k", ls=":", lw=0.8)
    axes[1].text(1.55, axes[1].get_ylim()[1] * 0.9, f"trained ≤ {train_longest} words", fontsize=7)
    axes[1].set(
        xlabel="source words", ylabel="‖h_train − h_eval‖ / ‖h_eval‖", title="Train- vs eval-mode encoder output"
    )
    axes[1].legend(fontsize=8)
    x = range(len(NORMS))
    axes[2].bar([i - 0.2 for i in x], [results[n]["bleu_short"] for n in NORMS], 0.4, label="training lengths")
    axes[2].bar([i + 0.2 for i in x], [results[n]["bleu_long"] for n in NORMS], 0.4, label="longer than trained")
    axes[2].set_xticks(list(x), NORMS)
    axes[2].set(ylabel="test BLEU", title="BLEU")
    axes[2].legend(fontsize=8)
    common.save(fig, out / "norms.png")
    fig, ax = common.plt.subplots(figsize=(6, 3.4))
    for norm in NORMS:
        ax.plot(results[norm]["run"].steps, results[norm]["run"].losses, label=norm)
    ax.set(xlabel="step", ylabel="training loss (label-smoothed)", yscale="log", title="LayerNorm vs BatchNorm")
    ax.legend()
    common.save(fig, out / "norms_loss.png")

    rows = [[n, results[n]["run"].losses[-1], results[n]["bleu_short"], results[n]["bleu_long"],
             *[results[n]["gap"].get(b, float("nan")) for b in names]] for n in NORMS]  # fmt: skip
    header = ["norm", "final train loss", "BLEU, training lengths", "BLEU, longer", *[f"gap {b} w" for b in names]]
    ln, bn_ = results["layernorm"], results["batchnorm"]
    body = f"""
**Reduced run**: d_model 64, 2+2 layers, d_ff 256, 4 heads, no dropout, {steps} steps of about {max_tokens}-token
batches, trained on the {len(data.train)} training pairs with at most {args.max_train_words} words on each side
(longest training source: {train_longest} words); greedy BLEU on {len(short)} test sentences of training length and
{len(long)} whose source is longer than any training source. One seed ({args.seed}); not comparable to the demo.
BatchNorm is the model's masked BatchNorm (statistics over real tokens only, running statistics with momentum 0.1
for evaluation), so padding itself does not enter its statistics; the batches still differ in length and content.

![norms](norms.png)

![loss](norms_loss.png)

{common.table(header, rows)}

"gap" is ‖h_train − h_eval‖ / ‖h_eval‖ of the encoder output when the same test batch (up to 64 sentences of one
length bucket) is encoded with batch statistics (train mode) and with running statistics (eval mode).

- Batch statistics at encoder layer 0 over the last {len(lengths)} training batches: the batch mean moves by
  {mean_spread:.3f} standard deviations from batch to batch (std across batches, averaged over features), the batch
  variance has a coefficient of variation of {var_spread:.3f}; correlation of a batch's variance with its padded
  length: {corr:+.2f}. LayerNorm normalises each token by itself: its statistics do not depend on the batch at all.
- Train/eval mismatch: BatchNorm's gap is {min(bn_["gap"].values()):.3f}-{max(bn_["gap"].values()):.3f} across the
  buckets; LayerNorm's is {max(ln["gap"].values()):.2g} (no dropout, so exactly the same function in both modes).
- BLEU: LayerNorm {ln["bleu_short"]:.1f} / {ln["bleu_long"]:.1f}, BatchNorm {bn_["bleu_short"]:.1f} /
  {bn_["bleu_long"]:.1f} (training lengths / longer). One seed and a short run: differences of a few points are
  within what another seed could change.
"""
    body += common.bleu_caveat(max(max(r["bleu_short"], r["bleu_long"]) for r in results.values()))
    common.write_report(out, "E3: LayerNorm vs BatchNorm on padded token batches", common.command_line(NAME, argv),
                        body, smoke)  # fmt: skip
    return results


if __name__ == "__main__":
    main()
