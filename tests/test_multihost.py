"""Multi-host on one machine: real `jaxgen` processes joined with jax.distributed on localhost,
two host devices each (tools/launch_group.py's environment), against one process's output; and
each way a group must fail: a process killed mid-stream, a process stopped (SIGSTOP), a process
started unlike the others, and a clean SIGTERM. Few launches, tiny checkpoints (and SmolLM2 for
the real-model case), so the whole file stays within a few minutes on the CPU box.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jaxgen.v1 import generation_pb2 as pb
from jaxgen.v1 import generation_pb2_grpc as pb_grpc
from tests.server_process import MODEL, ROOT, child_env, ensure_model

sys.path.insert(0, str(ROOT / "tools"))

from launch_group import free_port, process_env  # noqa: E402

ENGINE = ["--slots", "4", "--max-model-len", "128", "--num-pages", "64", "--decode-steps", "4",
          "--max-prefill-tokens", "16"]
PEER_TIMEOUT_S = 10.0
START_TIMEOUT_S = 300
PROMPTS = ["The capital of France is", "Once upon a time", "def add(a, b):", "Dear friend,",
           "1, 2, 3, 4,", "The weather today"]
MAX_TOKENS = 10
TINY = {"llama": dict(architecture="llama", hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5,
                      rope_theta=5e5, max_position_embeddings=1024, tie_embeddings=True),
        "gemma3": dict(architecture="gemma3", hidden_size=64, intermediate_size=128,
                       num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32, rms_norm_eps=1e-6,
                       rope_theta=1e6, rope_local_theta=1e4, max_position_embeddings=1024,
                       sliding_window=12, sliding_window_pattern=2, query_pre_attn_scalar=24.0)}
# Counts calls of the scheduler in a real process, then runs the CLI (JAXGEN_AUDIT: the file).
AUDIT = """
import json, os, sys
from jaxgen.scheduler import scheduler
seen = set()
def counted(name, method):
    def call(*args, **kwargs):
        if name not in seen:
            seen.add(name)
            with open(os.environ["JAXGEN_AUDIT"], "w") as f:
                json.dump(sorted(seen), f)
        return method(*args, **kwargs)
    return call
for name in ("__init__", "add", "schedule", "schedule_ahead", "update", "abort"):
    setattr(scheduler.Scheduler, name, counted(name, getattr(scheduler.Scheduler, name)))
from jaxgen.cli import main
sys.exit(main(sys.argv[1:]))
"""


class Group:
    """`jaxgen ARGS` as N processes of one group, each with two host devices and a log file;
    `per_process(rank)` adds flags to one process's command line."""

    def __init__(self, n: int, args, work, xla_cache_dir: str, per_process=lambda rank: (),
                 audit: bool = False):
        self.work, self.procs, self.logs = work, [], []
        coordinator = f"127.0.0.1:{free_port()}"
        for rank in range(n):
            env = process_env(rank, n, coordinator, cpu_devices=2, base=child_env())
            head = ["-c", AUDIT] if audit else ["-m", "jaxgen.cli"]
            if audit:
                env["JAXGEN_AUDIT"] = str(work / f"audit-{rank}.json")
            self.logs.append(work / f"process-{rank}.log")
            with open(self.logs[-1], "w") as log:
                self.procs.append(subprocess.Popen(
                    [sys.executable, *head, *map(str, args), "--compilation-cache-dir",
                     xla_cache_dir, "--peer-timeout", str(PEER_TIMEOUT_S), *per_process(rank)],
                    stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT))

    def log(self, rank: int) -> str:
        return self.logs[rank].read_text()

    def wait(self, timeout_s: float, ranks=None) -> list[int | None]:
        """Exit codes once every process of `ranks` (default: all) has exited, or None for
        those still running."""
        deadline = time.monotonic() + timeout_s
        for proc in [self.procs[r] for r in ranks] if ranks is not None else self.procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        return [proc.poll() for proc in self.procs]

    def wait_for(self, pattern: str, rank: int = 0) -> re.Match:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            found = re.search(pattern, self.log(rank))
            if found:
                return found
            if any(p.poll() is not None for p in self.procs):
                raise AssertionError(f"a process exited: {self.dump()}")
            time.sleep(0.1)
        raise AssertionError(f"{pattern!r} not in process {rank}'s log: {self.dump()}")

    def dump(self) -> str:
        return "\n".join(f"--- process {r} (exit {p.poll()}):\n{self.log(r)[-3000:]}"
                         for r, p in enumerate(self.procs))

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
                proc.wait(30)


@pytest.fixture
def group_of(tmp_path, xla_cache_dir):
    groups = []

    def start(n, args, **kw):
        groups.append(Group(n, args, tmp_path, xla_cache_dir, **kw))
        return groups[-1]
    yield start
    for group in groups:
        group.kill()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, cache_dir):
    """Random-weight checkpoints of a tiny Llama and a tiny Gemma 3 with SmolLM2's tokenizer."""
    from jaxgen.checkpoints import orbax_format, registry
    from jaxgen.models import Model, ModelConfig
    from jaxgen.tokenizer import load_tokenizer

    ensure_model(cache_dir)
    tokenizer = load_tokenizer(os.path.join(registry.cache_dir(cache_dir), "models", MODEL,
                                            "tokenizer"))
    paths = {}
    for name, shape in TINY.items():
        cfg = ModelConfig(vocab_size=tokenizer.vocab_size, dtype="float32", **shape)
        model = Model(cfg)
        paths[name] = str(tmp_path_factory.mktemp(name) / "ckpt")
        orbax_format.save(paths[name], cfg, model.canonical_params(model.init_random(seed=3)),
                          tokenizer)
    return paths


def one_process(model: str, cache_dir: str, prompts=PROMPTS) -> dict[str, list[int]]:
    """Greedy token ids of one process (the offline engine, the ENGINE shapes, one device)."""
    import dataclasses

    from jaxgen.build import build_engine
    from jaxgen.cli import parser
    from jaxgen.config_sources import config_from_args
    from jaxgen.sampling_params import SamplingParams

    config = config_from_args(parser().parse_args(
        ["generate", "--model", model, "--cache-dir", cache_dir, *ENGINE]), "generate")
    engine = build_engine(dataclasses.replace(config, compilation_cache_dir="off"))
    ids = [engine.tokenizer.encode(p) for p in prompts]
    done = engine.generate(ids, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))
    return {p: list(c.token_ids) for p, c in zip(prompts, done)}


@pytest.fixture(scope="module")
def reference(tiny, cache_dir):
    """One process's greedy token ids for PROMPTS on the tiny Llama (computed once)."""
    return one_process(tiny["llama"], cache_dir)


def batch_lines(prompts, max_tokens=MAX_TOKENS, first=0, **body) -> list[dict]:
    return [{"custom_id": f"line-{first + i}", "method": "POST", "url": "/v1/completions",
             "body": {"prompt": p, "max_tokens": max_tokens, "temperature": 0, **body}}
            for i, p in enumerate(prompts)]


def write_lines(path, lines) -> str:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(path)


def batch_texts(path) -> dict[str, str]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return {r["custom_id"]: r["response"]["body"]["choices"][0]["text"] for r in records}


def one_process_batch(model: str, lines, work) -> dict[str, str]:
    """The texts one process's batch job writes for `lines` (the ENGINE shapes, one device)."""
    from jaxgen.batch import BatchOptions, run
    from jaxgen.config import Config, EngineConfig, ModelSource

    config = Config(model=ModelSource(model), compilation_cache_dir="off",
                    engine=EngineConfig(num_slots=4, max_model_len=128, num_pages=64,
                                        decode_steps=4, max_prefill_tokens=16, warmup=False))
    run(write_lines(work / "want-in.jsonl", lines), str(work / "want.jsonl"), config,
        BatchOptions(quiet=True))
    return batch_texts(work / "want.jsonl")


def serving(group: Group) -> tuple[grpc.Channel, pb_grpc.GenerationStub]:
    port = int(group.wait_for(r"listening on [^\s]+:(\d+) ").group(1))
    group.wait_for(r"serving .* on ")
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    return channel, pb_grpc.GenerationStub(channel)


def health(channel) -> str:
    status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(status.status)


def greedy(text: str, max_tokens: int = MAX_TOKENS, **extra) -> pb.GenerateRequest:
    return pb.GenerateRequest(text=text, sampling=pb.SamplingParams(
        max_tokens=max_tokens, temperature=0.0, ignore_eos=extra.pop("ignore_eos", False)), **extra)


def token_ids(stub, request, **kw) -> list[int]:
    return [t for r in stub.Generate(request, **kw) for t in r.token_ids]


def test_serve_over_two_processes_then_one_is_killed(group_of, tiny, reference):
    """Mesh (1,4) over 2 processes (the engine in its own process on process 0): staggered
    requests, an abort and a deadline among them, each completion as one process's; no
    compilation after warm-up anywhere. Then SIGKILL of process 1 mid-stream: the stream ends
    UNAVAILABLE, health is NOT_SERVING, and every process exits non-zero naming process 1."""
    group = group_of(2, ["serve", "--model", tiny["llama"], "--mesh", "1,4", "--port", "0",
                         "--no-http", *ENGINE])
    channel, stub = serving(group)
    got, errors = {}, {}

    def run(i, prompt):
        time.sleep(0.4 * i)  # staggered arrivals: requests join a batch already running
        got[prompt] = token_ids(stub, greedy(prompt), timeout=60)

    def aborted():
        call = stub.Generate(greedy("Abort me", 100, ignore_eos=True, request_id="abort-me"),
                             timeout=60)
        chunks = iter(call)
        next(chunks)
        stub.Abort(pb.AbortRequest(request_id="abort-me"), timeout=10)
        errors["abort"] = [r.finish_reason for r in chunks][-1]

    def late():
        try:
            token_ids(stub, greedy("Too slow", 100, ignore_eos=True), timeout=2.0)
        except grpc.RpcError as e:
            errors["deadline"] = e.code()

    threads = [threading.Thread(target=run, args=(i, p)) for i, p in enumerate(PROMPTS)]
    threads += [threading.Thread(target=aborted), threading.Thread(target=late)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert got == reference
    assert errors == {"abort": pb.FINISH_REASON_ABORT, "deadline": grpc.StatusCode.DEADLINE_EXCEEDED}
    # Process 0's own and what process 1 reported: none on either.
    assert stub.GetServerStats(pb.GetServerStatsRequest(), timeout=10).compilations_after_warmup == 0

    call = stub.Generate(greedy("A long story", 100, ignore_eos=True), timeout=60)
    chunks = iter(call)
    next(chunks)
    group.procs[1].kill()
    killed = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        list(chunks)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
    assert "lost process 1" in err.value.details()
    deadline = time.monotonic() + 2  # the health watcher's interval, well within the grace
    while health(channel) != "NOT_SERVING" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert health(channel) == "NOT_SERVING"
    codes = group.wait(60 - (time.monotonic() - killed))
    assert codes[0] == 3, group.dump()
    assert "lost process 1" in group.log(0)


def test_serve_sigterm_to_process_0_stops_every_process(group_of, tiny, reference):
    """The engine on a thread of process 0 (mesh (1,4) again: the programs come from the
    persistent compilation cache): completions as one process's; SIGTERM to process 0 while a
    request streams drains it, then every process exits 0, process 1 having compiled nothing
    after warm-up."""
    group = group_of(2, ["serve", "--model", tiny["llama"], "--mesh", "1,4", "--port", "0",
                         "--no-http", "--no-engine-process", *ENGINE])
    channel, stub = serving(group)
    assert {p: token_ids(stub, greedy(p), timeout=60) for p in PROMPTS[:3]} == \
        {p: reference[p] for p in PROMPTS[:3]}
    call = stub.Generate(greedy("Still running", 40, ignore_eos=True), timeout=60)
    chunks = iter(call)
    next(chunks)
    group.procs[0].send_signal(signal.SIGTERM)
    rest = list(chunks)
    assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH  # drained, not cut
    assert group.wait(60) == [0, 0], group.dump()
    assert "(0 compilations after warm-up)" in group.log(1)


def test_batch_with_a_process_stopped_midway(group_of, tiny, tmp_path):
    """`jaxgen batch` of a Gemma 3, mesh (4,1) over 2 processes: the records written are one
    process's; then
    process 1 stops answering (SIGSTOP) mid-job: process 0 names it within the peer timeout and
    exits non-zero; resumed (SIGCONT), process 1 finds process 0 gone and exits non-zero too."""
    short = batch_lines(PROMPTS)
    # Far more work than the test waits for: process 0 is inside a step when process 1 stops.
    long = batch_lines([f"Story {i}:" for i in range(200)], 120, first=len(short), ignore_eos=True)
    out = tmp_path / "out.jsonl"
    group = group_of(2, ["batch", write_lines(tmp_path / "in.jsonl", short + long), out,
                         "--quiet", "--order", "input", "--model", tiny["gemma3"], "--mesh", "4,1",
                         "--no-warmup", *ENGINE])
    want = one_process_batch(tiny["gemma3"], short, tmp_path)
    deadline = time.monotonic() + START_TIMEOUT_S
    while not (out.exists() and len(out.read_text().splitlines()) >= len(short) + 1):
        assert time.monotonic() < deadline and group.procs[0].poll() is None, group.dump()
        time.sleep(0.1)
    group.procs[1].send_signal(signal.SIGSTOP)
    stopped = time.monotonic()
    # Process 1 cannot exit while stopped: wait for process 0 alone.
    assert group.wait(PEER_TIMEOUT_S + 20, ranks=[0])[0] == 3, group.dump()
    # Silence is judged every heartbeat interval (1 s); process 0 then holds for its grace (2 s).
    assert time.monotonic() - stopped < PEER_TIMEOUT_S + 1 + 2 + 5
    assert re.search(r"lost process 1 .*nothing heard from it", group.log(0))
    group.procs[1].send_signal(signal.SIGCONT)
    assert group.wait(30)[1] == 3, group.dump()
    assert "lost process 0" in group.log(1) or "the group failed" in group.log(1)
    written = batch_texts(out)
    assert {k: written[k] for k in want} == want


def test_generate_real_model_over_two_processes_and_only_process_0_schedules(
        group_of, cache_dir, tmp_path):
    """SmolLM2-135M, mesh (2,2): `jaxgen generate` over 2 processes prints one process's
    completions; the scheduler is called in process 0 and never in process 1 (which ran the
    plans: it says how many)."""
    group = group_of(2, ["generate", "--model", MODEL, "--cache-dir", cache_dir, "--mesh", "2,2",
                         "--json", "--max-tokens", MAX_TOKENS, *ENGINE, *PROMPTS[:3]], audit=True)
    want = one_process(MODEL, cache_dir, PROMPTS[:3])
    assert group.wait(START_TIMEOUT_S) == [0, 0], group.dump()
    got = {r["prompt"]: r["token_ids"]
           for r in map(json.loads, re.findall(r"^\{.*\}$", group.log(0), re.M))}
    assert got == want
    assert {"__init__", "schedule", "update"} <= set(json.loads((tmp_path / "audit-0.json").read_text()))
    assert not (tmp_path / "audit-1.json").exists()
    steps = int(re.search(r"stopped by process 0 after (\d+) steps", group.log(1)).group(1))
    assert steps > 0


def test_batch_over_four_processes_with_speculative_decoding(group_of, tiny, tmp_path):
    """Mesh (2,4) over 4 processes, n-gram drafts verified in the plans' verify rows: process 0
    reads and writes the files; the records are those of one process's batch job without
    speculation (greedy: drafts never change the output), and drafts were accepted."""
    lines = batch_lines(PROMPTS, 24)
    group = group_of(4, ["batch", write_lines(tmp_path / "in.jsonl", lines),
                         tmp_path / "out.jsonl", "--quiet", "--model", tiny["llama"],
                         "--mesh", "2,4", "--no-warmup", "--speculative", "ngram", *ENGINE])
    want = one_process_batch(tiny["llama"], lines, tmp_path)
    assert group.wait(START_TIMEOUT_S) == [0, 0, 0, 0], group.dump()
    assert batch_texts(tmp_path / "out.jsonl") == want
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    accepted = sum(r["response"]["body"]["usage"].get("completion_tokens_details", {})
                   .get("accepted_prediction_tokens", 0) for r in records)
    assert accepted > 0


@pytest.mark.parametrize("differ", ["max-model-len", "checkpoint"])
def test_a_process_started_unlike_the_others_is_one_clear_error_everywhere(
        group_of, tiny, differ):
    """Process 1 with another --max-model-len (found before loading) or another checkpoint
    (found after): every process exits 2 naming the difference; none hangs."""
    if differ == "max-model-len":
        other, named = ["--max-model-len", "256"], "engine.max_model_len=256"
    else:
        other, named = ["--model", tiny["gemma3"]], "model="
    group = group_of(2, ["generate", "--model", tiny["llama"], *ENGINE, "Hello"],
                     per_process=lambda rank: other if rank == 1 else ())
    assert group.wait(90) == [2, 2], group.dump()
    for rank in (0, 1):
        assert "were not started alike" in group.log(rank) and named in group.log(rank)


def _free_slurm_job_id() -> int:
    """A job id whose coordinator port (JAX's Slurm rule: 61440 + id % 4096) is free here."""
    import socket

    for port in range(61440 + os.getpid() % 2048, 65536):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port - 61440
    raise AssertionError("no free port in JAX's Slurm range")


def test_distributed_auto_joins_the_group_a_slurm_job_describes(tiny, reference, tmp_path):
    """`--distributed auto` with neither coordinator, count nor rank given: each process finds
    them where JAX's own detection does, here the variables Slurm sets for each task of a
    2-task job step on this host; the group's greedy output is one process's."""
    job, procs = _free_slurm_job_id(), []
    for rank in range(2):
        env = dict(child_env(), XLA_FLAGS="--xla_force_host_platform_device_count=2",
                   SLURM_JOB_ID=str(job), SLURM_STEP_NODELIST="127.0.0.1", SLURM_NTASKS="2",
                   SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "jaxgen.cli", "generate", "--distributed", "auto",
             "--model", tiny["llama"], "--mesh", "1,4", "--json", "--max-tokens", str(MAX_TOKENS),
             "--peer-timeout", str(PEER_TIMEOUT_S), "--compilation-cache-dir", "off", *ENGINE,
             *PROMPTS], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True))
    try:
        outs = [proc.communicate(timeout=START_TIMEOUT_S)[0] for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    assert [proc.returncode for proc in procs] == [0, 0], outs
    got = {r["prompt"]: r["token_ids"] for r in map(json.loads, re.findall(r"^\{.*\}$", outs[0], re.M))}
    assert got == reference
    assert "process 1 of 2 stopped by process 0" in outs[1]


def test_a_group_that_never_forms_is_one_clear_error_on_each_process(tiny):
    """Process 0 of 2 started alone, and process 1 of 2 with no process 0: each says the group
    did not form within 10 x --peer-timeout and exits 2 (JAX's own join timeout would abort
    the process from C++, with no word of why)."""
    procs = []
    for rank in (0, 1):
        env = process_env(rank, 2, f"127.0.0.1:{free_port()}", cpu_devices=2, base=child_env())
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "jaxgen.cli", "generate", "--model", tiny["llama"],
             "--peer-timeout", "1", *ENGINE, "Hello"], env=env, cwd=ROOT,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    start = time.monotonic()
    outs = [proc.communicate(timeout=120)[0] for proc in procs]
    assert time.monotonic() - start < 60, outs
    assert [proc.returncode for proc in procs] == [2, 2], outs
    assert "process 0 of 2: the group did not form within 10s" in outs[0]
    assert "the other 1 process(es) did not all reach this coordinator" in outs[0]
    assert "process 1 of 2: the group did not form within 10s" in outs[1]
