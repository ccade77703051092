"""Which linears should run on oneDNN in generate(): all, none, or only those with at least 2**16 or
2**17 weight entries (`cpu_inference.MIN_WEIGHT_ENTRIES`), alternating in one process, 7 rounds, median ratio of
time(variant) / time(all swapped). Run at the commit that added MIN_WEIGHT_ENTRIES:

    python benchmarks/results/2026-12-01_onednn_size_rule.py tiny,demo,small out.json
"""

import contextlib
import json
import sys
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks import common, levers  # noqa: E402
from hf_vanilla_transformer import VanillaTransformerConfig, VanillaTransformerForConditionalGeneration  # noqa: E402
from hf_vanilla_transformer import cpu_inference  # noqa: E402

CONFIGS = {
    "tiny": lambda: VanillaTransformerConfig.from_preset("tiny", vocab_size=1000),
    "demo": lambda: VanillaTransformerConfig.from_preset(
        "tiny", vocab_size=4000, d_model=128, encoder_ffn_dim=512, decoder_ffn_dim=512
    ),
    "small": lambda: common.model_config("small"),
}
VARIANTS = {
    "all": lambda: mock.patch.object(cpu_inference, "MIN_WEIGHT_ENTRIES", 0),
    "none": levers._onednn_off,
    "min_2^16": lambda: mock.patch.object(cpu_inference, "MIN_WEIGHT_ENTRIES", 2**16),
    "min_2^17": lambda: mock.patch.object(cpu_inference, "MIN_WEIGHT_ENTRIES", 2**17),
}
results = {}
for name in sys.argv[1].split(","):
    torch.manual_seed(0)
    model = VanillaTransformerForConditionalGeneration(CONFIGS[name]()).eval()
    for beams in (1, 4):
        for batch in (1, 16):
            config = common.fixed_length_generation_config(beams, 32)
            ids, mask = common.source_batch(model.config.vocab_size, batch, seed=batch)
            with torch.inference_mode():
                times = levers._alternate(
                    VARIANTS, lambda i: model.generate(input_ids=ids, attention_mask=mask, generation_config=config), 7
                )
            ratios = {k: v for k, v in levers._speedups({"on": times["all"], **times}).items() if k != "times_s"}
            results[f"{name}/beam{beams}_b{batch}"] = {"time_over_all": ratios, "times_s": times}
            print(name, beams, batch, {k: round(v, 3) for k, v in ratios.items()}, flush=True)
Path(sys.argv[2]).write_text(json.dumps(results, indent=1))
