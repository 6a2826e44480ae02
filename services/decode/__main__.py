"""``python -m baton.services.decode --model DIR [--port N] [--redis-url URL] [--kv-transport grpc|ucx|nccl]``"""

from __future__ import annotations

import argparse
import asyncio

import grpc

from baton.kvtransfer.base import KVReceiver, create_receiver
from baton.protos import decode_pb2, decode_pb2_grpc, kvtransfer_pb2
from baton.services.decode.server import DecodeServicer
from baton.services.worker import WorkerContext, build_worker, serve, setup_logging, worker_arg_parser


def make_receiver(args: argparse.Namespace, ctx: WorkerContext, server: grpc.aio.Server) -> KVReceiver:
    """The KV receiver of ``--kv-transport``: gRPC on the worker's own server, or UCX or NCCL on its own port."""
    if args.kv_transport == "grpc":
        return create_receiver("grpc", ctx.runner.kv_caches, address=ctx.address, server=server)
    bind = {"host": args.host} if args.kv_transport == "nccl" else {}  # ucxx's listener takes a port only
    try:
        return create_receiver(args.kv_transport, ctx.runner.kv_caches, **bind,
                               advertise_host=args.advertise_host or args.host, port=args.kv_port)
    except ValueError as exc:  # its package is not installed
        raise SystemExit(f"decode worker: {exc}") from None


async def main() -> None:
    args = worker_arg_parser("decode", default_port=50061).parse_args()
    setup_logging(args.log_level)
    ctx = build_worker(args, "decode", keep_finished_blocks=False)

    def register(server):
        receiver = make_receiver(args, ctx, server)
        servicer = DecodeServicer(ctx, receiver, stream_interval=args.stream_interval)
        decode_pb2_grpc.add_DecodeServicer_to_server(servicer, server)
        names = [decode_pb2.DESCRIPTOR.services_by_name["Decode"].full_name]
        if receiver.transport == "grpc":
            names.append(kvtransfer_pb2.DESCRIPTOR.services_by_name["KVTransfer"].full_name)
        return names, servicer.engine

    await serve(args, ctx, "decode", register)


if __name__ == "__main__":
    asyncio.run(main())
