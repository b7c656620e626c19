from setuptools import find_packages, setup

setup(
    name="lorakernels",
    version="0.1.0",
    description=("Fused Triton LoRA kernels and a hand-written Phi-3 for fast, lean LoRA "
                 "fine-tuning"),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["lorakernels", "lorakernels.*", "model", "model.*",
                                    "training"]),
    # The embedded default's tokenizer and the LongRoPE presets' factors.
    package_data={"model": ["assets/*.json", "assets/phi3-tiny/*.json"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.5",  # scaled_dot_product_attention(enable_gqa=...)
        # Triton ships wheels for Linux only; elsewhere the eager backend runs.
        "triton>=3.2; sys_platform == 'linux'",
        "safetensors",
        "tokenizers",
        "huggingface_hub",
        "tqdm",
        "pyyaml",
        "jinja2",  # checkpoints' chat templates (torch already depends on it)
    ],
    extras_require={
        "tensorboard": ["tensorboard"],  # --report-to tensorboard
        "datasets": ["datasets"],  # --data as parquet/CSV/arrow files or a Hugging Face dataset id
        "plot": ["matplotlib"],  # scripts/plot_metrics.py
        # Reference implementations, used only by the tests to check parity and interchange;
        # and the optional extras above, so that the tests cover them.
        "test": ["pytest", "transformers", "peft", "loralib==0.1.2", "tensorboard", "matplotlib",
                 "datasets"],
    },
)
