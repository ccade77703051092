"""The benchmarks still run, and their Marian comparison is a comparison of the same function."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402


def test_marian_and_torch_with_our_weights_reproduce_our_logits():
    """Same weights, positions copied into Marian: all three compute the same logits (build_models asserts it)."""
    models, diffs = common.build_models("tiny")
    assert set(models) == set(common.IMPLEMENTATIONS)
    assert diffs["marian"] <= 1e-5
    assert diffs["torch"] <= 1e-5
    batch = common.fixed_batch(models["ours"].config.vocab_size, batch_size=2, length=5)
    with torch.no_grad():
        ours = common.logits("ours", models["ours"], batch)
        torch.testing.assert_close(common.logits("marian", models["marian"], batch), ours, atol=1e-5, rtol=0)


def test_flop_formula_counts_the_linear_layers_of_a_one_layer_model():
    """6 x weights x tokens for the Linears, plus the attention terms, on a hand-sized example."""
    config = common.model_config("tiny")
    config.encoder_layers = config.decoder_layers = 1
    batch = common.fixed_batch(config.vocab_size, batch_size=2, length=3)
    d, f, v, tokens = config.d_model, config.encoder_ffn_dim, config.vocab_size, 2 * 3
    linear = tokens * (4 * d * d + 2 * d * f) + tokens * (6 * d * d + 2 * d * f) + tokens * 2 * d * d + tokens * d * v
    attention = 2 * 2 * d * (3 * 3 + 3 * 3 + 3 * 3)
    assert common.training_flops(config, batch) == 6 * (linear + attention)


@pytest.mark.slow
def test_quick_benchmark_writes_positive_numbers(tmp_path):
    out = tmp_path / "bench.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--sizes", "tiny", "--quick", "--json", str(out)]
    subprocess.run(command, check=True, cwd=ROOT, capture_output=True, timeout=600)
    results = json.loads(out.read_text())
    assert results["matmul"]["peak_flops"] > 0
    assert results["machine"]["transformers"] == transformers.__version__  # generate() changes between releases
    tiny = results["sizes"]["tiny"]
    for allocator in ("default", "tuned"):
        train = tiny["train"][allocator]
        kinds = [k for k in train if k.startswith(("fixed_", "tokens_"))]
        assert len(kinds) == 2
        for kind in kinds:
            assert train[kind]["matmul_flops_per_s"] > 0  # timed beside the steps, the denominator of the MFU
            for impl in common.IMPLEMENTATIONS:
                assert train[kind][impl]["tokens_per_s"] > 0
                assert train[kind][impl]["flops_per_s"] > 0
    for impl in common.IMPLEMENTATIONS:
        assert tiny["memory"]["default"][impl]["peak_rss_mib"] > 0
    for case in ("greedy_b1", "greedy_b2", "beam4_b1", "beam4_b2"):
        assert tiny["generation"][case]["ours"] > 0
        assert tiny["generation"][case]["marian"] > 0
    assert any("ours/marian" in line for line in results["table"])


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")
def test_linear_kernel_benchmark_times_every_decoder_shape_on_each_kernel(capsys):
    from benchmarks import linear_kernels

    result = linear_kernels.measure("tiny", rows=2, rounds=2)
    shapes, head = linear_kernels.decoder_shapes("tiny")
    for kernel in ("F.linear", "oneDNN", "oneDNN reordered"):
        assert set(result[kernel]) == {*shapes, head}
        assert all(microseconds > 0 for microseconds in result[kernel].values())
    linear_kernels.main(["--sizes", "tiny", "--rows", "1", "--rounds", "1"])
    assert capsys.readouterr().out.count("| tiny |") == len(set(shapes)) + 1


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")
def test_decoding_bounds_hand_written_step_finds_the_models_tokens(capsys):
    """The bounds script's bare aten loop is our decoding step without modules: it must decode the tokens
    `generate()` decodes (it raises otherwise), so its time is a floor for the same step."""
    from benchmarks import decoding_bounds

    times = decoding_bounds.step_times("tiny", rounds=1, steps=6)
    assert set(times) == {"ours", "ours rest", "marian", "marian rest", "loop"}
    assert all(milliseconds > 0 for milliseconds in times.values())
    model = common.build_ours("tiny").eval()
    input_ids, attention_mask = common.source_batch(model.config.vocab_size, 1, seed=1)
    tokens, _ = decoding_bounds.hand_written_greedy(model, input_ids, attention_mask, steps=6)
    torch.manual_seed(1)
    for parameter in model.model.decoder.layers.parameters():  # another model: other tokens, or the check is empty
        parameter.data.add_(torch.randn_like(parameter))
    changed = model.generate(
        input_ids, attention_mask=attention_mask, generation_config=common.fixed_length_generation_config(1, 6)
    )
    assert not torch.equal(tokens, changed[:, 1:])
    decoding_bounds.main(["--sizes", "tiny", "--rounds", "1", "--working-sets", "0.25,1"])
    out = capsys.readouterr().out
    assert out.count("| tiny |") == 1 and "oneDNN" in out


@pytest.mark.slow
def test_real_data_benchmark_runs_both_systems_and_reports_them(tmp_path):
    """benchmarks/real_data.py end to end on a few hundred pairs of the embedded corpus written as JSON lines (the
    real corpus is not in CI): both systems train for a few seconds, are scored, and land in the JSON and PNG."""
    from hf_vanilla_transformer.corpus import build_default_corpus

    corpus = build_default_corpus(seed=0, num_train=300, num_validation=12, num_test=1)
    files = {}
    for split in ("train", "validation"):
        files[split] = tmp_path / f"{split}.jsonl"
        files[split].write_text("".join(json.dumps({"translation": p}) + "\n" for p in corpus[split]["translation"]))
    source, target = corpus["train"][0]["translation"].keys()
    name = "pytest_real_data"
    command = [
        sys.executable, str(ROOT / "benchmarks" / "real_data.py"), str(files["train"]), str(files["validation"]),
        "--source_lang", source, "--target_lang", target, "--size", "tiny", "--minutes", "0.05",
        "--eval_minutes", "0.02", "--work_dir", str(tmp_path / "work"), "--name", name,
        "--results_dir", str(tmp_path / "results"),
        "--ours_args", "--vocab_size 300 --max_tokens 400 --warmup_steps 5 --save_steps 5",
        "--systems", "ours", "marian", "--seeds", "7", "--side_by_side",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((tmp_path / "results" / f"{name}.json").read_text())
    assert (tmp_path / "results" / f"{name}.png").stat().st_size > 0
    assert set(report["results"]) == {"ours", "marian"} and report["seeds"] == [7]
    threads = max(1, os.cpu_count() // 2)  # side by side: the cores split between the two runs
    assert report["threads_per_run"] == [threads]
    for runs in report["results"].values():
        (system,) = runs
        assert system["seed"] == 7 and system["steps"] > 0 and system["torch_threads"] == threads
        # the budget stops training within the step under way (a loaded machine makes steps of seconds)
        assert 0.05 <= system["training_minutes"] <= 0.05 + 2 * system["training_minutes"] / system["steps"]
        assert system["source_tokens_per_second"] > 0
        for decoding in ("greedy", "beam4"):
            assert 0 <= system[decoding]["bleu"] <= 100 and system[decoding]["length_ratio"] > 0
    assert "| ours |" in result.stdout and "| marian |" in result.stdout


def test_real_data_report_only_joins_runs_made_apart_and_refuses_missing_or_other_budgets(tmp_path, monkeypatch):
    """Runs made by separate invocations (a seed per session, a system per terminal) make one report with
    --report_only, which trains nothing; a run that is missing, or trained for another --minutes, is named. Side by
    side, more systems than cores are refused before anything trains."""
    from benchmarks import real_data

    work = tmp_path / "work"
    work.mkdir()
    for name in ("train.jsonl", "val.jsonl"):
        (tmp_path / name).write_text(json.dumps({"translation": {"en": "a", "fr": "b"}}) + "\n")

    def write_run(system, seed, beam, minutes=30.0):
        run = {
            "system": system, "seed": seed, "minutes": minutes, "training_minutes": minutes, "steps": 1000,
            "source_tokens_per_second": 2000, "torch_threads": 1, "curve": [{"minutes": 10.0, "bleu": beam - 5}],
            "greedy": {"bleu": beam - 1, "length_ratio": 1.0}, "beam4": {"bleu": beam, "length_ratio": 0.97},
        }  # fmt: skip
        (work / f"{system}-seed{seed}.json").write_text(json.dumps(run))

    for seed, ours, marian in ((42, 56.0, 51.0), (43, 55.0, 50.0)):
        write_run("ours", seed, ours)
        write_run("marian", seed, marian)
    argv = [
        str(tmp_path / "train.jsonl"), str(tmp_path / "val.jsonl"), "--source_lang", "en", "--target_lang", "fr",
        "--systems", "ours", "marian", "--seeds", "42", "43", "--work_dir", str(work),
        "--results_dir", str(tmp_path / "results"), "--name", "joined", "--report_only",
    ]  # fmt: skip
    report = real_data.main(argv)
    assert report["summary"]["ours"]["beam4"] == {"bleu": 55.5, "length_ratio": 0.97, "per_seed": [56.0, 55.0]}
    assert report["summary"]["marian"]["beam4"]["per_seed"] == [51.0, 50.0] and report["threads_per_run"] == [1]
    assert json.loads((tmp_path / "results" / "joined.json").read_text())["seeds"] == [42, 43]
    assert (tmp_path / "results" / "joined.png").stat().st_size > 0

    with pytest.raises(ValueError, match=r"ours-seed44\.json: no results for ours with seed 44"):
        real_data.main([*argv, "--seeds", "44"])
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    three_at_once = [*argv[:-1], "--systems", "ours", "previous", "marian", "--side_by_side"]
    with pytest.raises(ValueError, match="--side_by_side with 3 systems needs 3 cores and this machine has 2"):
        real_data.main(three_at_once)
    write_run("ours", 43, 57.0, minutes=60.0)
    with pytest.raises(ValueError, match=r"ours-seed43\.json: trained for --minutes 60.0, not the 30.0"):
        real_data.main(argv)


def test_the_real_data_table_gives_the_mean_over_seeds_and_each_seed():
    from benchmarks.real_data import summary, table

    def run(greedy, beam, steps):
        return {
            "greedy": {"bleu": greedy, "length_ratio": 1.0},
            "beam4": {"bleu": beam, "length_ratio": 0.98},
            "steps": steps,
            "training_minutes": 30.0,
            "source_tokens_per_second": 3000,
        }

    runs = [run(50.0, 52.0, 4000), run(51.0, 53.5, 4100), run(49.0, 51.0, 3900)]
    result = summary(runs)
    assert result["beam4"]["bleu"] == 52.17 and result["beam4"]["per_seed"] == [52.0, 53.5, 51.0]
    assert result["greedy"]["bleu"] == 50.0 and result["steps"] == 4000
    assert "| ours | 4,000 | 30.0 | 3,000 | 50.00 (1.000) | 52.17 (0.980) | 52.00 / 53.50 / 51.00 |" in table(
        {"ours": runs}
    )


def test_the_previous_recipe_flags_reproduce_the_small_recipe_before_issue_27():
    """`previous` in the real-data benchmark is train.py's small-model recipe as it was (eb57137): the same values as
    flags, whatever SMALL_RECIPE and the small preset become."""
    import train
    from benchmarks.real_data import PREVIOUS_RECIPE

    model_args, data_args, args = train.parse_args(
        ["--train_file", "x.jsonl", "--config_name", "small", *PREVIOUS_RECIPE]
    )
    before = {"vocab_size": 8000, "max_tokens": 1400, "warmup_steps": 500, "learning_rate": 1e-3, "save_steps": 300}
    values = {**vars(model_args), **vars(data_args), **vars(args)}
    assert {key: values[key] for key in before} == before
    assert args.lr_scheduler_type == "inverse_sqrt" and model_args.checkpoint_average == 3
    assert not args.bf16 and args.mixed_precision == "no"  # fp32, on any CPU
    sizes = train._parse_overrides(model_args.config_overrides)
    assert (sizes["d_model"], sizes["encoder_layers"], sizes["encoder_ffn_dim"], sizes["dropout"]) == (
        256,
        3,
        1024,
        0.1,
    )


def test_final_model_choices_average_the_last_checkpoints_and_translate_as_a_loaded_checkpoint(reference_run, tmp_path):
    """Window k is the mean of the last k checkpoints (read here from their safetensors files, apart from the
    script's reader); window 1 translates exactly as the last checkpoint loaded by from_pretrained; a window the run
    does not have is refused, not silently averaged over fewer."""
    from safetensors.torch import load_file
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from benchmarks import final_model_choices
    from benchmarks.real_data import score, translate
    from hf_vanilla_transformer.checkpoints import checkpoint_folders
    from hf_vanilla_transformer.cpu_inference import optimize_for_cpu_inference

    before, last = checkpoint_folders(reference_run, 2)
    pairs = [("a small dog runs", "ein kleiner Hund rennt"), ("two men at work", "zwei Maenner bei der Arbeit")] * 3
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps({"translation": {"en": en, "de": de}}) + "\n" for en, de in pairs))

    averaged = final_model_choices.averaged_model(reference_run, 2).state_dict()
    a, b = load_file(before / "model.safetensors"), load_file(last / "model.safetensors")
    embedding = "model.encoder.embed_tokens.weight"
    assert a.keys() == b.keys() and not torch.equal(a[embedding], b[embedding])
    for name in a:
        torch.testing.assert_close(averaged[name], (a[name].double() + b[name].double()).div(2).float())
    rows = final_model_choices.main(
        [str(val), str(reference_run), "--source_lang", "en", "--target_lang", "de", "--windows", "1", "2",
         "--beams", "1", "2", "--json", str(tmp_path / "choices.json")]
    )  # fmt: skip
    assert [(r["window"], r["beams"]) for r in rows] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    tokenizer = AutoTokenizer.from_pretrained(reference_run)
    checkpoint = optimize_for_cpu_inference(AutoModelForSeq2SeqLM.from_pretrained(last).eval())  # the same kernels
    sources, references = [en for en, _ in pairs], [de for _, de in pairs]
    window_1 = translate(final_model_choices.averaged_model(reference_run, 1), tokenizer, sources, num_beams=2)
    assert window_1 == translate(checkpoint, tokenizer, sources, num_beams=2)
    assert {k: rows[1][k] for k in ("bleu", "length_ratio")} == score(window_1, references)
    assert json.loads((tmp_path / "choices.json").read_text())["results"] == rows
    with pytest.raises(ValueError, match=r"fewer than 9 checkpoints: cannot average the last 9"):
        final_model_choices.averaged_model(reference_run, 9)


@pytest.mark.slow
def test_gpu_check_smoke_run_on_cpu_fills_every_section(tmp_path):
    """benchmarks/gpu.py --smoke runs every code path of the GPU check on CPU (tiny model, a few steps), so that it
    cannot rot before a GPU runs it: every section in the JSON, finite positive speeds, the correctness checks passed,
    the multi-GPU run skipped with its reason. Also the dense bf16 peak table behind the MFU."""
    import math

    from benchmarks import gpu

    assert gpu.dense_bf16_peak("NVIDIA H100 80GB HBM3") == 989.0  # SXM5
    assert gpu.dense_bf16_peak("NVIDIA H100 PCIe") == 756.0
    assert gpu.dense_bf16_peak("NVIDIA H200") == 989.0
    assert gpu.dense_bf16_peak("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu.dense_bf16_peak("NVIDIA H100 NVL") is None and gpu.dense_bf16_peak("Tesla T4") is None

    out = tmp_path / "gpu.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--smoke", "--json", str(out)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-4000:]
    report = json.loads(out.read_text())
    assert set(gpu.SECTIONS) <= set(report) and report["smoke"] and report["passed"]

    def positive(value) -> bool:
        return isinstance(value, (int, float)) and math.isfinite(value) and value > 0

    train = report["training"]
    assert train["timed_rounds"] == gpu.SMOKE.train_steps and not train["truncated"]
    for impl in ("ours", "marian"):
        row = train[impl]
        assert all(positive(row[key]) for key in ("source_tokens_per_s", "tokens_per_s", "tflops_per_s", "step_s"))
        assert row["source_tokens_per_s"] < row["tokens_per_s"]  # source only, against source + target
        assert all(math.isfinite(loss) for loss in row["losses"])
        assert row["mfu"] is None and row["peak_memory_mib"] is None and positive(row["peak_rss_mib"])  # CPU
    assert positive(train["ratio_source_tokens_per_s"]) and train["memory_source"].startswith("cpu")

    generation = report["generation"]
    ctranslate2 = "skipped" not in generation["ctranslate2"]
    for mode in ("greedy", "beam4"):
        for batch in gpu.SMOKE.gen_batch_sizes:
            row = generation[f"{mode}_b{batch}"]
            assert positive(row["ours"]) and positive(row["marian"]) and positive(row["ratio_marian"])
            assert positive(row["ctranslate2"]) if ctranslate2 else "ctranslate2" not in row

    checks = report["correctness"]
    assert checks["passed"]
    loss = checks["bf16_vs_fp32"]
    assert loss["passed"] and loss["steps"] == len(loss["relative_diff_per_step"]) == gpu.SMOKE.check_steps
    assert 0 <= loss["mean_relative_diff_last_window"] <= gpu.BF16_LOSS_RTOL
    for precision in ("fp32", "bf16"):
        sdpa = checks["sdpa_vs_eager"][precision]
        assert sdpa["passed"] and 0 <= sdpa["max_abs_diff"] <= sdpa["tolerance"]
    cache = checks["cached_vs_uncached"]
    assert cache["passed"] and cache["identical_rows"] == cache["rows"] == gpu.SMOKE.cache_batch

    assert report["multi_gpu"]["skipped"].startswith("no GPU")
    assert "| training tiny | source tok/s |" in result.stdout and "| sdpa vs eager logits, fp32" in result.stdout
