"""GPU attention backends, imported lazily by `linearsr.model.attention` and the network:

- `fused`: the project's Triton kernels for global ReLU linear attention (`fused.py`, kernels in
  `fused_triton.py`).
- `fla_backend`: the same attention assembled from flash-linear-attention's causal kernels.
- `gla`: `BidirectionalGLA`, a gated linear-attention mixer scanned in both directions
  (pure-torch reference on any device, fla's `chunk_gla` on CUDA).
- their benchmark is `linearsr bench gpu` (linearsr.bench.gpu, `make bench-gpu`), see docs/gpu.md.

Nothing here is imported by `import linearsr.model`: triton and fla are optional (`.[gpu]`)."""
