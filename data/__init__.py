"""LinearSR data."""
