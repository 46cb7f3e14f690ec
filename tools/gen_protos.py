"""Generates the Python gRPC stubs of protos/jaxgen/v1/*.proto into jaxgen/v1/.

    python tools/gen_protos.py [--out DIR]

The stubs are committed and never edited by hand; tests/test_server_protos.py regenerates them
into a temporary directory and fails when the committed ones differ. The generated code depends
on the generator's version, so grpcio-tools is pinned in pyproject.toml's `test` extra; after
changing a .proto or that pin, run this and commit the result.
"""

from __future__ import annotations

import argparse
import importlib.resources
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PACKAGE = pathlib.Path("jaxgen", "v1")  # the proto package jaxgen.v1 -> the Python package jaxgen.v1

INIT = '''"""Generated gRPC stubs for protos/jaxgen/v1 (`python tools/gen_protos.py`); do not edit.

Imported only by jaxgen.server and clients: the engine never imports grpc or these modules.
"""
'''


def proto_files() -> list[pathlib.Path]:
    return sorted((PROTO_ROOT / PACKAGE).glob("*.proto"))


def generate(out_root: pathlib.Path) -> list[pathlib.Path]:
    """Writes the stubs under `out_root`/jaxgen/v1/; returns the files written."""
    from grpc_tools import protoc

    out_dir = out_root / PACKAGE
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("*_pb2*.py*"):
        stale.unlink()
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    protos = [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
    args = ["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{well_known}", f"--python_out={out_root}",
            f"--pyi_out={out_root}", f"--grpc_python_out={out_root}", *protos]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    (out_dir / "__init__.py").write_text(INIT)
    return sorted(p for p in out_dir.iterdir() if p.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT), help="root to write jaxgen/v1/ under (default: the repo)")
    args = parser.parse_args(argv)
    for path in generate(pathlib.Path(args.out)):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
