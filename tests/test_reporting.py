"""The learning-curve figure: validation scores during training and the final model's are drawn and labelled apart
(before: one line joined the greedy points of training with the final beam-4 score of averaged checkpoints)."""

from __future__ import annotations

from types import SimpleNamespace

import train
from hf_vanilla_transformer import reporting

HISTORY = [
    {"loss": 5.0, "step": 100},
    {"eval_bleu": 20.0, "step": 100},
    {"loss": 3.0, "step": 200},
    {"eval_bleu": 30.0, "step": 200},
    {"train_runtime": 60.0, "step": 200},  # Trainer's end-of-training summary
    {"eval_bleu": 33.0, "step": 200},  # the final model, scored after training
]


def test_the_final_score_is_a_series_of_its_own_with_its_settings_in_the_label(tmp_path, monkeypatch):
    plt = reporting._pyplot()
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    path = reporting.plot_learning_curve(HISTORY, tmp_path / "curve.png", "greedy, during training", "final, beam 4")
    assert path.stat().st_size > 0
    lines = {line.get_label(): line for ax in figures[0].axes for line in ax.get_lines()}
    assert list(lines["validation BLEU, greedy, during training"].get_ydata()) == [20.0, 30.0]
    assert list(lines["validation BLEU, final, beam 4"].get_ydata()) == [33.0]
    assert list(lines["training loss (label-smoothed)"].get_ydata()) == [5.0, 3.0]


def test_train_py_labels_the_curve_with_the_decoding_it_used():
    model = SimpleNamespace(generation_config=SimpleNamespace(num_beams=4))
    model_args, _, training_args = train.parse_args(["--train_file", "x.jsonl", "--config_name", "small"])
    assert train.curve_labels(model_args, training_args, model) == (
        "greedy, during training",
        f"final model, beam 4, last {model_args.checkpoint_average} checkpoints averaged",
    )
    model_args, _, training_args = train.parse_args(["--train_file", "x.jsonl", "--generation_num_beams", "2"])
    assert train.curve_labels(model_args, training_args, model) == ("beam 2, during training", "final model, beam 4")
