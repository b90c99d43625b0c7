"""LinearSR ckpt_analysis."""
