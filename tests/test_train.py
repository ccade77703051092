"""train.py: its arguments and recipe, the schedule of §5.3, checkpoint averaging, and real runs end to end
(one process, resumed, two processes) in fresh subprocesses."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, get_scheduler

import train
from hf_vanilla_transformer.corpus import SOURCE_LANG, TARGET_LANG, build_default_corpus
from hf_vanilla_transformer.metrics import BLEU_SIGNATURE, PAPER_BLEU_SIGNATURE

ROOT = Path(__file__).resolve().parent.parent
# A run small enough for CI: tiny model, 2000 pairs, a 600-token vocabulary, token batches of 1024.
TINY_RUN = [
    "--config_name", "tiny", "--vocab_size", "600", "--max_train_samples", "2000", "--max_eval_samples", "16",
    "--max_predict_samples", "16", "--max_tokens", "1024", "--warmup_steps", "10", "--logging_steps", "5",
    "--eval_steps", "10", "--save_steps", "10", "--seed", "3",
]  # fmt: skip


def run_train(args: list[str], launcher: list[str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    command = [*(launcher or [sys.executable]), str(ROOT / "train.py"), *args]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def resumed_from(log: str) -> str:
    """The checkpoint train.py says it resumed from ("" if it did not resume)."""
    marker = "Resuming training from "
    return log.split(marker, 1)[1].split("\n", 1)[0].strip() if marker in log else ""


# ----------------------------------------------------------------------------------------------- arguments


def test_defaults_are_the_papers_recipe():
    model_args, data_args, args = train.parse_args(["--dataset_name", "wmt14", "--dataset_config_name", "de-en"])
    assert (args.adam_beta1, args.adam_beta2, args.adam_epsilon) == (0.9, 0.98, 1e-9)
    assert args.label_smoothing_factor == 0.1 and args.warmup_steps == 4000
    assert args.lr_scheduler_type == "inverse_sqrt" and args.predict_with_generate
    assert model_args.config_name == "base" and data_args.max_tokens == 25000 and model_args.vocab_size == 37000
    assert args.learning_rate is None  # resolved from d_model and warm-up once the model exists
    assert train.paper_learning_rate(512, 4000) == pytest.approx(6.988e-4, rel=1e-3)


def test_demo_recipe_applies_only_without_data_and_only_to_unset_flags():
    model_args, data_args, args = train.parse_args(["--max_steps", "7"])
    assert model_args.config_name == train.DEMO_RECIPE["config_name"]
    assert data_args.max_tokens == train.DEMO_RECIPE["max_tokens"]
    assert args.warmup_steps == train.DEMO_RECIPE["warmup_steps"] and args.max_steps == 7
    model_args, _, _ = train.parse_args(["--train_file", "x.jsonl"])
    assert model_args.config_name == "base"


def test_small_recipe_trains_in_bf16_on_a_cpu_that_computes_bf16_unless_a_precision_is_chosen(monkeypatch):
    """bf16 autocast where the CPU has bf16 arithmetic (AVX512-BF16 or AMX), fp32 elsewhere; the user's --bf16 /
    --fp16 or accelerate's ACCELERATE_MIXED_PRECISION wins; only the small recipe, only on CPU."""
    small = ["--train_file", "x.jsonl", "--config_name", "small", "--use_cpu", "true"]
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    for has_bf16 in (True, False):
        monkeypatch.setattr(train, "_cpu_computes_bf16", lambda has_bf16=has_bf16: has_bf16)
        args = train.parse_args(small)[2]
        assert args.bf16 is has_bf16 and args.mixed_precision == ("bf16" if has_bf16 else "no")
    monkeypatch.setattr(train, "_cpu_computes_bf16", lambda: True)
    assert not train.parse_args([*small, "--bf16", "false"])[2].bf16
    assert not train.parse_args(["--train_file", "x.jsonl", "--config_name", "base", "--use_cpu", "true"])[2].bf16
    assert not train.parse_args([*small[:-2], "--use_cpu", "false"])[2].bf16
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    assert train.parse_args(small)[2].mixed_precision == "no"
    # The real check answers without raising, whatever this machine is.
    monkeypatch.undo()
    assert train._cpu_computes_bf16() in (True, False)


def test_small_recipe_applies_to_small_presets_on_real_data_and_only_to_unset_flags():
    model_args, data_args, args = train.parse_args(["--train_file", "x.jsonl", "--config_name", "small"])
    assert args.learning_rate == train.SMALL_RECIPE["learning_rate"] and model_args.vocab_size == 8000
    assert model_args.checkpoint_average == args.save_total_limit == train.SMALL_RECIPE["checkpoint_average"]
    assert data_args.max_tokens == train.SMALL_RECIPE["max_tokens"]
    model_args, _, args = train.parse_args(
        ["--train_file", "x.jsonl", "--config_name", "small", "--learning_rate", "5e-4", "--checkpoint_average", "0"]
    )
    assert args.learning_rate == 5e-4 and model_args.checkpoint_average == 0
    model_args, _, args = train.parse_args(["--train_file", "x.jsonl", "--config_name", "base"])
    assert args.learning_rate is None and model_args.vocab_size == 37000 and model_args.checkpoint_average == 0


@pytest.mark.parametrize(
    "flags",
    [["--max-steps", "50"], ["--max_steps=50"], ["--max-steps=50"], ["--max_st", "50"], ["--max_steps", "50"]],
)
def test_every_spelling_of_a_flag_is_seen_as_given_and_kept_from_the_recipe(flags):
    """HfArgumentParser accepts dashes and argparse abbreviations: each is the user's value, which the recipe must not
    overwrite (before: `--max-steps 50` trained the demo's 1,000 steps)."""
    assert train.parse_args(flags)[2].max_steps == 50
    _, _, args = train.parse_args(["--train_file", "x.jsonl", "--config_name", "small", *flags])
    assert args.max_steps == 50
    _, _, args = train.parse_args(["--no-keep-freed-memory", "--max-train-minutes", "2"])
    assert args.keep_freed_memory is False and args.max_steps == train.UNTIL_TIME_IS_UP


def test_help_shows_the_defaults(capsys):
    """The probe that finds the given flags parses before the real parser: `--help` is the real parser's, with the
    defaults (a probe with help would print its own, every default ==SUPPRESS==)."""
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    out = capsys.readouterr().out
    assert "--max-steps" in out and "(default: 4000)" in out and "SUPPRESS" not in out


def test_config_overrides_merge_into_the_recipes_overrides():
    """`--config_overrides dropout=0.3` on the demo changes its dropout and keeps its sizes and initialisation (before:
    the user's string replaced the recipe's, and the demo trained a 512-wide model with N(0, 0.02))."""
    recipe = train._parse_overrides(train.DEMO_RECIPE["config_overrides"])
    model_args, _, _ = train.parse_args(["--config_overrides", "dropout=0.3,encoder_layers=3"])
    assert train._parse_overrides(model_args.config_overrides) == {**recipe, "dropout": 0.3, "encoder_layers": 3}
    model_args, _, _ = train.parse_args(["--config-overrides=init_std=0.02"])
    assert train._parse_overrides(model_args.config_overrides) == {**recipe, "init_std": 0.02}
    with pytest.raises(ValueError, match=r"'dropuot=0\.3' is not 'field=value'"):
        train._parse_overrides(train.parse_args(["--config_overrides", "dropuot=0.3"])[0].config_overrides)


def test_a_warmup_fraction_is_refused_when_a_time_budget_leaves_the_steps_open():
    with pytest.raises(ValueError, match=r"--warmup_steps 0\.1 is a fraction"):
        train.parse_args(["--train_file", "x.jsonl", "--max_train_minutes", "5", "--warmup_steps", "0.1"])
    assert train.parse_args(["--max_train_minutes", "5", "--warmup_steps", "0.1", "--max_steps", "9"])[2].max_steps == 9


def test_paper_clipping_and_checkpoints_kept_for_averaging():
    """§5.3 clips no gradients (fairseq's recipe: --clip-norm 0); Trainer's 1.0 stays only in the recipes that were
    measured with it. Old checkpoints are deleted, keeping what --checkpoint_average needs (at least 2)."""
    _, _, args = train.parse_args(["--dataset_name", "wmt14", "--dataset_config_name", "de-en"])
    assert args.max_grad_norm == 0.0 and args.save_total_limit == 2
    _, _, args = train.parse_args(["--dataset_name", "wmt14", "--checkpoint_average", "5"])
    assert args.save_total_limit == 5
    _, _, args = train.parse_args(["--dataset_name", "wmt14", "--checkpoint_average", "5", "--save_total_limit", "0"])
    assert args.save_total_limit == 0  # keep all
    with pytest.raises(ValueError, match="--save_total_limit 3 keeps fewer checkpoints than --checkpoint_average 5"):
        train.parse_args(["--dataset_name", "wmt14", "--checkpoint_average", "5", "--save_total_limit", "3"])
    assert train.parse_args([])[2].max_grad_norm == train.DEMO_RECIPE["max_grad_norm"] == 1.0
    assert train.parse_args(["--train_file", "x.jsonl", "--config_name", "small"])[2].max_grad_norm == 1.0


def test_report_to_is_tensorboard_when_installed(monkeypatch):
    monkeypatch.setattr(train, "is_tensorboard_available", lambda: True)
    assert train.parse_args(["--output_dir", "x"])[2].report_to == ["tensorboard"]
    assert train.parse_args(["--output_dir", "x", "--report_to", "none"])[2].report_to == []
    monkeypatch.setattr(train, "is_tensorboard_available", lambda: False)
    assert train.parse_args(["--output_dir", "x"])[2].report_to == []


def test_max_train_minutes_without_max_steps_runs_until_the_time_is_up():
    _, _, args = train.parse_args(["--train_file", "x.jsonl", "--config_name", "small", "--max_train_minutes", "30"])
    assert args.max_train_minutes == 30 and args.max_steps == train.UNTIL_TIME_IS_UP
    _, _, args = train.parse_args(["--train_file", "x.jsonl", "--max_train_minutes", "30", "--max_steps", "9"])
    assert args.max_steps == 9


def test_a_json_config_file_is_accepted(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"output_dir": str(tmp_path / "o"), "max_steps": 9, "config_name": "big"}))
    model_args, _, args = train.parse_args([str(path)])
    assert args.max_steps == 9 and model_args.config_name == "big"


def test_config_overrides_are_typed_and_checked():
    assert train._parse_overrides("d_model=96,dropout=0.2,normalize_before=true") == {
        "d_model": 96,
        "dropout": 0.2,
        "normalize_before": True,
    }
    assert train._parse_overrides("init_std=None,dropout=0.3") == {"init_std": None, "dropout": 0.3}
    assert train._parse_overrides("init_std=small_init") == {"init_std": "small_init"}
    switches = train._parse_overrides("attention_type=additive,norm_type=batchnorm,position_embedding_type=learned")
    assert switches == {"attention_type": "additive", "norm_type": "batchnorm", "position_embedding_type": "learned"}
    with pytest.raises(ValueError, match="colour"):
        train._parse_overrides("colour=blue")


def test_a_non_empty_output_dir_is_not_overwritten(tmp_path):
    (tmp_path / "precious.txt").write_text("do not lose me")
    _, _, args = train.parse_args(["--output_dir", str(tmp_path), "--do_train"])
    with pytest.raises(ValueError, match="not empty"):
        train.check_output_dir(args)
    _, _, args = train.parse_args(["--output_dir", str(tmp_path), "--do_train", "--overwrite_output_dir"])
    train.check_output_dir(args)
    _, _, args = train.parse_args(["--output_dir", str(tmp_path), "--do_train", "--resume_from_checkpoint"])
    train.check_output_dir(args)  # resuming is never blocked
    with pytest.raises(ValueError, match="no checkpoint"):
        train.resolve_checkpoint(args)


# ----------------------------------------------------------------------------------------------- §5.3, §6.1


@pytest.mark.parametrize(("d_model", "warmup"), [(512, 4000), (256, 400)])
def test_learning_rate_schedule_is_the_papers_formula(d_model, warmup):
    """lrate = d_model^-0.5 * min(step^-0.5, step * warmup^-1.5) (§5.3) at every step."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([param], lr=train.paper_learning_rate(d_model, warmup))
    scheduler = get_scheduler("inverse_sqrt", optimizer, num_warmup_steps=warmup)
    for step in range(1, 5 * warmup + 1):
        optimizer.step()
        scheduler.step()
        if step in (1, warmup // 2, warmup - 1, warmup, warmup + 1, 2 * warmup, 5 * warmup):
            expected = d_model**-0.5 * min(step**-0.5, step * warmup**-1.5)
            assert scheduler.get_last_lr()[0] == pytest.approx(expected, rel=1e-9), step


# ----------------------------------------------------------------------------------------------- real runs


@pytest.mark.slow
def test_end_to_end_run_writes_a_loadable_hub_ready_model(tmp_path):
    out = tmp_path / "run"
    result = run_train([*TINY_RUN, "--max_steps", "20", "--checkpoint_average", "2", "--output_dir", str(out)])
    log = result.stdout + result.stderr
    assert "on 1 process(es)" in log and "Averaged 2 checkpoints: checkpoint-10, checkpoint-20" in log
    assert "about 1024 tokens per side and update = 1 process(es) x 1 accumulation step(s) x 1024" in log
    assert list((out / "runs").glob("*/events.out.tfevents.*"))  # TensorBoard (installed with the dev extras)
    assert "BLEU (test):" in result.stdout and "Translate with:" in result.stdout
    results = json.loads((out / "all_results.json").read_text())
    assert {"eval_bleu", "predict_bleu", "train_loss"} <= set(results)
    assert json.loads((out / "eval_results.json").read_text())["eval_samples"] == 16
    files = {p.name for p in out.iterdir()}
    expected = {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "README.md"}
    assert expected | {"modeling_vanilla_transformer.py", "learning_curve.png", "cross_attention.png"} <= files
    assert not (out / ".final-model-staging").exists()
    assert "auto_map" in json.loads((out / "config.json").read_text())
    card = (out / "README.md").read_text()
    assert f"value: {results['predict_bleu']:.2f}" in card and "{{" not in card and "20 steps" in card
    model = AutoModelForSeq2SeqLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.vocab_size == len(tokenizer)
    assert model.generate(**tokenizer("nu figi ke fomet", return_tensors="pt"), max_new_tokens=3).shape[1] <= 4


@pytest.mark.slow
def test_resume_from_the_last_checkpoint_ends_with_the_same_weights(reference_run, tmp_path):
    """`full` is conftest's shared uninterrupted run of exactly these flags (`common`), read only."""
    full, resumed = reference_run, tmp_path / "resumed"
    common = [*TINY_RUN, "--max_steps", "20", "--do_train"]
    resumed.mkdir()
    os.system(f"cp -r {full / 'checkpoint-10'} {resumed}")
    result = run_train([*common, "--output_dir", str(resumed), "--resume_from_checkpoint"])
    assert resumed_from(result.stderr).endswith("checkpoint-10")
    a, b = load_file(str(full / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_time_budget_stops_training_with_a_checkpoint_decays_over_it_and_shows_it(tmp_path):
    """--max_train_minutes with a linear schedule and no step count: training stops at the budget with a checkpoint,
    the learning rate has decayed towards zero by then (over 10**9 steps it would still be at its peak), each log
    carries the training minutes and tokens per second, in trainer_state.json and in TensorBoard, and the progress
    bar counts minutes of the budget, not steps of 10**9."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "timed"
    args = [*TINY_RUN, "--save_steps", "100000", "--eval_steps", "100000", "--learning_rate", "1e-3"]
    args += ["--warmup_steps", "2"]  # the decay shows in a few steps (a loaded 2-core machine makes a few dozen)
    result = run_train(
        [*args, "--max_train_minutes", "0.4", "--logging_steps", "1", "--lr_scheduler_type", "linear",
         "--report_to", "tensorboard", "--do_train", "--output_dir", str(out)]
    )  # fmt: skip
    state = json.loads((out / "trainer_state.json").read_text())
    step = state["global_step"]
    assert 5 <= step < 100000 and (out / f"checkpoint-{step}" / "model.safetensors").exists()
    logs = [entry for entry in state["log_history"] if "loss" in entry]
    minutes = [entry["training_minutes"] for entry in logs]
    assert minutes == sorted(minutes) and 0.4 <= minutes[-1] <= 0.4 + 2 * minutes[-1] / step  # the step under way
    assert all(entry["source_tokens_per_second"] > 0 for entry in logs)
    # Trainer logs the rate each step used. After warm-up (2 steps) the rate step s uses is the peak times the fraction
    # of the budget left at the end of step s-2, of what was left when warm-up ended (the scheduler sets step s's rate
    # at step s-1's end, before the budget reads that step's time): linear decay to zero over the budget.
    rates = [entry["learning_rate"] for entry in logs]  # logs[i] is step i + 1
    left = [(0.4 - m) / (0.4 - minutes[1]) for m in minutes]
    assert rates[:3] == pytest.approx([0.0, 0.5e-3, 1e-3])
    # abs: training_minutes is logged to 1e-4 minutes, which near the end of the budget (the last rates are ~0.4% of the
    # peak on a fast machine) is a few percent of what is left; 0.1% of the peak still tells decay from none.
    assert rates[3:] == pytest.approx([1e-3 * f for f in left[1:-2]], rel=0.02, abs=1e-6)
    assert rates[-1] < rates[2]
    assert "training min" in result.stderr and "source tok/s" in result.stderr
    assert f"/{train.UNTIL_TIME_IS_UP}" not in result.stderr.replace(",", "")
    events = EventAccumulator(str(next((out / "runs").iterdir()))).Reload()
    assert {"train/training_minutes", "train/source_tokens_per_second"} <= set(events.Tags()["scalars"])


def torchrun() -> list[str]:
    """2 processes on this machine; --standalone picks a free port for the rendezvous (no clash between tests)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def write_jsonl_corpus(folder: Path, sizes: dict[str, int]) -> list[str]:
    """Splits of the embedded corpus as en->de JSON-lines files; returns train.py's file flags for them."""
    corpus = build_default_corpus(seed=0, num_train=sizes["train"], num_validation=8, num_test=8)
    flags = []
    for split, size in sizes.items():
        rows = [{"translation": {"en": p[SOURCE_LANG], "de": p[TARGET_LANG]}} for p in corpus[split]["translation"]]
        path = folder / f"{split}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows[:size]))
        flags += [f"--{split}_file", str(path)]
    return flags


@pytest.mark.slow
def test_two_processes_prepare_the_data_once_and_end_with_the_same_tokenizer_and_ids(tmp_path):
    """Only the main process trains the BPE and tokenizes; the other receives the tokenizer and reuses the cache."""
    write_jsonl_corpus(tmp_path, {"train": 200, "validation": 8})
    script = str(ROOT / "tests" / "ddp_data_preparation.py")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [*torchrun(), script, str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert "same data on every process" in result.stdout


def test_a_resumed_run_uses_the_tokenizer_saved_with_it(tmp_path, monkeypatch):
    """No new BPE (which could differ, e.g. after the data changed): the checkpoint's own tokenizer."""
    from hf_vanilla_transformer.tokenization import train_tokenizer

    saved = train_tokenizer(["nu figi ke fomet", "lo sima ke"] * 20, vocab_size=300)
    saved.save_pretrained(tmp_path / "checkpoint-10")
    monkeypatch.setattr(train, "train_tokenizer_once", lambda *a, **k: pytest.fail("trained a new BPE"))
    model_args, data_args, _ = train.parse_args(["--output_dir", str(tmp_path)])
    loaded = train.load_tokenizer(model_args, None, data_args, resume=str(tmp_path / "checkpoint-10"))
    assert loaded.get_vocab() == saved.get_vocab()
    with pytest.raises(ValueError, match="no tokenizer in the checkpoint"):
        train.load_tokenizer(model_args, None, data_args, resume=str(tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize(
    "variant", [[], ["--bf16", "--gradient_accumulation_steps", "2"]], ids=["fp32", "bf16-accumulation"]
)
def test_two_processes_stopped_in_the_second_epoch_resume_to_the_same_weights(tmp_path, variant):
    """2 gloo processes, 300 pairs (11 steps an epoch): the run checkpoints at step 14, 3 steps into its second epoch.
    A copy of that checkpoint resumed to step 20 must end with the uninterrupted run's weights, bit for bit: the rest
    of the resumed epoch must be the second epoch's order, not the first's. The uninterrupted run also goes through
    the whole end of a run on both processes (averaging, evaluation, prediction, the final model). Also under bf16
    autocast (Trainer's --bf16, which CPUs run too) with 2 accumulation steps (the same 1024 tokens per update, in
    batches half as large: still 11 updates an epoch)."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    common = [*TINY_RUN, "--max_train_samples", "300", "--max_steps", "20", "--save_steps", "14", *variant]
    result = run_train([*common, "--checkpoint_average", "2", "--output_dir", str(full)], launcher=torchrun())
    log = result.stdout + result.stderr
    assert "Process 0 of 2: training" in log and "Process 1 of 2: training" in log
    assert "Averaged 2 checkpoints: checkpoint-14, checkpoint-20" in log and "BLEU (test):" in result.stdout
    state = json.loads((full / "checkpoint-14" / "trainer_state.json").read_text())
    assert 1 < state["epoch"] < 2, state["epoch"]  # the checkpoint is inside the second epoch
    model = AutoModelForSeq2SeqLM.from_pretrained(full)  # the final (averaged) model loads
    assert model.config.vocab_size == len(AutoTokenizer.from_pretrained(full))

    resumed.mkdir()
    shutil.copytree(full / "checkpoint-14", resumed / "checkpoint-14")
    result = run_train(
        [*common, "--do_train", "--output_dir", str(resumed), "--resume_from_checkpoint"], launcher=torchrun()
    )
    assert resumed_from(result.stderr).endswith("checkpoint-14")
    a = load_file(str(full / "checkpoint-20" / "model.safetensors"))
    b = load_file(str(resumed / "checkpoint-20" / "model.safetensors"))
    assert a.keys() == b.keys()
    differences = {k: (a[k] - b[k]).abs().max().item() for k in a if not torch.equal(a[k], b[k])}
    assert not differences, differences


def test_label_smoothing_moves_into_the_models_fused_loss():
    """train.py hands --label_smoothing_factor to the model (fused loss, padding skipped) and turns Trainer's own
    smoother off, which would otherwise pop `labels` and smooth the full logits."""
    _, _, training_args = train.parse_args(["--label_smoothing_factor", "0.2", "--output_dir", "unused"])
    model = tiny_model()
    train.move_label_smoothing_into_model(model, training_args)
    assert model.config.label_smoothing == 0.2 and training_args.label_smoothing_factor == 0.0
    assert model.fused_training_loss
    # A model whose code has no fused loss (older remote code, another architecture) keeps Trainer's smoother.
    other = torch.nn.Linear(2, 2)
    other.config = type("Config", (), {"label_smoothing": 0.0})()
    _, _, training_args = train.parse_args(["--label_smoothing_factor", "0.2", "--output_dir", "unused"])
    train.move_label_smoothing_into_model(other, training_args)
    assert training_args.label_smoothing_factor == 0.2 and other.config.label_smoothing == 0.0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_keeps_a_freed_64_mb_buffer_resident():
    """Default glibc unmaps a freed 64 MB buffer (RSS falls); after `keep_freed_memory_in_heap` it stays for reuse."""
    script = (
        "import sys, torch\n"
        "from hf_vanilla_transformer.allocator import keep_freed_memory_in_heap\n"
        "if sys.argv[1] == 'keep': assert keep_freed_memory_in_heap()\n"
        "rss = lambda: int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**20\n"
        "x = torch.ones(16 * 2**20); before = rss(); del x\n"
        "print(before - rss())\n"
    )
    # Both fresh interpreters at once (most of each is importing torch, on one core; the machine has two): each
    # measures its own RSS only.
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, "cwd": ROOT}
    started = {mode: subprocess.Popen([sys.executable, "-c", script, mode], **pipes) for mode in ("default", "keep")}
    freed = {}
    for mode, process in started.items():
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, (mode, stderr[-2000:])
        freed[mode] = float(stdout.split()[-1])
    assert freed["default"] > 60 and freed["keep"] < 4, freed


@pytest.mark.slow
def test_an_english_german_run_reports_bleu_as_the_paper_counted_it_with_signatures(tmp_path):
    """German targets: all_results.json and the card carry the paper-style score and both sacreBLEU signatures."""
    files = write_jsonl_corpus(tmp_path, {"train": 600, "validation": 8, "test": 8})
    out = tmp_path / "en-de"
    args = [*TINY_RUN, *files, "--source_lang", "en", "--target_lang", "de", "--max_steps", "10"]
    run_train([*args, "--checkpoint_average", "0", "--output_dir", str(out)])
    results = json.loads((out / "all_results.json").read_text())
    for prefix in ("eval", "predict"):
        assert 0.0 <= results[f"{prefix}_bleu_paper"] <= 100.0
        assert results[f"{prefix}_bleu_signature"] == BLEU_SIGNATURE
        assert results[f"{prefix}_bleu_paper_signature"] == PAPER_BLEU_SIGNATURE
    card = (out / "README.md").read_text()
    assert BLEU_SIGNATURE in card and PAPER_BLEU_SIGNATURE in card
    assert f"| test | {results['predict_bleu_paper']:.2f} |" in card
