"""The web demo: `goca app [--model ID_OR_FOLDER] [--device cpu] [--dtype float32] [--port 7860]` (extra [app]).

A Gradio page on any supported pipeline (the shipped toy model by default) with two tabs:

- **Segment**: an uploaded image or a held-out toy scene, the classes, the method(s) and `segment`'s options; shows
  the overlay, the label map and the per-class heat maps, and saves each class's mask as a PNG (and all in a zip);
- **Generate**: a prompt, its classes (default: its noun phrases), steps, guidance, seed, CFG or S-CFG; shows the
  image and, on a step slider, the masks at every step (CFG) or S-CFG's regions, foreground and rates at every step
  with the masks of the final image (S-CFG, whose capture cannot also give masks in the same call).

Offline: no analytics, no share link, no font or asset download. Bad input (no class, a class not in the prompt, an
unreadable image, an unsupported pipeline) gives a message in the page, never a traceback, and the server keeps
serving. `Demo` holds the pipeline and does the work without Gradio (the tests call it directly); `build_app` makes the
page; `launch` serves it. Gradio is imported only there, so the package imports without the extra.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import re
import tempfile
import threading
import time
import traceback
import zipfile
from types import SimpleNamespace
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageOps

from .class_order import CLASS_ORDERS
from .loading import TOY_DIT_MODEL_DIR, TOY_MODEL_DIR, pipeline_dtype, pretrained
from .pipelines import from_pipe, scfg_from_pipe
from .prompt_classes import entities_from_prompt
from .scfg import save_scfg_maps
from .toyworld import make_scene, scene_seeds

__all__ = [
    "AppError",
    "DEFAULT_PROMPT",
    "DEFAULT_SCENE",
    "Demo",
    "MODELS",
    "TOY_SEEDS",
    "build_app",
    "launch",
    "make_events",
    "parse_classes",
    "save_masks",
]

logger = logging.getLogger(__name__)

# Names the model box takes besides hub ids and folders: the two shipped toy models.
MODELS = {"toy": TOY_MODEL_DIR, "toy-dit": TOY_DIT_MODEL_DIR}
# The held-out toy scenes the Segment tab offers, and the one it opens on: two objects on grass, segmented by
# GoCA at 0.82 mIoU (the first 20 scenes range from 0.09 to 0.95).
TOY_SEEDS = scene_seeds("test", 20)
DEFAULT_SCENE = TOY_SEEDS[4]
# The Generate tab's first prompt: a toy-world caption of that scene's content, the surface first (on the UNet toy the
# CLIP encoder privileges that order: docs/protocols.md).
DEFAULT_PROMPT = "grass with a yellow triangle and a purple triangle"
TOY, UPLOAD = "toy scene", "uploaded file"
CFG, SCFG = "CFG", "S-CFG"
# Small pictures (the toy world's 32 px) are shown enlarged to about this side, nearest neighbour.
DISPLAY_SIDE = 256


class AppError(ValueError):
    """A mistake in the page's input, shown to the user as it is."""


def parse_classes(text: str | None, required: bool = True) -> list[str]:
    """The comma-separated classes of a text box, stripped, without empty names. required: raise AppError when none
    is left."""
    classes = [c.strip() for c in (text or "").split(",") if c.strip()]
    if required and not classes:
        raise AppError("Type at least one class, comma-separated (e.g. `grass, red circle`).")
    return classes


def _timestep(value) -> int | float | None:
    """The timestep box's value: empty → None (the family's rule), an integral value → int (SD, SDXL and PixArt take
    integers only), else the float (SD3 and Flux take fractions); the range is the library's to check."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise AppError(f"The timestep must be a number, or empty for the family's, got {value!r}.") from None
    if not math.isfinite(value):
        raise AppError(f"The timestep must be a finite number, got {value}.")
    return int(value) if value.is_integer() else value


def _integer(value, name: str) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise AppError(f"{name} must be a number, got {value!r}.") from None
    if not number.is_integer():
        raise AppError(f"{name} must be an integer, got {value!r}.")
    return int(number)


def _enlarged(image: Image.Image | np.ndarray) -> Image.Image:
    """The picture as RGB, enlarged by an integer factor (nearest neighbour) when it is smaller than DISPLAY_SIDE."""
    image = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    image = image.convert("RGB")
    scale = max(1, DISPLAY_SIDE // max(image.size))
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST) if scale > 1 else image


def read_image(path: str | os.PathLike) -> Image.Image:
    """An uploaded file as an upright PIL image; AppError for a file PIL cannot read."""
    path = os.fspath(path)
    name = os.path.basename(path)
    try:
        with Image.open(path) as opened:
            opened.load()
            return ImageOps.exif_transpose(opened)
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError... for broken files
        why = str(error).replace(path, name)  # the server's upload folder is no business of the page
        raise AppError(
            f"Could not read '{name}' as an image ({type(error).__name__}: {why}). Upload a PNG, JPEG "
            f"or another image file."
        ) from None


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_") or "class"


def save_masks(results: dict, folder: str | None = None) -> list[str]:
    """Each class's mask of each method's result (`result.mask(name)`) as a black-and-white PNG,
    `METHOD_KK_CLASS.png`, and all of them in `masks.zip`; in `folder` (default: a new temporary folder). Returns
    the zip's path, then the PNGs'."""
    if not results:
        raise AppError("Segment an image first: there are no masks to save yet.")
    folder = folder or tempfile.mkdtemp(prefix="goca-masks-")
    paths = []
    for method, result in results.items():
        for k, name in enumerate(result.classes):
            mask = result.mask(name).cpu().numpy().astype(np.uint8) * 255
            path = os.path.join(folder, f"{method}_{k:02d}_{_slug(name)}.png")
            Image.fromarray(mask).save(path)
            paths.append(path)
    archive = os.path.join(folder, "masks.zip")
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
        for path in paths:
            z.write(path, os.path.basename(path))
    return [archive] + paths


def _shares(result) -> str:
    return " · ".join(
        f"{name} judged absent" if share is None else f"{name} {share:.0f}%"
        for name, share in result.pixel_shares().items()
    )


def legend_text(result, method: str | None = None) -> str:
    """The class list the pictures' legends show, as page text: `classes: a, b` and each class's share."""
    head = f"**{method}** — " if method else ""
    return f"classes: {', '.join(result.classes)}\n\n{head}pixels: {_shares(result)}"


def _timestep_value(t) -> float | None:
    if t is None:
        return None
    return float(torch.as_tensor(t).flatten()[0]) if torch.is_tensor(t) or isinstance(t, np.ndarray) else float(t)


def _call_parameters(pipe) -> set[str]:
    """The keyword names the pipeline's call takes, over its class's MRO (the mixins take **kwargs)."""
    names = set()
    for cls in type(pipe).__mro__:
        call = cls.__dict__.get("__call__")
        if call is not None:
            try:
                names |= set(inspect.signature(call).parameters)
            except (TypeError, ValueError):
                pass
    return names


class Demo:
    """The demo's pipeline and work, without Gradio: `load`, `segment`, `generate`. One pipeline for every session;
    calls into it are serialised by a lock (Gradio runs the events of different buttons concurrently).

    model: "toy" (default), "toy-dit", a hub id or a local pipeline folder; dtype: a `loading.DTYPES` name or a
    torch.dtype (float32 on the CPU: `pipeline_dtype`). The pipeline is an S-CFG one where the family allows it
    (`scfg_from_pipe`), else a GoCA one (`from_pipe`); ValueError for a pipeline GoCA does not support."""

    def __init__(self, model: str | None = None, device: str = "cpu", dtype: str | torch.dtype = "float32"):
        self.device = device
        self.dtype = pipeline_dtype(dtype, device)
        self.lock = threading.Lock()
        self.pipe = None
        self.model = None
        self.has_scfg = False
        self.load(model)

    # -- the model -----------------------------------------------------------------------------------------------------
    def load(self, model: str | None = None) -> str:
        """Load `model` and make it the demo's pipeline; the previous one stays if loading fails. Returns the status
        line. ValueError for a pipeline GoCA does not support; the loader's own errors (OSError for a missing
        folder or an id not in the cache offline) pass through."""
        name = (model or "").strip() or "toy"
        path = MODELS.get(name, name)
        raw = pretrained(path, self.dtype).to(self.device)
        raw.set_progress_bar_config(disable=True)
        try:
            pipe, has_scfg = scfg_from_pipe(raw), True
        except ValueError:  # a family whose guidance S-CFG cannot steer (Flux), or one GoCA does not support at all
            pipe, has_scfg = from_pipe(raw), False  # raises ValueError for the latter
        with self.lock:
            self.pipe, self.model, self.has_scfg = pipe, name, has_scfg
        return self.status()

    @property
    def methods(self) -> list[str]:
        """The methods `segment` offers (`pipe.goca_methods`)."""
        return list(self.pipe.goca_methods)

    @property
    def mask_methods(self) -> list[str]:
        """The methods masks during generation take: all but iseg, which needs a forward of its own."""
        return [m for m in self.pipe.goca_methods if m != "iseg"]

    @property
    def guidance_modes(self) -> list[str]:
        return [CFG, SCFG] if self.has_scfg else [CFG]

    def status(self) -> str:
        scfg = "S-CFG available" if self.has_scfg else "no S-CFG for this family"
        return (
            f"**Model:** `{self.model}` — {type(self.pipe).__name__} on {self.device} ({str(self.dtype)[6:]}); "
            f"methods: {', '.join(self.methods)}; {scfg}."
        )

    # -- segmentation --------------------------------------------------------------------------------------------------
    def input_image(self, source: str, scene_seed, upload: str | None) -> Image.Image | np.ndarray:
        """The Segment tab's image: the toy scene of `scene_seed`, or the uploaded file (AppError if none or
        unreadable)."""
        if source == UPLOAD:
            if not upload:
                raise AppError("Upload an image file first, or pick a toy scene.")
            return read_image(upload)
        return make_scene(_integer(scene_seed, "The toy scene")).image

    def segment(
        self,
        source: str,
        scene_seed,
        upload: str | None,
        classes: str,
        methods,
        background: bool = False,
        background_offset: float = 0.0,
        timestep=None,
        seed=0,
        class_encoding: str = "prompt",
        presence: bool = False,
        class_order: str = "given",
    ) -> dict:
        """`pipe.segment` on the chosen image → {method: GoCASegmentation}, in the order of `methods`."""
        classes = parse_classes(classes)
        methods = [methods] if isinstance(methods, str) else list(methods or [])
        if not methods:
            raise AppError("Pick at least one method.")
        image = self.input_image(source, scene_seed, upload)
        offset = 0.0 if background_offset is None else float(background_offset)
        with self.lock:
            out = self.pipe.segment(
                image,
                classes,
                method=methods if len(methods) > 1 else methods[0],
                timestep=_timestep(timestep),
                seed=_integer(seed, "The noise seed"),
                background=bool(background),
                background_offset=offset,
                class_encoding=class_encoding or "prompt",
                presence=bool(presence),
                class_order=class_order or "given",
            )
        return out if isinstance(out, dict) else {methods[0]: out}

    @staticmethod
    def pictures(result) -> dict:
        """The Segment tab's pictures of one result: the blended overlay with its legend, the label map with its
        legend, the per-class heat maps with the colour bar."""
        return {
            "overlay": result.overlay(style="blend"),
            "labels": result.colorize(legend=True),
            "heatmaps": result.heatmaps(columns=2, legend=True),
        }

    # -- generation ----------------------------------------------------------------------------------------------------
    def generate(
        self,
        prompt: str,
        classes: str = "",
        steps=10,
        guidance=4.0,
        seed=0,
        mode: str = CFG,
        method: str = "goca",
        progress: Callable[[float, str], None] | None = None,
    ) -> dict:
        """Generate one image. CFG: the masks at every step (`goca_masks="all"`); S-CFG: its maps at every step
        (`scfg_keep_maps=True`) and the masks of the final image (`segment`). classes: comma-separated, or empty for
        the prompt's noun phrases (`entities_from_prompt`). progress(fraction, text) is called after each step.

        Returns {"image", "classes", "from_prompt", "mode", "frames", "final"}: frames, one per step, each
        {"step", "timestep", "caption", "overlay", "heatmaps", "scfg"} (pictures; "scfg" None under CFG, "overlay" and
        "heatmaps" those of the final image under S-CFG); final: the final image's GoCASegmentation under S-CFG."""
        prompt = (prompt or "").strip()
        if not prompt:
            raise AppError("Type a prompt.")
        steps = _integer(steps, "Steps")
        if steps < 1:
            raise AppError("Steps must be at least 1.")
        guidance, seed = float(guidance), _integer(seed, "The seed")
        names = parse_classes(classes, required=False)
        from_prompt = not names
        if from_prompt:
            names = entities_from_prompt(prompt)  # ValueError when the prompt names nothing
        if mode == SCFG and not self.has_scfg:
            raise AppError("S-CFG is not available for this pipeline (its guidance is not one [uncond, cond] batch).")
        if mode == SCFG and guidance <= 1:
            raise AppError("S-CFG rescales classifier-free guidance: set a guidance scale above 1.")
        report = progress or (lambda fraction, text: None)
        kwargs = {
            "num_inference_steps": steps,
            "guidance_scale": guidance,
            "generator": torch.Generator("cpu").manual_seed(seed),
        }
        with self.lock:
            pipe = self.pipe
            if mode == SCFG:
                # The check goca_classes makes, before the denoising: each class must be in the prompt.
                pipe.goca_adapter.token_index(prompt, names)
                params = _call_parameters(pipe)
                if "callback_on_step_end" in params:

                    def on_step(p, i, t, callback_kwargs):
                        report((i + 1) / steps, f"step {i + 1} of {steps}")
                        return callback_kwargs

                    kwargs["callback_on_step_end"] = on_step
                elif "callback" in params and "callback_steps" in params:  # PixArt's older callback
                    kwargs["callback"] = lambda i, t, latents: report((i + 1) / steps, f"step {i + 1} of {steps}")
                    kwargs["callback_steps"] = 1
                image = pipe(prompt, scfg=True, scfg_keep_maps=True, **kwargs).images[0]
                maps = list(pipe.scfg_maps)
                report(1.0, "segmenting the final image")
                final = pipe.segment(image, names, method=method)
            else:
                if self.has_scfg:
                    kwargs["scfg"] = False

                def on_masks(p, step, t, masks):
                    report((step + 1) / steps, f"step {step + 1} of {steps}")

                image = pipe(
                    prompt, goca_masks="all", goca_classes=names, goca_method=method, goca_callback=on_masks, **kwargs
                ).images[0]
                masks = list(pipe.goca_masks)
                final = None
        image = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
        frames = []
        if mode == SCFG:
            overlay, heatmaps = final.overlay(), final.heatmaps(columns=2, legend=True)
            with tempfile.TemporaryDirectory(prefix="goca-scfg-") as folder:
                for m in maps:
                    path = os.path.join(folder, f"{m.step}.png")
                    save_scfg_maps([m], path)
                    with Image.open(path) as picture:
                        frames.append(self._frame(m.step, m.timestep, steps, overlay, heatmaps, picture.copy()))
        else:
            for m in masks:
                result = m.results[0]
                frames.append(
                    self._frame(
                        m.step,
                        m.timestep,
                        steps,
                        result.overlay(image),
                        result.heatmaps(image, columns=2, legend=True),
                        None,
                    )
                )
        return {
            "image": image,
            "classes": names,
            "from_prompt": from_prompt,
            "mode": mode,
            "frames": frames,
            "final": final,
        }

    @staticmethod
    def _frame(step, timestep, steps, overlay, heatmaps, scfg) -> dict:
        t = _timestep_value(timestep)
        caption = f"step {step + 1} of {steps}" + ("" if t is None else f" · t = {t:g}")
        return {"step": step, "timestep": t, "caption": caption, "overlay": overlay, "heatmaps": heatmaps, "scfg": scfg}


def _message(error: Exception) -> str:
    """The page's text for an error: the library's own message for the mistakes it reports, else a short line (the
    traceback goes to the server's log)."""
    if isinstance(error, (ValueError, RuntimeError, OSError)):
        return str(error)
    logger.error("unexpected error in the demo:\n%s", traceback.format_exc())
    return f"Unexpected {type(error).__name__}: {error} (the server's log has the details)."


def _error_markdown(what: str, error: Exception) -> str:
    return f"⚠️ **{what}:** {_message(error)}"


def make_events(demo: Demo) -> SimpleNamespace:
    """The page's event handlers on `demo`: plain functions of the components' values that return the outputs' new
    values (`gr.update()` for one left as it is). None raises: an error becomes a message in the page (and a
    `gr.Warning` toast). `build_app` wires them; the tests call them directly."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    def warn(text: str):
        gr.Warning(re.sub(r"[*`⚠️]", "", text).strip())
        return text

    # -- Segment tab ---------------------------------------------------------------------------------------------
    def pick_scene(seed):
        try:
            scene = make_scene(_integer(seed, "The toy scene"))
        except Exception as error:
            return gr.update(), gr.update(), gr.update(), warn(_error_markdown("Toy scene", error))
        return TOY, ", ".join(scene.classes), _enlarged(scene.image), ""

    def pick_upload(path):
        if not path:
            return gr.update(), None, ""
        try:
            image = read_image(path)
        except Exception as error:
            return UPLOAD, None, warn(_error_markdown("Upload", error))
        return UPLOAD, _enlarged(image), ""

    def segment_event(*inputs):
        """The Segment tab's inputs, in `Demo.segment`'s order (image source, scene seed, upload, classes, methods,
        background, its offset, timestep, noise seed, class encoding, presence test, class order)."""
        start = time.perf_counter()
        try:
            results = demo.segment(*inputs)
        except Exception as error:
            text = warn(_error_markdown("Could not segment", error))
            return text, "", gr.update(), None, None, None, None, None
        method = next(iter(results))
        pictures = demo.pictures(results[method])
        done = f"Segmented with {', '.join(results)} in {time.perf_counter() - start:.1f} s."
        return (
            done,
            legend_text(results[method], method),
            gr.update(choices=list(results), value=method),
            pictures["overlay"],
            pictures["labels"],
            pictures["heatmaps"],
            results,
            None,
        )

    def show_method(results, method):
        if not results or method not in results:
            return gr.update(), gr.update(), gr.update(), gr.update()
        pictures = demo.pictures(results[method])
        return pictures["overlay"], pictures["labels"], pictures["heatmaps"], legend_text(results[method], method)

    def save_event(results):
        try:
            paths = save_masks(results)
        except Exception as error:
            return None, warn(_error_markdown("Could not save the masks", error))
        return paths, f"Saved {len(paths) - 1} masks: one PNG per class, and all of them in masks.zip."

    # -- Generate tab --------------------------------------------------------------------------------------------
    def generate_event(prompt, classes, steps, guidance, seed, mode, method, progress=gr.Progress()):
        start = time.perf_counter()
        try:
            out = demo.generate(
                prompt,
                classes,
                steps,
                guidance,
                seed,
                mode,
                method,
                progress=lambda fraction, text: progress(fraction, desc=text),
            )
        except Exception as error:
            text = warn(_error_markdown("Could not generate", error))
            return (text, "", None, gr.update(), "", None, None, gr.update(value=None, visible=mode == SCFG), None)
        frames = out["frames"]
        last = frames[-1] if frames else None
        origin = " (from the prompt)" if out["from_prompt"] else ""
        legend = f"classes{origin}: {', '.join(out['classes'])}"
        if out["final"] is not None:
            legend += "\n\nmasks of the final image — pixels: " + _shares(out["final"])
        done = f"Generated with {out['mode']} in {time.perf_counter() - start:.1f} s; {len(frames)} steps."
        slider = gr.update(
            minimum=1, maximum=max(2, len(frames)), value=len(frames), step=1, interactive=len(frames) > 1
        )
        return (
            done,
            legend,
            _enlarged(out["image"]),
            slider,
            last["caption"] if last else "",
            last["overlay"] if last else None,
            last["heatmaps"] if last else None,
            gr.update(value=last["scfg"] if last else None, visible=out["mode"] == SCFG),
            frames,
        )

    def show_step(frames, step):  # step: 1 … len(frames), as the slider and the captions count
        if not frames:
            return gr.update(), gr.update(), gr.update(), gr.update()
        frame = frames[min(max(1, int(step or 1)), len(frames)) - 1]
        return frame["caption"], frame["overlay"], frame["heatmaps"], frame["scfg"]

    # -- the model box -------------------------------------------------------------------------------------------------
    def load_event(model):
        try:
            status = demo.load(model)
        except Exception as error:
            text = warn(_error_markdown(f"Could not load '{(model or '').strip()}'", error))
            return text + "\n\n" + demo.status(), gr.update(), gr.update(), gr.update()
        return (
            status,
            gr.update(choices=demo.methods, value=["goca"]),
            gr.update(choices=demo.mask_methods, value="goca"),
            gr.update(choices=demo.guidance_modes, value=CFG),
        )

    return SimpleNamespace(
        pick_scene=pick_scene,
        pick_upload=pick_upload,
        segment=segment_event,
        show_method=show_method,
        save=save_event,
        generate=generate_event,
        show_step=show_step,
        load=load_event,
    )


def build_app(demo: Demo):
    """The Gradio page (a `gr.Blocks`) on `demo`'s pipeline; `launch` serves it."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    events = make_events(demo)
    first = make_scene(DEFAULT_SCENE)
    image_kwargs = {"format": "png", "interactive": False}
    with gr.Blocks(title="GoCA demo", analytics_enabled=False) as blocks:
        gr.Markdown(
            "## GoCA: masks from the attention of a diffusion pipeline\n"
            "Segment an image into the classes you name, or generate one and watch its masks step by step."
        )
        with gr.Accordion("Model", open=False):
            with gr.Row():
                model_box = gr.Textbox(
                    value=demo.model,
                    label="Model: toy, toy-dit, a hub id or a local pipeline folder",
                    elem_id="model-name",
                    scale=4,
                )
                load_button = gr.Button("Load", elem_id="model-load", scale=1)
            model_status = gr.Markdown(demo.status(), elem_id="model-status")
        with gr.Tabs():
            with gr.Tab("Segment", id="segment"):
                with gr.Row():
                    with gr.Column(scale=1, min_width=280):
                        source = gr.Radio([TOY, UPLOAD], value=TOY, label="Image", elem_id="seg-source")
                        scene = gr.Dropdown(
                            choices=TOY_SEEDS,
                            value=DEFAULT_SCENE,
                            label="Held-out toy scene (seed)",
                            elem_id="seg-scene",
                        )
                        upload = gr.File(label="…or an image file", type="filepath", elem_id="seg-upload")
                        preview = gr.Image(
                            value=_enlarged(first.image),
                            label="Input",
                            height=200,
                            elem_id="seg-preview",
                            **image_kwargs,
                        )
                        classes = gr.Textbox(
                            value=", ".join(first.classes), label="Classes (comma-separated)", elem_id="seg-classes"
                        )
                        methods = gr.CheckboxGroup(
                            choices=demo.methods, value=["goca"], label="Method(s)", elem_id="seg-methods"
                        )
                        with gr.Row():
                            background = gr.Checkbox(False, label="Background channel", elem_id="seg-background")
                            offset = gr.Number(0.0, label="background_offset", elem_id="seg-offset")
                        class_encoding = gr.Radio(
                            ["prompt", "separate"],
                            value="prompt",
                            label="Class encoding",
                            info="separate: each class encoded on its own, so that the order "
                            "of the classes no longer matters",
                            elem_id="seg-encoding",
                        )
                        class_order = gr.Radio(
                            list(CLASS_ORDERS),
                            value="given",
                            label="Class order",
                            info="stuff-first: stuff (sky, grass, road, wall, ...) named first, the rest in several "
                            "orders whose maps are averaged (a forward each), so that the order typed no longer "
                            "matters",
                            elem_id="seg-order",
                        )
                        presence = gr.Checkbox(
                            False,
                            label="Presence test",
                            info="ask the denoiser which named classes are in the image; the others take no "
                            "pixel (14 more forwards per class and round)",
                            elem_id="seg-presence",
                        )
                        with gr.Row():
                            timestep = gr.Textbox(
                                "", label="Timestep", placeholder="the family's", elem_id="seg-timestep"
                            )
                            noise_seed = gr.Number(0, precision=0, label="Noise seed", elem_id="seg-seed")
                        segment_button = gr.Button("Segment", variant="primary", elem_id="seg-run")
                    with gr.Column(scale=3):
                        seg_message = gr.Markdown("", elem_id="seg-message")
                        shown = gr.Radio(choices=["goca"], value="goca", label="Method shown", elem_id="seg-shown")
                        seg_legend = gr.Markdown("", elem_id="seg-legend")
                        with gr.Row():
                            overlay = gr.Image(label="Overlay", elem_id="seg-overlay", **image_kwargs)
                            labelmap = gr.Image(label="Label map", elem_id="seg-labels", **image_kwargs)
                            heatmaps = gr.Image(label="Heat maps", elem_id="seg-heatmaps", **image_kwargs)
                        save_button = gr.Button("Save the masks as PNGs", elem_id="seg-save")
                        files = gr.File(
                            label="Masks (one PNG per class, and a zip)",
                            file_count="multiple",
                            interactive=False,
                            elem_id="seg-files",
                        )
                results = gr.State(None)
            with gr.Tab("Generate", id="generate"):
                with gr.Row():
                    with gr.Column(scale=1, min_width=280):
                        prompt = gr.Textbox(value=DEFAULT_PROMPT, label="Prompt", elem_id="gen-prompt")
                        gen_classes = gr.Textbox(
                            "",
                            label="Classes (comma-separated; empty: the prompt's noun phrases)",
                            elem_id="gen-classes",
                        )
                        steps = gr.Slider(1, 50, value=10, step=1, label="Steps", elem_id="gen-steps")
                        guidance = gr.Slider(1, 15, value=4.0, step=0.5, label="Guidance scale", elem_id="gen-guidance")
                        gen_seed = gr.Number(0, precision=0, label="Seed", elem_id="gen-seed")
                        mode = gr.Radio(demo.guidance_modes, value=CFG, label="Guidance", elem_id="gen-mode")
                        gen_method = gr.Dropdown(
                            choices=demo.mask_methods, value="goca", label="Mask method", elem_id="gen-method"
                        )
                        generate_button = gr.Button("Generate", variant="primary", elem_id="gen-run")
                    with gr.Column(scale=3):
                        gen_message = gr.Markdown("", elem_id="gen-message")
                        gen_legend = gr.Markdown("", elem_id="gen-legend")
                        with gr.Row():
                            image = gr.Image(label="Generated image", elem_id="gen-image", scale=1, **image_kwargs)
                            with gr.Column(scale=2):
                                step = gr.Slider(
                                    1, 2, value=1, step=1, label="Step", interactive=False, elem_id="gen-step"
                                )
                                step_caption = gr.Markdown("", elem_id="gen-step-caption")
                        with gr.Row():
                            step_overlay = gr.Image(
                                label="Masks at this step (S-CFG: of the final image)",
                                elem_id="gen-overlay",
                                **image_kwargs,
                            )
                            step_heatmaps = gr.Image(label="Heat maps", elem_id="gen-heatmaps", **image_kwargs)
                        step_scfg = gr.Image(
                            label="S-CFG regions · foreground · rates at this step",
                            visible=False,
                            elem_id="gen-scfg",
                            **image_kwargs,
                        )
                frames = gr.State(None)

        scene.change(events.pick_scene, [scene], [source, classes, preview, seg_message])
        upload.upload(events.pick_upload, [upload], [source, preview, seg_message])
        segment_button.click(
            events.segment,
            [
                source,
                scene,
                upload,
                classes,
                methods,
                background,
                offset,
                timestep,
                noise_seed,
                class_encoding,
                presence,
                class_order,
            ],
            [seg_message, seg_legend, shown, overlay, labelmap, heatmaps, results, files],
        )
        shown.change(events.show_method, [results, shown], [overlay, labelmap, heatmaps, seg_legend])
        save_button.click(events.save, [results], [files, seg_message])
        generate_button.click(
            events.generate,
            [prompt, gen_classes, steps, guidance, gen_seed, mode, gen_method],
            [gen_message, gen_legend, image, step, step_caption, step_overlay, step_heatmaps, step_scfg, frames],
        )
        step.change(events.show_step, [frames, step], [step_caption, step_overlay, step_heatmaps, step_scfg])
        load_button.click(events.load, [model_box], [model_status, methods, gen_method, mode])
    return blocks


def launch(
    model: str | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    port: int = 7860,
    host: str = "127.0.0.1",
    block: bool = True,
):
    """Load the model, build the page and serve it on http://host:port, offline (no analytics, no share link).
    block: serve until interrupted; else return the running `gr.Blocks` (its `close()` stops it). Prints the time
    from the call to a served page."""
    start = time.perf_counter()
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    import diffusers
    import gradio  # noqa: F401  (timed with the rest; fails here, before the model loads, without the extra)
    import transformers

    diffusers.utils.logging.disable_progress_bar()  # the server's log: no loading bars
    transformers.utils.logging.disable_progress_bar()

    demo = Demo(model, device, dtype)
    blocks = build_app(demo)
    blocks.queue(default_concurrency_limit=1)
    blocks.launch(
        server_name=host,
        server_port=port,
        share=False,
        inbrowser=False,
        prevent_thread_lock=True,
        show_error=False,
        ssr_mode=False,
        quiet=True,
    )
    print(
        f"goca app: {demo.model} ({type(demo.pipe).__name__}) served on http://{host}:{port} "
        f"after {time.perf_counter() - start:.1f} s",
        flush=True,
    )
    if not block:
        return blocks
    try:
        blocks.block_thread()
    finally:
        blocks.close()
    return blocks
