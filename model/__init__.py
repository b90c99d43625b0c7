"""LinearSR model."""
