"""The attention explorer's model side (always run), its Gradio page without a browser (where Gradio is installed),
and the Space folder `train.py --push_space` writes and pushes (offline: the Hub client is patched, as in
test_hub.py). The browser test is test_demo_browser.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_model
from huggingface_hub import HfApi, RepoCard, RepoUrl

from hf_vanilla_transformer import demo, space
from hf_vanilla_transformer.corpus import build_default_corpus
from hf_vanilla_transformer.generation_vanilla_transformer import length_penalty
from hf_vanilla_transformer.modeling_vanilla_transformer import sinusoidal_table
from hf_vanilla_transformer.reporting import attention_maps, cross_attention
from hf_vanilla_transformer.tokenization import train_tokenizer

ROOT = Path(__file__).resolve().parent.parent
MAX_POSITIONS = 64  # conftest's tiny config


# Short sentences in the embedded corpus' source language (its words, so the tokenizer knows them): short pages, fast.
SOURCES = ["nu figi ke fomet", "nu siriri fesumit ta lozu", "panas rora sin nu mivame fuva"]


def save_tiny_translator(folder: Path) -> Path:
    """A tiny random model and a BPE tokenizer trained on the embedded corpus, saved as a user would. Its outputs
    are random tokens, but they depend on the source; outputs stop after 8 tokens (`max_length_offset`), so pages
    stay small."""
    corpus = build_default_corpus(num_train=300, num_validation=4, num_test=4)
    tokenizer = train_tokenizer([text for pair in corpus["train"]["translation"] for text in pair.values()], 300)
    model = tiny_model(seed=1, vocab_size=len(tokenizer))
    model.generation_config.max_length_offset = 8
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    return save_tiny_translator(tmp_path_factory.mktemp("tiny-translator"))


@pytest.fixture(scope="module")
def loaded(saved):
    return demo.load_for_demo(str(saved))


@pytest.fixture(scope="module")
def explained(loaded):
    model, tokenizer = loaded
    return demo.explain(model, tokenizer, SOURCES[0])


# ----------------------------------------------------------------------------------------------- attention weights


def test_three_uses_for_every_layer_and_head_with_rows_that_sum_to_one(loaded, explained):
    model, _ = loaded
    maps = explained.attention
    config = model.config
    source, target = len(maps.source_tokens), len(maps.target_tokens)
    assert len(maps.decoder_input_tokens) == target and maps.output_ids.shape == (1, target + 1)
    expected = {
        "encoder": (config.encoder_layers, (config.encoder_attention_heads, source, source)),
        "decoder": (config.decoder_layers, (config.decoder_attention_heads, target, target)),
        "cross": (config.decoder_layers, (config.decoder_attention_heads, target, source)),
    }
    for use, (layers, shape) in expected.items():
        weights = getattr(maps, use)
        assert len(weights) == layers and all(tuple(w.shape) == shape for w in weights), use
        for w in weights:
            torch.testing.assert_close(w.sum(-1), torch.ones(shape[:2]), rtol=0, atol=1e-5)


def test_masked_self_attention_sees_nothing_after_its_position(explained):
    for weights in explained.attention.decoder:
        above = torch.triu(torch.ones(weights.shape[-2:], dtype=torch.bool), diagonal=1)
        assert weights[:, above].abs().max() == 0
        assert weights[:, ~above].min() > 0  # and everything before it (no padding in one sentence)


def test_weights_are_the_models_own_output_attentions(loaded, explained):
    model, tokenizer = loaded
    maps = explained.attention
    inputs = tokenizer(SOURCES[0], return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs, decoder_input_ids=maps.output_ids[:, :-1], output_attentions=True)
    for use in ("encoder", "decoder", "cross"):
        field = "cross_attentions" if use == "cross" else f"{use}_attentions"
        for mine, theirs in zip(getattr(maps, use), getattr(out, field), strict=True):
            assert torch.equal(mine, theirs[0]), use


def test_head_average_is_the_mean_of_the_heads(explained):
    weights = explained.attention.cross[1]
    average = demo.head_average(weights)
    assert average.shape == weights.shape[1:]
    torch.testing.assert_close(average, sum(weights[h] for h in range(weights.shape[0])) / weights.shape[0])


def test_train_py_cross_attention_picture_is_the_last_layer_of_the_greedy_translation(loaded):
    """train.py's PNG keeps its input: the last decoder layer's cross-attention of the greedy output."""
    model, tokenizer = loaded
    source = SOURCES[1]
    weights, src_tokens, tgt_tokens = cross_attention(model, tokenizer, source)
    inputs = tokenizer(source, return_tensors="pt")
    greedy = model.generate(**inputs, num_beams=1)
    with torch.no_grad():
        out = model(**inputs, decoder_input_ids=greedy[:, :-1], output_attentions=True)
    assert torch.equal(weights, out.cross_attentions[-1][0])
    assert src_tokens == tokenizer.convert_ids_to_tokens(inputs["input_ids"][0])
    assert tgt_tokens == tokenizer.convert_ids_to_tokens(greedy[0, 1:])
    assert model.config._attn_implementation == "eager"  # as loaded; attention_maps restores what it found


def test_attention_maps_restores_the_attention_implementation(loaded):
    _, tokenizer = loaded
    model = tiny_model(seed=1, vocab_size=len(tokenizer))
    model.set_attn_implementation("sdpa")
    maps = attention_maps(model, tokenizer, SOURCES[0])
    assert model.config._attn_implementation == "sdpa" and len(maps.cross) == model.config.decoder_layers


# ----------------------------------------------------------------------------------------------- the beam


def test_candidates_come_best_first_and_the_first_is_what_generate_gives(loaded, explained):
    model, tokenizer = loaded
    candidates = explained.candidates
    assert len(candidates) == model.generation_config.num_beams == 4
    scores = [c.score for c in candidates]
    assert scores == sorted(scores, reverse=True)
    plain = model.generate(**tokenizer(SOURCES[0], return_tensors="pt"))
    assert candidates[0].output_ids.tolist() == plain.tolist()
    assert candidates[0].text == tokenizer.decode(plain[0], skip_special_tokens=True).strip()


def test_scores_are_log_probabilities_over_gnmts_length_penalty(loaded):
    """What `sequences_scores` means with this package's beam-search overrides, checked against a forward pass: the
    summed log-probability of each hypothesis divided by ((5 + |Y|) / 6)^0.6, not transformers' |Y|^0.6. Without
    the per-input length rule (max_new_tokens instead), no end token is forced, so every token's log-probability
    is the model's own."""
    model, tokenizer = loaded
    assert model.generation_config.length_penalty_type == "gnmt" and model.generation_config.length_penalty == 0.6
    source = SOURCES[2]
    candidates = demo.beam_candidates(model, tokenizer, source, max_new_tokens=6)
    inputs = tokenizer(source, return_tensors="pt")
    for candidate in candidates:
        ids = candidate.output_ids
        assert candidate.length == ids.shape[1] - 1 > 1
        with torch.no_grad():
            logits = model(**inputs, decoder_input_ids=ids[:, :-1]).logits
        log_prob = torch.log_softmax(logits, dim=-1)[0].gather(-1, ids[0, 1:, None]).sum().item()
        gnmt = length_penalty(candidate.length, 0.6, "gnmt")
        assert candidate.score == pytest.approx(log_prob / gnmt, abs=1e-4)
        assert candidate.score != pytest.approx(log_prob / candidate.length**0.6, abs=1e-2)
        assert candidate.penalty == gnmt and candidate.log_prob == pytest.approx(log_prob, abs=1e-3)


# ----------------------------------------------------------------------------------------------- positions, refusals


def test_position_encodings_are_the_models_sinusoids(loaded, explained):
    model, _ = loaded
    length = len(explained.attention.source_tokens)
    assert torch.equal(explained.positions, sinusoidal_table(length, model.config.d_model))


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "source text is empty"),
        ("   \n", "source text is empty"),
        (" ".join(["nu"] * MAX_POSITIONS), f"{MAX_POSITIONS + 1} tokens long; this model encodes at most 64"),
    ],
)
def test_a_sentence_the_model_cannot_take_is_refused_with_the_reason(loaded, text, message):
    model, tokenizer = loaded
    with pytest.raises(ValueError, match=message):
        demo.explain(model, tokenizer, text)


def test_the_longest_sentence_the_model_can_take_is_accepted(loaded):
    model, tokenizer = loaded
    longest = " ".join(["nu"] * (MAX_POSITIONS - 1))  # + the end token
    assert demo.check_source(tokenizer, model.config, longest) == MAX_POSITIONS


def test_a_checkpoint_of_another_model_is_refused_at_start(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    with pytest.raises(ValueError, match=rf"{tmp_path} holds a 'bert' model, not a 'vanilla_transformer' one"):
        demo.load_for_demo(str(tmp_path))


def test_a_folder_that_does_not_exist_is_refused_as_such(tmp_path):
    with pytest.raises(ValueError, match=rf"{tmp_path / 'missing'}: no such model folder"):
        demo.load_for_demo(str(tmp_path / "missing"))


# ----------------------------------------------------------------------------------------------- the page (Gradio)


def test_the_page_translates_and_refuses_on_the_page(loaded):
    gr = pytest.importorskip("gradio", reason="the demo extra (Gradio) is not installed")
    pytest.importorskip("plotly", reason="the demo extra (plotly) is not installed")
    model, tokenizer = loaded
    page = demo.build_demo(model, tokenizer, examples=["nu figi"])
    assert isinstance(page, gr.Blocks)
    run = next(fn.fn for fn in page.fns.values() if fn.fn.__name__ == "run")
    refused = run("", "Cross-attention", 1, 1)
    assert "source text is empty" in refused[1] and refused[2] == ""
    explanation, status, translation, table, *_ = run(SOURCES[0], "Cross-attention", 2, 3)
    assert status == "" and translation == explanation.candidates[0].text
    assert "((5 + |Y|) / 6)^0.6" in table and [line[:5] for line in table.splitlines()[-4:]] == [
        "| 1 |",
        "| 2 |",
        "| 3 |",
        "| 4 |",
    ]


# ----------------------------------------------------------------------------------------------- the Space


def test_space_folder_has_the_spaces_front_matter_and_an_app_that_builds(saved, tmp_path):
    folder = space.write_space(tmp_path / "space", "user/tiny", examples=["nu figi"])
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "app.py", "requirements.txt"]
    card = RepoCard.load(folder / "README.md")
    meta = card.data.to_dict()
    assert meta["sdk"] == "gradio" and meta["app_file"] == "app.py" and meta["models"] == ["user/tiny"]
    assert meta["sdk_version"] == space.gradio_version() and meta["title"] == "tiny attention explorer"
    assert {"emoji", "colorFrom", "colorTo"} <= set(meta) and len(meta["short_description"]) <= 60
    assert yaml.safe_load((folder / "README.md").read_text(encoding="utf-8").split("---\n")[1]) == meta
    assert (folder / "requirements.txt").read_text() == "hf-vanilla-transformer[demo]==0.1.0\n"
    app = (folder / "app.py").read_text(encoding="utf-8")
    compile(app, "app.py", "exec")
    pytest.importorskip("gradio", reason="the demo extra (Gradio) is not installed: app.py is not run")
    # The app, run in a fresh interpreter on the saved model instead of the Hub id, builds its page without serving.
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "app.py").write_text(app.replace(repr("user/tiny"), repr(str(saved))), encoding="utf-8")
    check = "import runpy, gradio; app = runpy.run_path('app.py', run_name='space'); print(type(app['demo']).__name__)"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    result = subprocess.run(
        [sys.executable, "-c", check], cwd=tmp_path / "local", env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("Blocks"), result.stderr[-3000:]


def test_a_space_for_a_local_folder_names_no_hub_model(saved, tmp_path):
    meta = RepoCard.load(space.write_space(tmp_path / "space", str(saved)) / "README.md").data.to_dict()
    assert "models" not in meta and meta["sdk"] == "gradio"


class SpaceRecorder:
    """The Hub client's two calls a Space push makes, with their arguments."""

    def __init__(self) -> None:
        self.repos: list[tuple[str, dict]] = []
        self.uploads: list[tuple[str, dict, dict[str, bytes]]] = []

    def create_repo(self, repo_id: str, **kwargs) -> RepoUrl:
        self.repos.append((repo_id, kwargs))
        prefix = "spaces/" if kwargs.get("repo_type") == "space" else ""
        return RepoUrl(f"https://huggingface.co/{prefix}{repo_id}")

    def upload_folder(self, *, repo_id: str, folder_path, **kwargs):
        files = {p.name: p.read_bytes() for p in Path(folder_path).iterdir() if p.is_file()}
        self.uploads.append((repo_id, kwargs, files))


def test_push_space_creates_a_gradio_space_and_uploads_the_folder(monkeypatch, tmp_path):
    hub = SpaceRecorder()
    monkeypatch.setattr(HfApi, "create_repo", lambda api, repo_id, **kw: hub.create_repo(repo_id, **kw))
    monkeypatch.setattr(HfApi, "upload_folder", lambda api, **kw: hub.upload_folder(**kw))
    folder = space.write_space(tmp_path / "space", "user/tiny")
    assert space.push_space(folder, "user/tiny-explorer") == "https://huggingface.co/spaces/user/tiny-explorer"
    [(repo, created)] = hub.repos
    assert repo == "user/tiny-explorer" and created["repo_type"] == "space" and created["space_sdk"] == "gradio"
    assert created["exist_ok"] is True
    [(repo, uploaded, files)] = hub.uploads
    assert repo == "user/tiny-explorer" and uploaded["repo_type"] == "space"
    assert set(files) == {"README.md", "app.py", "requirements.txt"}


@pytest.mark.slow
def test_train_py_push_space_writes_the_space_and_pushes_it_beside_the_model(monkeypatch, tmp_path):
    """`--push_to_hub --push_space`: the model pushed as before, then a Gradio Space of the same name opening it,
    from the Space folder written into output_dir/space."""
    from test_hub import install_hub_recorder
    from test_train import TINY_RUN

    import train

    spaces = SpaceRecorder()
    hub = install_hub_recorder(monkeypatch)
    create_model_repo = HfApi.create_repo

    def create_repo(api, repo_id, **kw):
        return spaces.create_repo(repo_id, **kw) if kw.get("repo_type") == "space" else create_model_repo(api, repo_id)

    def upload_folder(api, **kw):
        return spaces.upload_folder(**kw) if kw.get("repo_type") == "space" else hub.upload_folder(**kw)

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    out = tmp_path / "run"
    quick = ["--max_steps", "1", "--do_train", "--eval_strategy", "no", "--max_train_samples", "64"]
    args = [*quick, "--vocab_size", "300", "--output_dir", str(out), "--push_to_hub", "--hub_model_id", "user/x"]
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        train.main([*TINY_RUN, *args, "--push_space"])
    finally:  # train.py installs SIGINT/SIGTERM handlers (SaveOnSignal); give pytest its own back
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert "model.safetensors" in hub.uploads[-1]  # the model, as without --push_space
    [(repo, created)] = spaces.repos
    assert repo == "user/x" and created["space_sdk"] == "gradio"
    [(_, _, files)] = spaces.uploads
    assert files == {p.name: p.read_bytes() for p in (out / "space").iterdir()}
    assert "MODEL = 'user/x'" in files["app.py"].decode()
