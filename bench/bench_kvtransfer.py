"""One request's KV handed from a prefill process to a decode process, by each
transport: what the decode worker waits for between the prompt's last layer and
its first decode step.

    python bench/bench_kvtransfer.py                                  # CPU, a small shape
    python bench/bench_kvtransfer.py --device cuda --receiver-device cuda:1 \\
        --layers 32 --kv-heads 8 --head-dim 128 --tokens 2048 8192   # Llama-3-8B, GPU to GPU

NCCL takes two GPUs (it refuses two ranks on one): the run skips it, saying so,
when ``--device`` and ``--receiver-device`` name the same one; between CPU caches
it runs over gloo.

The receiver runs in its own process (on ``--receiver-device``) with every
request of the run expected up front; the sender submits all layers of a
request back to back (a prefill worker submits each as it is computed) and
waits for the receiver's acknowledgement. Prints, per transport and prompt
length, the median wall time from the first ``submit_layer`` to the
acknowledgement and the KV bytes over it (GB/s), and checks that every block
landed bit for bit.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import statistics
import time

import torch

from baton.kvtransfer import KVLayout, TransferTicket, create_receiver, create_sender
from baton.kvtransfer.grpc_transport import GrpcKVSender, grpc_options
from baton.protos import MAX_MESSAGE_BYTES

FINGERPRINT = "bench"


def make_caches(args: argparse.Namespace, num_blocks: int, device: str, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (num_blocks, 2, args.block_size, args.kv_heads, args.head_dim)
    return [torch.randn(shape, generator=g).to(torch.bfloat16).to(device) for _ in range(args.layers)]


def plan(args: argparse.Namespace, tokens: int, repeat: int) -> tuple[str, list[int], list[int]]:
    """(request id, sender blocks, receiver blocks) of one transfer: shuffled, as in a used pool."""
    n = -(-tokens // args.block_size)
    g = torch.Generator().manual_seed(tokens * 1000 + repeat)
    src = torch.randperm(args.pool_blocks, generator=g)[:n].tolist()
    dst = torch.randperm(args.pool_blocks, generator=g)[:n].tolist()
    return f"t{tokens}-r{repeat}", src, dst


def checksum(caches: list[torch.Tensor], blocks: list[int]) -> int:
    ids = torch.tensor(blocks, device=caches[0].device)
    return sum(int(c[ids].view(torch.int16).to(torch.int64).sum()) for c in caches)


def receiver_main(args: argparse.Namespace, transport: str, conn) -> None:
    async def serve() -> None:
        caches = make_caches(args, args.pool_blocks, args.receiver_device, seed=1)
        layout = KVLayout.from_caches(caches, FINGERPRINT)
        server = None
        if transport == "grpc":
            import grpc
            server = grpc.aio.server(options=grpc_options(MAX_MESSAGE_BYTES))
            port = server.add_insecure_port("127.0.0.1:0")
            receiver = create_receiver("grpc", caches, address=f"127.0.0.1:{port}", server=server)
            await server.start()
        else:
            receiver = create_receiver(transport, caches)
        transfers = [plan(args, tokens, r) for tokens in args.tokens for r in range(args.repeats + 1)]
        for rid, _, dst in transfers:
            receiver.expect(rid, dst, layout)
        conn.send(receiver.address)
        for rid, _, dst in transfers:
            stats = await receiver.wait_complete(rid, timeout_s=300)
            conn.send((rid, stats.bytes, checksum(caches, dst)))
        await receiver.close()
        if server is not None:
            await server.stop(grace=None)

    asyncio.run(serve())


async def send_all(args: argparse.Namespace, transport: str, address: str, conn) -> list[tuple[int, int, float]]:
    caches = make_caches(args, args.pool_blocks, args.device, seed=2)
    layout = KVLayout.from_caches(caches, FINGERPRINT)
    sender = GrpcKVSender(chunk_bytes=args.chunk_mb << 20) if transport == "grpc" else create_sender(transport)
    results = []
    try:
        for tokens in args.tokens:
            for repeat in range(args.repeats + 1):  # the first is a warm-up
                rid, src, dst = plan(args, tokens, repeat)
                ticket = TransferTicket(rid, transport, address, tuple(dst), layout, tokens)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                start = time.perf_counter()
                session = sender.open(ticket, layout)
                for layer, cache in enumerate(caches):
                    session.submit_layer(layer, cache, src)
                stats = await session.finish(timeout_s=300)
                elapsed = time.perf_counter() - start
                got_rid, got_bytes, got_sum = await asyncio.to_thread(conn.recv)
                assert (got_rid, got_bytes) == (rid, stats.bytes), (got_rid, got_bytes, rid, stats.bytes)
                assert got_sum == checksum(caches, src), f"{rid}: the landed blocks differ from the sent ones"
                if repeat:
                    results.append((tokens, stats.bytes, elapsed))
    finally:
        await sender.close()
    return results


def nccl_skip_reason(args: argparse.Namespace) -> str | None:
    """Why the nccl transport cannot run between these devices, if it cannot."""
    sender, receiver = torch.device(args.device), torch.device(args.receiver_device)
    if sender.type != receiver.type:
        return "it needs both caches on CUDA (NCCL) or both on the CPU (gloo)"
    if sender.type == "cuda" and (sender.index or 0) == (receiver.index or 0):
        return (f"NCCL refuses two ranks on one GPU, and both caches are on {sender}; give the receiver another "
                f"(--receiver-device cuda:1) on a machine with two (this one has {torch.cuda.device_count()})")
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--transports", nargs="+", default=["grpc", "ucx", "nccl"])
    p.add_argument("--device", default="cpu", help="the sender's caches")
    p.add_argument("--receiver-device", default=None, help="the receiver's caches (default: --device)")
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--tokens", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--pool-blocks", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--chunk-mb", type=int, default=16, help="gRPC message size")
    args = p.parse_args()
    args.receiver_device = args.receiver_device or args.device
    if max(args.tokens) > args.pool_blocks * args.block_size:
        p.error("--pool-blocks too small for the longest --tokens")

    block_kib = 2 * args.block_size * args.kv_heads * args.head_dim * 2 / 1024
    print(f"# KV handoff: {args.layers} layers x {args.kv_heads} KV heads x head dim {args.head_dim}, bf16, "
          f"blocks of {args.block_size} tokens ({block_kib:g} KiB a layer); {args.device} -> {args.receiver_device}; "
          f"median of {args.repeats}")
    if args.device.startswith("cuda"):
        print(f"# {torch.cuda.get_device_name(args.device)}, torch {torch.__version__}")
    if "nccl" in args.transports and (reason := nccl_skip_reason(args)) is not None:
        print(f"# nccl skipped: {reason}")
        args.transports.remove("nccl")
    print("| transport | prompt tokens | KV bytes | time | GB/s |")
    print("| --- | --- | --- | --- | --- |")
    ctx = mp.get_context("spawn")
    for transport in args.transports:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=receiver_main, args=(args, transport, child))
        proc.start()
        child.close()  # the receiver's end: a receiver that dies then ends parent.recv() with EOFError
        try:
            address = parent.recv()
            results = asyncio.run(send_all(args, transport, address, parent))
        finally:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()
        for tokens in args.tokens:
            times = [t for n, _, t in results if n == tokens]
            nbytes = next(b for n, b, _ in results if n == tokens)
            median = statistics.median(times)
            print(f"| {transport} | {tokens} | {nbytes / 2**20:.1f} MiB | {median * 1e3:.2f} ms | {nbytes / median / 1e9:.2f} |")


if __name__ == "__main__":
    main()
