"""Publishing and loading (the Hub issue): Auto classes with the package installed, `trust_remote_code` in a process
that cannot import the package, offline loading by repo id from a Hub cache, what `push_to_hub` and
`train.py --push_to_hub` would upload, the model card template, and safe loading.

No network is reachable here, so pushes are checked at the Hub client's boundary: `HfApi.create_repo`,
`create_commit` and `upload_folder` are replaced by recorders that read every uploaded file's bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import zipfile
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_model
from huggingface_hub import HfApi, RepoUrl
from huggingface_hub.errors import EntryNotFoundError
from huggingface_hub.hf_api import CommitInfo
from huggingface_hub.utils import filter_repo_objects
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer, PreTrainedTokenizerBase

import hf_vanilla_transformer
from hf_vanilla_transformer import VanillaTransformerConfig, VanillaTransformerForConditionalGeneration, reporting
from hf_vanilla_transformer.corpus import build_default_corpus
from hf_vanilla_transformer.metrics import BLEU_SIGNATURE
from hf_vanilla_transformer.model_card import TEMPLATE_PATH, render_model_card
from hf_vanilla_transformer.tokenization import train_tokenizer

PACKAGE_DIR = Path(hf_vanilla_transformer.__file__).resolve().parent
# The model code save_pretrained copies beside the weights: the modeling file and every sibling it imports.
CODE_FILES = (
    "configuration_vanilla_transformer.py",
    "modeling_vanilla_transformer.py",
    "generation_vanilla_transformer.py",
    "losses.py",
)
REPO_ID = "user/tiny-vanilla"
SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"  # any 40-hex commit hash names a cached snapshot
MAX_NEW_TOKENS = 6


# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    corpus = build_default_corpus(num_train=300, num_validation=4, num_test=4)
    texts = [text for pair in corpus["train"]["translation"] for text in pair.values()]
    return train_tokenizer(texts, vocab_size=300)


@pytest.fixture(scope="module")
def source() -> str:
    return build_default_corpus(num_train=4, num_validation=4, num_test=4)["test"][0]["translation"]["xa"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer) -> Path:
    """A tiny random model and its tokenizer, saved the way a user publishes them."""
    folder = tmp_path_factory.mktemp("saved")
    tiny_model(seed=1, vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def expected(saved, tokenizer, source) -> dict:
    """generate() ids (beam 4 from generation_config.json) and logits computed in this, the saving, process."""
    model = VanillaTransformerForConditionalGeneration.from_pretrained(saved).eval()
    return run_model(model, tokenizer, source)


def run_model(model, tokenizer, source: str) -> dict:
    inputs = tokenizer(source, return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS)
        logits = model(**inputs, decoder_input_ids=ids).logits
    return {"ids": ids.tolist(), "logits": logits}


def make_hub_cache(folder: Path, hub_cache: Path, repo_id: str = REPO_ID) -> None:
    """The offline Hub cache layout (notes §4): snapshots/<hash>/ with plain copies, refs/main holding the hash."""
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / SNAPSHOT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SNAPSHOT)


# ----------------------------------------------------------------------------------------------- (a) package installed


@pytest.mark.parametrize("where", ["directory", "hub cache"])
def test_installed_package_loads_without_trust_remote_code(where, saved, expected, tokenizer, source, tmp_path):
    if where == "directory":
        name, kwargs = str(saved), {}
    else:  # by repo id out of a Hub cache, never asking the network
        make_hub_cache(saved, tmp_path / "hub")
        name, kwargs = REPO_ID, {"cache_dir": str(tmp_path / "hub"), "local_files_only": True}
    config = AutoConfig.from_pretrained(name, **kwargs)
    loaded_tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
    model = AutoModelForSeq2SeqLM.from_pretrained(name, **kwargs).eval()
    # The registered classes of the package, not a copy of the code from the checkpoint folder.
    assert type(config) is VanillaTransformerConfig
    assert type(model) is VanillaTransformerForConditionalGeneration
    assert loaded_tokenizer.get_vocab() == tokenizer.get_vocab()
    assert loaded_tokenizer(source)["input_ids"] == tokenizer(source)["input_ids"]
    result = run_model(model, loaded_tokenizer, source)
    assert result["ids"] == expected["ids"]
    torch.testing.assert_close(result["logits"], expected["logits"], rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------- (b) no package

# Runs in a fresh interpreter. `sys.modules[...] = None` makes every import of the package raise ImportError, so
# only the code copied from the checkpoint (into $HF_HOME/modules/transformers_modules) can be used.
CHILD = textwrap.dedent(
    """
    import json, sys
    sys.modules["hf_vanilla_transformer"] = None
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM, AutoTokenizer

    source, max_new_tokens, names = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    report = {}
    for name in names:
        config = AutoConfig.from_pretrained(name, trust_remote_code=True)
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=True)
        model = AutoModelForSeq2SeqLM.from_pretrained(name, trust_remote_code=True).eval()
        inputs = tokenizer(source, return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=max_new_tokens)
            logits = model(**inputs, decoder_input_ids=ids).logits
            bare = AutoModel.from_pretrained(name, trust_remote_code=True).eval()
            bare_states = bare(**inputs, decoder_input_ids=ids).last_hidden_state
            bare_equal = torch.equal(bare_states, model.model(**inputs, decoder_input_ids=ids).last_hidden_state)
        try:
            AutoModelForSeq2SeqLM.from_pretrained(name, trust_remote_code=False)
            refused = False
        except ValueError:
            refused = True
        report[name] = {
            "config_module": type(config).__module__,
            "model_module": type(model).__module__,
            "model_config_module": type(model.config).__module__,
            "tied": model.lm_head.weight is model.model.encoder.embed_tokens.weight,
            "input_ids": inputs["input_ids"].tolist(),
            "ids": ids.tolist(),
            "logits": logits.tolist(),
            "refused_without_trust": refused,
            "bare_model": [type(bare).__name__, type(bare).__module__, bare_equal],
        }
    try:
        import hf_vanilla_transformer  # noqa: F401
        report["package_importable"] = True
    except ImportError:
        report["package_importable"] = False
    report["package_modules"] = sorted(m for m in sys.modules if m.startswith("hf_vanilla_transformer."))
    print("REPORT=" + json.dumps(report))
    """
)


@pytest.mark.slow
def test_loads_with_trust_remote_code_where_the_package_cannot_be_imported(
    saved, expected, tokenizer, source, tmp_path
):
    hf_home, elsewhere = tmp_path / "hf_home", tmp_path / "elsewhere"
    make_hub_cache(saved, hf_home / "hub")
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    # -I: isolated mode, so neither the current directory nor PYTHON* variables put the repository on sys.path.
    command = [sys.executable, "-I", "-c", CHILD, source, str(MAX_NEW_TOKENS), str(saved), REPO_ID]
    result = subprocess.run(command, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.split("REPORT=", 1)[1])

    assert report["package_importable"] is False and report["package_modules"] == []
    for name in (str(saved), REPO_ID):
        loaded = report[name]
        for key in ("config_module", "model_module", "model_config_module"):
            assert loaded[key].startswith("transformers_modules."), (name, key, loaded[key])
        assert loaded["tied"] and loaded["refused_without_trust"]
        bare_name, bare_module, bare_equal = loaded["bare_model"]  # AutoModel: the bare model, same weights
        assert bare_name == "VanillaTransformerModel" and bare_module.startswith("transformers_modules.") and bare_equal
        assert loaded["input_ids"] == tokenizer(source, return_tensors="pt")["input_ids"].tolist()
        assert loaded["ids"] == expected["ids"], name
        torch.testing.assert_close(torch.tensor(loaded["logits"]), expected["logits"], rtol=0, atol=1e-6)
    # What ran is a byte-identical copy of the package's files, copied fresh into this HF_HOME.
    copies = list((hf_home / "modules" / "transformers_modules").rglob("modeling_vanilla_transformer.py"))
    assert copies and all(c.read_bytes() == (PACKAGE_DIR / CODE_FILES[1]).read_bytes() for c in copies)


# ----------------------------------------------------------------------------------------------- (c) push_to_hub


class HubRecorder:
    """Stands in for the Hub: records each repository created and every file a commit or folder upload sends."""

    def __init__(self) -> None:
        self.repos: list[str] = []
        self.uploads: list[dict[str, bytes]] = []  # one {path_in_repo: bytes} per commit or upload_folder call

    def create_repo(self, repo_id: str, **kwargs) -> RepoUrl:
        self.repos.append(repo_id)
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, repo_id: str, operations, **kwargs) -> CommitInfo:
        # Read the bytes now: push_to_hub deletes its temporary folder as soon as the call returns.
        files = {}
        for op in operations:
            with open(op.path_or_fileobj, "rb") if isinstance(op.path_or_fileobj, str) else op.path_or_fileobj as f:
                files[op.path_in_repo] = f.read()
        self.uploads.append(files)
        return _commit_info(repo_id)

    def upload_folder(self, *, repo_id: str, folder_path, **kwargs):
        root = Path(folder_path)
        paths = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
        kept = filter_repo_objects(
            paths, allow_patterns=kwargs.get("allow_patterns"), ignore_patterns=kwargs.get("ignore_patterns")
        )
        self.uploads.append({path: (root / path).read_bytes() for path in kept})
        info = _commit_info(repo_id)
        if kwargs.get("run_as_future"):  # the Trainer's background pushes wait on a Future
            future: Future = Future()
            future.set_result(info)
            return future
        return info


def _commit_info(repo_id: str) -> CommitInfo:
    url = f"https://huggingface.co/{repo_id}/commit/{SNAPSHOT}"
    return CommitInfo(commit_url=url, commit_message="", commit_description="", oid=SNAPSHOT, pr_url=None)


def install_hub_recorder(monkeypatch: pytest.MonkeyPatch) -> HubRecorder:
    recorder = HubRecorder()
    for method in ("create_repo", "create_commit", "upload_folder"):  # callers pass arguments by keyword or not
        monkeypatch.setattr(HfApi, method, lambda api, *args, _m=method, **kw: getattr(recorder, _m)(*args, **kw))

    # push_to_hub first reads the repository's existing README; a new repository has none.
    def no_remote_file(*args, **kwargs):
        raise EntryNotFoundError("new repository: no README.md yet")

    monkeypatch.setattr("huggingface_hub.repocard.hf_hub_download", no_remote_file)
    return recorder


@pytest.fixture
def hub(monkeypatch) -> HubRecorder:
    return install_hub_recorder(monkeypatch)


def front_matter(card: str) -> dict:
    assert card.startswith("---\n"), card[:200]
    return yaml.safe_load(card.split("---\n", 2)[1])


def check_model_files(files: dict[str, bytes], reference_state: dict[str, torch.Tensor], tmp_path: Path) -> None:
    """The files of a loadable remote-code checkpoint, by content."""
    config = json.loads(files["config.json"])
    assert config["model_type"] == VanillaTransformerConfig.model_type
    # transformers maps only the classes being saved; ours adds the bare model, which AutoModel loads.
    assert config["auto_map"] == {
        "AutoConfig": "configuration_vanilla_transformer.VanillaTransformerConfig",
        "AutoModel": "modeling_vanilla_transformer.VanillaTransformerModel",
        "AutoModelForSeq2SeqLM": "modeling_vanilla_transformer.VanillaTransformerForConditionalGeneration",
    }
    for code in CODE_FILES:
        assert files[code] == (PACKAGE_DIR / code).read_bytes(), code
    assert json.loads(files["generation_config.json"])["num_beams"] == 4  # §6.1
    assert not any(name.endswith((".bin", ".pt", ".pkl")) and name != "training_args.bin" for name in files)
    (tmp_path / "uploaded.safetensors").write_bytes(files["model.safetensors"])
    uploaded = load_file(str(tmp_path / "uploaded.safetensors"))
    assert uploaded.keys() <= reference_state.keys() and "model.encoder.embed_tokens.weight" in uploaded
    assert "lm_head.weight" not in uploaded  # tied (§3.4): one copy of the embedding matrix
    for key, tensor in uploaded.items():
        assert torch.equal(tensor, reference_state[key]), key


def test_model_and_tokenizer_push_to_hub_upload_a_remote_code_checkpoint(hub, tokenizer, tmp_path):
    model = tiny_model(seed=2, vocab_size=len(tokenizer))
    model.push_to_hub(REPO_ID)
    tokenizer.push_to_hub(REPO_ID)
    assert hub.repos == [REPO_ID, REPO_ID]
    model_files, tokenizer_files = hub.uploads
    assert set(model_files) == {"README.md", "config.json", "generation_config.json", "model.safetensors", *CODE_FILES}
    check_model_files(model_files, model.state_dict(), tmp_path)
    # transformers writes its generic card for a new repository; it must at least be a valid Hub card.
    assert front_matter(model_files["README.md"].decode())["library_name"] == "transformers"

    assert {"tokenizer.json", "tokenizer_config.json"} <= set(tokenizer_files)
    (tmp_path / "tok").mkdir()
    for name, data in tokenizer_files.items():
        (tmp_path / "tok" / name).write_bytes(data)
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert reloaded.get_vocab() == tokenizer.get_vocab()
    assert (reloaded.pad_token_id, reloaded.bos_token_id, reloaded.eos_token_id) == (0, 1, 2)


@pytest.fixture(scope="module")
def pushed_run(tmp_path_factory) -> tuple[HubRecorder, Path, dict]:
    """One tiny `train.py --push_to_hub` run, in-process so the patched HfApi is the one the Trainer uses."""
    from test_train import TINY_RUN

    import train

    out = tmp_path_factory.mktemp("pushed") / "run"
    args = [*TINY_RUN, "--max_steps", "4", "--output_dir", str(out), "--push_to_hub", "--hub_model_id", "user/x"]
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.MonkeyPatch.context() as monkeypatch:
            hub = install_hub_recorder(monkeypatch)
            metrics = train.main(args)
    finally:  # train.py installs SIGINT/SIGTERM handlers (SaveOnSignal); give pytest its own back
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return hub, out, metrics


@pytest.mark.slow
def test_train_py_push_to_hub_uploads_the_final_model(pushed_run, tmp_path):
    hub, out, _ = pushed_run
    assert hub.repos and set(hub.repos) == {"user/x"}
    final = hub.uploads[-1]  # the push after training; earlier ones are the Trainer's checkpoint pushes
    expected = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "README.md"}
    assert expected | {*CODE_FILES, "tokenizer_config.json", "cross_attention.png"} <= set(final)
    # Only the model: no checkpoints (optimizer states), run metrics, Trainer state or arguments.
    allowed = {*expected, *CODE_FILES, "tokenizer_config.json", "special_tokens_map.json", "learning_curve.png"}
    assert set(final) <= allowed | {"cross_attention.png"}, set(final) - allowed
    assert {p.name for p in out.iterdir()} >= {"all_results.json", "trainer_state.json", "training_args.bin"}
    assert json.loads(final["config.json"])["use_cache"] is True  # Trainer turns it off for training only
    check_model_files(final, load_file(str(out / "model.safetensors")), tmp_path)
    assert json.loads(final["tokenizer_config.json"])["eos_token"] == "</s>"


@pytest.mark.slow
def test_train_py_push_to_hub_publishes_its_own_model_card(pushed_run):
    hub, out, metrics = pushed_run
    card = hub.uploads[-1]["README.md"].decode()
    assert card == (out / "README.md").read_text(encoding="utf-8")
    meta = front_matter(card)
    assert meta["pipeline_tag"] == "translation" and "{{" not in card and "## Citation" in card
    value = meta["model-index"][0]["results"][0]["metrics"][0]["value"]
    assert value == pytest.approx(metrics["predict_bleu"], abs=0.006)


# ----------------------------------------------------------------------------------------------- (d) model card


def card_values(**overrides) -> dict:
    """Every value train.py can know after a run with a test set; overrides set some to None (unknown)."""
    values = {
        "model_name": "x",
        "code_reference": "hf-vanilla-transformer",
        "repo_id": "user/x",
        "source_lang": "xa",
        "target_lang": "xb",
        "dataset_id": "wmt14",
        "dataset_name": "wmt14",
        "dataset_type": "wmt14",
        "encoder_layers": 6,
        "decoder_layers": 6,
        "d_model": 512,
        "ffn_dim": 2048,
        "heads": 8,
        "position_embedding_type": "sinusoidal",
        "vocab_size": 37000,
        "dropout": 0.1,
        "num_parameters": "63.1M",
        "data_description": "WMT 2014 en-de.",
        "adam_beta1": 0.9,
        "adam_beta2": 0.98,
        "adam_epsilon": 1e-9,
        "warmup_steps": 4000,
        "learning_rate": "0.000699",
        "label_smoothing": 0.1,
        "train_steps": 100000,
        "num_processes": 8,
        "batching": ", batches of about 25000 tokens",
        "train_runtime": "12 h",
        "averaged_checkpoints": 5,
        "num_beams": 4,
        "length_penalty": 0.6,
        "max_length_offset": 50,
        "eval_bleu": "25.10",
        "eval_samples": 3000,
        "test_bleu": "27.30",
        "test_samples": 3003,
        "learning_curve": "learning_curve.png",
        "attention_map": "cross_attention.png",
        "example_source": "a b c",
    }
    values.update(overrides)
    return values


def test_full_card_has_the_hub_metadata():
    card = render_model_card(card_values())
    meta = front_matter(card)
    assert meta["license"] == "apache-2.0" and meta["language"] == ["xa", "xb"]
    assert meta["pipeline_tag"] == "translation" and meta["library_name"] == "transformers"
    assert {"translation", "custom_code"} <= set(meta["tags"])
    assert meta["datasets"] == ["wmt14"] and meta["metrics"] == ["bleu"]
    [entry] = meta["model-index"]
    [result] = entry["results"]
    assert entry["name"] == "x" and result["task"]["type"] == "translation"
    assert result["dataset"]["type"] == "wmt14"
    assert result["metrics"][0] == {"type": "bleu", "value": 27.3, "name": "sacreBLEU (test)"}
    body = card.split("---\n", 2)[2]
    for heading in ("## Model", "## Intended uses and limits", "## Training data", "## Training procedure"):
        assert heading in body
    for heading in ("## Evaluation", "## How to use", "## How to fine-tune", "## Citation"):
        assert heading in body
    assert "6 encoder and 6 decoder" in body and "d_model = 512" in body
    assert "@inproceedings{vaswani2017attention" in body
    assert "| test | 27.30 | 3003 |" in body and "average of the last 5 checkpoints" in body


def test_unknown_values_leave_their_blocks_out_instead_of_inventing_them():
    unknown = ("dataset_id", "test_bleu", "eval_bleu", "averaged_checkpoints", "learning_curve", "attention_map")
    card = render_model_card(card_values(**dict.fromkeys(unknown)))
    meta = front_matter(card)
    assert "model-index" not in meta and "datasets" not in meta  # no BLEU, no dataset claimed
    assert meta["pipeline_tag"] == "translation"
    assert "27.30" not in card and "25.10" not in card and "| validation |" not in card and "| test |" not in card
    assert "checkpoints (§6.1)" not in card and "learning_curve.png" not in card and "{{" not in card


@pytest.mark.parametrize("required", ["source_lang", "d_model", "repo_id"])
def test_a_missing_required_value_is_an_error(required):
    with pytest.raises(ValueError, match=required):
        render_model_card(card_values(**{required: None}))
    values = card_values()
    del values[required]
    with pytest.raises(ValueError, match=required):
        render_model_card(values)


def run_card(tmp_path: Path, *flags: str) -> str:
    """The card `train.py FLAGS` writes (`reporting.card_values` on its parsed arguments) after a run that scored
    a test BLEU of 25 with sacreBLEU, on splits of 10, 2 and 3 pairs."""
    import train  # imported here: the other tests need none of the Trainer's imports

    out = ["--output_dir", str(tmp_path / "out"), "--hub_model_id", "user/x", "--learning_rate", "1e-3"]
    model_args, data_args, training_args = train.parse_args([*flags, *out])
    metrics = {"eval_bleu": 20.0, "eval_samples": 2, "eval_bleu_signature": BLEU_SIGNATURE}
    metrics |= {"predict_bleu": 25.0, "predict_samples": 3, "predict_bleu_signature": BLEU_SIGNATURE}
    raw = {"train": [None] * 10, "validation": [None] * 2, "test": [None] * 3}  # card_values counts them
    values = reporting.card_values(tiny_model(), training_args, model_args, data_args, metrics, raw, None)
    return render_model_card({**values, "example_source": "a b c"})


def card_result(card: str):
    """The card's one evaluation result, as the Hub reads the model-index (`huggingface_hub.ModelCard`)."""
    from huggingface_hub import ModelCard

    data = ModelCard(card, ignore_metadata_errors=False).data
    [result] = data.eval_results
    assert data.model_name == "x" and result.task_type == "translation"
    assert (result.metric_type, result.metric_value, result.metric_name) == ("bleu", 25.0, "sacreBLEU (test)")
    return data, result


def test_the_card_of_a_run_on_local_files_names_each_file_by_its_base_name_only(tmp_path):
    """Files given by absolute paths: the model-index's dataset is the test file, by name, as a local file; no
    directory of the training machine is anywhere on the card (front matter or prose). The names need YAML quoting."""
    data_dir = tmp_path / "private-data-dir"
    train_pair = f"{data_dir / 'train.en'},{data_dir / 'train.de'}"
    test_name = "newstest: 2014 #1.jsonl"  # ": " and " #" would end a plain YAML scalar
    files = ["--train_file", train_pair, "--validation_file", str(data_dir / "dev.jsonl")]
    files += ["--test_file", str(data_dir / test_name), "--source_lang", "en", "--target_lang", "de"]
    card = run_card(tmp_path, *files)
    assert str(data_dir) not in card and str(tmp_path) not in card
    data, result = card_result(card)
    assert (result.dataset_name, result.dataset_type, result.dataset_split) == (test_name, "local file", "test")
    assert result.dataset_config is None and data.datasets is None  # no Hub dataset claimed
    assert result.metric_config == BLEU_SIGNATURE
    body = card.split("---\n", 2)[2]
    assert "train `train.en,train.de`, validation `dev.jsonl`, test `newstest: 2014 #1.jsonl`" in body
    assert f"sacreBLEU signature: `{BLEU_SIGNATURE}`" in body


def test_the_card_of_a_run_on_a_local_dataset_folder_names_the_folder_only(tmp_path):
    folder = tmp_path / "saved" / "my-corpus"
    folder.mkdir(parents=True)
    card = run_card(tmp_path, "--dataset_name", str(folder), "--source_lang", "en", "--target_lang", "de")
    assert str(folder.parent) not in card
    data, result = card_result(card)
    assert (result.dataset_name, result.dataset_type, result.dataset_split) == ("my-corpus", "local folder", "test")
    assert data.datasets is None and "`my-corpus`" in card.split("---\n", 2)[2]


@pytest.mark.parametrize(
    ("limit", "split"),
    [([], "test"), (["--max_predict_samples", "3"], "test[:3]"), (["--max_predict_samples", "5"], "test")],
)
def test_the_card_of_a_run_on_a_hub_dataset_gives_its_id_config_and_split(tmp_path, limit, split):
    """--max_predict_samples N scores the first N test pairs (here the test split has 3): the split says so in
    `datasets`' slicing syntax."""
    hub = ["--dataset_name", "wmt14", "--dataset_config_name", "de-en", "--source_lang", "en", "--target_lang", "de"]
    card = run_card(tmp_path, *hub, *limit)
    data, result = card_result(card)
    assert (result.dataset_type, result.dataset_config, result.dataset_split) == ("wmt14", "de-en", split)
    assert result.dataset_name == "wmt14 de-en" and data.datasets == ["wmt14"]
    assert result.metric_config == BLEU_SIGNATURE
    assert "the Hub dataset `wmt14`, config `de-en`" in card.split("---\n", 2)[2]


def test_the_card_of_a_run_on_the_embedded_corpus_says_so(tmp_path):
    data, result = card_result(run_card(tmp_path))
    assert (result.dataset_name, result.dataset_type, result.dataset_split) == (
        "embedded synthetic corpus",
        "synthetic",
        "test",
    )
    assert result.dataset_config is None and data.datasets is None
    assert result.metric_config == BLEU_SIGNATURE


@pytest.mark.parametrize("language", ["no", "on", "null"])
def test_language_codes_yaml_would_read_as_something_else_stay_text(language):
    """Norwegian's code is YAML 1.1's false."""
    meta = front_matter(render_model_card(card_values(source_lang=language)))
    assert meta["language"] == [language, "xb"]
    assert meta["model-index"][0]["results"][0]["task"]["name"] == f"Translation {language}-xb"


@pytest.mark.slow
def test_a_wheel_ships_the_card_template_and_every_code_file_the_model_imports(tmp_path):
    """Installed from a wheel (no source tree beside it), the package renders the card and finds its code files."""
    assert TEMPLATE_PATH.parent == PACKAGE_DIR
    source = tmp_path / "source"  # a clean copy: a build/ folder left in the checkout could add stale files
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(PACKAGE_DIR.parent / name, source / name)
    shutil.copytree(PACKAGE_DIR, source / PACKAGE_DIR.name, ignore=shutil.ignore_patterns("__pycache__"))
    command = [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation"]
    subprocess.run([*command, "-q", "-w", str(tmp_path)], check=True, capture_output=True, cwd=tmp_path)
    site = tmp_path / "site"
    with zipfile.ZipFile(next(tmp_path.glob("*.whl"))) as wheel:
        wheel.extractall(site)
    assert {path.name for path in PACKAGE_DIR.glob("*.py")} <= {
        path.name for path in (site / PACKAGE_DIR.name).iterdir()
    }
    values = card_values()
    code = (
        "import json, sys\n"
        "from hf_vanilla_transformer import model_card\n"
        "assert model_card.__file__.startswith(sys.argv[1]), model_card.__file__\n"
        "print(model_card.render_model_card(json.loads(sys.argv[2])), end='')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run(
        [sys.executable, "-c", code, str(site), json.dumps(values)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout == render_model_card(values)


# ----------------------------------------------------------------------------------------------- (e) safe loading


def copy_checkpoint(saved: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "checkpoint"
    shutil.copytree(saved, folder)
    return folder


def pickle_only_checkpoint(saved: Path, tmp_path: Path) -> Path:
    """A copy of the checkpoint whose weights are in pytorch_model.bin (a pickle) instead of model.safetensors."""
    folder = copy_checkpoint(saved, tmp_path)
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    return folder


def test_pickle_weights_are_never_loaded(saved, tmp_path):
    folder = pickle_only_checkpoint(saved, tmp_path)
    with pytest.raises(OSError, match=r"model\.safetensors"):
        AutoModelForSeq2SeqLM.from_pretrained(folder)


def test_pickle_weights_are_refused_when_safetensors_is_required(saved, tmp_path):
    """The explicit opt-in, which this model's from_pretrained makes the default."""
    folder = pickle_only_checkpoint(saved, tmp_path)
    with pytest.raises(OSError, match=r"no file named model\.safetensors"):
        AutoModelForSeq2SeqLM.from_pretrained(folder, use_safetensors=True)


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_a_config_whose_widths_do_not_match_the_weights_fails(saved, tmp_path):
    folder = copy_checkpoint(saved, tmp_path)
    edit_config(folder, d_model=15)  # still divisible by the 3 heads, so only the weights disagree
    with pytest.raises(ValueError, match="does not match its weights"):
        AutoModelForSeq2SeqLM.from_pretrained(folder)


def test_a_width_mismatch_error_names_the_parameter_and_shapes(saved, tmp_path):
    folder = copy_checkpoint(saved, tmp_path)
    edit_config(folder, d_model=15)
    with pytest.raises(
        (RuntimeError, ValueError), match=r"k_proj\.weight \(checkpoint \(12, 12\), config \(15, 15\)\)"
    ):
        AutoModelForSeq2SeqLM.from_pretrained(folder)


@pytest.mark.parametrize("layers", [1, 3])
def test_a_config_whose_depth_does_not_match_the_weights_fails(saved, tmp_path, layers):
    folder = copy_checkpoint(saved, tmp_path)
    edit_config(folder, encoder_layers=layers)
    with pytest.raises((RuntimeError, ValueError), match=r"model\.encoder\.layers"):
        AutoModelForSeq2SeqLM.from_pretrained(folder)


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_weights_fail(saved, tmp_path, keep):
    folder = copy_checkpoint(saved, tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(OSError, match=r"damaged or truncated.*incomplete metadata, file not fully covered"):
        AutoModelForSeq2SeqLM.from_pretrained(folder)


def test_truncated_weights_error_names_the_file(saved, tmp_path):
    folder = copy_checkpoint(saved, tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError, match=r"model\.safetensors"):
        AutoModelForSeq2SeqLM.from_pretrained(folder)


def test_the_card_links_the_code_only_to_an_address_someone_gave():
    from hf_vanilla_transformer.reporting import code_reference

    assert code_reference("https://example.org/code") == "[hf-vanilla-transformer](https://example.org/code)"
    assert code_reference() == "hf-vanilla-transformer"  # the package metadata names no project URL
    card = render_model_card(card_values())
    assert "github.com" not in card and "with hf-vanilla-transformer to translate" in card
