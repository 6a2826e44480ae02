"""What structured output costs: the host's time to build each constrained row's token mask
(xgrammar) and apply it, beside generation throughput with and without a grammar.

    python bench/bench_structured.py                           # demo checkpoint, CPU
    python bench/bench_structured.py --model DIR --device cuda --dtype bfloat16 --batches 1 64
    python bench/bench_structured.py --mask-vocab 128000        # masks only, at a large vocabulary

1. Masks: ``B`` matchers of a JSON schema take random paths through it (each step, every row
   takes a random token its mask allows); per step, the time to fill the ``B`` bitmasks and mask
   ``[B, vocab]`` float32 logits on the device, and the filling alone. In the engine the filling
   runs on the host while the device computes the step's forward pass. ``--mask-vocab`` measures
   this at a large model's vocabulary size, with a tokenizer trained on the spot.
2. Generation: the same prompts, greedy, free and under the schema. Output tokens/s of each
   (the lengths differ: a constrained answer ends where its JSON closes).
"""

from __future__ import annotations

import argparse
import json
import random
import sysconfig
import tempfile
import time
from pathlib import Path

import torch
import xgrammar as xgr
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from baton.engine.llm import LLM
from baton.engine.sampling_params import SamplingParams, StructuredOutputParams
from baton.engine.structured_output import StructuredOutputs, mask_logits
from baton.services.launcher import default_model

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["merry", "sad", "noble", "base"]}, "maxItems": 4},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
SPEC = StructuredOutputParams(json=json.dumps(SCHEMA), disable_any_whitespace=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_masks(
    structured: StructuredOutputs, vocab: int, batch: int, steps: int, device: str, rng: random.Random
) -> tuple[float, float]:
    """Median seconds per step to fill and apply ``batch`` rows' masks (``mask_logits``), and of
    those the filling alone (xgrammar's batch matcher, on the host)."""
    grammars = [structured.grammar(SPEC) for _ in range(batch)]
    logits = torch.zeros(batch, vocab, device=device)
    filler = xgr.BatchGrammarMatcher()
    times, fills = [], []
    for _ in range(steps):
        bitmask = xgr.allocate_token_bitmask(batch, vocab)
        start = time.perf_counter()
        filler.batch_fill_next_token_bitmask([g.matcher for g in grammars], bitmask)
        fills.append(time.perf_counter() - start)
        logits.zero_()
        sync(device)
        start = time.perf_counter()
        mask_logits(logits, grammars)
        sync(device)
        times.append(time.perf_counter() - start)
        allowed = (logits > float("-inf")).cpu()
        for i, g in enumerate(grammars):
            g.accept(rng.choice(allowed[i].nonzero().flatten().tolist()))
            if g.is_terminated():   # took EOS where the JSON was whole: start another
                grammars[i] = structured.grammar(SPEC)
    return sorted(times)[len(times) // 2], sorted(fills)[len(fills) // 2]


def bench_generate(llm: LLM, prompts: list[str], params: SamplingParams, device: str) -> tuple[float, int]:
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, structured_output=params.structured_output), use_tqdm=False)  # warm-up
    sync(device)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    sync(device)
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return tokens / (time.perf_counter() - start), tokens


def synthetic_tokenizer(vocab: int, directory: Path) -> int:
    """Train a byte-level BPE of up to ``vocab`` tokens on this Python's standard-library sources
    into ``directory``: a stand-in for a large model's tokenizer, whose size sets the masks' cost.
    Returns its vocabulary size."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for path in root.rglob("*.py"):
        if "site-packages" not in path.parts:
            try:
                texts.append(path.read_text())
            except (UnicodeDecodeError, OSError):
                continue
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(directory)
    return tok.get_vocab_size()


def print_masks(structured: StructuredOutputs, vocab: int, args: argparse.Namespace) -> None:
    rng = random.Random(0)
    print("masks (fill + apply, median per step; the fill alone runs on the host):")
    bench_masks(structured, vocab, 1, 4, args.device, rng)   # compiles the grammar and the apply kernel
    for batch in args.batches:
        step, fill = bench_masks(structured, vocab, batch, args.steps, args.device, rng)
        print(f"  batch {batch:4d}: {step * 1e6:9.1f} us per step, {step * 1e6 / batch:7.1f} us per row "
              f"(fill alone {fill * 1e6 / batch:6.1f} us per row)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=default_model())
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--steps", type=int, default=64, help="mask steps timed per batch")
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--mask-vocab", type=int, metavar="N",
                   help="masks only, for a byte-level BPE of up to N tokens trained here (no model): "
                        "the mask's cost at a large model's vocabulary size")
    args = p.parse_args()

    if args.mask_vocab:
        with tempfile.TemporaryDirectory() as directory:
            vocab = synthetic_tokenizer(args.mask_vocab, Path(directory))
            print(f"synthetic byte-level BPE, vocab {vocab}, device {args.device}")
            print_masks(StructuredOutputs(directory, vocab, [1]), vocab, args)   # "</s>" is token 1
        return
    llm = LLM(args.model, device=args.device, dtype=args.dtype)
    print(f"model {args.model}, vocab {llm.runner.vocab_size}, device {args.device}")
    print_masks(llm.core.structured_outputs, llm.runner.vocab_size, args)
    print("generation (greedy):")
    lines = ["JULIET:\nO Romeo", "ROMEO:\nBut, soft!", "HAMLET:\nTo be", "KING RICHARD III:\nNow is"]
    for batch in args.batches:
        prompts = [lines[i % len(lines)] + " " * (i // len(lines)) for i in range(batch)]
        free, n_free = bench_generate(llm, prompts, SamplingParams(temperature=0, max_tokens=args.max_tokens), args.device)
        constrained, n_constrained = bench_generate(
            llm, prompts, SamplingParams(temperature=0, max_tokens=args.max_tokens, structured_output=SPEC), args.device
        )
        print(f"  batch {batch:4d}: free {free:9.1f} tok/s ({n_free} tokens), "
              f"JSON schema {constrained:9.1f} tok/s ({n_constrained} tokens), ratio {constrained / free:.2f}")


if __name__ == "__main__":
    main()
