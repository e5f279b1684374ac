from setuptools import find_packages, setup

setup(
    name="attnsr",
    version="0.1.0",
    description="Fused Triton kernels for the attention layers of image-restoration networks",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["kernels", "kernels.*", "attnsr", "attnsr.*", "benchmarks"]),
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.4",
        "triton>=3.4; platform_system == 'Linux'",
        "numpy",
        "pillow",
        "scikit-image",  # the bundled photographs the CLI trains on by default (no download)
        "tqdm",
    ],
    entry_points={"console_scripts": ["attnsr=attnsr.cli:main"]},
    extras_require={
        "test": ["pytest"],
        "bench": ["pytest", "pytest-benchmark", "matplotlib"],
    },
)
