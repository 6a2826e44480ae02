"""Engine settings (everything that is not the model's own config)."""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_CUDA_GRAPH_BATCH_SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256]
SCHEDULING_POLICIES = ("fcfs", "priority")


@dataclass
class EngineConfig:
    """How the engine lays out its KV cache and batches work.

    The KV pool holds ``num_blocks`` blocks when set, otherwise as many as fit in
    ``kv_cache_memory_bytes``. On CUDA, decode steps replay CUDA graphs captured
    for ``cuda_graph_batch_sizes`` (up to the first size that holds ``max_num_seqs``)
    unless ``enforce_eager``. With ``async_scheduling`` the host schedules and
    launches step n+1 before it reads step n's tokens back (``engine_core``).
    ``scheduling_policy``: "fcfs" (arrival order) or "priority" (each request's
    ``priority``, lower first, then arrival; see ``scheduler``).
    """

    block_size: int = 16
    num_blocks: int | None = None
    kv_cache_memory_bytes: int = 256 * 1024 * 1024
    max_num_batched_tokens: int = 2048     # token budget of one step (chunked prefill)
    max_num_seqs: int = 128                # running sequences
    max_model_len: int | None = None       # default: the model's max_position_embeddings
    enable_prefix_caching: bool = True
    device: str = "cpu"
    dtype: str | None = None               # default: the checkpoint's dtype ("float32", "bfloat16", "float16")
    cuda_graph_batch_sizes: list[int] = field(default_factory=lambda: list(DEFAULT_CUDA_GRAPH_BATCH_SIZES))
    enforce_eager: bool = False            # never capture CUDA graphs
    async_scheduling: bool | None = None   # overlap host work with the device's step (None: on CUDA only)
    scheduling_policy: str = "fcfs"

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise ValueError(f"scheduling_policy must be one of {', '.join(SCHEDULING_POLICIES)}, got {self.scheduling_policy!r}")
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be positive")
        if not self.cuda_graph_batch_sizes or any(
            not isinstance(b, int) or b < 1 for b in self.cuda_graph_batch_sizes
        ):
            raise ValueError(f"cuda_graph_batch_sizes must be positive ints, got {self.cuda_graph_batch_sizes}")
