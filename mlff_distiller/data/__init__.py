"""Data: batch keys, datasets and loaders. Models and losses read batches through ``keys``."""
