"""Export a trained model to CTranslate2, the C++ inference engine OPUS-MT and others deploy with.

    python -m hf_vanilla_transformer.export_ctranslate2 MODEL OUT [--quantization int8]
    vanilla-export-ctranslate2 MODEL OUT [--quantization int8]           (the same, as a console script)

MODEL is a folder `train.py` wrote (or a Hub id); OUT gets `model.bin`, `config.json` and `shared_vocabulary.json`,
whose tokens are the tokenizer's own token strings, plus the tokenizer files and a README saying how to use it:

    import ctranslate2
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(OUT)
    translator = ctranslate2.Translator(OUT)
    source = tokenizer.convert_ids_to_tokens(tokenizer.encode("a sentence"))   # ends in </s>, as training saw
    result = translator.translate_batch([source], beam_size=4, length_penalty=0.6)
    print(tokenizer.decode(tokenizer.convert_tokens_to_ids(result[0].hypotheses[0])))

CTranslate2's `TransformerSpec` describes the paper's model directly; the conversion builds it from our config and
copies our weights in. Three things differ from the obvious conversion: the position table is handed over
explicitly (CTranslate2's own sinusoid puts all sines first; §3.5 interleaves them); sources keep the EOS our
tokenizer appends and CTranslate2 adds none; and a config CTranslate2 cannot compute (BatchNorm, additive attention)
is refused with the field named. `ctranslate2` is an optional dependency: `pip install
"hf-vanilla-transformer[ctranslate2]"`.

Decoding differs in one rule: CTranslate2's length penalty is transformers' |Y|^α, not GNMT's ((5 + |Y|) / 6)^α
that `generate()` uses by default (§6.1), so beam search can rank finished hypotheses differently.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .configuration_vanilla_transformer import VanillaTransformerConfig
from .modeling_vanilla_transformer import VanillaTransformerForConditionalGeneration, sinusoidal_table

QUANTIZATIONS = ("float32", "int8", "int8_float32", "float16", "bfloat16")
MODEL_CONFIG_NAME = "vanilla_transformer_config.json"  # the transformers config, beside CTranslate2's config.json
# Our `activation_function` -> CTranslate2's `common_spec.Activation` member. transformers' "gelu" is the exact
# (erf) GELU and "gelu_new" the tanh approximation; CTranslate2's SWISH is x * sigmoid(x), i.e. SiLU.
_ACTIVATIONS = {
    "relu": "RELU",
    "gelu": "GELU",
    "gelu_new": "GELUTanh",
    "silu": "SWISH",
    "swish": "SWISH",
    "tanh": "Tanh",
}
_MISSING = (
    'CTranslate2 is not installed: pip install "hf-vanilla-transformer[ctranslate2]" (or: pip install ctranslate2)'
)


def import_ctranslate2() -> Any:
    """The `ctranslate2` module, or an ImportError that says how to install it."""
    try:
        import ctranslate2
    except (ImportError, OSError) as error:  # OSError: the wheel is there but its shared library does not load
        raise ImportError(f"{_MISSING} ({error})") from error
    return ctranslate2


def check_supported(config: VanillaTransformerConfig) -> None:
    """Refuse the design-choice variants CTranslate2's Transformer cannot compute, naming each field."""
    problems = []
    if config.norm_type != "layernorm":
        problems.append(f"norm_type={config.norm_type!r} (CTranslate2 has LayerNorm only)")
    if config.attention_type not in ("scaled_dot_product", "dot_product"):
        problems.append(f"attention_type={config.attention_type!r} (CTranslate2 has dot-product attention only)")
    if config.activation_function not in _ACTIVATIONS:
        problems.append(f"activation_function={config.activation_function!r}")
    if problems:
        raise ValueError("Cannot convert to CTranslate2: " + "; ".join(problems))


def _array(tensor: torch.Tensor) -> np.ndarray:
    """A float32, contiguous CPU copy: CTranslate2 serialises numpy arrays byte for byte."""
    return tensor.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy().copy()


def _set_linear(spec: Any, linears: list[nn.Linear]) -> None:
    """One LinearSpec from one or more Linears stacked along the output axis (CTranslate2 fuses Q, K, V). Both store
    (out_features, in_features). Without biases (`attention_bias=False`) the spec gets none."""
    spec.weight = np.concatenate([_array(linear.weight) for linear in linears])
    if any(linear.bias is not None for linear in linears):
        spec.bias = np.concatenate(
            [_array(lin.bias) if lin.bias is not None else np.zeros(lin.out_features, np.float32) for lin in linears]
        )


def _set_layer_norm(spec: Any, norm: nn.LayerNorm) -> None:
    spec.gamma, spec.beta = _array(norm.weight), _array(norm.bias)


def _set_layer(spec: Any, layer: nn.Module) -> None:
    """One encoder or decoder layer: self-attention (Q, K, V fused), cross-attention (decoder only: Q, then K and V
    of the encoder output fused, then W^O) and the FFN, each with the LayerNorm of its sub-layer."""
    attention = layer.self_attn
    _set_linear(spec.self_attention.linear[0], [attention.q_proj, attention.k_proj, attention.v_proj])
    _set_linear(spec.self_attention.linear[1], [attention.out_proj])
    _set_layer_norm(spec.self_attention.layer_norm, layer.self_attn_block.layer_norm)
    if hasattr(layer, "encoder_attn"):
        attention = layer.encoder_attn
        _set_linear(spec.attention.linear[0], [attention.q_proj])
        _set_linear(spec.attention.linear[1], [attention.k_proj, attention.v_proj])
        _set_linear(spec.attention.linear[2], [attention.out_proj])
        _set_layer_norm(spec.attention.layer_norm, layer.encoder_attn_block.layer_norm)
    _set_linear(spec.ffn.linear_0, [layer.ffn.fc1])
    _set_linear(spec.ffn.linear_1, [layer.ffn.fc2])
    _set_layer_norm(spec.ffn.layer_norm, layer.ffn_block.layer_norm)


def _set_stack_inputs(spec: Any, stack: nn.Module, config: VanillaTransformerConfig, max_positions: int) -> None:
    """Token embedding, its sqrt(d_model) scale (§3.4), the position table (§3.5: exactly the rows ours adds; a
    learned table as it is) and, pre-LN only, the stack's final LayerNorm."""
    embeddings = spec.embeddings[0] if isinstance(spec.embeddings, list) else spec.embeddings
    embeddings.weight = _array(stack.embed_tokens.weight)
    spec.scale_embeddings = float(stack.embed_scale)
    if config.position_embedding_type == "learned":
        spec.position_encodings.encodings = _array(stack.embed_positions.weight)
    else:  # CTranslate2 cannot extend a table: this bounds source length and 1 + generated tokens
        spec.position_encodings.encodings = _array(sinusoidal_table(max_positions, config.d_model))
    if config.normalize_before:
        _set_layer_norm(spec.layer_norm, stack.layer_norm)


def build_spec(
    model: VanillaTransformerForConditionalGeneration,
    vocabulary: Sequence[str],
    special_tokens: dict[str, str],
    max_positions: int | None = None,
) -> Any:
    """CTranslate2's `TransformerSpec` holding `model`'s weights; `vocabulary` has one token string per id, and
    `special_tokens` names "unk", "bos", "eos" and "decoder_start" among them. Sources are expected to end in EOS
    already (our tokenizer appends it), so CTranslate2 adds none."""
    from ctranslate2.specs import common_spec, transformer_spec

    config = model.config
    check_supported(config)
    if len(vocabulary) != config.vocab_size:
        raise ValueError(f"The vocabulary has {len(vocabulary)} tokens; the model's config says {config.vocab_size}.")
    # pre_norm=False is the paper's post-LN, LayerNorm(x + Sublayer(x)), without a final stack LayerNorm.
    options = {
        "pre_norm": config.normalize_before,
        "activation": common_spec.Activation[_ACTIVATIONS[config.activation_function]],
    }
    encoder = transformer_spec.TransformerEncoderSpec(config.encoder_layers, config.encoder_attention_heads, **options)
    decoder = transformer_spec.TransformerDecoderSpec(config.decoder_layers, config.decoder_attention_heads, **options)
    spec = transformer_spec.TransformerSpec(encoder, decoder)
    positions = max_positions or config.max_position_embeddings
    for stack_spec, stack in ((spec.encoder, model.model.encoder), (spec.decoder, model.model.decoder)):
        _set_stack_inputs(stack_spec, stack, config, positions)
        for layer_spec, layer in zip(stack_spec.layer, stack.layers, strict=True):
            _set_layer(layer_spec, layer)
    _set_linear(spec.decoder.projection, [model.lm_head])
    if config.attention_type == "dot_product":  # no 1/sqrt(d_k): CTranslate2 scales queries by it by default
        for layer_spec in [*spec.encoder.layer, *spec.decoder.layer]:
            for attention in (layer_spec.self_attention, getattr(layer_spec, "attention", None)):
                if attention is not None:
                    attention.queries_scale = np.float32(1.0)
    spec.register_source_vocabulary(list(vocabulary))
    spec.register_target_vocabulary(list(vocabulary))
    spec.config.unk_token = special_tokens["unk"]
    spec.config.bos_token = special_tokens["bos"]
    spec.config.eos_token = special_tokens["eos"]
    spec.config.decoder_start_token = special_tokens["decoder_start"]
    spec.config.add_source_bos = False
    spec.config.add_source_eos = False
    spec.config.layer_norm_epsilon = float(config.layer_norm_eps)
    spec.validate()
    return spec


def save_spec(spec: Any, output_dir: str | Path, quantization: str = "float32") -> Path:
    """Quantize (`QUANTIZATIONS`) and write the spec; tied matrices are stored once."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}.")
    spec.optimize(quantization=quantization)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    spec.save(str(output_dir))
    return output_dir


def export(model: Any, tokenizer: Any, output_dir: str | Path, quantization: str = "float32") -> Path:
    """`model` and its tokenizer as a CTranslate2 model folder with the tokenizer's own vocabulary (see the module
    docstring), the tokenizer files beside it and a README on how to use it."""
    import_ctranslate2()
    config = model.config
    vocabulary = tokenizer.convert_ids_to_tokens(list(range(config.vocab_size)))
    if len(set(vocabulary)) != len(vocabulary) or None in vocabulary:
        raise ValueError(f"The tokenizer does not give {config.vocab_size} distinct tokens for the model's ids.")
    special_tokens = {
        "unk": tokenizer.unk_token or vocabulary[0],
        "bos": vocabulary[config.bos_token_id],
        "eos": vocabulary[config.eos_token_id],
        "decoder_start": vocabulary[config.decoder_start_token_id],
    }
    output_dir = save_spec(build_spec(model, vocabulary, special_tokens), output_dir, quantization)
    tokenizer.save_pretrained(output_dir)
    # What the translate CLI reads beside the CTranslate2 files: the decoding defaults (§6.1) and the model's config
    # (under its own name: CTranslate2's config.json is there already).
    model.generation_config.save_pretrained(output_dir)
    model.config.to_json_file(output_dir / MODEL_CONFIG_NAME)
    (output_dir / "README.md").write_text(_README.format(quantization=quantization), encoding="utf-8")
    return output_dir


_README = """# CTranslate2 export ({quantization})

Written by `python -m hf_vanilla_transformer.export_ctranslate2`. The vocabulary is the tokenizer's own token
strings, and the tokenizer files are in this folder:

```python
import ctranslate2
from transformers import AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("this/folder")
translator = ctranslate2.Translator("this/folder")
source = tokenizer.convert_ids_to_tokens(tokenizer.encode("a sentence"))  # ends in </s>: keep it
result = translator.translate_batch([source], beam_size=4, length_penalty=0.6)
print(tokenizer.decode(tokenizer.convert_tokens_to_ids(result[0].hypotheses[0])))
```

or `python -m hf_vanilla_transformer.translate MODEL --backend ctranslate2` on the original model folder.
CTranslate2's length penalty is |Y|^α, not the GNMT form the model's `generate()` uses.
"""


def main(argv: list[str] | None = None) -> int:
    """The command line (and the `vanilla-export-ctranslate2` console script): 0 on success."""
    run(argv)
    return 0


def run(argv: list[str] | None = None) -> Path:
    """Export as the command line says; returns the output folder."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a folder train.py wrote, or a Hub model id")
    parser.add_argument("output_dir", help="where to write the CTranslate2 model")
    parser.add_argument("--quantization", default="float32", choices=QUANTIZATIONS)
    args = parser.parse_args(argv)
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    import_ctranslate2()  # before loading anything large
    model = AutoModelForSeq2SeqLM.from_pretrained(args.model).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    out = export(model, tokenizer, args.output_dir, args.quantization)
    print(f"CTranslate2 model ({args.quantization}) written to {out}", file=sys.stderr)
    return out


if __name__ == "__main__":
    sys.exit(main())
