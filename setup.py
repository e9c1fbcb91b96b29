"""mtl_jax: one multi-modal transformer trained on hundreds to thousands of classification tasks."""
from setuptools import find_packages, setup

# Versions seen to resolve together (pip check clean) on Python 3.11.
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "chex==0.1.92",
    "clu==0.0.12",
    "ml_collections==1.1.0",
    "tensorflow-datasets==4.9.10",
    "array_record==0.8.6",
    "transformers==5.24.0",
    "tokenizers==0.23.3",
    "safetensors==0.8.0",
    "numpy>=2.0,<3",
    "pillow==13.0.0",  # Product photos -> embeddings (image_encoder.py).
    "matplotlib==3.11.2",  # Plots of the HTML report.
    # clu's metric writers and periodic actions import TensorFlow and tensorboard.
    "tensorflow-cpu==2.21.0",
    "tensorboard==2.21.0",
]

setup(
    name="mtl_jax",
    version="0.1.0",
    description=__doc__,
    # `configs` too, so that a config's `from configs import common` works from any directory.
    packages=find_packages(include=["mtl_jax", "mtl_jax.*", "configs"]),
    package_data={"mtl_jax": ["data/*.txt"]},
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "test": [
            "pytest==9.0.3",
            "pytest-timeout==2.4.0",
            # The reference implementation for the parity tests (a CPU wheel where available).
            "torch==2.13.0",
            # Executes the notebooks in colabs/.
            "nbclient==0.11.0",
            "nbformat==5.11.1",
            "ipykernel==7.4.0",
        ],
    },
)
