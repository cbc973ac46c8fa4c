"""What a stage may ask Ray for, checked where it is configured (rollout actors, train workers, Serve replicas):
custom resources by name, and GPUs that cover an engine's tensor parallelism. Imports nothing heavy, so every
config class can use it."""

from __future__ import annotations


def check_resources(name: str, resources: dict[str, float]) -> None:
    """Custom resources by name: CPU and GPU have settings of their own, and amounts are >= 0."""
    for key, amount in resources.items():
        if key in ("CPU", "GPU", "memory"):
            raise ValueError(f"{name}.{key}: CPU, GPU and memory have settings of their own; {name} is for "
                             f"custom resources such as teacher_gpu or train_gpu")
        if amount < 0:
            raise ValueError(f"{name}.{key} must be >= 0, got {amount}")


def check_tensor_parallel(tensor_parallel_size: int, num_gpus: float) -> None:
    """One engine spans `tensor_parallel_size` GPUs, so the replica holding it needs at least as many."""
    if tensor_parallel_size < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
    if tensor_parallel_size > 1 and num_gpus < tensor_parallel_size:
        raise ValueError(f"tensor_parallel_size {tensor_parallel_size} needs num_gpus >= {tensor_parallel_size} "
                         f"per replica, got {num_gpus:g}")
