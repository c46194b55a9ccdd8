"""Student models. They know nothing of the trainer: ``forward(batch) -> {"energy", "forces"}``."""
