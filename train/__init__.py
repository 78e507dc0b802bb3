"""Training, evaluation and prediction: composes ``loaders`` with ``torch2flax`` models."""
