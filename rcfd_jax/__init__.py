"""rcfd_jax: RL fine-tuning of language models with reward calibration from demonstration."""

__version__ = "0.1.0"
