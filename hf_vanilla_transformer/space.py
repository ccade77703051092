"""A Hugging Face Space for a trained model: the attention explorer (`demo.py`) as a Gradio SDK app.

A Space of the Gradio SDK is a repository whose README.md front matter names the SDK, its version and the file to
run (`sdk: gradio`, `sdk_version`, `app_file`), beside that file and a `requirements.txt` that Spaces installs
first (Gradio itself comes from `sdk_version`). `write_space` writes those three files; `push_space` creates the
Space and uploads them. `train.py --push_to_hub --push_space` does both for the model it pushed.

    python -m hf_vanilla_transformer.space user/my-model outputs/space --push user/my-model
"""

from __future__ import annotations

import argparse
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from huggingface_hub import HfApi, SpaceCard, SpaceCardData

from .reporting import code_reference

# The Gradio version the explorer is tested with, the `demo` extra's lower bound: the Space's `sdk_version` where
# Gradio is not installed here (train.py can write a Space without the extra).
GRADIO_TESTED = "6.31.0"
SHORT_DESCRIPTION = "Attention of a Transformer (Vaswani et al., 2017)"  # the Hub allows 60 characters

APP = '''\
"""The attention explorer of hf-vanilla-transformer for {model_id}. Spaces runs this file (README.md: app_file);
`python app.py` runs it anywhere the requirements are installed."""

from hf_vanilla_transformer.demo import build_demo, load_for_demo

MODEL = {model_id!r}
EXAMPLES = {examples!r}

model, tokenizer = load_for_demo(MODEL)
demo = build_demo(model, tokenizer, examples=EXAMPLES)

if __name__ == "__main__":
    demo.launch()
'''

BODY = """
# {title}

Type a sentence in the source language of [{model_id}]({model_link}) and see its translation, the beam's finished
candidates with their scores under the model's length penalty, the attention of every layer and head for the three
uses of attention (encoder self-attention, the decoder's masked self-attention, cross-attention), and the position
encodings of §3.5.

Written by `write_space` of {code}, the Transformer of
["Attention Is All You Need"](https://arxiv.org/abs/1706.03762) as a transformers model.
"""


def default_requirement() -> str:
    """This package with the explorer's extra, at the installed version. Where the package is not on PyPI, pass
    `write_space` a pip spec that installs it (e.g. 'hf-vanilla-transformer[demo] @ git+https://...')."""
    from . import __version__

    return f"hf-vanilla-transformer[demo]=={__version__}"


def gradio_version() -> str:
    """The Space's `sdk_version`: the Gradio installed here (the one the explorer ran with), else `GRADIO_TESTED`."""
    try:
        return version("gradio")
    except PackageNotFoundError:
        return GRADIO_TESTED


def write_space(
    folder: str | os.PathLike,
    model_id: str,
    requirement: str | None = None,
    examples: list[str] | tuple[str, ...] = (),
    title: str | None = None,
) -> Path:
    """Write a Gradio Space that opens the explorer on `model_id` (a Hub id, or a local folder for a Space run
    locally) into `folder`: app.py, requirements.txt, and README.md with the Spaces front matter. Returns `folder`."""
    if not model_id or not str(model_id).strip():
        raise ValueError(f"model_id must name a model (a Hub id or a folder), got {model_id!r}.")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    title = title or f"{Path(model_id).name} attention explorer"
    local = os.path.isdir(model_id)
    (folder / "app.py").write_text(APP.format(model_id=model_id, examples=list(examples)), encoding="utf-8")
    (folder / "requirements.txt").write_text(f"{requirement or default_requirement()}\n", encoding="utf-8")
    data = SpaceCardData(
        title=title,
        sdk="gradio",
        sdk_version=gradio_version(),
        app_file="app.py",
        models=None if local else [model_id],  # the Hub links the Space from these models' pages
        emoji="🔍",
        colorFrom="indigo",
        colorTo="purple",
        pinned=False,
        short_description=SHORT_DESCRIPTION,
        tags=["attention-visualization", "translation"],
    )
    link = Path(model_id).resolve().as_uri() if local else f"https://huggingface.co/{model_id}"
    body = BODY.format(title=title, model_id=model_id, model_link=link, code=code_reference())
    SpaceCard(f"---\n{data.to_yaml()}\n---\n{body}").save(folder / "README.md")
    return folder


def push_space(folder: str | os.PathLike, repo_id: str, token: str | None = None, private: bool | None = None) -> str:
    """Create the Gradio Space `repo_id` if it does not exist and upload `folder` to it; returns its address."""
    api = HfApi(token=token)
    url = api.create_repo(repo_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
    api.upload_folder(
        repo_id=repo_id,
        repo_type="space",
        folder_path=str(folder),
        commit_message="Attention explorer, written by hf-vanilla-transformer",
    )
    return str(url)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m hf_vanilla_transformer.space", description="Write (and push) a Gradio Space for a model."
    )
    parser.add_argument("model", help="The model the Space opens: a Hub id (or a local folder).")
    parser.add_argument("folder", help="Where to write app.py, requirements.txt and README.md.")
    parser.add_argument("--requirement", help=f"pip spec of this package (default: {default_requirement()}).")
    parser.add_argument("--example", action="append", default=[], help="A sentence to offer (repeatable).")
    parser.add_argument("--push", metavar="SPACE_ID", help="Create this Space and upload the folder to it.")
    args = parser.parse_args(argv)
    folder = write_space(args.folder, args.model, args.requirement, args.example)
    print(f"Space written to {folder}")
    if args.push:
        print(f"Space pushed: {push_space(folder, args.push)}")


if __name__ == "__main__":
    main()
