"""Model load times: first run (bundled GGUF -> jaxgen Orbax conversion, then restore) and
cached run (restore only), each in a fresh process so nothing is warm in memory.

    python tools/bench_load.py [--models gemma3-270m,smollm2-135m] [--dtype float32]

Prints one table. Uses a temporary cache directory, so the user's cache is untouched.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile

CHILD = """
import json, sys, time
from jaxgen import checkpoints
loaded = checkpoints.load(sys.argv[1], dtype=sys.argv[2], cache=sys.argv[3])
print(json.dumps({"seconds": loaded.load_seconds, "converted": loaded.converted}))
"""


def measure(model: str, dtype: str, cache: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, model, dtype, cache],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="gemma3-270m,smollm2-135m")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    import jax

    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, "
          f"python {platform.python_version()}, dtype {args.dtype}")
    print(f"| model | first run (convert + load) s | cached run s |")
    print(f"|---|---|---|")
    for model in args.models.split(","):
        with tempfile.TemporaryDirectory() as cache:
            first = measure(model, args.dtype, cache)
            cached = measure(model, args.dtype, cache)
        assert first["converted"] and not cached["converted"]
        print(f"| {model} | {first['seconds']:.1f} | {cached['seconds']:.1f} |")


if __name__ == "__main__":
    main()
