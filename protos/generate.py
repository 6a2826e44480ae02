"""Regenerate the Python stubs from the .proto files in this folder.

    python -m baton.protos.generate          # rewrite the committed stubs
    python -m baton.protos.generate --check  # exit 1 if they are stale

The .proto files are compiled under the virtual path ``baton/protos/`` so the
generated modules import each other as ``baton.protos.X_pb2``.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTOS = sorted(p.name for p in HERE.glob("*.proto"))
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generated_names() -> list[str]:
    return [p.removesuffix(".proto") + s for p in PROTOS for s in SUFFIXES]


def generate(out_dir: Path) -> None:
    from grpc_tools import protoc

    args = [
        "grpc_tools.protoc",
        f"-Ibaton/protos={HERE}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[f"baton/protos/{p}" for p in PROTOS],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare only; write nothing")
    check = parser.parse_args().check
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh = Path(tmp) / "baton" / "protos"
        stale = [n for n in generated_names() if not (HERE / n).exists() or not filecmp.cmp(fresh / n, HERE / n, shallow=False)]
        if check:
            for name in stale:
                print(f"stale: protos/{name}", file=sys.stderr)
            return 1 if stale else 0
        for name in generated_names():
            (HERE / name).write_bytes((fresh / name).read_bytes())
    return 0


if __name__ == "__main__":
    sys.exit(main())
