"""GoCA beside what diffusers users combine with a pipeline: other pipeline classes on the same components
(img2img, inpainting, ControlNet, the SDXL refiner, Flux Kontext, PAG), IP-Adapter, textual inversion, fused
projections, `torch.compile`, quantized layers and sequential CPU offload: the images stay the pipeline's own and
the masks are read where that feature puts the attention."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import diffusers_goca as goca
from diffusers_goca.testing import (
    PROMPTS,
    IMAGE_48x32,
    derived,
    generate,
    install_ip_adapter,
    make_tiny_flux,
    make_tiny_pixart,
    make_tiny_sd,
    make_tiny_sd3,
    make_tiny_sdxl,
    with_ip_adapter,
)


@pytest.mark.slow
def test_ip_adapter_loaded_after_enable_goca():
    """What `load_ip_adapter` does, after `enable_goca`: the IP-Adapter processors are wrapped on the next call, the
    images are the IP-Adapter pipeline's, and `disable_goca` leaves its processors."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    embeds = dict(ip_adapter_image_embeds=[torch.randn(2, 1, 16, generator=torch.Generator().manual_seed(1))])
    reference = generate(with_ip_adapter(), **embeds)
    pipe = goca.from_pipe(make_tiny_sd())
    install_ip_adapter(pipe.unet)
    assert np.array_equal(generate(pipe, goca_masks="last", **embeds), reference)
    pipe.disable_goca()
    assert sum(isinstance(p, IPAdapterAttnProcessor2_0) for p in pipe.unet.attn_processors.values()) > 0


DERIVED = {
    "sd-img2img": (derived(make_tiny_sd, "StableDiffusionImg2ImgPipeline"), dict(image=IMAGE_48x32, strength=0.9)),
    "sd-inpaint": (
        derived(make_tiny_sd, "StableDiffusionInpaintPipeline"),
        dict(image=IMAGE_48x32, mask_image=IMAGE_48x32.convert("L")),
    ),
    "sd-controlnet": (derived(make_tiny_sd, "StableDiffusionControlNetPipeline"), dict(image=IMAGE_48x32)),
    "sd3-img2img": (derived(make_tiny_sd3, "StableDiffusion3Img2ImgPipeline"), dict(image=IMAGE_48x32, strength=0.9)),
    "flux-img2img": (derived(make_tiny_flux, "FluxImg2ImgPipeline"), dict(image=IMAGE_48x32, strength=0.9)),
    "flux-inpaint": (
        derived(make_tiny_flux, "FluxInpaintPipeline"),
        dict(image=IMAGE_48x32, mask_image=IMAGE_48x32.convert("L"), strength=0.9),
    ),
    # One image embedding each for the unconditional and the conditional half.
    "sd-ip-adapter": (
        with_ip_adapter,
        dict(ip_adapter_image_embeds=[torch.randn(2, 1, 16, generator=torch.Generator().manual_seed(1))]),
    ),
    # Its masks reach the processors through cross_attention_kwargs, which pass on only the parameters they name.
    "sd-ip-adapter-masks": (
        with_ip_adapter,
        dict(
            ip_adapter_image_embeds=[torch.randn(2, 1, 16, generator=torch.Generator().manual_seed(1))],
            cross_attention_kwargs={"ip_adapter_masks": [(torch.arange(48) < 24).float().expand(1, 1, 32, 48)]},
        ),
    ),
}


@pytest.mark.parametrize(  # SD's (a UNet at 32×48) take over about 10 s each on 2 CPU cores
    "name", [pytest.param(n, marks=pytest.mark.slow) if n.startswith("sd-") else n for n in DERIVED]
)
def test_derived_pipelines_keep_their_images(name):
    """`from_pipe` on other pipeline classes with a supported denoiser: the images stay bit-identical while masks are
    computed, and the masks have the generated image's size."""
    make, kw = DERIVED[name]
    pipe = make()
    reference = generate(pipe, **kw)
    gp = goca.from_pipe(pipe)
    assert type(gp).__name__ == "GoCA" + type(pipe).__name__
    assert np.array_equal(generate(gp, goca_masks="last", **kw), reference)
    (masks,) = gp.goca_masks
    assert [r.labels.shape for r in masks.results] == [reference.shape[1:3]] * 2


@pytest.mark.parametrize("class_name", ["StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline"])
def test_sdxl_pipeline_classes_segment_alike(tiny_sdxl, class_name):
    """`segment` builds SDXL's micro-conditioning itself (the pipeline classes' `_get_add_time_ids` differ): every
    SDXL pipeline class on the same components gives the same segmentation."""
    base, other = (
        goca.from_pipe(tiny_sdxl, enable=False),
        goca.from_pipe(derived(lambda: tiny_sdxl, class_name)(), enable=False),
    )
    # Not enabled: each `segment` enables GoCA for its forward and leaves the shared UNet as it was.
    want, got = base.segment(IMAGE_48x32, ["cat", "dog"]), other.segment(IMAGE_48x32, ["cat", "dog"])
    assert torch.equal(got.scores, want.scores)
    assert not any(goca.processors.is_goca_processor(p) for p in tiny_sdxl.unet.attn_processors.values())


def test_sdxl_refiner_with_only_the_second_text_encoder():
    """The refiner layout: no first tokenizer or text encoder (the second one's tokens sit at the same positions),
    time ids with the aesthetic score. Its encoder reads `prompt` (a prompt_2 goes unread), while SDXL's two encoders
    lay `prompt` and `prompt_2` at the same positions, so a differing prompt_2 is refused there."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        norm_num_groups=16,
        block_out_channels=(16, 32, 32),
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2,
        up_block_types=("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",),
        transformer_layers_per_block=(1, 2, 2),
        attention_head_dim=(2, 4, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=5 * 8 + 32,
        cross_attention_dim=32,
    ).eval()
    sdxl = make_tiny_sdxl()
    refiner = StableDiffusionXLImg2ImgPipeline(
        vae=sdxl.vae,
        unet=unet,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=sdxl.text_encoder_2,
        tokenizer_2=sdxl.tokenizer_2,
        scheduler=sdxl.scheduler,
        requires_aesthetics_score=True,
    )
    refiner.set_progress_bar_config(disable=True)
    kw = dict(image=IMAGE_48x32, strength=0.5)
    reference = generate(refiner, **kw)
    gp = goca.from_pipe(refiner)
    assert np.array_equal(generate(gp, goca_masks="last", **kw), reference)
    assert gp.goca_masks[0].results[1].classes == ["cat", "dog", "sand"]
    assert np.array_equal(generate(gp, goca_masks="last", prompt_2="a bird", **kw), reference)
    assert gp.goca_masks[0].results[1].classes == ["cat", "dog", "sand"]
    assert gp.segment(IMAGE_48x32, ["cat", "dog"]).labels.shape == (32, 48)
    with pytest.raises(ValueError, match="prompt_2 that differs"):
        generate(goca.from_pipe(sdxl), goca_masks="last", prompt_2="a bird")


def test_flux_kontext_masks_are_the_generated_images():
    """Flux Kontext appends a reference image's tokens to the generated image's, in one softmax. With masks on, the
    images stay the pipeline's own, and the masks cover the generated image (32×48, from a 16×24 reference)."""
    pipe = derived(make_tiny_flux, "FluxKontextPipeline")()
    reference = Image.fromarray((np.random.RandomState(5).rand(16, 24, 3) * 255).astype(np.uint8))

    def generate_from_reference(p, **kw):  # as `generate`, but Kontext's first parameter is the image
        return p(
            image=reference,
            prompt=PROMPTS,
            num_inference_steps=3,
            height=32,
            width=48,
            output_type="np",
            max_sequence_length=32,
            _auto_resize=False,
            max_area=32 * 48,
            generator=torch.Generator().manual_seed(0),
            **kw,
        ).images

    plain = generate_from_reference(pipe)
    gp = goca.from_pipe(pipe)
    assert np.array_equal(generate_from_reference(gp, goca_masks="last"), plain)
    result = gp.goca_masks[0].results[1]
    assert result.classes == ["cat", "dog", "sand"] and result.labels.shape == (32, 48)
    assert gp.segment(IMAGE_48x32, ["cat"], resolution=32).labels.shape == (32, 48)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd", "sd3"])
@pytest.mark.parametrize("guidance", [5.0, 1.0], ids=["cfg+pag", "pag-only"])
def test_pag_pipelines_segment_their_conditional_rows(family, guidance):
    """PAG batches [uncond, cond, perturbed] (or [cond, perturbed] without CFG) and swaps its own processors in for
    the call: the images stay the PAG pipeline's own, and the first step's masks are those of the same pipeline
    without PAG (the perturbed rows' maps would differ). The perturbed layer is not the pipeline class's default, so
    `from_pipe` must carry `pag_applied_layers` over."""
    make, class_name, layers = (
        (make_tiny_sd, "StableDiffusionPAGPipeline", ["down_blocks.1"])
        if family == "sd"
        else (make_tiny_sd3, "StableDiffusion3PAGPipeline", ["blocks.0"])
    )
    base = make()
    pipe = derived(lambda: base, class_name, pag_applied_layers=layers)()
    kw = dict(guidance_scale=guidance, pag_scale=3.0)
    reference = generate(pipe, **kw)
    gp = goca.from_pipe(pipe)
    assert gp.pag_applied_layers == layers
    assert np.array_equal(generate(gp, goca_masks=[0], **kw), reference)
    assert np.array_equal(generate(pipe, **kw), reference)  # PAG put our processors back after the call
    plain = goca.from_pipe(base)
    generate(plain, goca_masks=[0], guidance_scale=guidance)
    for got, want in zip(gp.goca_masks[0].results, plain.goca_masks[0].results):
        assert torch.allclose(got.scores, want.scores, atol=0.02)  # the batch sizes differ: float noise only


@pytest.mark.slow
@pytest.mark.parametrize(
    "make", [make_tiny_sd, make_tiny_pixart, make_tiny_sd3, make_tiny_flux], ids=["sd", "pixart", "sd3", "flux"]
)
def test_fused_projections_are_read(make):
    """After `fuse_qkv_projections()` the processors project through to_qkv / to_kv / to_added_qkv: the images stay
    identical, and the masks are those of the unfused pipeline."""
    plain = goca.from_pipe(make())
    generate(plain, goca_masks=[2])
    pipe = make()
    (pipe.unet if hasattr(pipe, "unet") else pipe.transformer).fuse_qkv_projections()
    reference = generate(pipe)
    gp = goca.from_pipe(pipe)
    assert np.array_equal(generate(gp, goca_masks=[2]), reference)
    for got, want in zip(gp.goca_masks[0].results, plain.goca_masks[0].results):
        assert torch.allclose(got.scores, want.scores, atol=1e-4)


@pytest.mark.slow
def test_capture_runs_outside_a_compiled_denoiser(monkeypatch):
    """With the denoiser compiled in place, the capture's hooks and bookkeeping run eagerly (not traced into the
    graph), and the images stay those of the compiled pipeline; a `torch.compile` wrapper is refused clearly."""
    from diffusers_goca.capture import Capture

    pipe = make_tiny_sd3()
    pipe.transformer.compile(backend="eager")
    try:
        reference = generate(pipe)
        gp = goca.from_pipe(pipe)
        traced, record = [], Capture.record

        def recording(self, *args, **kwargs):
            traced.append(torch.compiler.is_compiling())
            return record(self, *args, **kwargs)

        monkeypatch.setattr(Capture, "record", recording)
        assert np.array_equal(generate(gp, goca_masks=True), reference)
        assert traced and not any(traced)
        gp.disable_goca()
        pipe.transformer = torch.compile(pipe.transformer, backend="eager")  # a wrapper: the layers are hidden
        with pytest.raises(ValueError, match=r"compile it in place"):
            goca.from_pipe(pipe)
    finally:
        torch._dynamo.reset()


@pytest.mark.slow
def test_multi_vector_textual_inversion_tokens_are_read_where_the_encoder_puts_them():
    """The pipeline spells a multi-vector textual-inversion token out as one token per vector before tokenizing, which
    moves every later token: the class positions follow, the token as a class reads all its vectors, and the default
    classes keep the name the prompt uses."""
    pipe = make_tiny_sd()
    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    pipe.load_textual_inversion(
        {"<cat-toy>": torch.randn(3, width, generator=torch.Generator().manual_seed(0))}, token="<cat-toy>"
    )
    prompt = "a <cat-toy> on grass"
    reference = generate(pipe)
    gp = goca.from_pipe(pipe)
    index = gp._goca.adapter.token_index(prompt, ["<cat-toy>", "grass"])
    ids = pipe.tokenizer(pipe.maybe_convert_prompt(prompt, pipe.tokenizer))["input_ids"]
    assert [pipe.tokenizer.convert_ids_to_tokens([ids[p] for p in ps]) for ps in index.class_tokens] == [
        ["<cat-toy>", "<cat-toy>_1", "<cat-toy>_2"],
        ["grass</w>"],
    ]
    assert np.array_equal(generate(gp, goca_masks="last"), reference)
    gp([prompt], num_inference_steps=2, height=32, width=32, goca_masks="last", output_type="np")
    assert gp.goca_masks[0].results[0].classes == ["<cat-toy>", "grass"]
    assert gp.segment(IMAGE_48x32, ["<cat-toy>", "grass"]).labels.shape == (32, 48)


class Int8Linear(torch.nn.Linear):
    """Weight-only int8 quantization as torchao, bitsandbytes or GGUF keep it: the weight is not a float tensor, and
    the forward dequantizes it (per-row scale). No bias, so that the weight read off the forward is exact (a bias
    added and taken away again would round it by an ulp, which the unclamped head weights of a tiny random model
    can amplify to 1e-3 in the scores)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__(linear.in_features, linear.out_features, bias=False)
        scale = linear.weight.detach().abs().amax(1, keepdim=True) / 127
        del self.weight
        self.register_buffer("weight", (linear.weight.detach() / scale).round().to(torch.int8))
        self.register_buffer("scale", scale)

    def dequantized(self) -> torch.nn.Linear:
        plain = torch.nn.Linear(self.in_features, self.out_features, bias=False)
        plain.weight.data = self.weight.float() * self.scale
        return plain

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype) * self.scale, self.bias)


@pytest.mark.parametrize("make", [make_tiny_sd, make_tiny_flux], ids=["sd", "flux"])
def test_quantized_output_projections_give_the_dequantized_models_scores(make):
    """The head weights read the weight that an attention output's projection applies. Quantized, it is no float
    tensor (it was read as raw integers, or failed); it is read off the layer's own forward, so the scores equal those
    of the same model with the dequantized weights as plain layers."""
    quantized, plain = make(), make()
    denoiser = goca.adapter_for(quantized).denoiser
    names = [
        n
        for n, m in denoiser.named_modules()
        if type(m) is torch.nn.Linear and (n.endswith("to_out.0") or n.endswith("proj_out"))
    ]
    assert len(names) >= 3
    for name in names:
        parent, attr = name.rsplit(".", 1) if "." in name else ("", name)
        q = Int8Linear(denoiser.get_submodule(name))
        setattr(denoiser.get_submodule(parent), attr, q)
        other = goca.adapter_for(plain).denoiser
        setattr(other.get_submodule(parent), attr, q.dequantized())
    image = Image.fromarray((np.random.RandomState(3).rand(32, 32, 3) * 255).astype(np.uint8))
    a = goca.from_pipe(quantized).segment(image, ["cat", "grass"], resolution=32)
    b = goca.from_pipe(plain).segment(image, ["cat", "grass"], resolution=32)
    assert torch.equal(a.scores, b.scores)


@pytest.mark.parametrize("make", [make_tiny_sd, make_tiny_flux], ids=["sd", "flux"])
def test_sequential_cpu_offload_gives_the_resident_models_scores(make):
    """Under sequential offload (accelerate's `cpu_offload`, what `enable_sequential_cpu_offload` puts on each
    model) the parameters wait on the meta device outside their forward: the output projections' weights and biases
    are read off their forward. The images stay the same and the scores are the resident model's, up to the
    rounding of the bias taken off that forward again (which the tiny random SD amplifies to about 1e-3)."""
    from accelerate import cpu_offload

    image = Image.fromarray((np.random.RandomState(3).rand(32, 32, 3) * 255).astype(np.uint8))
    resident = goca.from_pipe(make()).segment(image, ["cat", "grass"], resolution=32)
    pipe = make()
    reference = generate(pipe)
    for name in ("unet", "transformer", "text_encoder", "text_encoder_2", "vae"):
        if getattr(pipe, name, None) is not None:
            cpu_offload(getattr(pipe, name), execution_device=torch.device("cpu"))
    gp = goca.from_pipe(pipe)
    assert gp._goca.adapter.denoiser.get_submodule(gp._goca.adapter.cross_layers[0]).to_q.weight.device.type == "meta"
    offloaded = gp.segment(image, ["cat", "grass"], resolution=32)
    assert torch.allclose(offloaded.scores, resident.scores, atol=5e-3)
    assert np.array_equal(generate(gp, goca_masks="last"), reference)
