"""The toy world: synthetic scenes with pixel ground truth, and the tiny text-to-image model trained on them.

`load_toy_pipeline()` returns the shipped UNet model as a stock `StableDiffusionPipeline`,
`load_toy_pipeline(TOY_DIT_MODEL_DIR)` the transformer one as a `PixArtSigmaPipeline`; `make_scene(seed)` draws a scene.
"""

from .model import TOY_DIT_MODEL_DIR, TOY_MODEL_DIR, load_toy_pipeline
from .scenes import BACKGROUNDS, CLASS_NAMES, COLOURS, SHAPES, Scene, make_scene, scene_seeds

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "SHAPES",
    "CLASS_NAMES",
    "Scene",
    "make_scene",
    "scene_seeds",
    "TOY_MODEL_DIR",
    "TOY_DIT_MODEL_DIR",
    "load_toy_pipeline",
]
