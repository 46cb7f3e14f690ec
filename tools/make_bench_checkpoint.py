"""A random-weight jaxgen checkpoint of a model shape, with a real tokenizer, for serving load
tests of big shapes (`jaxgen serve` needs a tokenizer; random weights need no download).

    python3 tools/make_bench_checkpoint.py --shape llama-3.2-1b --tokenizer DIR --out .bench/llama-3.2-1b
    jaxgen serve --config configs/serving/llama-3.2-1b-bench-gpu.json

`--shape`: a preset in configs/models/ (or a JSON path); its vocabulary is resized to the
tokenizer's. `--tokenizer`: a jaxgen tokenizer directory (the `tokenizer/` of any jaxgen
checkpoint, e.g. the converted smollm2-135m in ~/.cache/jaxgen/models/). Weights as
`bench_offline.py` draws them (normal(0, 0.02), norms at identity), seeded.
"""

from __future__ import annotations

import argparse

from bench_offline import load_preset, random_params
from jaxgen.checkpoints import orbax_format
from jaxgen.models import Model
from jaxgen.tokenizer import load_tokenizer


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="llama-3.2-1b")
    ap.add_argument("--tokenizer", required=True, metavar="DIR")
    ap.add_argument("--out", required=True, metavar="DIR")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        shape = load_preset(args.shape)
        tokenizer = load_tokenizer(args.tokenizer)
    except (ValueError, OSError) as e:
        ap.error(str(e))
    cfg = shape.replace(vocab_size=tokenizer.vocab_size, dtype=args.dtype)
    model = Model(cfg)
    orbax_format.save(args.out, cfg, model.canonical_params(random_params(model, args.seed)),
                      tokenizer)
    print(f"{args.out}: {cfg.architecture}, {cfg.num_layers} layers, vocab {cfg.vocab_size}, {cfg.dtype}")


if __name__ == "__main__":
    main()
