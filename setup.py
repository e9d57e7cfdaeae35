"""piip_llava: train, chat with and evaluate PIIP-LLaVA (parameter-inverted image pyramid + LLaVA)."""
from setuptools import find_packages, setup

setup(
    name="piip_llava",
    version="0.1.0",
    description="PIIP-LLaVA: N-branch parameter-inverted image pyramid vision towers for Hugging Face LLMs",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["piip_llava", "piip_llava.*"]),
    package_data={"piip_llava": ["models/presets/*.json", "serve/examples/*", "data/assets/*"]},
    install_requires=[
        "torch>=2.4,<2.15",
        "torchvision>=0.19",
        "transformers>=5.17,<6",
        "accelerate>=1.0",
        "peft>=0.17",
        "timm>=1.0.15",
        "safetensors>=0.4",
        "sentencepiece>=0.2",
        "protobuf>=4",
        "einops>=0.8",
        "datasets>=3",
        "pillow>=10",
        "numpy>=1.26",
        "pyyaml>=6",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "openpyxl>=3.1",
        "pandas>=2.0",
    ],
    extras_require={
        "train": ["deepspeed>=0.16", "tensorboard>=2.15"],
        "serve": ["gradio>=5,<7", "gradio_client>=1.5", "fastapi>=0.110", "uvicorn>=0.29"],
        "flash": ["flash-attn>=2.6"],
        # lmms-eval 0.7 pins wandb==0.25 (protobuf<7), which sentencepiece>=0.2.3 cannot load its model proto
        # with, and imports filelock._api (gone in filelock 4)
        "lmms": ["lmms-eval>=0.7,<0.8", "sentencepiece>=0.2,<0.2.3", "filelock>=3.16,<4"],
        "dev": ["pytest>=8", "openai>=1.40", "playwright>=1.45", "httpx>=0.27"],
    },
)
