"""Engine settings (everything that is not the model's own config)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field

from baton.engine.pooling import PoolerConfig
from baton.engine.quantization import QUANTIZATION_METHODS
from baton.engine.sampling_params import DEFAULT_MAX_LOGPROBS

DEFAULT_CUDA_GRAPH_BATCH_SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256]
SCHEDULING_POLICIES = ("fcfs", "priority")
MAX_SPECULATIVE_TOKENS = 16
# vLLM's --dtype names: "auto" is the checkpoint's own; "half" and "float" as torch names them
DTYPE_NAMES = {"auto": None, "half": "float16", "float": "float32", "float16": "float16", "bfloat16": "bfloat16",
               "float32": "float32"}
# vLLM's --kv-cache-dtype names: "auto" is the model's dtype; "fp8" is E4M3 (as vLLM takes it on CUDA)
KV_CACHE_DTYPE_NAMES = {"auto": None, "fp8": "float8_e4m3fn", "fp8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding by n-gram prompt lookup (``engine/speculative.py``): up to
    ``num_speculative_tokens`` proposed a step, found after the longest n-gram of
    ``prompt_lookup_min`` to ``prompt_lookup_max`` tokens that the text ends with and has
    written before. No step proposes while ``disable_by_batch_size`` or more sequences run
    (vLLM's name): a large batch already fills the GPU, and drafts there cost more than
    they save."""

    num_speculative_tokens: int
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 1
    disable_by_batch_size: int | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.num_speculative_tokens <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"num_speculative_tokens must be in [1, {MAX_SPECULATIVE_TOKENS}], got {self.num_speculative_tokens}")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError("prompt_lookup_min and prompt_lookup_max must satisfy 1 <= min <= max, got "
                             f"{self.prompt_lookup_min} and {self.prompt_lookup_max}")
        if self.disable_by_batch_size is not None and self.disable_by_batch_size < 1:
            raise ValueError(f"disable_by_batch_size must be at least 1, got {self.disable_by_batch_size}")

    def drafts_at(self, num_running: int) -> bool:
        """Whether a step of ``num_running`` running sequences proposes drafts."""
        return self.disable_by_batch_size is None or num_running < self.disable_by_batch_size

    @classmethod
    def from_json(cls, text: str) -> SpeculativeConfig:
        """From vLLM's ``--speculative-config`` JSON: ``{"method": "ngram", "num_speculative_tokens":
        k, "prompt_lookup_max": n, "prompt_lookup_min": m, "disable_by_batch_size": b}`` (all
        but the first optional)."""
        try:
            fields = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"--speculative-config is not JSON: {exc}") from None
        if not isinstance(fields, dict) or fields.pop("method", None) != "ngram":
            raise ValueError('--speculative-config must be an object with "method": "ngram" (the only method here)')
        known = {"num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min", "disable_by_batch_size"}
        if set(fields) - known or "num_speculative_tokens" not in fields:
            raise ValueError(f"--speculative-config takes num_speculative_tokens and optionally prompt_lookup_max / "
                             f"prompt_lookup_min / disable_by_batch_size, got {sorted(fields)}")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in fields.values()):
            raise ValueError("--speculative-config's values must be integers")
        return cls(**fields)

    def to_json(self) -> str:
        """What ``from_json`` reads back."""
        fields = {name: value for name, value in dataclasses.asdict(self).items() if value is not None}
        return json.dumps({"method": "ngram", **fields})


def speculative_config_arg(text: str) -> SpeculativeConfig:
    """``--speculative-config``'s argparse type: the parse error as the command line's."""
    try:
        return SpeculativeConfig.from_json(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_lora_modules(specs: list[str], served_model_name: str | None = None) -> dict[str, str]:
    """``--lora-modules`` as ``{name: path}``, each spec as vLLM takes it: ``name=path``, or JSON
    ``{"name": ..., "path": ..., "base_model_name": ...}``. A base model other than
    ``served_model_name`` (where given) is refused: one base model is served. ValueError for a
    malformed spec or a repeated name."""
    modules: dict[str, str] = {}
    for spec in specs:
        if spec.lstrip().startswith("{"):
            name, path = _lora_module_json(spec, served_model_name)
        else:
            name, sep, path = spec.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"--lora-modules takes name=path or a JSON object, got {spec!r}")
        if name in modules:
            raise ValueError(f"--lora-modules names adapter {name!r} twice")
        modules[name] = path
    return modules


def _lora_module_json(spec: str, served_model_name: str | None) -> tuple[str, str]:
    try:
        module = json.loads(spec)
    except ValueError as exc:
        raise ValueError(f"--lora-modules {spec!r} is not JSON: {exc}") from None
    if not isinstance(module, dict) or set(module) - {"name", "path", "base_model_name"}:
        raise ValueError(f'--lora-modules {spec!r}: a JSON module takes "name", "path" and "base_model_name"')
    name, path, base = module.get("name"), module.get("path"), module.get("base_model_name")
    if not isinstance(name, str) or not name or not isinstance(path, str) or not path:
        raise ValueError(f'--lora-modules {spec!r}: "name" and "path" must be non-empty strings')
    if base is not None and served_model_name is not None and base != served_model_name:
        raise ValueError(f"--lora-modules: adapter {name!r} names base model {base!r}, but the model served is "
                         f"{served_model_name!r}")
    return name, path


@dataclass
class EngineConfig:
    """How the engine lays out its KV cache and batches work.

    The KV pool holds ``num_blocks`` blocks when set; else, with ``gpu_memory_utilization``
    (CUDA), as many as fit in that share of the device's memory beside the weights and the
    activations of the largest step (``model_runner``); else as many as fit in
    ``kv_cache_memory_bytes``. On CUDA, decode steps replay CUDA graphs captured
    for ``cuda_graph_batch_sizes`` (up to the first size that holds ``max_num_seqs``)
    unless ``enforce_eager``. With ``async_scheduling`` the host schedules and
    launches step n+1 before it reads step n's tokens back (``engine_core``).
    ``scheduling_policy``: "fcfs" (arrival order) or "priority" (each request's
    ``priority``, lower first, then arrival; see ``scheduler``). ``speculative``: propose
    tokens by n-gram lookup and verify them in one step (``engine/speculative.py``); steps
    that may propose schedule synchronously, since a proposal needs the tokens read back
    (async scheduling goes on above ``disable_by_batch_size``). ``pooler``: how an
    embedding request pools its prompt's hidden states (``engine/pooling.py``); None: as the
    checkpoint's sentence-transformers modules say, else LAST, normalized. ``lora_modules``:
    LoRA adapters (name -> PEFT directory) loaded at start, all resident, at most ``max_loras`` of
    rank at most ``max_lora_rank`` (vLLM's names; ``engine/lora_loader.py``), those loaded later
    (``EngineCore.load_lora``) counted; a request names one by its name.
    ``max_logprobs``: the most log-probs a request may ask for each sampled or prompt token (vLLM's;
    -1: the whole vocabulary). ``seed`` (vLLM's): seeds the generator that draws a sampling seed for
    each request without one of its own, so a fresh engine handed the same requests in the same
    order samples the same tokens; None: those seeds come from the OS's randomness.
    """

    block_size: int = 16
    num_blocks: int | None = None
    kv_cache_memory_bytes: int = 256 * 1024 * 1024
    max_num_batched_tokens: int = 2048     # token budget of one step (chunked prefill)
    max_num_seqs: int = 128                # running sequences
    max_model_len: int | None = None       # default: the model's max_position_embeddings
    enable_prefix_caching: bool = True
    device: str = "cpu"
    dtype: str | None = None               # default or "auto": the checkpoint's dtype (DTYPE_NAMES)
    kv_cache_dtype: str = "auto"           # the KV cache's (KV_CACHE_DTYPE_NAMES): "auto" is the model's dtype
    quantization: str | None = None       # quantize an unquantized checkpoint's linear layers as it loads ("fp8")
    cuda_graph_batch_sizes: list[int] = field(default_factory=lambda: list(DEFAULT_CUDA_GRAPH_BATCH_SIZES))
    enforce_eager: bool = False            # never capture CUDA graphs
    async_scheduling: bool | None = None   # overlap host work with the device's step (None: on CUDA only)
    scheduling_policy: str = "fcfs"
    speculative: SpeculativeConfig | None = None
    pooler: PoolerConfig | None = None
    lora_modules: dict[str, str] = field(default_factory=dict)
    max_loras: int = 1
    max_lora_rank: int = 16
    gpu_memory_utilization: float | None = None   # CUDA: size the KV pool to this share of the device (vLLM's)
    max_logprobs: int = DEFAULT_MAX_LOGPROBS      # the most log-probs a request may ask for a token (-1: the vocabulary)
    seed: int | None = None                       # seeds unseeded requests' sampling seeds (None: OS randomness)
    tokenizer: str | None = None                  # the tokenizer's directory or hub id, where not the model's
    revision: str | None = None                   # a hub model's branch, tag or commit (None: its default branch)
    download_dir: str | None = None               # where a hub model is downloaded (None: the hub's cache)

    def __post_init__(self) -> None:
        if self.dtype is not None:
            if self.dtype not in DTYPE_NAMES:
                raise ValueError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {self.dtype!r}")
            self.dtype = DTYPE_NAMES[self.dtype]
        if self.quantization not in (None, *QUANTIZATION_METHODS):
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_METHODS)}, got {self.quantization!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPE_NAMES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPE_NAMES)}, got {self.kv_cache_dtype!r}")
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise ValueError(f"scheduling_policy must be one of {', '.join(SCHEDULING_POLICIES)}, got {self.scheduling_policy!r}")
        if self.speculative is not None and self.speculative.disable_by_batch_size is None and self.async_scheduling:
            raise ValueError("speculative decoding schedules synchronously below disable_by_batch_size: async_scheduling "
                             "needs one set")
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be positive")
        if self.max_loras < 1 or self.max_lora_rank < 1:
            raise ValueError(f"max_loras and max_lora_rank must be positive, got {self.max_loras} and {self.max_lora_rank}")
        if self.seed is not None and self.seed < 0:
            raise ValueError(f"seed must be non-negative, got {self.seed}")
        if self.max_logprobs < -1:
            raise ValueError(f"max_logprobs must be -1 (the vocabulary) or at least 0, got {self.max_logprobs}")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.gpu_memory_utilization is not None and not self.device.startswith("cuda"):
            raise ValueError(f"gpu_memory_utilization sizes the KV cache on a CUDA device, not on {self.device!r}")
        if len(self.lora_modules) > self.max_loras:
            raise ValueError(f"{len(self.lora_modules)} LoRA adapters given ({', '.join(self.lora_modules)}) "
                             f"but max_loras={self.max_loras}")
        if not self.cuda_graph_batch_sizes or any(
            not isinstance(b, int) or b < 1 for b in self.cuda_graph_batch_sizes
        ):
            raise ValueError(f"cuda_graph_batch_sizes must be positive ints, got {self.cuda_graph_batch_sizes}")


def _one_device(text: str) -> int:
    """vLLM's parallel sizes: only 1 here (argparse's error otherwise, saying how Baton scales)."""
    if text.strip() != "1":
        raise argparse.ArgumentTypeError(f"{text}: a Baton worker runs its model on one device; serve more with more "
                                         "workers (baton up --prefill N --decode M)")
    return 1


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be at least 1")
    return value


def add_engine_switches(p: argparse.ArgumentParser) -> None:
    """vLLM's engine switches, on a worker and on ``baton up`` (which hands them to every worker, but
    for ``--revision`` and ``--download-dir``: it downloads a hub model once and hands the workers its
    directory); and some that vLLM command lines carry which change nothing here, so that those
    command lines run."""
    p.add_argument("--enable-chunked-prefill", action="store_true",
                   help="accepted so that vLLM command lines run: prompts are always computed in chunks of "
                        "--max-num-batched-tokens here")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="accepted so that vLLM command lines run: no code from a checkpoint runs here (the model "
                        "architectures are Baton's own)")
    p.add_argument("--kv-cache-dtype", choices=list(KV_CACHE_DTYPE_NAMES), default="auto",
                   help="the KV cache's dtype (vLLM's): auto, the model's; fp8 (E4M3) or fp8_e5m2 hold each key and "
                        "value in a byte, unscaled: twice the blocks in the same memory, half the bytes read a step and "
                        "sent a transfer (every worker of a deployment must take the same)")
    p.add_argument("--quantization", "-q", choices=list(QUANTIZATION_METHODS), default=None,
                   help="quantize the linear layers of an unquantized checkpoint as it loads (vLLM's): fp8, E4M3 weights "
                        "scaled per output channel and inputs scaled per token as they come (W8A8; half the weight "
                        "bytes a decode step reads). A checkpoint quantized already (a config.json quantization_config: "
                        "fp8, or compressed-tensors FP8 with dynamic per-token inputs) runs so without it (give every worker of a "
                        "deployment the same)")
    for flag, short in (("--tensor-parallel-size", "-tp"), ("--pipeline-parallel-size", "-pp")):
        p.add_argument(flag, short, type=_one_device, default=1, metavar="1",
                       help="accepted so that vLLM command lines run: 1 only, a worker's model on one device")
    p.add_argument("--enforce-eager", action="store_true", help="CUDA: never capture CUDA graphs (vLLM's)")
    p.add_argument("--cuda-graph-sizes", type=int, nargs="+", default=None, metavar="N",
                   help="CUDA: the decode batch sizes captured as CUDA graphs, each step padded to the next (vLLM's; "
                        "default: the powers of two from 1 to 256, up to the first that holds --max-num-seqs)")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="keep computed blocks to reuse for prompts that share a prefix (vLLM's; with "
                        "--no-enable-prefix-caching every prompt is computed in full and nothing is indexed)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed the sampling seeds of requests that give none, so a fresh worker handed the same requests "
                        "in the same order samples the same tokens (vLLM's; default: none, drawn from the OS)")
    p.add_argument("--revision", default=None,
                   help="a hub model's (and tokenizer's) branch, tag or commit (vLLM's; default: its default branch)")
    p.add_argument("--download-dir", default=None,
                   help="where a hub model is downloaded (vLLM's; default: the Hugging Face cache)")
    p.add_argument("--disable-log-stats", action="store_true",
                   help="a worker logs no line every 10 s of throughput, requests, KV cache use and prefix cache hits "
                        "(vLLM's)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="the most tokens a request's prompt and output may hold together (vLLM's; default: the "
                        "model's max_position_embeddings)")
    p.add_argument("--max-num-seqs", type=int, default=EngineConfig.max_num_seqs,
                   help="the most sequences a step runs (vLLM's)")
    p.add_argument("--max-num-batched-tokens", type=int, default=EngineConfig.max_num_batched_tokens,
                   help="the most tokens a step computes; longer prompts are computed in chunks (vLLM's)")
    p.add_argument("--stream-interval", type=_positive_int, default=1, metavar="N",
                   help="a decode worker streams a request's tokens N at a time, its first and its last at once "
                        "(vLLM's and SGLang's: a larger N streams less smoothly but serves more tokens a second; "
                        "default 1: each token as it comes; a prefill worker sends one token)")


def add_lora_switches(p: argparse.ArgumentParser, modules_help: str) -> None:
    """vLLM's LoRA switches, on a worker and on ``baton up`` (which hands them to every worker)."""
    p.add_argument("--enable-lora", action="store_true",
                   help="accepted so that vLLM command lines run: LoRA is always on here (vLLM's)")
    p.add_argument("--lora-modules", nargs="+", action="extend", default=[], metavar="NAME=PATH", help=modules_help)
    p.add_argument("--max-loras", type=int, default=1,
                   help="the most LoRA adapters loaded at once: by --lora-modules, and at runtime while serving")
    p.add_argument("--max-lora-rank", type=int, default=16, help="the largest LoRA rank loaded")


def engine_switches(args: argparse.Namespace) -> list[str]:
    """``add_engine_switches``' flags as a worker's command line takes them (those not at their defaults)."""
    out = ["--enforce-eager"] if args.enforce_eager else []
    if args.disable_log_stats:
        out.append("--disable-log-stats")
    if args.seed is not None:
        out += ["--seed", str(args.seed)]
    if args.kv_cache_dtype != "auto":
        out += ["--kv-cache-dtype", args.kv_cache_dtype]
    if args.quantization is not None:
        out += ["--quantization", args.quantization]
    if args.cuda_graph_sizes:
        out += ["--cuda-graph-sizes", *map(str, args.cuda_graph_sizes)]
    for flag, value, default in (("--max-model-len", args.max_model_len, None),
                                 ("--stream-interval", args.stream_interval, 1),
                                 ("--max-num-seqs", args.max_num_seqs, EngineConfig.max_num_seqs),
                                 ("--max-num-batched-tokens", args.max_num_batched_tokens,
                                  EngineConfig.max_num_batched_tokens)):
        if value != default:
            out += [flag, str(value)]
    return out if args.enable_prefix_caching else [*out, "--no-enable-prefix-caching"]
