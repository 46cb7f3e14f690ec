"""`jaxgen plan`: compile the serving program for a TPU target with no TPU attached and report
HBM per chip, what fits, and each step's estimates, as a table or as JSON (`--json`).

`add_plan_parser(subparsers)` registers the command using only the standard library;
`cmd_plan(args)` imports jax. `main(argv)` runs it alone (python -m jaxgen.planning.cli).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from jaxgen.sampling_params import DRAW, FILTER, GREEDY  # plain Python, no jax

GIB = 1 << 30
LEVELS = {"greedy": GREEDY, "draw": DRAW, "filter": FILTER}


def _mesh(text: str) -> tuple[int, int]:
    from jaxgen.config_sources import ConfigError, parse_mesh  # serve's parser (no jax)

    try:
        return parse_mesh(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _batches(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(p) for p in text.split(",") if p)
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be comma-separated batch sizes >= 1")
    return sizes


def add_plan_parser(subparsers, formatter_class=argparse.ArgumentDefaultsHelpFormatter
                    ) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "plan", help="compile the serving program for a TPU slice (no TPU needed) and report "
                     "HBM per chip and step estimates",
        description=__doc__.split("\n\n")[0], formatter_class=formatter_class)
    p.add_argument("--model", required=True,
                   help="shape preset (llama-3-8b, llama-3.2-1b, gemma3-270m), bundled model "
                        "(gemma3-270m, smollm2-135m), or a .json / .gguf path")
    p.add_argument("--target", required=True,
                   help="TPU chip or slice: v5e-1, v5e:2x2, v5e:4x4, v6e:4x8, v5p:2x2x1, ...")
    p.add_argument("--mesh", type=_mesh, default=None,
                   help="DATA,MODEL (None: every chip on model)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                   help="weights, activations and KV pool")
    p.add_argument("--slots", type=int, default=8, help="decode slots (requests at once)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="prompt + completion tokens (None: min(model context, 4096))")
    p.add_argument("--page-size", type=int, default=16, help="tokens per KV page")
    p.add_argument("--num-pages", type=int, default=None,
                   help="KV pool pages (None: every slot at max-model-len, plus the null page)")
    p.add_argument("--max-prefill-tokens", type=int, default=512,
                   help="largest prefill bucket (buckets: 16, 32, ... up to it)")
    p.add_argument("--decode-steps", type=int, default=8, help="decode steps per device call")
    p.add_argument("--decode-batches", type=_batches, default=(1,),
                   help="decode batch sizes to estimate besides --slots")
    p.add_argument("--sampling", choices=tuple(LEVELS), default="filter",
                   help="sampling level compiled (filter: the largest program)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=cmd_plan)
    return p


def cmd_plan(args) -> int:
    from jaxgen.config import ConfigError, EngineConfig
    from jaxgen.config_sources import setting_name
    from jaxgen.planning.plan import PlanRequest, make_plan
    from jaxgen.planning.targets import TargetError

    try:
        engine = EngineConfig(num_slots=args.slots, page_size=args.page_size,
                              max_model_len=args.max_model_len, decode_steps=args.decode_steps,
                              max_prefill_tokens=args.max_prefill_tokens,
                              num_pages=args.num_pages)
        plan = make_plan(PlanRequest(args.model, args.target, engine, mesh=args.mesh,
                                     dtype=args.dtype, decode_batches=args.decode_batches,
                                     level=LEVELS[args.sampling]))
    except ConfigError as e:  # named as the flag that set it (--slots, not num_slots)
        print(f"jaxgen plan: {ConfigError(setting_name(e.field), e.value, e.rule)}",
              file=sys.stderr)
        return 2
    except (TargetError, ValueError) as e:  # bad flags, unknown model / target: one line
        print(f"jaxgen plan: {e}", file=sys.stderr)
        return 2
    print(json.dumps(plan_json(plan), indent=2) if args.json else render(plan))
    return 1 if plan.failure else 0


def plan_json(plan) -> dict:
    m = plan.memory
    return {
        "model": plan.config.name, "dtype": plan.config.dtype, "target": plan.target.name,
        "chip": plan.target.chip.name, "devices": plan.num_devices, "hosts": plan.num_hosts,
        "mesh": {"data": plan.mesh[0], "model": plan.mesh[1]},
        "engine": dataclasses.asdict(plan.engine) | {
            "pages_per_seq": plan.engine.pages_per_seq,
            "prefill_buckets": list(plan.engine.prefill_buckets)},
        "fits": plan.failure is None, "failure": plan.failure,
        "memory_per_device": dataclasses.asdict(m) | {
            "used": m.used, "headroom": m.headroom, "max_pages": m.max_pages,
            "max_slots": m.max_slots},
        "compiled_pages": plan.compiled_pages,
        "steps": [dataclasses.asdict(s.step) | {
            "roofline": None if s.roofline is None else dataclasses.asdict(s.roofline),
            "xla_tokens_per_s": s.xla_tokens_per_s,
            "roofline_tokens_per_s": s.roofline_tokens_per_s} for s in plan.steps],
        "compile_seconds": plan.compile_seconds,
    }


def _row(label: str, n: float) -> str:
    return f"  {label:36s} {n / GIB:8.2f}"


def _ms(s: float | None) -> str:
    return "       -" if s is None else f"{s * 1e3:8.2f}"


def _rate(r: float | None) -> str:
    return "        -" if r is None else f"{r:9,.0f}"


def render(plan) -> str:
    c, t, e, m = plan.config, plan.target, plan.engine, plan.memory
    lines = [
        f"jaxgen plan: {c.name} ({c.dtype}) on {t.name}: {plan.num_devices} chip(s), "
        f"{plan.num_hosts} host(s), mesh data={plan.mesh[0]} model={plan.mesh[1]}, "
        "TPU attention kernels",
        f"serving: {e.num_slots} slots x {e.max_model_len} tokens, page {e.page_size}, "
        f"{m.num_pages} pages ({e.pages_per_seq} per sequence), prefill buckets "
        f"{e.prefill_buckets[0]}..{e.prefill_buckets[-1]}, {e.decode_steps} decode steps per call",
        "",
        f"per chip ({t.chip.name}: {t.chip.hbm_bytes / GIB:.0f} GiB HBM, "
        f"{t.chip.hbm_bytes_per_s / 1e9:,.0f} GB/s, "
        f"{t.chip.bf16_flops_per_s / 1e12:,.0f} bf16 TFLOP/s)                GiB",
        _row("HBM the compiler allows", m.capacity),
        _row("weights", m.weights),
        _row(f"KV pool ({m.num_pages} pages)", m.kv_pool),
        _row("decode state", m.decode_state),
        _row("compiled temporaries (max)", m.temporaries) + f"   ({m.temporaries_of})",
        _row("executables", m.executables),
        _row("headroom", m.headroom),
        f"  {'largest pool that fits':36s} {m.max_pages:,} pages; {m.max_slots} slots at "
        f"{e.max_model_len} tokens",
    ]
    if not plan.steps:
        lines.append("  (nothing compiled: temporaries and executables are not in these numbers)")
    elif plan.compiled_pages != m.num_pages:
        lines.append(f"  (programs compiled with a {plan.compiled_pages}-page pool: the requested "
                     "one does not fit)")
    if plan.steps:
        lines += ["", "per step (one chip; XLA: cost_analysis optimal_seconds; roofline: bytes "
                  f"and FLOPs at {e.max_model_len} context)",
                  "  step           tokens   XLA ms      tok/s  roofline ms    tok/s  bound    "
                  "compile s"]
    for s in plan.steps:
        r = s.roofline
        unpriced = f"  ({s.step.unpriced_ops} ops unpriced)" if s.step.unpriced_ops else ""
        lines.append(
            f"  {s.step.name:14s} {s.step.tokens:6d} {_ms(s.step.xla_seconds)} "
            f"{_rate(s.xla_tokens_per_s)} {_ms(r.seconds if r else None)}     "
            f"{_rate(s.roofline_tokens_per_s)}  {r.bound if r else '-':7s} "
            f"{s.step.compile_seconds:8.1f}{unpriced}")
    if plan.mesh[0] > 1:
        lines.append(f"  (data={plan.mesh[0]}: the runner replicates slots over `data`, so each "
                     "replica computes the same batch; tok/s is the slice's)")
    lines.append(f"compile: {len(plan.steps)} programs, {plan.compile_seconds:.1f} s")
    lines.append(plan.failure or "fits")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxgen")
    add_plan_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["plan", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
