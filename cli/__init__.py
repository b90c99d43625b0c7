"""LinearSR: a linear-attention flow-matching model for image super-resolution, and the
distributed system that trains it (Ray + DeepSpeed), picks its knee checkpoint and
fine-tunes one expert per log-SNR interval."""

__version__ = "0.1.0"
