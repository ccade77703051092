"""E5, sinusoidal vs learned positions (§3.5, Table 3 row (E)) on test sentences longer than any training sentence:
§3.5 chose sinusoids hoping they "allow the model to extrapolate to sequence lengths longer than the ones encountered
during training". Both models train on short sentences only and are tested per source-length bucket."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from experiments import common

NAME = "e5_positions"
TYPES = ("sinusoidal", "learned")


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = common.training_parser(__doc__, default_steps=400)
    p.add_argument("--max_train_words", type=int, default=15)
    args = p.parse_args(argv)
    out = common.out_dir(args, NAME)
    common.setup_threads()
    smoke = args.smoke
    steps, max_tokens = common.training_budget(args)
    data, _, _ = common.length_split(
        400 if smoke else 12000, 300 if smoke else 2000, args.max_train_words, args.seed, 500 if smoke else 2000
    )
    tok = data.tokenizer
    train_longest = max(common.num_words(s) for s, _ in data.train)
    encoded = common.encode(tok, data.train)
    trained_positions = max(max(len(s), len(t) + 1) for s, t in encoded)  # +1: the decoder's start token
    per_bucket = 8 if smoke else 100
    edges = [(3, args.max_train_words), (train_longest + 1, 20), (21, 25), (26, 30), (31, 40)]
    buckets = {}
    for lo, hi in edges:
        chosen = [pr for pr in data.test if lo <= common.num_words(pr[0]) <= hi][:per_bucket]
        if chosen:
            buckets[f"{lo}-{hi}"] = chosen
    test_positions = max(len(ids) for ids in tok([s for b in buckets.values() for s, _ in b])["input_ids"])
    # Learned positions need a row for every test position, plus room for generated outputs longer than the source.
    max_positions = 2 * test_positions + 16

    results = {}
    for kind in TYPES:
        config = common.small_config(tok, position_embedding_type=kind, max_position_embeddings=max_positions)
        model = common.build_model(config, seed=args.seed)
        run = common.train(model, tok, data.train, steps, max_tokens=max_tokens, seed=args.seed,
                           log_every=2 if smoke else 10)  # fmt: skip
        scores, ratios = {}, {}
        for name, prs in buckets.items():
            hyps = common.translate(model, tok, [s for s, _ in prs])
            scores[name] = common.bleu(hyps, [t for _, t in prs])
            ratios[name] = sum(map(common.num_words, hyps)) / sum(common.num_words(t) for _, t in prs)
        results[kind] = {"run": run, "bleu": scores, "length_ratio": ratios}
        if kind == "learned":
            rows = model.get_encoder().embed_positions.weight.detach().norm(dim=1)
            results[kind]["row_norms"] = rows
        print(f"{kind}: BLEU {scores} length ratio {ratios}", flush=True)

    norms = results["learned"]["row_norms"]
    trained_norm = float(norms[:trained_positions].mean())
    untrained_norm = float(norms[trained_positions:].mean())
    init_norm = config.d_model**0.5 * config.d_model**-0.5  # N(0, d^-1) rows have norm about 1
    names = list(buckets)
    fig, axes = common.plt.subplots(1, 2, figsize=(11, 3.6))
    for kind, marker in zip(TYPES, "os", strict=True):
        axes[0].plot(names, [results[kind]["bleu"][n] for n in names], marker + "-", label=kind)
    axes[0].axvline(0.5, color="k", ls=":", lw=0.8)
    axes[0].set(xlabel=f"source words (training: ≤ {train_longest})", ylabel="test BLEU", title="BLEU by length")
    axes[0].legend()
    axes[1].plot(norms.numpy(), label="learned rows (encoder)")
    axes[1].axhline((config.d_model / 2) ** 0.5, color="tab:orange", ls="--", label="sinusoidal rows")
    axes[1].axvline(trained_positions - 0.5, color="k", ls=":", lw=0.8, label="longest trained position")
    axes[1].set(xlabel="position", ylabel="‖row‖", title="Position vectors after training")
    axes[1].legend(fontsize=7)
    common.save(fig, out / "positions.png")

    rows_ = [[k, results[k]["run"].losses[-1], *[results[k]["bleu"][n] for n in names],
              *[results[k]["length_ratio"][n] for n in names]] for k in TYPES]  # fmt: skip
    header = ["positions", "final train loss", *[f"BLEU {n} w" for n in names], *[f"len ratio {n} w" for n in names]]
    sizes = ", ".join(f"{n} words: {len(b)}" for n, b in buckets.items())
    s, learned = results["sinusoidal"]["bleu"], results["learned"]["bleu"]
    long_names = names[1:]
    mean = lambda d: sum(d[n] for n in long_names) / max(len(long_names), 1)  # noqa: E731
    body = f"""
**Reduced run**: d_model 64, 2+2 layers, d_ff 256, 4 heads, no dropout, {steps} steps of about {max_tokens}-token
batches, trained on the {len(data.train)} pairs with at most {args.max_train_words} words on each side (longest
training source {train_longest} words, longest training sequence {trained_positions} tokens); greedy BLEU per source
length bucket ({sizes}). One seed ({args.seed}); not comparable to the demo.

`max_position_embeddings` = {max_positions} for both (the longest test source is {test_positions} tokens; outputs
may be longer). Learned rows past position {trained_positions - 1} never receive a gradient: they keep their random
N(0, 1/d_model) initialisation (norm about {init_norm:.1f}; mean norm here {untrained_norm:.2f}, against
{trained_norm:.2f} for the trained rows), so at longer lengths the model adds noise it has never seen in place of
a position.

![positions](positions.png)

{common.table(header, rows_)}

"len ratio" is the words of the output over the words of the reference (below 1: translations stop early).

- Training lengths: sinusoidal {s[names[0]]:.1f}, learned {learned[names[0]]:.1f} BLEU.
- Longer than any training sentence (mean over the {len(long_names)} longer buckets): sinusoidal
  {mean(s):.1f}, learned {mean(learned):.1f} BLEU.
"""
    body += common.bleu_caveat(max(max(r["bleu"].values()) for r in results.values()))
    common.write_report(out, "E5: sinusoidal vs learned positions beyond the training lengths",
                        common.command_line(NAME, argv), body, smoke)  # fmt: skip
    return results


if __name__ == "__main__":
    main()
