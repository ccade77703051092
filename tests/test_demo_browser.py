"""The attention explorer as a person uses it: the app runs on a free local port, a real headless browser (Debian's
Chromium, driven by Playwright; nothing downloaded) types sentences, presses Translate and switches attention use,
layer and head; the page must show the model's translation and the attention weights the model computes (read
from the plots' data in the page, not from pixels). A screenshot of the page is saved with the test's files.

Skipped where Gradio, plotly, Playwright or /usr/bin/chromium is missing; `scripts/setup.sh` installs them all."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from test_demo import SOURCES, save_tiny_translator

from hf_vanilla_transformer import demo
from hf_vanilla_transformer.modeling_vanilla_transformer import sinusoidal_table

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
# Headless on a closed network: no sandbox (root), no GPU, and none of Chrome's own calls home.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _absent(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):  # a broken install counts as none
        return True


MISSING = [name for name in ("gradio", "plotly", "playwright") if _absent(name)]
MISSING += [CHROMIUM] if not os.path.exists(CHROMIUM) else []
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        bool(MISSING),
        reason=f"the browser test needs {', '.join(MISSING)}: pip install -e '.[dev,demo]' and apt-get install "
        "chromium (scripts/setup.sh does both)",
    ),
]
PLOT_DATA = """(id) => {
    const plot = document.querySelector(`#${id} .js-plotly-plot`);
    return plot && plot.data ? {z: plot.data[0].z, title: plot.layout.title.text} : null;
}"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The explorer, as `python -m hf_vanilla_transformer.demo MODEL --port N` starts it, on a saved tiny model."""
    folder = save_tiny_translator(tmp_path_factory.mktemp("model"))
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "hf_vanilla_transformer.demo", str(folder), "--port", str(port)]
    with open(log, "w") as out:
        server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the explorer did not start serving {url}:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url, folder
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def plot_shows(page, elem_id: str, expected: torch.Tensor, title: str | None, timeout: float = 60.0) -> None:
    """Wait until the plot `elem_id` in the page holds `expected` (under `title`, if given); fail saying what it
    holds."""
    deadline = time.monotonic() + timeout
    while True:
        shown = page.evaluate(PLOT_DATA, elem_id)
        z = torch.tensor(shown["z"]) if shown else None
        same = z is not None and z.shape == expected.shape and torch.allclose(z, expected, atol=1e-5)
        if same and title in (None, shown["title"]):
            return
        if time.monotonic() > deadline:
            got = (shown["title"], tuple(z.shape)) if shown else None
            if got and z.shape == expected.shape:
                got = (*got, f"values off by up to {(z - expected).abs().max():.3g}")
            raise AssertionError(f"#{elem_id}: expected {title!r} {tuple(expected.shape)}, the page shows {got}")
        time.sleep(0.2)


def test_a_person_translates_and_explores_every_attention(served, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    url, folder = served
    model, tokenizer = demo.load_for_demo(str(folder))  # what the page must show, computed here
    first, second = (demo.explain(model, tokenizer, source) for source in SOURCES[:2])
    assert first.candidates[0].text != second.candidates[0].text  # so the page's change can be seen
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 1400})
            page.goto(url)
            source = page.locator("#source textarea")
            translation = page.locator("#translation textarea")

            # What the model cannot take is refused on the page, and the page goes on serving.
            page.click("#translate")
            expect(page.locator("#status")).to_contain_text("the source text is empty", timeout=60_000)
            source.fill(" ".join(["nu"] * 64))
            page.click("#translate")
            expect(page.locator("#status")).to_contain_text("65 tokens long; this model encodes at most 64")

            source.fill(SOURCES[0])
            page.click("#translate")
            expect(translation).to_have_value(first.candidates[0].text, timeout=60_000)
            expect(page.locator("#status")).to_have_text("")
            expect(page.locator("#candidates table tbody tr")).to_have_count(4)
            cross = first.attention.cross
            plot_shows(page, "attention-head", cross[0][0], "Cross-attention, layer 1, head 1")
            plot_shows(page, "attention-mean", cross[0].mean(0), "Cross-attention, layer 1, average of heads")
            length = len(first.attention.source_tokens)
            plot_shows(page, "positions", sinusoidal_table(length, model.config.d_model), None)

            # Switch the use, then the layer, then the head: each time the heat-map holds the model's weights.
            encoder = first.attention.encoder
            page.locator("#use").get_by_label("Encoder self-attention").check()
            plot_shows(page, "attention-head", encoder[0][0], "Encoder self-attention, layer 1, head 1")
            page.locator("#layer").get_by_label("2", exact=True).check()
            plot_shows(page, "attention-head", encoder[1][0], "Encoder self-attention, layer 2, head 1")
            page.locator("#head").get_by_label("3", exact=True).check()
            plot_shows(page, "attention-head", encoder[1][2], "Encoder self-attention, layer 2, head 3")
            plot_shows(page, "attention-mean", encoder[1].mean(0), "Encoder self-attention, layer 2, average of heads")
            assert not torch.allclose(encoder[1][2], encoder[1][0]) and not torch.allclose(encoder[1][0], encoder[0][0])
            decoder = first.attention.decoder
            page.locator("#use").get_by_label("Decoder masked self-attention").check()
            plot_shows(page, "attention-head", decoder[1][2], "Decoder masked self-attention, layer 2, head 3")

            # Hovering a cell shows its weight.
            page.locator("#attention-head .nsewdrag").hover(position={"x": 5, "y": 5})
            expect(page.locator("#attention-head .hoverlayer")).to_contain_text(f"weight {decoder[1][2][0, 0]:.3f}")

            # Another sentence: another translation, and the heat-map of its weights, in the same view.
            source.fill(SOURCES[1])
            page.click("#translate")
            expect(translation).to_have_value(second.candidates[0].text, timeout=60_000)
            plot_shows(
                page, "attention-head", second.attention.decoder[1][2], "Decoder masked self-attention, layer 2, head 3"
            )

            screenshot = tmp_path / "demo_explorer.png"
            page.screenshot(path=screenshot, full_page=True)
            print(f"screenshot of the explorer: {screenshot}")
        finally:
            browser.close()
