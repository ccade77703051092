"""--checkpoint_average with DeepSpeed ZeRO-3 is refused at start-up, naming both, before any data or model: the
averaging reads whole weights and loads them into whole parameters, and ZeRO-3 keeps neither. deepspeed need not be
installed (it is not here): TrainingArguments would need it, so the check runs before they are built."""

from __future__ import annotations

import json

import pytest

import train

ZERO3 = {"zero_optimization": {"stage": 3}}
BOTH_FLAGS = r"--checkpoint_average 5 cannot be used with DeepSpeed ZeRO-3 \(--deepspeed"


@pytest.fixture
def zero3_file(tmp_path):
    path = tmp_path / "ds_zero3.json"
    path.write_text(json.dumps(ZERO3))
    return str(path)


def test_averaging_with_a_zero3_file_is_refused_naming_both_flags(zero3_file):
    with pytest.raises(ValueError, match=BOTH_FLAGS):
        train.parse_args(["--dataset_name", "wmt14", "--checkpoint_average", "5", "--deepspeed", zero3_file])


def test_averaging_with_a_zero3_dict_in_a_json_config_is_refused(tmp_path):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"dataset_name": "wmt14", "checkpoint_average": 5, "deepspeed": ZERO3}))
    with pytest.raises(ValueError, match=BOTH_FLAGS):
        train.parse_args([str(config)])


def test_the_small_recipes_averaging_under_zero3_is_refused_too(zero3_file):
    flags = ["--train_file", "x.jsonl", "--config_name", "small", "--deepspeed", zero3_file]
    average = train.SMALL_RECIPE["checkpoint_average"]
    with pytest.raises(ValueError, match=rf"--checkpoint_average {average} \(the recipe default\).*--deepspeed"):
        train.parse_args(flags)


def test_accelerate_launch_with_zero_stage_3_is_refused_too(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    with pytest.raises(ValueError, match="--checkpoint_average 5 cannot be used with DeepSpeed ZeRO-3"):
        train.parse_args(["--dataset_name", "wmt14", "--checkpoint_average", "5"])


def test_main_refuses_before_reading_any_data(zero3_file, monkeypatch, tmp_path):
    def prepare_data(*args, **kwargs):
        raise AssertionError("data prepared before the arguments were checked")

    monkeypatch.setattr(train, "prepare_data", prepare_data)
    monkeypatch.setattr(train, "build_model", prepare_data)
    flags = ["--dataset_name", "wmt14", "--checkpoint_average", "5", "--deepspeed", zero3_file]
    with pytest.raises(ValueError, match=BOTH_FLAGS):
        train.main([*flags, "--output_dir", str(tmp_path / "out")])


@pytest.mark.parametrize(
    ("average", "stage", "explicit"),
    [(5, 2, {"checkpoint_average", "deepspeed"}), (0, 3, {"checkpoint_average", "deepspeed"}), (1, 3, {"deepspeed"})],
)
def test_other_stages_or_no_averaging_pass_the_check(average, stage, explicit):
    deepspeed = {"zero_optimization": {"stage": stage}}
    train.refuse_averaging_under_zero3(
        {"dataset_name": "wmt14", "checkpoint_average": average, "deepspeed": deepspeed}, explicit
    )
