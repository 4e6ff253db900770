"""Installs dual-path: the `dual_path` library, `data_prep` and `experiments`.

TensorFlow comes from an extra so that each machine gets the right build:
`.[cpu]` (tensorflow-cpu), `.[gpu]` (tensorflow[and-cuda]) or `.[tpu]`.
"""
import setuptools

setuptools.setup(
    name="dual-path",
    version="0.1.0",
    description=(
        "Dual-Path Convolutional Image-Text Embeddings with Instance Loss "
        "(Zheng et al., 2020) in TensorFlow / Keras 3."
    ),
    python_requires=">=3.10",
    packages=setuptools.find_packages(include=["dual_path*", "data_prep*", "experiments*"]),
    package_data={"experiments": ["configs/*.flags"]},
    install_requires=[
        "keras>=3",
        "numpy",
        "gensim",
        "absl-py",
        "tensorflow-datasets",
        "tensorboard",
        "pillow",
    ],
    extras_require={
        "cpu": ["tensorflow-cpu>=2.16"],
        "gpu": ["tensorflow[and-cuda]>=2.16"],
        "tpu": ["tensorflow-tpu>=2.16"],
        "test": ["pytest"],
    },
    entry_points={
        "console_scripts": [
            "dual-path-generate-synthetic=data_prep.generate_synthetic:run",
            "dual-path-build-shards=data_prep.build_shards:run",
            "dual-path-demo=experiments.demo:run",
            "dual-path-train=experiments.train:run",
            "dual-path-export=experiments.export:run",
            "dual-path-search=experiments.search:run",
            "dual-path-evaluate=experiments.evaluate:run",
        ],
    },
)
