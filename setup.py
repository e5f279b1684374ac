from setuptools import find_packages, setup

setup(
    name="attnsr",
    version="0.1.0",
    description="Fused Triton kernels for the attention layers of image-restoration networks",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    # the kernels/ folder is installed as attnsr.kernels (attnsr/kernels links to it); benchmarks/ and tests/
    # stay in the source tree: the wheel holds nothing but attnsr at the top of site-packages
    packages=find_packages(include=["attnsr", "attnsr.*"]),
    # the floors tested: torch 2.11 + triton 3.6 (the GPU image's versions; torch 2.11 needs Python 3.10)
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.11",
        "triton>=3.6; platform_system == 'Linux'",
        "numpy",
        "pillow",
        "scikit-image",  # the bundled photographs the CLI trains on by default (no download)
        "tqdm",
    ],
    entry_points={"console_scripts": ["attnsr=attnsr.cli:main"]},
    extras_require={
        "test": ["pytest", "setuptools>=70.1"],  # setuptools: the packaging test builds the wheel offline
        "bench": ["pytest", "pytest-benchmark", "matplotlib"],
        # published SR architectures and their checkpoints (SwinIR, HAT, RCAN, ...): `attnsr upscale`
        # and the tests on real models; spandrel needs torchvision, hence a torch build that has one
        "models": ["spandrel>=0.4"],
    },
)
