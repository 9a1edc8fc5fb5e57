"""blipfast: BLIP with fused Triton kernels, DeepSpeed training and a DALI pipeline."""
from setuptools import find_packages, setup

PACKAGES = find_packages(include=["blipfast", "blipfast.*"])

setup(
    name="blipfast",
    version="0.1.0",
    description="The fastest trustworthy BLIP: fused Triton kernels, DeepSpeed ZeRO, DALI",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_data={"blipfast": ["assets/*"]},
    include_package_data=True,
    install_requires=[
        # torch is not pinned to a build: the CPU wheel (2.13) and the GPU image's (2.11) both work.
        "torch>=2.4",
        "transformers>=4.40",
        "tokenizers",
        "safetensors",
        "pyyaml",
        "numpy",
        "tqdm",
        "pillow",
        # The fused kernels are the point of blipfast; on CPU they run under TRITON_INTERPRET=1.
        "triton>=3.2; platform_system == 'Linux'",
    ],
    extras_require={
        "train": ["deepspeed==0.19.8", "tensorboard"],
        "dali": ["nvidia-dali-cuda130==2.4.0"],
        "eval": ["pycocoevalcap"],
        "bench": ["pytest-benchmark"],
        "test": ["pytest", "pytest-benchmark", "pytest-timeout", "scipy", "import-linter"],
    },
    entry_points={
        "console_scripts": [
            "blipfast-capfilt=blipfast.capfilt:main",
            "blipfast-train=blipfast.train.cli:main",
            "blipfast-export=blipfast.train.export:main",
            "blipfast-eval-retrieval=blipfast.eval.retrieval:main",
            "blipfast-eval-caption=blipfast.eval.caption:main",
            "blipfast-eval-vqa=blipfast.eval.vqa:main",
            "blipfast-predict=blipfast.predict:main",
        ]
    },
)
