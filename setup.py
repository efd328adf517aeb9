"""epsdist: EPS (Lee et al., CVPR 2021) weakly supervised segmentation at cluster scale.

Two import packages are installed:
  * ``epsdist``          -- the framework (config, data, models, trainer, ...), from ``epsdist/``
  * ``epsdist_kernels``  -- the Triton kernels with their references and benchmarks, from the
                            top-level ``kernels/`` folder. It is installed under this name because
                            a PyPI distribution already owns the import name ``kernels``.
"""
from setuptools import setup

setup(
    name="epsdist",
    version="0.1.0",
    description="EPS weakly supervised semantic segmentation with DeepSpeed and fused Triton kernels",
    python_requires=">=3.10",
    packages=["epsdist", "epsdist.data", "epsdist.gpucheck", "epsdist.models", "epsdist.seg",
              "epsdist_kernels"],
    package_dir={"epsdist": "epsdist", "epsdist_kernels": "kernels"},
    install_requires=[
        # The code runs on the stacks GPU images carry (torch 2.11 + triton 3.6 seen);
        # the Makefile installs the versions we verified (constraints.txt).
        "torch>=2.4",
        "torchvision>=0.19",
        "triton>=3.0; platform_system == 'Linux'",
        "numpy",
        "pyyaml",
        "tqdm",
        "webdataset",
        "tensorboard",
        "deepspeed",
        "pycocotools",
        "opencv-python-headless",
    ],
    # moto's S3 server and the aws client: tests/test_remote.py reads s3:// shards on loopback
    extras_require={"dev": ["pytest", "moto[server]", "awscli"]},
)
