"""The layer tables of an `Adapter`: its cross, self and joint layers, the layer sets the methods read, and the token
grid of each layer."""

from __future__ import annotations


class LayerTables:
    """A base of `Adapter`: what its `layers` (name → `LayerInfo`), `reference_layer`, `refinement_layers` and
    `map_factor` say about the denoiser's attention layers and their token grids."""

    @property
    def cross_layers(self) -> list[str]:
        return [n for n, i in self.layers.items() if i.role in ("cross", "joint")]

    @property
    def scfg_layers(self) -> list[str]:
        """The cross layers S-CFG's own segmenter reads: by default those of the refinement blocks."""
        blocks = {self.layers[n].block for n in self.refinement_layers}
        return [n for n in self.cross_layers if self.layers[n].block in blocks]

    @property
    def joint(self) -> bool:
        """Whether the image attends to the text in joint attention (SD3, Flux) rather than in cross-attention."""
        return any(i.role == "joint" for i in self.layers.values())

    @property
    def self_layers(self) -> list[str]:
        return [n for n, i in self.layers.items() if i.role in ("self", "joint")]

    LAYER_SETS = ("all", "subset", "manual")

    def layer_set(self, name) -> tuple[list[str], list[str]]:
        """(cross layers of the maps, self layers of the refinement) of a `GoCAOptions.layers` value: "all",
        "subset" (the official vanilla's), "manual" (SD 1.5's hand-picked maps), or a sequence of cross layer names
        (refined as "all")."""
        if not isinstance(name, str):
            names = list(name)
            unknown = [n for n in names if n not in self.cross_layers]
            if not names or unknown:
                raise ValueError(
                    f"layers: {unknown or 'an empty list'} are not cross-attention layers of this "
                    f"{self.family} model; it has {self.cross_layers}"
                )
            return names, self.refinement_layers
        if name not in self.LAYER_SETS:
            raise ValueError(f"layers must be one of {self.LAYER_SETS}, got {name!r}")
        if name == "manual":
            if self.manual_layers is None:
                raise ValueError(
                    f"layers='manual' (SD 1.5's hand-picked layers) is not defined for {self.family} "
                    f"models; use 'all' or 'subset'"
                )
            return self.manual_layers, self.refinement_layers
        if name == "subset" and self.vanilla_layers is not None:
            return self.vanilla_layers, self.vanilla_refinement_layers or self.refinement_layers
        return self.cross_layers, self.refinement_layers

    def self_of(self, cross_layer: str) -> str:
        """The self-attention layer of the same transformer block as `cross_layer`."""
        block = self.layers[cross_layer].block
        if self.layers[cross_layer].role == "joint":
            return cross_layer
        for name, info in self.layers.items():
            if info.role == "self" and info.block == block:
                return name
        raise KeyError(f"no self-attention layer in the block of {cross_layer}")

    def on_reference_grid(self, layer: str) -> bool:
        """Whether `layer`'s token grid is the reference layer's (then its layer-weight call reads every query)."""
        return self.layers[layer].factor == self.layers[self.reference_layer].factor

    def layer_hw(self, layer: str, latent_hw: tuple[int, int]) -> tuple[int, int]:
        """Token grid (h, w) of `layer` for a latent of size `latent_hw` (each side divided by the layer's factor,
        rounded up)."""
        f = self.layers[layer].factor
        return -(-latent_hw[0] // f), -(-latent_hw[1] // f)

    def grid(self, layer: str, n_tokens: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
        """`layer_hw`, checked against the tokens the layer received: from the latent shape, never from sqrt(N)."""
        h, w = self.layer_hw(layer, latent_hw)
        if h * w != n_tokens:
            raise RuntimeError(
                f"{layer}: {n_tokens} tokens do not match a {h}×{w} grid (latent {latent_hw}, "
                f"factor {self.layers[layer].factor})"
            )
        return h, w

    def image_hw(self, latent_hw: tuple[int, int]) -> tuple[int, int]:
        """Pixel size of a generated image whose denoiser input has spatial size `latent_hw`."""
        return tuple(s * self.pipe.vae_scale_factor for s in latent_hw)

    def map_grid(self, latent_hw: tuple[int, int]) -> tuple[int, int]:
        f = self.map_factor
        return -(-latent_hw[0] // f), -(-latent_hw[1] // f)
