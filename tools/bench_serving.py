"""Serving load test over gRPC and/or the OpenAI HTTP API against a running `jaxgen serve` on
this machine.

    python tools/bench_serving.py --port 50051 --rates 1,2,4 [--concurrency 8] \\
        [--api grpc|openai|both --http-port 8000] [--server-pid PID] \\
        [--num-requests 100] [--max-seconds 60] [--out-json r.json] [--out-png r.png]

Each `--rates` value is one run with Poisson arrivals at that many requests/s; each
`--concurrency` value is one closed-loop run (that many clients, each sending its next request
when the last one ends). Prompts (token ids) and output lengths come from a seeded, long-tailed
chat-like distribution (log-normal, prompts tens to ~2k tokens, outputs tens to ~1k, capped by
--max-prompt-tokens / --max-output-tokens and the server's context); outputs run to their length
(ignore_eos). A run ends after --num-requests requests or --max-seconds (stragglers cancelled).
Reports per run: requests/s, output tok/s, TTFT / TPOT / end-to-end p50/p90/p99, errors by status;
prints a table, writes JSON and a PNG of throughput against latency (matplotlib). Loopback only.

`--api both` runs every plan through gRPC and then through HTTP (`/v1/completions`, streamed,
prompts as token ids), the same requests each time, so the two front ends compare in one run.
With `--server-pid` (the `jaxgen serve` process; the engine in its own process, the default) it
also reports the front end's CPU time per streamed chunk (user + system, from /proc).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

import grpc
import numpy as np
from grpc import aio

from jaxgen.server.client import auth_metadata
from jaxgen.config import grpc_target
from jaxgen.v1 import generation_pb2 as pb
from jaxgen.v1 import generation_pb2_grpc as pb_grpc

LOOPBACK = ("127.0.0.1", "localhost", "::1")
MAX_REQUESTS = 10_000
MAX_SECONDS = 3600


def workload(n: int, seed: int, vocab: int, context: int, max_prompt: int, max_output: int):
    """`n` (prompt token ids, output length) pairs: log-normal lengths (median ~220 prompt and
    ~120 output tokens; p99 near 2k and 1k), clipped to the caps and the context."""
    rng = np.random.default_rng(seed)
    prompt_lens = np.clip(rng.lognormal(np.log(220), 0.95, n), 16, max_prompt).astype(int)
    output_lens = np.clip(rng.lognormal(np.log(120), 0.95, n), 16, max_output).astype(int)
    out = []
    for p, o in zip(prompt_lens, output_lens):
        p = int(min(p, context - 16))
        o = int(max(1, min(o, context - p)))
        out.append((rng.integers(100, vocab, p).tolist(), o))
    return out


async def one_request(stub, prompt, max_tokens, metadata, timeout):
    """(status name, ttft s, e2e s, output tokens, chunks)."""
    request = pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=prompt),
        sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    start, ttft, tokens, chunks = time.perf_counter(), None, 0, 0
    try:
        async for r in stub.Generate(request, metadata=metadata, timeout=timeout):
            if r.token_ids and ttft is None:
                ttft = time.perf_counter() - start
            tokens += len(r.token_ids)
            chunks += 1
        return "OK", ttft, time.perf_counter() - start, tokens, chunks
    except grpc.aio.AioRpcError as e:
        return e.code().name, ttft, time.perf_counter() - start, tokens, chunks
    except asyncio.CancelledError:
        return "CANCELLED", ttft, time.perf_counter() - start, tokens, chunks


async def one_http_request(client, prompt, max_tokens, timeout):
    """As `one_request`, through `/v1/completions` (streamed; the tokens from the usage chunk)."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    start, ttft, tokens, chunks = time.perf_counter(), None, 0, 0
    try:
        async with client.stream("POST", "/v1/completions", json=body, timeout=timeout) as r:
            if r.status_code != 200:
                return f"HTTP_{r.status_code}", None, time.perf_counter() - start, 0, 0
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunks += 1
                data = json.loads(line[6:])
                if data.get("usage"):
                    tokens = data["usage"]["completion_tokens"]
                elif ttft is None and data["choices"] and data["choices"][0]["text"]:
                    ttft = time.perf_counter() - start
        return "OK", ttft, time.perf_counter() - start, tokens, chunks
    except asyncio.CancelledError:
        return "CANCELLED", ttft, time.perf_counter() - start, tokens, chunks
    except Exception as e:  # the client's own errors (timeouts, connection resets)
        return type(e).__name__, ttft, time.perf_counter() - start, tokens, chunks


async def run_load(request, items, max_seconds, rate=None, concurrency=None, seed=0):
    """`request(prompt, max_tokens, timeout)` for every item, as Poisson arrivals at `rate` or
    a closed loop of `concurrency` clients."""
    rng = np.random.default_rng(seed + 1)
    start = time.perf_counter()
    results = []
    deadline = start + max_seconds

    async def send(item):
        results.append(await request(item[0], item[1], max(1.0, deadline - time.perf_counter())))

    if rate is not None:
        tasks = []
        for item in items:
            tasks.append(asyncio.ensure_future(send(item)))
            await asyncio.sleep(rng.exponential(1.0 / rate))
            if time.perf_counter() >= deadline:
                break
        await asyncio.wait(tasks, timeout=max(0.0, deadline - time.perf_counter()))
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    else:
        queue = list(reversed(items))

        async def client():
            while queue and time.perf_counter() < deadline:
                await send(queue.pop())

        await asyncio.gather(*(client() for _ in range(concurrency)))
    return results, time.perf_counter() - start


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU time of process `pid` so far (Linux /proc), None without a pid."""
    if pid is None:
        return None
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def summarize(results, elapsed, cpu_s=None, **label) -> dict:
    ok = [r for r in results if r[0] == "OK"]
    errors: dict[str, int] = {}
    for r in results:
        if r[0] != "OK":
            errors[r[0]] = errors.get(r[0], 0) + 1

    def pct(values):
        v = [x for x in values if x is not None]
        return {f"p{q}": (float(np.percentile(v, q)) if v else None) for q in (50, 90, 99)}

    tpot = [(r[2] - r[1]) / (r[3] - 1) for r in ok if r[1] is not None and r[3] > 1]
    chunks = sum(r[4] for r in results)
    return dict(label, requests=len(results), completed=len(ok), elapsed_s=elapsed, chunks=chunks,
                front_end_cpu_us_per_chunk=None if cpu_s is None else cpu_s / max(chunks, 1) * 1e6,
                request_throughput=len(ok) / elapsed,
                output_token_throughput=sum(r[3] for r in results) / elapsed,
                ttft_s=pct([r[1] for r in ok]), tpot_s=pct(tpot), e2e_s=pct([r[2] for r in ok]),
                errors=errors)


def plot(runs: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    x = [r["output_token_throughput"] for r in runs]
    for key, style in (("ttft_s", "o-"), ("e2e_s", "s-")):
        for q in ("p50", "p99"):
            ax.plot(x, [r[key][q] for r in runs], style, label=f"{key[:-2].upper()} {q}")
    for r, xi in zip(runs, x):
        ax.annotate(r.get("rate") and f"{r['rate']:g}/s" or f"c={r['concurrency']}",
                    (xi, r["e2e_s"]["p50"] or 0), fontsize=7)
    ax.set_xlabel("output tokens/s")
    ax.set_ylabel("latency (s)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.set_title("jaxgen serving: throughput vs latency")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _rates(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()] if text else []


async def amain(args) -> dict:
    import httpx2

    metadata = auth_metadata(args.api_key)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx2.Limits(max_connections=None, max_keepalive_connections=None)
    async with aio.insecure_channel(grpc_target(args.host, args.port)) as channel, \
            httpx2.AsyncClient(base_url=f"http://{args.host}:{args.http_port}", headers=headers,
                               limits=limits) as http:
        stub = pb_grpc.GenerationStub(channel)
        info = await stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=metadata, timeout=30)
        apis = {"grpc": lambda p, m, t: one_request(stub, p, m, metadata, t),
                "openai": lambda p, m, t: one_http_request(http, p, m, t)}
        runs = []
        plans = [dict(rate=r) for r in _rates(args.rates)] + \
                [dict(concurrency=c) for c in (int(v) for v in _rates(args.concurrency))]
        for i, plan in enumerate(plans):
            items = workload(args.num_requests, args.seed + i, info.vocab_size,
                             info.max_context_length, args.max_prompt_tokens, args.max_output_tokens)
            for api in (("grpc", "openai") if args.api == "both" else (args.api,)):
                cpu = cpu_seconds(args.server_pid)
                results, elapsed = await run_load(apis[api], items, args.max_seconds,
                                                  seed=args.seed, **plan)
                used = None if cpu is None else cpu_seconds(args.server_pid) - cpu
                runs.append(summarize(results, elapsed, used, api=api, **plan))
    return dict(model=info.name, device=info.device, num_slots=info.num_slots,
                vocab_size=info.vocab_size, max_context_length=info.max_context_length,
                num_requests=args.num_requests, max_prompt_tokens=args.max_prompt_tokens,
                max_output_tokens=args.max_output_tokens, seed=args.seed, runs=runs)


class StepStats:
    """Engine observer (the `EngineObserver` methods): what `/metrics` reports of the steps,
    for an in-process engine: steps, their mean launch-to-tokens time, steps launched ahead and
    on a drained device, the mean dispatch time."""

    def __init__(self):
        self.steps, self.step_seconds = 0, 0.0
        self.launched_ahead, self.drained, self.launch_seconds = 0, 0, 0.0

    def on_step(self, step_seconds, host_gap_seconds):
        self.steps += 1
        self.step_seconds += step_seconds

    def on_launch(self, device_drained, launch_seconds):
        self.launched_ahead += 1
        self.drained += bool(device_drained)
        self.launch_seconds += launch_seconds

    def on_finish(self, finished):
        pass

    def summary(self) -> dict:
        return dict(steps=self.steps, mean_step_s=self.step_seconds / max(self.steps, 1),
                    launched_ahead=self.launched_ahead, launched_on_drained_device=self.drained,
                    mean_launch_s=self.launch_seconds / max(self.launched_ahead, 1))


def offline_engine(preset: str, serve_flags=(), longest: int = 0):
    """An in-process engine built from the serving preset the server runs (`jaxgen serve
    --config PRESET [serve_flags]`), warmed up as `serve` does (no compile inside a timing);
    `longest`: the longest request, for a preset without max-model-len."""
    from jaxgen.build import build_engine
    from jaxgen.cli import parser
    from jaxgen.config_sources import config_from_args

    args = parser().parse_args(["serve", "--config", preset, *serve_flags])
    return build_engine(config_from_args(args, "serve"), longest=longest)


def add_preset_workload_args(p: argparse.ArgumentParser, num_requests: int,
                             max_output_tokens: int) -> None:
    """The flags of the tools that run `workload` through `offline_engine` (bench_host,
    bench_host_gap): the preset, the workload, the report file, serve flags after --."""
    p.add_argument("--config", required=True, metavar="PRESET", help="a `jaxgen serve --config` preset")
    p.add_argument("--num-requests", type=int, default=num_requests)
    p.add_argument("--max-prompt-tokens", type=int, default=1024)
    p.add_argument("--max-output-tokens", type=int, default=max_output_tokens)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-json", default=None)
    p.add_argument("serve_flags", nargs="*",
                   help="after --: `jaxgen serve` flags that win over the preset")


def preset_engine_and_workload(p: argparse.ArgumentParser, args):
    """(`offline_engine` of the preset, `workload` sized to it) from `add_preset_workload_args`'
    flags; bad flags or a bad preset end with `p.error` naming them."""
    if args.num_requests < 1 or min(args.max_prompt_tokens, args.max_output_tokens) < 16:
        p.error(f"num_requests={args.num_requests} must be >= 1; max_prompt_tokens="
                f"{args.max_prompt_tokens} and max_output_tokens={args.max_output_tokens} >= 16")
    try:
        engine = offline_engine(args.config, args.serve_flags)
    except (ValueError, OSError) as e:
        p.error(str(e))
    info = engine.info()
    items = workload(args.num_requests, args.seed, info.vocab_size, info.max_model_len,
                     args.max_prompt_tokens, args.max_output_tokens)
    return engine, items


def offline_throughput(preset: str, items, stats: StepStats | None = None) -> float:
    """Output tok/s of the same workload through an in-process engine built from the serving
    preset the server runs (`jaxgen serve --config PRESET`): the ceiling serving is held to.
    `stats`, if given, observes the timed run's steps."""
    from jaxgen.sampling_params import SamplingParams

    engine = offline_engine(preset, longest=max(len(p) + o for p, o in items))
    params = [SamplingParams(max_tokens=o, temperature=0.0, ignore_eos=True) for _, o in items]
    prompts = [p for p, _ in items]
    engine.generate(prompts[:2], params[:2])  # first use of the shapes outside the timing
    if stats is not None:
        engine.observers.append(stats)
    start = time.perf_counter()
    out = engine.generate(prompts, params)
    return sum(len(c.token_ids) for c in out) / (time.perf_counter() - start)


def check_args(args) -> None:
    if args.host not in LOOPBACK:
        raise ValueError(f"host={args.host!r}: loopback only ({', '.join(LOOPBACK)})")
    if not 1 <= args.num_requests <= MAX_REQUESTS:
        raise ValueError(f"num_requests={args.num_requests}: must be in [1, {MAX_REQUESTS}]")
    if not 0 < args.max_seconds <= MAX_SECONDS:
        raise ValueError(f"max_seconds={args.max_seconds}: must be in (0, {MAX_SECONDS}]")
    if any(r <= 0 for r in _rates(args.rates)) or any(c < 1 for c in _rates(args.concurrency)):
        raise ValueError(f"rates={args.rates!r} / concurrency={args.concurrency!r}: rates must "
                         f"be > 0 and concurrency >= 1")
    if not _rates(args.rates) and not _rates(args.concurrency):
        raise ValueError("give --rates and/or --concurrency")
    for name in ("max_prompt_tokens", "max_output_tokens"):
        if getattr(args, name) < 16:
            raise ValueError(f"{name}={getattr(args, name)}: must be >= 16")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--api-key", default=None)
    p.add_argument("--api", default="grpc", choices=["grpc", "openai", "both"],
                   help="which front end to load (both: each plan through gRPC, then HTTP)")
    p.add_argument("--http-port", type=int, default=8000, help="the server's HTTP API port")
    p.add_argument("--server-pid", type=int, default=None,
                   help="the jaxgen serve process: report its CPU time per streamed chunk")
    p.add_argument("--rates", default="", help="comma-separated request rates (req/s), Poisson")
    p.add_argument("--concurrency", default="", help="comma-separated closed-loop client counts")
    p.add_argument("--num-requests", type=int, default=100, help="per run")
    p.add_argument("--max-seconds", type=float, default=120.0, help="per run")
    p.add_argument("--max-prompt-tokens", type=int, default=2048)
    p.add_argument("--max-output-tokens", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-json", default=None)
    p.add_argument("--out-png", default=None)
    p.add_argument("--offline-config", default=None,
                   help="serving preset the server runs: also time the last run's workload "
                        "offline (in-process engine) and report serving / offline throughput")
    args = p.parse_args(argv)
    try:
        check_args(args)
    except ValueError as e:
        print(f"bench_serving: error: {e}", file=sys.stderr)
        return 2
    report = asyncio.run(amain(args))
    print(f"{'run':>10} {'api':>6} {'req/s':>7} {'tok/s':>8} {'TTFT p50/p99 (s)':>18} "
          f"{'TPOT p50 (ms)':>13} {'E2E p50/p99 (s)':>17} {'cpu us/chunk':>12} errors")
    for r in report["runs"]:
        name = f"{r['rate']:g}/s" if "rate" in r else f"c={r['concurrency']}"
        f = lambda v, s=1: "-" if v is None else f"{v * s:.3f}"  # noqa: E731
        cpu = r["front_end_cpu_us_per_chunk"]
        print(f"{name:>10} {r['api']:>6} {r['request_throughput']:7.2f} "
              f"{r['output_token_throughput']:8.1f} "
              f"{f(r['ttft_s']['p50']) + '/' + f(r['ttft_s']['p99']):>18} "
              f"{f(r['tpot_s']['p50'], 1000):>13} "
              f"{f(r['e2e_s']['p50']) + '/' + f(r['e2e_s']['p99']):>17} "
              f"{'-' if cpu is None else f'{cpu:.0f}':>12} {r['errors'] or ''}")
    if args.offline_config:
        last = report["runs"][-1]
        i = len(_rates(args.rates)) + len(_rates(args.concurrency)) - 1  # the last plan's seed
        items = workload(args.num_requests, args.seed + i, report["vocab_size"],
                         report["max_context_length"], args.max_prompt_tokens,
                         args.max_output_tokens)
        stats = StepStats()
        offline = offline_throughput(args.offline_config, items, stats)
        report["offline_output_token_throughput"] = offline
        report["offline_steps"] = stats.summary()
        print(f"offline steps: {json.dumps(report['offline_steps'])}")
        print(f"offline engine on the last run's workload: {offline:.1f} tok/s; serving "
              f"{last['output_token_throughput']:.1f} tok/s = "
              f"{last['output_token_throughput'] / offline:.0%} of offline")
    if args.out_json:
        with open(args.out_json, "w") as fh:
            json.dump(report, fh, indent=1)
    if args.out_png:
        plot(report["runs"], args.out_png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
