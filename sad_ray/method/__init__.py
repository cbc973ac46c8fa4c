"""The SAD method as pure torch/numpy functions: segmentation, masks, losses, curriculum (no Ray, no vLLM)."""
