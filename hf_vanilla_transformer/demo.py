"""The attention explorer: a Gradio page where a source sentence gets translated, and every layer's and head's
attention is drawn for the three uses of §3.2.3, beside the beam's candidates and the §3.5 position encodings.

    pip install "hf-vanilla-transformer[demo]"
    python -m hf_vanilla_transformer.demo outputs/vanilla-transformer      # a saved folder or a Hub id

The first half of this file is the model side (no Gradio): which checkpoint and sentence it accepts, the beam's
finished candidates with their scores, the attention weights (`reporting.attention_maps`, the model's own
`output_attentions`, as train.py's cross-attention PNG) and the position encodings. The second half draws them;
Gradio and plotly are imported only there, so the package and its tests need neither.
"""

from __future__ import annotations

import argparse
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from .configuration_vanilla_transformer import VanillaTransformerConfig
from .generation_vanilla_transformer import length_penalty
from .modeling_vanilla_transformer import VanillaTransformerForConditionalGeneration
from .reporting import AttentionMaps, attention_maps

# The three uses of attention (§3.2.3), as the page names them, and the `AttentionMaps` field of each.
USES = {
    "Encoder self-attention": "encoder",
    "Decoder masked self-attention": "decoder",
    "Cross-attention": "cross",
}
DEFAULT_BEAMS = 4  # §6.1's beam, for a model whose generation config decodes greedily (the page shows a beam)
CONCURRENCY = 4  # requests served at once: a long sentence's beam search does not hold up a short one


# ----------------------------------------------------------------------------------------------- model side


def load_for_demo(name: str) -> tuple[VanillaTransformerForConditionalGeneration, PreTrainedTokenizerBase]:
    """The model and tokenizer of a saved folder or Hub id, with eager attention (the only implementation that
    returns its weights; loading it so, rather than switching per request, lets concurrent requests share the
    model). Refuses a checkpoint of another model before loading any weights."""
    if not Path(name).is_dir() and (Path(name).is_absolute() or name.startswith((".", "~"))):
        raise ValueError(f"{name}: no such model folder.")  # else the Hub client says it is a malformed repo id
    config, _ = PretrainedConfig.get_config_dict(name)
    model_type = config.get("model_type")
    if model_type != VanillaTransformerConfig.model_type:
        raise ValueError(
            f"{name} holds a {model_type!r} model, not a {VanillaTransformerConfig.model_type!r} one: the explorer "
            "draws only this package's Transformer."
        )
    model = VanillaTransformerForConditionalGeneration.from_pretrained(name, attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=False)  # False: no prompt; ours loads anyway
    return model, tokenizer


def check_source(tokenizer: PreTrainedTokenizerBase, config: VanillaTransformerConfig, source: str) -> int:
    """The sentence's length in tokens; a ValueError saying what is wrong if the model cannot take it."""
    if not source or not source.strip():
        raise ValueError("Type a sentence to translate: the source text is empty.")
    length = len(tokenizer(source)["input_ids"])
    if length > config.max_position_embeddings:
        raise ValueError(
            f"The sentence is {length} tokens long; this model encodes at most {config.max_position_embeddings} "
            "(max_position_embeddings). Shorten it."
        )
    return length


@dataclass
class Candidate:
    """One finished beam hypothesis. `score` is what beam search ranked it by, `log_prob / penalty`: its summed
    token log-probabilities over the length penalty of the model's generation config at its `length` |Y|
    (generated tokens, end token included)."""

    text: str
    score: float
    length: int
    penalty: float
    output_ids: torch.Tensor  # (1, 1 + length): the start token, then the hypothesis

    @property
    def log_prob(self) -> float:
        return self.score * self.penalty


def beam_candidates(
    model, tokenizer, source: str, num_beams: int | None = None, **generate_kwargs: Any
) -> list[Candidate]:
    """The beam's finished hypotheses for `source`, best first, as `generate()` returns them with
    `num_return_sequences` = the beam size (so the first is what plain `generate()` gives). The beam size is the
    model's (§6.1: 4), or `DEFAULT_BEAMS` where the model decodes greedily; `generate_kwargs` go to `generate()`.
    A hypothesis that reached the length limit ends in an end token the limit forced, which adds 0 to its score."""
    generation = model.generation_config
    beams = num_beams or (generation.num_beams if (generation.num_beams or 1) > 1 else DEFAULT_BEAMS)
    inputs = tokenizer(source, return_tensors="pt").to(model.device)
    out = model.generate(
        **inputs,
        num_beams=beams,
        num_return_sequences=beams,
        output_scores=True,
        return_dict_in_generate=True,
        **generate_kwargs,
    )
    alpha = generate_kwargs.get("length_penalty", generation.length_penalty)
    penalty_type = generate_kwargs.get("length_penalty_type", getattr(generation, "length_penalty_type", None))
    penalty_type = penalty_type or "transformers"  # what a generation config without the key means
    candidates = []
    for row, score in zip(out.sequences, out.sequences_scores.tolist(), strict=True):
        ids = _trim(row, model.config.eos_token_id, model.config.pad_token_id)
        length = ids.shape[0] - 1  # the start token is the decoder's prompt, not generated
        candidates.append(
            Candidate(
                text=tokenizer.decode(ids, skip_special_tokens=True).strip(),
                score=score,
                length=length,
                penalty=length_penalty(length, alpha, penalty_type),
                output_ids=ids.unsqueeze(0).cpu(),
            )
        )
    return candidates


def _trim(row: torch.Tensor, eos_token_id: int, pad_token_id: int | None) -> torch.Tensor:
    """One returned sequence without the padding after its end token (shorter hypotheses are padded)."""
    ends = (row[1:] == eos_token_id).nonzero()
    if len(ends):
        return row[: int(ends[0]) + 2]
    kept = (row != pad_token_id).nonzero() if pad_token_id is not None else None
    return row if kept is None or not len(kept) else row[: int(kept[-1]) + 1]


def position_encodings(model, length: int) -> torch.Tensor:
    """(length, D): what the encoder adds to the first `length` token embeddings (§3.5), from the model's own
    positional module: the fixed sinusoids of `sinusoidal_table`, or a `learned` model's rows."""
    with torch.no_grad():
        return model.get_encoder().embed_positions(length).float().cpu()


@dataclass
class Explanation:
    """All the page shows for one sentence."""

    candidates: list[Candidate]
    attention: AttentionMaps  # for the best candidate, the translation shown
    positions: torch.Tensor  # (S, D)


def explain(model, tokenizer, source: str) -> Explanation:
    """Check `source` (ValueError if the model cannot take it), translate it with the beam, and read the attention
    of the best candidate and the position encodings of the source."""
    length = check_source(tokenizer, model.config, source)
    candidates = beam_candidates(model, tokenizer, source)
    maps = attention_maps(model, tokenizer, source, output_ids=candidates[0].output_ids.to(model.device))
    return Explanation(candidates, maps, position_encodings(model, length))


def head_average(weights: torch.Tensor) -> torch.Tensor:
    """(H, rows, columns) -> (rows, columns): the mean over heads, what a layer's heads attend to together (the
    output projection mixes their values; this is a picture of them, not a quantity the model computes)."""
    return weights.mean(dim=0)


def display_token(tokenizer: PreTrainedTokenizerBase, token: str) -> str:
    """A token as text for an axis: byte-level symbols decoded (Ġ is a space), a word's leading space dropped. A
    piece of a multi-byte character has no text of its own and keeps its symbol."""
    text = tokenizer.convert_tokens_to_string([token])
    return token if "\ufffd" in text or not text.strip() else text.strip()


# ----------------------------------------------------------------------------------------------- the page


INTRO = """\
Each attention layer scores every **query** against every **key** (softmax(QKᵀ/√d_k), §3.2.1) and returns the
**values** mixed by those weights: a row of a heat-map is one query's weights over the keys, and sums to 1. The
**heads** (§3.2.2) do this side by side, each in its own learned projection, so each can look at something else.
**Encoder self-attention**: each source token over the whole source. **Decoder masked self-attention**: the
position that produces an output token over the tokens produced before it (the mask hides the future: nothing
above the diagonal). **Cross-attention**: that position over the source, i.e. what it reads while producing the
token. Hover over a cell for its weight.
"""


def _gradio():
    try:
        import gradio as gr
        import plotly  # noqa: F401  (gr.Plot draws plotly figures)
    except ImportError as error:
        raise ImportError(
            f"The attention explorer needs Gradio and plotly ({error}): pip install 'hf-vanilla-transformer[demo]'"
        ) from error
    return gr


def build_demo(model, tokenizer, examples: list[str] | tuple[str, ...] = (), title: str | None = None):
    """The explorer's `gr.Blocks` for a loaded model (see `load_for_demo`), queued; `.launch()` serves it."""
    gr = _gradio()
    title = title or f"Attention explorer: {Path(str(model.config.name_or_path)).name or 'vanilla Transformer'}"
    uses = list(USES)
    with gr.Blocks(title=title) as demo:
        gr.Markdown(f"# {title}\n{INTRO}")
        with gr.Row():
            source = gr.Textbox(label="Source sentence", elem_id="source", scale=5, lines=1)
            translate = gr.Button("Translate", variant="primary", elem_id="translate", scale=1)
        if examples:
            gr.Examples(list(examples), inputs=source)
        status = gr.Markdown(elem_id="status")
        translation = gr.Textbox(label="Translation (the beam's best)", elem_id="translation", interactive=False)
        candidates = gr.Markdown(elem_id="candidates")
        with gr.Row():
            use = gr.Radio(uses, value=uses[-1], label="Attention", elem_id="use", scale=2)
            layer = gr.Radio(_numbers(model.config.decoder_layers), value=1, label="Layer", elem_id="layer")
            head = gr.Radio(_numbers(model.config.decoder_attention_heads), value=1, label="Head", elem_id="head")
        with gr.Row():
            head_plot = gr.Plot(label="One head", elem_id="attention-head")
            mean_plot = gr.Plot(label="Average over heads", elem_id="attention-mean")
        positions = gr.Plot(label="Position encodings (§3.5)", elem_id="positions")
        state = gr.State()

        def run(text: str, use_name: str, layer_number: int, head_number: int):
            try:
                explanation = explain(model, tokenizer, text)
            except ValueError as error:  # a refusal: said on the page; nothing of an earlier sentence stays beside it
                return (None, f"⚠️ {error}", "", "", gr.skip(), gr.skip(), None, None, None)
            drawn = _draw(tokenizer, explanation.attention, use_name, layer_number, head_number)
            return (
                explanation,
                "",
                explanation.candidates[0].text,
                _candidates_table(explanation.candidates, model.generation_config),
                *drawn,
                _positions_figure(tokenizer, explanation.positions, explanation.attention.source_tokens, model.config),
            )

        def redraw(explanation: Explanation | None, use_name: str, layer_number: int, head_number: int):
            if explanation is None:
                return [gr.skip()] * 4
            return _draw(tokenizer, explanation.attention, use_name, layer_number, head_number)

        controls = [use, layer, head]
        outputs = [state, status, translation, candidates, layer, head, head_plot, mean_plot, positions]
        gr.on([translate.click, source.submit], run, [source, *controls], outputs)
        gr.on([use.input, layer.input, head.input], redraw, [state, *controls], [layer, head, head_plot, mean_plot])
    return demo.queue(default_concurrency_limit=CONCURRENCY)


def _numbers(count: int) -> list[int]:
    return list(range(1, count + 1))


def _draw(tokenizer, maps: AttentionMaps, use_name: str, layer_number: int, head_number: int) -> list[Any]:
    """The layer and head choices for the chosen use (the encoder and decoder may differ in layers and heads),
    and its two heat-maps: the chosen head, and the average over the layer's heads."""
    gr = _gradio()
    use = USES[use_name]
    layers = getattr(maps, use)
    layer = min(layer_number or 1, len(layers))
    weights = layers[layer - 1]  # (H, rows, columns)
    head = min(head_number or 1, weights.shape[0])
    rows, columns, row_label, column_label = _axes(tokenizer, maps, use)
    where = f"{use_name}, layer {layer}"
    return [
        gr.Radio(choices=_numbers(len(layers)), value=layer),
        gr.Radio(choices=_numbers(weights.shape[0]), value=head),
        _heatmap(weights[head - 1], rows, columns, row_label, column_label, f"{where}, head {head}"),
        _heatmap(head_average(weights), rows, columns, row_label, column_label, f"{where}, average of heads"),
    ]


def _axes(tokenizer, maps: AttentionMaps, use: str) -> tuple[list[str], list[str], str, str]:
    source = [display_token(tokenizer, t) for t in maps.source_tokens]
    produced = [display_token(tokenizer, t) for t in maps.target_tokens]
    fed = [display_token(tokenizer, t) for t in maps.decoder_input_tokens]
    if use == "encoder":
        return source, source, "query: source token", "key: source token"
    if use == "decoder":
        return produced, fed, "query: position producing this token", "key: decoder input (output so far)"
    return produced, source, "query: position producing this token", "key: source token"


def _heatmap(weights: torch.Tensor, rows: list[str], columns: list[str], row_label: str, column_label: str, title):
    """A plotly heat-map with the tokens on the axes. Cells sit at integer positions and the tokens are tick
    labels, so a token that occurs twice keeps two rows (a categorical axis would merge them)."""
    import plotly.graph_objects as go

    left, bottom = _label_margins(rows, columns)
    rows, columns = _plotly_text(rows), _plotly_text(columns)
    z = weights.tolist()
    cells = [[[f"{i}: {rows[i]}", f"{j}: {columns[j]}"] for j in range(len(columns))] for i in range(len(rows))]
    figure = go.Figure(
        go.Heatmap(
            z=z,
            x=list(range(len(columns))),
            y=list(range(len(rows))),
            customdata=cells,
            hovertemplate="query %{customdata[0]}<br>key %{customdata[1]}<br>weight %{z:.3f}<extra></extra>",
            colorscale="Viridis",
            zmin=0.0,
            zmax=1.0,
        )
    )
    figure.update_xaxes(
        tickvals=list(range(len(columns))), ticktext=columns, tickangle=-60, automargin=False, title=column_label
    )
    figure.update_yaxes(
        tickvals=list(range(len(rows))), ticktext=rows, autorange="reversed", automargin=False, title=row_label
    )
    height = min(bottom + 60 + 22 * len(rows), 900)
    figure.update_layout(title=title, height=height, margin=dict(l=left, r=10, t=50, b=bottom))
    return figure


def _plotly_text(labels: list[str]) -> list[str]:
    """Labels as plotly shows them literally: it reads a few HTML tags in text, and "</s>" would be one."""
    return [label.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;") for label in labels]


def _label_margins(rows: list[str], columns: list[str]) -> tuple[int, int]:
    """Left and bottom margins (px) for the tick labels and axis titles. Set here, not by plotly's automargin,
    which measures the labels while Gradio still hides the plot and then leaves a plot a few pixels wide."""
    widest = max(map(len, rows), default=1)
    tallest = max(map(len, columns), default=1)
    return 40 + 8 * widest, 50 + 7 * tallest  # x labels turned by 60°: about 7 px of height per character


def _positions_figure(tokenizer, table: torch.Tensor, tokens: list[str], config):
    """The (S, D) position encodings, one row per source position."""
    import plotly.graph_objects as go

    rows = [f"{i} {display_token(tokenizer, t)}" for i, t in enumerate(tokens)]
    left, bottom = _label_margins(rows, ["000"])
    rows = _plotly_text(rows)
    learned = config.position_embedding_type == "learned"
    title = "Learned position embeddings" if learned else "PE(pos, 2i) = sin(pos/10000^(2i/d)), PE(pos, 2i+1) = cos(…)"
    figure = go.Figure(
        go.Heatmap(
            z=table.tolist(),
            x=list(range(table.shape[1])),
            y=list(range(table.shape[0])),
            hovertemplate="position %{y}, dimension %{x}<br>value %{z:.3f}<extra></extra>",
            colorscale="RdBu",
            zmid=0.0,
        )
    )
    figure.update_xaxes(title="dimension" if learned else "dimension (even: sine, odd: cosine)", automargin=False)
    figure.update_yaxes(
        tickvals=list(range(len(rows))), ticktext=rows, autorange="reversed", automargin=False, title="position"
    )
    figure.update_layout(
        title=title, height=min(bottom + 60 + 18 * len(rows), 700), margin=dict(l=left, r=10, t=50, b=bottom)
    )
    return figure


def _candidates_table(candidates: list[Candidate], generation) -> str:
    alpha = generation.length_penalty
    gnmt = (getattr(generation, "length_penalty_type", None) or "transformers") == "gnmt"
    penalty = f"((5 + |Y|) / 6)^{alpha}" if gnmt else f"|Y|^{alpha}"
    lines = [
        f"**The beam's {len(candidates)} finished candidates**, ranked by score = log P / {penalty} "
        "(|Y|: generated tokens, end token included)",
        "",
        "| # | translation | \\|Y\\| | log P | score |",
        "|---|---|---|---|---|",
    ]
    for rank, candidate in enumerate(candidates, 1):
        text = _escape(candidate.text) or "*(empty)*"
        lines.append(f"| {rank} | {text} | {candidate.length} | {candidate.log_prob:.3f} | {candidate.score:.4f} |")
    return "\n".join(lines)


def _escape(text: str) -> str:
    """Model output as literal Markdown text on one table row: punctuation escaped, and control characters (an
    untrained model emits any byte) drawn as their Unicode control pictures (␊ for a line feed)."""
    return "".join(_escape_character(c) for c in text)


def _escape_character(c: str) -> str:
    if c in "\\`*_{}[]<>()#+-.!|~":
        return f"\\{c}"
    if unicodedata.category(c) in ("Cc", "Zl", "Zp"):  # controls, line and paragraph separators
        return chr(0x2400 + ord(c)) if ord(c) < 0x20 else "␡" if c == "\x7f" else "\ufffd"
    return c


# ----------------------------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m hf_vanilla_transformer.demo",
        description="Open the attention explorer for a trained model in the browser.",
    )
    parser.add_argument("model", help="A saved model folder or a Hub id.")
    parser.add_argument("--host", default="127.0.0.1", help="Address to serve on (0.0.0.0: every interface).")
    parser.add_argument("--port", type=int, default=7860, help="Port to serve on.")
    parser.add_argument("--example", action="append", default=[], help="A sentence to offer (repeatable).")
    args = parser.parse_args(argv)
    _gradio()  # a missing extra is said before minutes of loading
    try:
        model, tokenizer = load_for_demo(args.model)
    except (OSError, ValueError) as error:  # no such model, or not this one: the reason, without a traceback
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    build_demo(model, tokenizer, examples=args.example).launch(server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
