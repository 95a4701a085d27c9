"""The public configs of the supported denoisers (layer counts, widths, heads), for the benchmarks and the tests that
build them with random weights (full width at reduced depth) or on the meta device (full depth)."""

SD15 = dict(
    sample_size=64,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768,
    attention_head_dim=8,
)
SDXL = dict(
    sample_size=128,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    cross_attention_dim=2048,
)
PIXART_SIGMA = dict(
    sample_size=128,
    num_layers=28,
    patch_size=2,
    attention_head_dim=72,
    num_attention_heads=16,
    caption_channels=4096,
    in_channels=4,
    out_channels=8,
    cross_attention_dim=1152,
    attention_bias=True,
    activation_fn="gelu-approximate",
    num_embeds_ada_norm=1000,
    norm_type="ada_norm_single",
    norm_elementwise_affine=False,
    norm_eps=1e-6,
    interpolation_scale=2,
    use_additional_conditions=False,
)
SD3_MEDIUM = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    out_channels=16,
    pos_embed_max_size=192,
)
FLUX_DEV = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)

UNETS = {"sd15": SD15, "sdxl": SDXL}
# name → (diffusers class, the depth key reduced for CPU runs, config)
TRANSFORMERS = {
    "pixart-sigma": ("PixArtTransformer2DModel", "num_layers", PIXART_SIGMA),
    "sd3-medium": ("SD3Transformer2DModel", "num_layers", SD3_MEDIUM),
    "flux-dev": ("FluxTransformer2DModel", "num_single_layers", FLUX_DEV),
}
TEXT_TOKENS = {"sd15": 77, "sdxl": 77, "pixart-sigma": 300, "sd3-medium": 333, "flux-dev": 512}
