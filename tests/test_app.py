"""The web demo (`diffusers_goca.app`, `goca app`): its work (`Demo`) and its page's handlers (`make_events`) called
directly, then the page itself served by `goca app` in a subprocess and driven in a real headless browser: Debian's
`chromium` with `chromium-driver`, through Selenium (nothing downloaded). The browser test is skipped, with the reason,
where Gradio, Selenium, chromium or chromedriver is missing.

GOCA_APP_SCREENSHOTS=docs/images makes the browser test write the README's screenshots (app_segment.png,
app_generate.png) there; by default they go to pytest's temporary folder.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_goca import entities_from_prompt
from diffusers_goca.app import (
    CFG,
    DEFAULT_PROMPT,
    DEFAULT_SCENE,
    SCFG,
    TOY,
    TOY_SEEDS,
    UPLOAD,
    AppError,
    Demo,
    parse_classes,
    save_masks,
)
from diffusers_goca.toyworld import make_scene

ROOT = Path(__file__).resolve().parent.parent
HAS_GRADIO = importlib.util.find_spec("gradio") is not None
needs_gradio = pytest.mark.skipif(not HAS_GRADIO, reason="Gradio is not installed: pip install -e '.[app]'")
SCENE = make_scene(DEFAULT_SCENE)


@pytest.fixture(scope="module")
def demo():
    return Demo()  # the shipped toy model, on the CPU


def _broken_png(folder: Path) -> Path:
    path = folder / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"this is not an image" * 10)
    return path


# -- Demo: the work, without Gradio ------------------------------------------------------------------------------------
def test_parse_classes():
    assert parse_classes(" grass, red circle ,, ") == ["grass", "red circle"]
    assert parse_classes("", required=False) == []
    with pytest.raises(AppError, match="at least one class"):
        parse_classes(" , ")


def test_demo_loads_the_toy_model_with_scfg(demo):
    assert demo.model == "toy" and demo.has_scfg and demo.guidance_modes == [CFG, SCFG]
    assert "goca" in demo.methods and "iseg" not in demo.mask_methods
    assert "toy" in demo.status() and "S-CFG available" in demo.status()


def test_segment_a_toy_scene_with_two_methods(demo):
    results = demo.segment(TOY, DEFAULT_SCENE, None, ", ".join(SCENE.classes), ["goca", "vanilla"])
    assert list(results) == ["goca", "vanilla"]
    for result in results.values():
        assert result.classes == SCENE.classes and tuple(result.labels.shape) == SCENE.image.shape[:2]
    pictures = demo.pictures(results["goca"])
    assert set(pictures) == {"overlay", "labels", "heatmaps"}
    assert all(isinstance(p, Image.Image) and min(p.size) >= 64 for p in pictures.values())
    assert demo.segment(TOY, DEFAULT_SCENE, None, "grass, background", "goca", background=True)["goca"].classes == [
        "grass",
        "background",
    ]


def test_segment_options_reach_the_library(demo):
    """The timestep and the noise seed are segment's: another timestep gives other scores, the same one the same."""
    a = demo.segment(TOY, TOY_SEEDS[1], None, "grass, sky", ["goca"], timestep=100)["goca"]
    b = demo.segment(TOY, TOY_SEEDS[1], None, "grass, sky", ["goca"], timestep=100.0)["goca"]
    c = demo.segment(TOY, TOY_SEEDS[1], None, "grass, sky", ["goca"], timestep=500)["goca"]
    assert torch.equal(a.scores, b.scores) and not torch.equal(a.scores, c.scores)


def test_the_class_encoding_reaches_the_library(demo):
    """class_encoding="separate" encodes each class on its own: other scores than the prompt's encoding."""
    classes = ", ".join(reversed(SCENE.classes))
    prompt = demo.segment(TOY, DEFAULT_SCENE, None, classes, ["goca"])["goca"]
    separate = demo.segment(TOY, DEFAULT_SCENE, None, classes, ["goca"], class_encoding="separate")["goca"]
    assert prompt.classes == separate.classes and not torch.equal(prompt.scores, separate.scores)
    with pytest.raises(ValueError, match="class_encoding"):
        demo.segment(TOY, DEFAULT_SCENE, None, classes, ["goca"], class_encoding="joint")


def test_the_class_order_reaches_the_library(demo):
    """class_order="stuff-first": the scores of `segment(..., class_order="stuff-first")`, the classes listed as
    typed."""
    classes = list(reversed(SCENE.classes))
    got = demo.segment(TOY, DEFAULT_SCENE, None, ", ".join(classes), ["goca"], class_order="stuff-first")["goca"]
    expected = demo.pipe.segment(SCENE.image, classes, class_order="stuff-first")
    assert got.classes == classes and torch.equal(got.scores, expected.scores)
    assert not torch.equal(
        got.scores, demo.segment(TOY, DEFAULT_SCENE, None, ", ".join(classes), ["goca"])["goca"].scores
    )
    with pytest.raises(ValueError, match="class_order"):
        demo.segment(TOY, DEFAULT_SCENE, None, ", ".join(classes), ["goca"], class_order="largest")


def test_the_presence_test_reaches_the_library(demo):
    """presence=True: the weights and labels of `segment(..., presence=True)`, a class ruled out shown as such."""
    from diffusers_goca.app import legend_text
    from diffusers_goca.toyworld import CLASS_NAMES

    classes = list(SCENE.classes) + [c for c in CLASS_NAMES if c not in SCENE.classes][:2]
    got = demo.segment(TOY, DEFAULT_SCENE, None, ", ".join(classes), ["goca"], presence=True)["goca"]
    expected = demo.pipe.segment(SCENE.image, classes, presence=True)
    assert got.presence == expected.presence and set(got.presence) == set(classes)
    assert torch.equal(got.labels, expected.labels)
    assert got.absent and all(f"{c} judged absent" in legend_text(got) for c in got.absent)
    assert not demo.segment(TOY, DEFAULT_SCENE, None, ", ".join(classes), ["goca"])["goca"].presence


def test_save_masks_writes_one_png_per_class_and_a_zip(demo, tmp_path):
    results = demo.segment(TOY, DEFAULT_SCENE, None, ", ".join(SCENE.classes), ["goca", "vanilla"])
    paths = save_masks(results, str(tmp_path))
    archive, pngs = paths[0], paths[1:]
    assert archive.endswith("masks.zip") and len(pngs) == 2 * len(SCENE.classes)
    assert sorted(zipfile.ZipFile(archive).namelist()) == sorted(os.path.basename(p) for p in pngs)
    for method, result in results.items():
        for k, name in enumerate(result.classes):
            path = tmp_path / f"{method}_{k:02d}_{re.sub(r'[^A-Za-z0-9]+', '_', name)}.png"
            mask = np.asarray(Image.open(path))
            assert set(np.unique(mask)) <= {0, 255}
            assert np.array_equal(mask == 255, result.mask(name).numpy())
    with pytest.raises(AppError, match="Segment an image first"):
        save_masks({})


def test_segment_an_uploaded_file_and_refuse_an_unreadable_one(demo, tmp_path):
    path = tmp_path / "scene.png"
    Image.fromarray(SCENE.image).save(path)
    result = demo.segment(UPLOAD, None, str(path), ", ".join(SCENE.classes), ["goca"])["goca"]
    same = demo.segment(TOY, DEFAULT_SCENE, None, ", ".join(SCENE.classes), ["goca"])["goca"]
    assert torch.equal(result.labels, same.labels)
    with pytest.raises(AppError, match="Could not read 'broken.png' as an image"):
        demo.segment(UPLOAD, None, str(_broken_png(tmp_path)), "grass", ["goca"])
    with pytest.raises(AppError, match="Upload an image file first"):
        demo.segment(UPLOAD, None, None, "grass", ["goca"])


@pytest.mark.parametrize(
    "classes, methods, options, match",
    [
        ("", ["goca"], {}, "at least one class"),
        ("grass", [], {}, "at least one method"),
        ("grass", ["seg4diff"], {}, "seg4diff"),  # a method this family does not run: the library's message
        ("grass", ["goca"], {"timestep": 5000}, "timestep"),
        ("grass", ["goca"], {"timestep": "soon"}, "timestep must be a number"),
        ("grass", ["goca"], {"seed": 1.5}, "integer"),
        ("grass, Grass", ["goca"], {}, "case"),
    ],
)
def test_segment_refuses_bad_input_with_a_message(demo, classes, methods, options, match):
    with pytest.raises(ValueError, match=match):
        demo.segment(TOY, DEFAULT_SCENE, None, classes, methods, **options)


def test_generate_with_masks_at_every_step(demo):
    seen = []
    out = demo.generate(
        SCENE.caption,
        "",
        steps=3,
        guidance=4.0,
        seed=0,
        mode=CFG,
        progress=lambda fraction, text: seen.append((fraction, text)),
    )
    assert out["from_prompt"] and out["classes"] == entities_from_prompt(SCENE.caption)
    assert [f["step"] for f in out["frames"]] == [0, 1, 2] and out["final"] is None
    assert [f for f, _ in seen] == pytest.approx([1 / 3, 2 / 3, 1.0]) and seen[-1][1] == "step 3 of 3"
    assert out["frames"][0]["caption"].startswith("step 1 of 3 · t = ")
    for frame in out["frames"]:
        assert isinstance(frame["overlay"], Image.Image) and isinstance(frame["heatmaps"], Image.Image)
        assert frame["scfg"] is None
    again = demo.generate(SCENE.caption, ", ".join(out["classes"]), steps=3, guidance=4.0, seed=0, mode=CFG)
    assert np.array_equal(np.asarray(again["image"]), np.asarray(out["image"])) and not again["from_prompt"]


def test_generate_with_scfg_shows_its_maps_and_the_final_masks(demo):
    seen = []
    out = demo.generate(
        SCENE.caption,
        "",
        steps=3,
        guidance=4.0,
        seed=0,
        mode=SCFG,
        progress=lambda fraction, text: seen.append(fraction),
    )
    assert len(out["frames"]) == 3 and seen[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert out["final"] is not None and out["final"].classes == out["classes"]
    assert all(isinstance(f["scfg"], Image.Image) for f in out["frames"])


@pytest.mark.parametrize(
    "prompt, classes, mode, guidance, match",
    [
        ("", "", CFG, 4.0, "Type a prompt"),
        (SCENE.caption, "blue elephant", CFG, 4.0, "blue elephant"),  # not in the prompt: the library's message
        (SCENE.caption, "blue elephant", SCFG, 4.0, "blue elephant"),
        (SCENE.caption, "", SCFG, 1.0, "guidance scale above 1"),
        ("high quality, 4k", "", CFG, 4.0, "no class found"),  # nothing to take from the prompt
    ],
)
def test_generate_refuses_bad_input_with_a_message(demo, prompt, classes, mode, guidance, match):
    with pytest.raises(ValueError, match=match):
        demo.generate(prompt, classes, steps=2, guidance=guidance, mode=mode)


def _tiny_unsupported_pipeline(folder: Path) -> Path:
    """A diffusers DiT pipeline (class-conditional, no text: GoCA has nothing to read), saved with tiny weights."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        sample_size=4,
        patch_size=2,
        num_embeds_ada_norm=10,
    )
    vae = AutoencoderKL(
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
        norm_num_groups=8,
    )
    DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler()).save_pretrained(folder)
    return folder


def test_loading_an_unsupported_pipeline_keeps_the_previous_one(demo, tmp_path):
    before = demo.pipe
    with pytest.raises(ValueError):
        demo.load(str(_tiny_unsupported_pipeline(tmp_path / "dit")))
    with pytest.raises((OSError, ValueError)):
        demo.load(str(tmp_path / "no such folder"))
    assert demo.pipe is before and demo.model == "toy"


# -- the handlers the page calls (Gradio needed, no browser) -----------------------------------------------------------
# Outside a served page, the handlers' gr.Warning toasts are Python UserWarnings: expected here.
warning_toasts = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def events(demo):
    if not HAS_GRADIO:
        pytest.skip("Gradio is not installed: pip install -e '.[app]'")
    from diffusers_goca.app import make_events

    return make_events(demo)


@needs_gradio
def test_the_page_builds(demo):
    import gradio as gr

    from diffusers_goca.app import build_app

    assert isinstance(build_app(demo), gr.Blocks)


@needs_gradio
@warning_toasts
def test_segment_and_save_handlers(events, tmp_path):
    message, legend, shown, overlay, labels, heatmaps, results, files = events.segment(
        TOY, DEFAULT_SCENE, None, ", ".join(SCENE.classes), ["goca", "vanilla"], False, 0.0, None, 0, "prompt"
    )
    assert message.startswith("Segmented with goca, vanilla in ")
    assert legend.splitlines()[0] == "classes: " + ", ".join(SCENE.classes)
    assert all(isinstance(p, Image.Image) for p in (overlay, labels, heatmaps)) and set(results) == {"goca", "vanilla"}
    *pictures, legend = events.show_method(results, "vanilla")
    assert all(isinstance(p, Image.Image) for p in pictures) and "**vanilla**" in legend
    paths, message = events.save(results)
    assert paths[0].endswith("masks.zip") and len(paths) == 1 + 2 * len(SCENE.classes)
    assert all(os.path.exists(p) for p in paths) and message.startswith(f"Saved {2 * len(SCENE.classes)} masks")


@needs_gradio
@warning_toasts
@pytest.mark.parametrize(
    "classes, methods, upload, match",
    [
        ("", ["goca"], None, "Type at least one class"),
        ("grass", [], None, "Pick at least one method"),
        ("grass", ["goca"], "broken", "Could not read 'broken.png'"),
    ],
)
def test_segment_handler_shows_bad_input_as_a_message(events, tmp_path, classes, methods, upload, match):
    source, upload = (UPLOAD, str(_broken_png(tmp_path))) if upload else (TOY, None)
    out = events.segment(source, DEFAULT_SCENE, upload, classes, methods, False, 0.0, None, 0)
    assert out[0].startswith("⚠️ **Could not segment:**") and match in out[0] and "Traceback" not in out[0]
    assert out[3:] == (None, None, None, None, None)  # no stale pictures, no results to save
    paths, message = events.save(None)
    assert paths is None and "Segment an image first" in message


@needs_gradio
@warning_toasts
def test_upload_handler_previews_or_refuses(events, tmp_path):
    path = tmp_path / "scene.png"
    Image.fromarray(SCENE.image).save(path)
    source, preview, message = events.pick_upload(str(path))
    assert source == UPLOAD and preview.size == (256, 256) and message == ""
    source, preview, message = events.pick_upload(str(_broken_png(tmp_path)))
    assert preview is None and "Could not read" in message
    source, classes, preview, message = events.pick_scene(TOY_SEEDS[1])
    assert source == TOY and classes == ", ".join(make_scene(TOY_SEEDS[1]).classes)


@needs_gradio
@warning_toasts
def test_generate_and_step_handlers(events):
    out = events.generate(SCENE.caption, "", 3, 4.0, 0, CFG, "goca", progress=lambda *a, **k: None)
    message, legend, image, slider, caption, overlay, heatmaps, scfg, frames = out
    assert message.startswith("Generated with CFG in ") and message.endswith("3 steps.")
    assert legend == "classes (from the prompt): " + ", ".join(entities_from_prompt(SCENE.caption))
    assert image.size == (256, 256) and slider["maximum"] == 3 and slider["value"] == 3  # steps count from 1
    assert caption.startswith("step 3 of 3") and len(frames) == 3
    step_caption, step_overlay, _, _ = events.show_step(frames, 1)
    assert step_caption.startswith("step 1 of 3") and step_overlay is frames[0]["overlay"]
    assert events.show_step(frames, 99)[0].startswith("step 3 of 3")
    bad = events.generate(SCENE.caption, "blue elephant", 3, 4.0, 0, CFG, "goca", progress=lambda *a, **k: None)
    assert bad[0].startswith("⚠️ **Could not generate:**") and "blue elephant" in bad[0] and bad[2] is None


@needs_gradio
@warning_toasts
def test_load_handler_reports_an_unsupported_pipeline(events, demo, tmp_path):
    folder = _tiny_unsupported_pipeline(tmp_path / "dit")
    status, *updates = events.load(str(folder))
    assert status.startswith("⚠️ **Could not load") and demo.model in status and demo.model == "toy"
    status, methods, mask_methods, modes = events.load("toy")
    assert status.startswith("**Model:** `toy`") and methods["choices"] and modes["choices"]


# -- the page in a real browser ----------------------------------------------------------------------------------------
def _browser() -> tuple[str, str] | str:
    """(chromium, chromedriver) paths, or the reason they cannot be used."""
    if not HAS_GRADIO:
        return "Gradio is not installed: pip install -e '.[app]'"
    if importlib.util.find_spec("selenium") is None:
        return "Selenium is not installed: pip install -e '.[app]'"
    chromium = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        return "no chromium and chromedriver on the PATH: apt-get install chromium chromium-driver (.ci/run does)"
    return chromium, driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`goca app` on the toy model on a free local port, in a subprocess; yields (url, seconds to a served page)."""
    found = _browser()
    if isinstance(found, str):
        pytest.skip(found)
    port, folder = _free_port(), tmp_path_factory.mktemp("app")
    env = dict(
        os.environ,
        GRADIO_ANALYTICS_ENABLED="False",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
        PYTHONPATH=str(ROOT),
    )
    log = open(folder / "server.log", "w")
    start = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "diffusers_goca", "app", "--port", str(port), "--device", "cpu"],
        cwd=folder,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"goca app exited with {process.returncode}:\n{(folder / 'server.log').read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.perf_counter() - start > 180:
                pytest.fail(f"goca app did not serve within 180 s:\n{(folder / 'server.log').read_text()}")
            time.sleep(0.2)
        yield url, time.perf_counter() - start
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
        leftovers = sorted(p.name for p in folder.iterdir() if p.name != "server.log")
        assert not leftovers, f"goca app wrote into its working folder: {leftovers}"


@pytest.fixture(scope="module")
def browser(server):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver_path = _browser()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--window-size=1500,1100",
        "--no-proxy-server",
    ):
        options.add_argument(flag)
    try:
        driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    except Exception as error:  # a driver that does not match the browser, a browser that cannot start here
        pytest.skip(f"chromium could not be started through chromedriver: {type(error).__name__}: {error}")
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


class Page:
    """The demo's page in the browser: elements by their elem_id, text, waits."""

    def __init__(self, driver, timeout: float = 90):
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver, self.by, self.wait = driver, By, WebDriverWait(driver, timeout, poll_frequency=0.1)

    def find(self, css: str):
        return self.driver.find_element(self.by.CSS_SELECTOR, css)

    def text(self, elem_id: str) -> str:
        elements = self.driver.find_elements(self.by.CSS_SELECTOR, f"#{elem_id}")
        return elements[0].text.strip() if elements else ""

    def wait_text(self, elem_id: str, predicate) -> str:
        self.wait.until(lambda d: predicate(self.text(elem_id)))
        return self.text(elem_id)

    def image_source(self, elem_id: str) -> str:
        images = self.driver.find_elements(self.by.CSS_SELECTOR, f"#{elem_id} img")
        return (images[0].get_attribute("src") or "") if images else ""

    def downloads(self, elem_id: str) -> list[str]:
        """The names of the files a File component offers for download."""
        links = self.driver.find_elements(self.by.CSS_SELECTOR, f"#{elem_id} a[download]")
        return [link.get_attribute("download") for link in links]

    def type(self, elem_id: str, text: str):
        from selenium.webdriver.common.keys import Keys

        box = self.find(f"#{elem_id} textarea, #{elem_id} input")
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(Keys.DELETE)
        if text:
            box.send_keys(text)
        self.wait.until(lambda d: box.get_attribute("value") == text)

    def click(self, elem_id: str):
        self.find(f"#{elem_id}").click()

    def choose(self, elem_id: str, label: str):
        self.driver.find_element(self.by.XPATH, f"//*[@id='{elem_id}']//label[contains(., '{label}')]").click()

    def tab(self, name: str):
        self.driver.find_element(self.by.XPATH, f"//button[@role='tab' and contains(., '{name}')]").click()

    def body(self) -> str:
        return self.driver.find_element(self.by.TAG_NAME, "body").text

    def screenshot(self, path: Path):
        """The whole page: the window made as tall as the page's content, scrolled to the top."""
        height = self.driver.execute_script(
            "return Math.max(...Array.from(document.querySelectorAll('body, gradio-app, .gradio-container'))"
            ".map(e => e.getBoundingClientRect().bottom + window.scrollY))"
        )
        self.driver.set_window_size(1500, min(max(900, int(height) + 160), 2400))
        self.driver.execute_script("window.scrollTo(0, 0)")
        time.sleep(0.5)
        self.driver.save_screenshot(str(path))
        self.driver.set_window_size(1500, 1100)


@pytest.mark.slow
def test_the_page_in_a_browser(server, browser, tmp_path, capsys):
    """Segment a toy scene, save its masks, generate with masks and move the step slider, S-CFG; bad input (no
    class, an unreadable upload, a class not in the prompt) gives a message in the page and the server goes on."""
    from selenium.webdriver.common.keys import Keys

    url, served_after = server
    shots = Path(os.environ.get("GOCA_APP_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    page = Page(browser)
    browser.get(url)
    page.wait.until(lambda d: d.find_elements(page.by.CSS_SELECTOR, "#seg-run"))

    # Segment the toy scene the tab opens on: pictures, and the classes as page text.
    start = time.perf_counter()
    page.click("seg-run")
    message = page.wait_text("seg-message", lambda t: t.startswith(("Segmented", "⚠️")))
    segment_seconds = time.perf_counter() - start
    assert message.startswith("Segmented with goca in "), message
    assert page.text("seg-legend").splitlines()[0] == "classes: " + ", ".join(SCENE.classes)
    for elem_id in ("seg-overlay", "seg-labels", "seg-heatmaps", "seg-preview"):
        assert page.image_source(elem_id), f"no picture in #{elem_id}"
    page.click("seg-save")
    page.wait.until(lambda d: page.downloads("seg-files"))
    assert page.downloads("seg-files") == ["masks.zip"] + [
        f"goca_{k:02d}_{name.replace(' ', '_')}.png" for k, name in enumerate(SCENE.classes)
    ]
    page.screenshot(shots / "app_segment.png")

    # Bad input: no class; an unreadable upload (on upload, and when segmenting it). The page says so.
    page.type("seg-classes", "")
    page.click("seg-run")
    message = page.wait_text("seg-message", lambda t: t.startswith("⚠️"))
    assert "Type at least one class" in message and not page.image_source("seg-overlay")
    page.find("#seg-upload input[type=file]").send_keys(str(_broken_png(tmp_path)))
    message = page.wait_text("seg-message", lambda t: "broken.png" in t)  # markdown: no ** or ` in the page's text
    assert message.startswith("⚠️ Upload: Could not read 'broken.png' as an image"), message
    assert "/tmp" not in message and "Traceback" not in page.body()
    page.type("seg-classes", "grass")
    page.click("seg-run")
    message = page.wait_text("seg-message", lambda t: t.startswith("⚠️ Could not segment"))
    assert "Could not read 'broken.png' as an image" in message
    # The server goes on: back to the toy scene, segmented with two methods.
    page.choose("seg-source", TOY)
    page.type("seg-classes", ", ".join(SCENE.classes))
    page.choose("seg-methods", "vanilla")
    page.click("seg-run")
    assert page.wait_text("seg-message", lambda t: t.startswith(("Segmented", "⚠️"))).startswith(
        "Segmented with goca, vanilla"
    )
    assert "Traceback" not in page.body()

    # Generate with masks at every step; the step slider shows each step's masks. (A fresh page: no warning toasts.)
    browser.refresh()
    page.wait.until(lambda d: d.find_elements(page.by.XPATH, "//button[@role='tab' and contains(., 'Generate')]"))
    page.tab("Generate")
    page.wait.until(lambda d: d.find_elements(page.by.CSS_SELECTOR, "#gen-run"))
    steps = page.find("#gen-steps input[type=range]")  # the keyboard on the slider: 1, then 5 to the right
    browser.execute_script("arguments[0].focus()", steps)
    steps.send_keys(Keys.HOME)
    steps.send_keys(*[Keys.ARROW_RIGHT] * 5)
    page.wait.until(lambda d: steps.get_attribute("value") == "6")
    page.click("gen-run")
    message = page.wait_text("gen-message", lambda t: t.startswith(("Generated", "⚠️")))
    assert message.startswith("Generated with CFG in ") and message.endswith("6 steps."), message
    classes = entities_from_prompt(DEFAULT_PROMPT)
    assert page.text("gen-legend") == "classes (from the prompt): " + ", ".join(classes)
    assert page.image_source("gen-image") and page.image_source("gen-overlay") and page.image_source("gen-heatmaps")
    assert page.text("gen-step-caption").startswith("step 6 of 6")
    last = page.image_source("gen-overlay")
    slider = page.find("#gen-step input[type=range]")
    browser.execute_script("arguments[0].focus()", slider)
    for _ in range(3):
        slider.send_keys(Keys.ARROW_LEFT)
    page.wait_text("gen-step-caption", lambda t: t.startswith("step 3 of 6"))
    page.wait.until(lambda d: page.image_source("gen-overlay") not in ("", last))
    third = page.image_source("gen-overlay")
    slider.send_keys(Keys.ARROW_RIGHT, Keys.ARROW_RIGHT)
    page.wait_text("gen-step-caption", lambda t: t.startswith("step 5 of 6"))
    page.wait.until(lambda d: page.image_source("gen-overlay") not in ("", last, third))
    page.screenshot(shots / "app_generate.png")

    # A class not in the prompt: the library's message in the page.
    page.type("gen-classes", "blue elephant")
    page.click("gen-run")
    message = page.wait_text("gen-message", lambda t: t.startswith("⚠️"))
    assert "blue elephant" in message and not page.image_source("gen-image")

    # S-CFG: its regions and rates per step, the masks of the final image.
    page.type("gen-classes", "")
    page.choose("gen-mode", SCFG)
    page.click("gen-run")
    message = page.wait_text("gen-message", lambda t: t.startswith(("Generated", "⚠️")))
    assert message.startswith("Generated with S-CFG in "), message
    assert page.image_source("gen-scfg") and page.image_source("gen-overlay")
    assert "masks of the final image" in page.text("gen-legend")
    slider = page.find("#gen-step input[type=range]")
    browser.execute_script("arguments[0].focus()", slider)
    slider.send_keys(Keys.HOME)
    page.wait_text("gen-step-caption", lambda t: t.startswith("step 1 of 6"))
    assert "Traceback" not in page.body()

    with capsys.disabled():
        print(
            f"\n[goca app] page served {served_after:.1f} s after `goca app` started; the first segmentation took "
            f"{segment_seconds:.1f} s in the browser (start + segment: {served_after + segment_seconds:.1f} s)"
        )
    assert served_after + segment_seconds < 60  # the target is 15 s on a CPU; this bound allows a loaded machine
