"""What bounds a decoding step on this machine: the memory the weights come from, the fixed cost of a kernel call,
and the Python around the ops.

    python benchmarks/decoding_bounds.py [--sizes small,base] [--rounds 9]

Three measurements, each side by side with its reference in one run:

1. **Cache.** One-row linears over N distinct 256 x 256 weights in turn, for working sets of 0.25 to 64 MB: the
   microseconds per call and the bandwidth they imply, for `F.linear` (MKL) and oneDNN. A decoding step of the small
   model reads about 19 MB of weights (the decoder's step weights, 11 MB, and the output projection, 8 MB).
2. **Fixed cost per call.** A one-row 16 x 16 linear, whose bytes take no time: what each kernel costs per call.
3. **The Python around the ops.** Per decoding step at batch 1 (greedy, 32 tokens), the time of our model's forward
   inside `generate()` (converted by `cpu_inference.optimize_for_cpu_inference`, as the pipelines run it), of
   Marian's, and of a hand-written loop of the aten ops our step runs (the same weights and kernels, no modules, no
   cache objects, no `ModelOutput`), alternating; the loop must find our tokens. What separates ours from the loop
   is what Python and transformers' objects cost per step; the loop is the floor for an eager PyTorch step.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # make `benchmarks` importable as a script

from benchmarks import common
from benchmarks.linear_kernels import onednn_linear
from hf_vanilla_transformer import cpu_inference
from hf_vanilla_transformer.modeling_vanilla_transformer import VanillaTransformerForConditionalGeneration


def per_call_microseconds(call, calls: int, rounds: int = 5) -> float:
    """Median over `rounds` of the mean time of `calls` calls, after a warm-up round."""
    times = []
    for round_ in range(rounds + 1):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        if round_:
            times.append((time.perf_counter() - start) / calls)
    return 1e6 * common.median(times)


def cache_sweep(working_sets_mb: list[float], dim: int = 256) -> list[tuple[float, float, float]]:
    """(working set in MB, F.linear us per call, oneDNN us per call) for one-row linears over distinct weights."""
    x = torch.randn(1, dim)
    rows = []
    with torch.inference_mode():
        for megabytes in working_sets_mb:
            count = max(1, round(megabytes * 2**20 / (dim * dim * 4)))
            weights = [torch.randn(dim, dim) for _ in range(count)]
            passes = max(3, 400 // count)
            timed = []
            for kernel in (F.linear, onednn_linear):

                def one_pass(kernel=kernel, weights=weights) -> None:
                    for weight in weights:
                        kernel(x, weight, None)

                timed.append(per_call_microseconds(one_pass, passes) / count)
            rows.append((count * dim * dim * 4 / 2**20, *timed))
    return rows


def fixed_costs() -> dict[str, float]:
    """Microseconds per call of a one-row 16 x 16 linear (the bytes are nothing): each kernel's own cost."""
    x, weight, bias = torch.randn(1, 16), torch.randn(16, 16), torch.randn(16)
    with torch.inference_mode():
        return {
            "F.linear": per_call_microseconds(lambda: F.linear(x, weight, bias), 2000),
            "oneDNN": per_call_microseconds(lambda: onednn_linear(x, weight, bias), 2000),
        }


def hand_written_greedy(
    model: VanillaTransformerForConditionalGeneration, input_ids: torch.Tensor, attention_mask: torch.Tensor, steps: int
) -> tuple[torch.Tensor, float]:
    """Greedy decoding at batch 1 as a bare loop of the aten ops our decoding step runs (post-LN, sinusoids, no
    EOS until `steps` tokens, as the benchmark forces): the tokens, and the seconds per step spent in the step (the
    embedding to the output projection). Each linear runs the kernel `cpu_inference.OneDNNLinear` runs."""
    config, decoder = model.config, model.model.decoder
    heads, dim = config.decoder_attention_heads, config.d_model
    with torch.inference_mode():
        memory = model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

        def linear(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
            return onednn_linear(x, module.weight, module.bias)

        def split(x: torch.Tensor) -> torch.Tensor:  # (1, L, D) -> (1, H, L, Dh)
            return x.view(1, -1, heads, dim // heads).transpose(1, 2)

        def norm(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
            return F.layer_norm(x, (dim,), block.layer_norm.weight, block.layer_norm.bias, block.layer_norm.eps)

        layers = decoder.layers
        cross = [
            (split(linear(L.encoder_attn.k_proj, memory)), split(linear(L.encoder_attn.v_proj, memory))) for L in layers
        ]
        cache: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(layers)
        token = torch.tensor([[config.decoder_start_token_id]])
        tokens, seconds = [], 0.0
        for step in range(steps):
            start = time.perf_counter()
            x = decoder.embed_tokens(token) * decoder.embed_scale + decoder.embed_positions(1, step)
            for i, layer in enumerate(layers):
                attention = layer.self_attn
                query, key, value = (
                    split(linear(proj, x)) for proj in (attention.q_proj, attention.k_proj, attention.v_proj)
                )
                if cache[i] is not None:
                    key, value = torch.cat([cache[i][0], key], dim=2), torch.cat([cache[i][1], value], dim=2)
                cache[i] = (key, value)
                out = F.scaled_dot_product_attention(query, key, value, scale=attention.scaling)
                x = norm(layer.self_attn_block, x + linear(attention.out_proj, out.transpose(1, 2).reshape(1, 1, dim)))
                attention = layer.encoder_attn
                query = split(linear(attention.q_proj, x))
                out = F.scaled_dot_product_attention(query, *cross[i], scale=attention.scaling)
                x = norm(
                    layer.encoder_attn_block, x + linear(attention.out_proj, out.transpose(1, 2).reshape(1, 1, dim))
                )
                hidden = torch.relu(linear(layer.ffn.fc1, x))
                x = norm(layer.ffn_block, x + linear(layer.ffn.fc2, hidden))
            logits = linear(model.lm_head, x)[:, -1]  # (1, V)
            seconds += time.perf_counter() - start
            logits[:, config.eos_token_id] = float("-inf")  # the benchmark's forced length
            token = logits.argmax(dim=-1, keepdim=True)
            tokens.append(token)
    return torch.cat(tokens, dim=1), seconds / steps


def step_times(size: str, rounds: int, steps: int = 32) -> dict[str, float]:
    """Milliseconds per decoding step at batch 1 (median over rounds): ours and Marian's forward inside
    `generate()`, the rest of `generate()` for each, and the hand-written loop of our step's ops."""
    ours = common.build_ours(size).eval()
    config = ours.config
    if config.normalize_before or config.position_embedding_type != "sinusoidal":
        raise ValueError(f"the hand-written step is the paper's post-LN, sinusoidal model; {size!r} is not")
    marian = common.build_marian(ours, size).eval()
    cpu_inference.optimize_for_cpu_inference(ours)  # as the pipelines run it; after Marian took a copy of its weights
    input_ids, attention_mask = common.source_batch(config.vocab_size, 1, seed=1)
    generation_config = common.fixed_length_generation_config(1, steps)
    forward_seconds = {"ours": 0.0, "marian": 0.0}

    def timed_forward(name: str, model: torch.nn.Module) -> None:
        forward = model.forward

        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            output = forward(*args, **kwargs)
            forward_seconds[name] += time.perf_counter() - start
            return output

        model.forward = wrapper

    timed_forward("ours", ours)
    timed_forward("marian", marian)
    samples: dict[str, list[float]] = {key: [] for key in ("ours", "ours rest", "marian", "marian rest", "loop")}
    with torch.inference_mode():
        for round_ in range(rounds + 1):
            for name, model in (("ours", ours), ("marian", marian)):
                forward_seconds[name] = 0.0
                start = time.perf_counter()
                generated = model.generate(
                    input_ids, attention_mask=attention_mask, generation_config=generation_config
                )
                total = time.perf_counter() - start
                if round_:
                    samples[name].append(forward_seconds[name] / steps)
                    samples[f"{name} rest"].append((total - forward_seconds[name]) / steps)
                if name == "ours":
                    reference = generated[:, 1:]
            tokens, per_step = hand_written_greedy(ours, input_ids, attention_mask, steps)
            if not torch.equal(tokens, reference):
                raise RuntimeError("the hand-written step found other tokens than the model: it is not the same step")
            if round_:
                samples["loop"].append(per_step)
    return {key: 1e3 * common.median(values) for key, values in samples.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="small,base")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--working-sets", default="0.25,1,4,8,12,16,24,32,64", help="MB, for the cache sweep")
    args = parser.parse_args(argv)
    if not torch.backends.mkldnn.is_available():
        raise SystemExit("This torch build has no oneDNN: the model's inference kernel is not there to measure.")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("\n1. One-row 256 x 256 linears over a working set of distinct weights (us per call, GB/s)")
    print("| working set (MB) | F.linear (us) | oneDNN (us) | F.linear (GB/s) | oneDNN (GB/s) |")
    print("|---|---|---|---|---|")
    for megabytes, mkl, onednn in cache_sweep([float(mb) for mb in args.working_sets.split(",")]):
        nbytes = 256 * 256 * 4
        print(f"| {megabytes:g} | {mkl:.1f} | {onednn:.1f} | {nbytes / mkl / 1e3:.1f} | {nbytes / onednn / 1e3:.1f} |")
    costs = fixed_costs()
    print("\n2. One-row 16 x 16 linear, the cost of a call: " + ", ".join(f"{k} {v:.1f} us" for k, v in costs.items()))
    print("\n3. Per decoding step, batch 1, greedy, 32 tokens (ms; median over rounds)")
    print(
        "| size | ours forward | ours rest of generate() | Marian forward | Marian rest | hand-written loop "
        "| ours / loop (forward) | Marian / ours (whole step) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for size in args.sizes.split(","):
        t = step_times(size, args.rounds)
        ours_total, marian_total = t["ours"] + t["ours rest"], t["marian"] + t["marian rest"]
        print(
            f"| {size} | {t['ours']:.3f} | {t['ours rest']:.3f} | {t['marian']:.3f} | {t['marian rest']:.3f} "
            f"| {t['loop']:.3f} | {t['ours'] / t['loop']:.2f} | {marian_total / ours_total:.2f} |"
        )


if __name__ == "__main__":
    main()
