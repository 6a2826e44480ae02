"""``python -m baton.services.decode --model DIR [--port N] [--redis-url URL]``"""

from __future__ import annotations

import asyncio

from baton.kvtransfer.base import create_receiver
from baton.protos import decode_pb2, decode_pb2_grpc, kvtransfer_pb2
from baton.services.decode.server import DecodeServicer
from baton.services.worker import build_worker, serve, setup_logging, worker_arg_parser


async def main() -> None:
    args = worker_arg_parser("decode", default_port=50061).parse_args()
    setup_logging(args.log_level)
    ctx = build_worker(args, "decode", keep_finished_blocks=False)

    def register(server):
        receiver = create_receiver("grpc", ctx.runner.kv_caches, address=ctx.address, server=server)
        servicer = DecodeServicer(ctx, receiver)
        decode_pb2_grpc.add_DecodeServicer_to_server(servicer, server)
        names = [
            decode_pb2.DESCRIPTOR.services_by_name["Decode"].full_name,
            kvtransfer_pb2.DESCRIPTOR.services_by_name["KVTransfer"].full_name,
        ]
        return names, servicer.engine

    await serve(args, ctx, "decode", register)


if __name__ == "__main__":
    asyncio.run(main())
