"""Input pipeline: TFRecord files as torch Datasets, augmentation, collation for JAX devices.

Knows nothing of Flax models; everything here produces NumPy arrays or jax.Arrays.
"""
