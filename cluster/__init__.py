"""LinearSR cluster."""
