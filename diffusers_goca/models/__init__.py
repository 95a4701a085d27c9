"""One adapter per model family: which attention modules are cross / self, the reference and refinement layers, the grids."""

from .base import Adapter, LayerInfo, adapter_for
from .flux import FluxAdapter
from .pixart import PixArtAdapter
from .sd3 import SD3Adapter
from .unet import UNetAdapter

__all__ = ["Adapter", "FluxAdapter", "LayerInfo", "adapter_for", "PixArtAdapter", "SD3Adapter", "UNetAdapter"]
