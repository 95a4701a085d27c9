from setuptools import find_packages, setup

setup(
    name="diffusers-goca",
    version="0.1.0",
    description="Training-free open-vocabulary segmentation from the attention of diffusers pipelines (GoCA), "
    "and semantic-aware classifier-free guidance that uses it.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["diffusers_goca", "diffusers_goca.*"]),
    package_data={"diffusers_goca.toyworld": ["model/**/*", "model/*", "dit_model/**/*", "dit_model/*", "classifier/*"]},
    include_package_data=True,
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.1",
        "diffusers>=0.35,<0.43",
        "transformers>=4.46",
        "accelerate>=0.30",
        "numpy",
        "pillow",
        "open-clip-torch>=2.20",
        "safetensors",
        "tqdm",
    ],
    extras_require={
        "test": ["pytest>=7", "sentencepiece", "torchmetrics", "scipy"],
        "bench": ["clean-fid", "torchmetrics", "matplotlib", "scipy"],
    },
    entry_points={"console_scripts": ["goca=diffusers_goca.cli:main"]},
)
