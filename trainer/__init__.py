"""LinearSR trainer."""
