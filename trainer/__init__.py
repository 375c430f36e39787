"""The trainer: model builder, datasets, training loop and broker worker."""
