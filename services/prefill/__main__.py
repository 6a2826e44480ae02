"""``python -m baton.services.prefill --model DIR [--port N] [--redis-url URL]``"""

from __future__ import annotations

import asyncio

from baton.protos import prefill_pb2, prefill_pb2_grpc
from baton.services.prefill.server import PrefillServicer
from baton.services.worker import build_worker, serve, setup_logging, worker_arg_parser


async def main() -> None:
    args = worker_arg_parser("prefill", default_port=50051).parse_args()
    setup_logging(args.log_level)
    ctx = build_worker(args, "prefill", keep_finished_blocks=True)
    servicer = PrefillServicer(ctx)

    def register(server):
        prefill_pb2_grpc.add_PrefillServicer_to_server(servicer, server)
        return [prefill_pb2.DESCRIPTOR.services_by_name["Prefill"].full_name], servicer.engine

    await serve(args, ctx, "prefill", register)


if __name__ == "__main__":
    asyncio.run(main())
