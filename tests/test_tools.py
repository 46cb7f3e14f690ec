"""Host-side logic of the benchmark tools (their timings come from the GPU box, not tests)."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))

import profile_decode  # noqa: E402


def test_busy_time_is_the_union_of_intervals():
    assert profile_decode.busy_time([]) == 0.0
    assert profile_decode.busy_time([(5, 7), (0, 2), (1, 3), (3, 4)]) == 6  # [0,4) and [5,7)


def test_stream_summary_reads_the_busiest_gpu_stream():
    events = [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
        {"ph": "X", "pid": 1, "tid": 7, "ts": 0, "dur": 10, "name": "gemm"},
        {"ph": "X", "pid": 1, "tid": 7, "ts": 20, "dur": 10, "name": "gemm"},
        {"ph": "X", "pid": 1, "tid": 7, "ts": 25, "dur": 15, "name": "rpa_decode"},
        {"ph": "X", "pid": 1, "tid": 9, "ts": 0, "dur": 99, "name": "memcpy"},  # other stream
        {"ph": "X", "pid": 2, "tid": 7, "ts": 0, "dur": 99, "name": "host"},  # not a GPU
    ]
    n, span, busy, by_name = profile_decode.stream_summary(events)
    assert (n, span, busy) == (3, 40, 30)
    assert by_name == {"gemm": [20.0, 2], "rpa_decode": [15.0, 1]}


def test_host_gap_summary():
    import bench_host_gap

    assert bench_host_gap.summary([]) == {}
    s = bench_host_gap.summary([0.0, 0.0, 0.002, 0.004])
    assert s["launched_ahead_share"] == 0.5
    assert abs(s["mean_ms"] - 1.5) < 1e-9 and abs(s["max_ms"] - 4.0) < 1e-9
    assert abs(s["p50_ms"] - 1.0) < 1e-9


def test_check_backends_compare_names_the_first_difference():
    import check_backends

    assert check_backends.first_difference([1, 2, 3], [1, 2, 3]) is None
    assert check_backends.first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert check_backends.first_difference([1, 2], [1, 2, 3]) == 2  # shorter counts
    rows = check_backends.compare({"reference": ([[1, 2], [3, 4]], 1.0),
                                   "gpu": ([[1, 2], [3, 9]], 0.5)})
    assert rows[0]["equal"] == 2 and rows[0]["first_difference"] is None
    assert rows[1]["equal"] == 1 and rows[1]["first_difference"] == (1, 1)
    assert rows[1]["reference"] == "reference" and rows[1]["tokens"] == 4


def test_make_bench_checkpoint_loads_with_its_tokenizer(tmp_path, cache_dir):
    """A random-weight shape saved with a real tokenizer: the vocabulary follows the tokenizer
    and the result loads as a jaxgen checkpoint that `serve` can use."""
    import make_bench_checkpoint

    from jaxgen import checkpoints
    from tests.helpers import TINY_LLAMA

    smol = checkpoints.load("smollm2-135m", cache=cache_dir)
    shape = tmp_path / "tiny.json"
    shape.write_text(TINY_LLAMA.to_json())
    out = tmp_path / "bench"
    make_bench_checkpoint.main(["--shape", str(shape), "--out", str(out), "--dtype", "float32",
                                "--tokenizer", os.path.join(smol.source, "tokenizer")])
    loaded = checkpoints.load(str(out))
    assert loaded.config.vocab_size == smol.tokenizer.vocab_size == 49152
    assert loaded.config.num_layers == TINY_LLAMA.num_layers
    assert loaded.tokenizer.encode("Hello, world!") == smol.tokenizer.encode("Hello, world!")


def test_bench_tools_name_bad_input(capsys):
    import pytest

    import check_backends
    import make_bench_checkpoint

    with pytest.raises(SystemExit) as e:
        make_bench_checkpoint.main(["--shape", "llama-9z", "--tokenizer", "x", "--out", "y"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "shape='llama-9z': no such preset or file" in err and "llama-3.2-1b" in err
    with pytest.raises(SystemExit) as e:  # "auto" is "xla" on CPU: nothing to compare
        check_backends.main(["--backends", "xla,auto", "--model", "unused"])
    assert e.value.code == 2
    assert "need two distinct backends" in capsys.readouterr().err
    import bench_verify

    for contexts in ("0,-5", "12,x", ""):  # refused before any model is loaded
        with pytest.raises(SystemExit) as e:
            bench_verify.main(["--model", "unused", "--contexts", contexts])
        assert e.value.code == 2
        assert f"--contexts {contexts!r}: must be comma-separated integers >= 0" in \
            capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        bench_verify.main(["--model", "unused", "--reps", "0"])
    assert e.value.code == 2 and "--reps 0: must be >= 1" in capsys.readouterr().err

    import bench_speculative

    for argv, message in [(["--batches", "1,0"], "--batches '1,0': must be comma-separated"),
                          (["--batches", "x"], "--batches 'x': must be comma-separated"),
                          (["--prompts", "0"], "--prompts 0: must be >= 1"),
                          (["--max-tokens", "-1"], "--max-tokens -1: must be >= 1"),
                          (["--reps", "0"], "--reps 0: must be >= 1")]:
        with pytest.raises(SystemExit) as e:  # refused before any model is loaded
            bench_speculative.main(["--models", "unused"] + argv)
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_bench_attention_block_specs(capsys):
    import pytest

    import bench_attention

    blocks = bench_attention.parse_blocks("ppb=8,stages=2,splits=4")
    assert (blocks.pages_per_block, blocks.num_stages, blocks.num_splits) == (8, 2, 4)
    assert bench_attention.parse_blocks("") == bench_attention.parse_blocks("warps=4")
    for spec, bad in [("ppb=8,stage=2", "'stage=2'"), ("ppb=x", "'ppb=x'"), ("ppb=0", "'ppb=0'"),
                      ("ppb", "'ppb'")]:
        with pytest.raises(SystemExit) as e:  # before any device work
            bench_attention.main(["--gpu-blocks", f"ppb=4;{spec}"])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert f"--gpu-blocks {spec!r}: bad item {bad}" in err and "pages_per_block" not in err
        assert "ppb, stages, warps, programs, splits, bq" in err


def test_bench_projections_names_the_matmul_kernels():
    import bench_projections

    hlo = """
  %input_reduce_fusion.3 = bf16[3072]{0} fusion(%p0, %p1), kind=kInput, calls=%fused_reduce
  %input_reduce_fusion_1.2 = bf16[3072]{0} fusion(%p0, %p2), kind=kInput, calls=%fused_reduce.1
  %gemm_fusion_dot.7 = bf16[2,2048]{1,0} fusion(%p3, %p4), kind=kCustom, calls=%gemm
  %loop_add_fusion = bf16[2048]{0} fusion(%a, %b), kind=kLoop, calls=%add
"""
    assert bench_projections.kernel_kinds(hlo) == "input_reduce_fusion x2, gemm_fusion_dot x1"
    assert bench_projections.kernel_kinds("%loop_add_fusion = f32[2]{0} fusion(%a)") == "-"


def test_bench_attention_table_len_and_min_split_blocks():
    """--table-len widens the page table with null entries (as max_model_len does in the
    engine) and keeps the context's pages first; minblocks= sets the decode split floor."""
    import jax
    import numpy as np

    import bench_attention

    _, _, (kv_lens, table, _, _) = bench_attention.make_inputs(
        jax.random.key(0), 2, 40, 1, 4, 2, 8, 16, 1, table_len=160)
    table = np.asarray(table)
    assert table.shape == (2, 10) and list(np.asarray(kv_lens)) == [41, 41]
    assert (table[:, 3:] == 0).all() and (table[:, :3] > 0).all()
    assert len(set(table[:, :3].ravel())) == 6  # each sequence its own pages
    assert bench_attention.parse_blocks("minblocks=3").min_split_blocks == 3


def test_gpu_block_sizes_refuse_values_below_one():
    import pytest

    from pallas_kernels.ragged_paged_attention.gpu import GpuBlockSizes

    with pytest.raises(ValueError, match="min_split_blocks=0: must be >= 1"):
        GpuBlockSizes(min_split_blocks=0)
    assert GpuBlockSizes(num_splits=None).num_splits is None


def test_bench_serving_step_stats_observe_an_engine():
    """The offline side of bench_serving reports what /metrics reports of the steps."""
    import bench_serving
    from jaxgen.models import Model
    from jaxgen.sampling_params import SamplingParams
    from tests.helpers import TINY_LLAMA, ByteTokenizer, engine_for

    model = Model(TINY_LLAMA)
    engine = engine_for(model, model.init_random(seed=0), ByteTokenizer())
    stats = bench_serving.StepStats()
    engine.observers.append(stats)
    out = engine.generate([list(b"hello"), list(b"a longer prompt")],
                          SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True))
    summary = stats.summary()
    assert sum(len(c.token_ids) for c in out) == 18
    # A prefill step, then decode steps of 4 tokens launched ahead of the previous read.
    assert summary["steps"] >= 3 and summary["mean_step_s"] > 0
    assert 1 <= summary["launched_ahead"] <= summary["steps"]
    assert 0 <= summary["launched_on_drained_device"] <= summary["launched_ahead"]
    assert summary["mean_launch_s"] > 0


def test_bench_detok_table_and_bad_input(tmp_path, cache_dir, capsys):
    import bench_detok
    import pytest

    from jaxgen import checkpoints

    smol = checkpoints.load("smollm2-135m", cache=cache_dir)
    text = tmp_path / "text.txt"
    text.write_text("Streaming text back, a step at a time: naïve café, 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 and 🫠. " * 20)
    bench_detok.main(["--tokenizer", os.path.join(smol.source, "tokenizer"), "--text", str(text),
                      "--steps", "1,16", "--reps", "1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 1")]
    assert [r.split("|")[1].strip() for r in rows] == ["1", "16"]
    assert all(float(r.split("|")[2]) > 0 for r in rows)
    bench_detok.main(["--tokenizer", os.path.join(smol.source, "tokenizer"), "--random-ids",
                      "200", "--steps", "16", "--reps", "1"])
    out = capsys.readouterr().out
    assert "200 random ids" in out and float(out.splitlines()[-1].split("|")[2]) > 0
    with pytest.raises(SystemExit) as e:
        bench_detok.main(["--tokenizer", os.path.join(smol.source, "tokenizer"), "--text",
                          str(text), "--steps", "0"])
    assert e.value.code == 2 and "must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        bench_detok.main(["--tokenizer", os.path.join(smol.source, "tokenizer"), "--random-ids", "-5"])
    assert e.value.code == 2 and "random_ids=-5: must be 0" in capsys.readouterr().err


def test_bench_host_times_every_stage(tmp_path, cache_dir, xla_cache_dir, capsys):
    import json

    import bench_host

    from tests.server_process import ensure_model

    preset = tmp_path / "preset.json"  # the stages, not the model, are the subject: 4 layers
    preset.write_text(json.dumps({"model": ensure_model(cache_dir), "slots": 4, "max-model-len": 256,
                                  "num-pages": 64, "decode-steps": 4, "max-prefill-tokens": 64}))
    out = tmp_path / "host.json"
    assert bench_host.main(["--config", str(preset), "--num-requests", "6", "--max-prompt-tokens",
                            "32", "--max-output-tokens", "16", "--out-json", str(out), "--",
                            "--cache-dir", cache_dir, "--compilation-cache-dir", xla_cache_dir]) == 0
    report = json.loads(out.read_text())
    stages = {r["stage"]: r for r in report["stages"]}
    assert report["requests"] == 6 and report["output_tokens"] >= 6 * 16
    for name in ("plan ahead", "dispatch (uploads, jit calls)", "wait for tokens (device)",
                 "fold tokens in (scheduler)", "text and streams (detokenize, stops)"):
        assert stages[name]["calls"] > 0 and stages[name]["ms_per_step"] > 0, name
    assert sum(r["share"] for r in report["stages"]) <= 1.0 + 1e-6  # one thread: no overlap
    assert "| dispatch (uploads, jit calls) |" in capsys.readouterr().out


def test_preset_tools_name_bad_input(tmp_path, capsys):
    """bench_host and bench_host_gap share their flags and engine building
    (`bench_serving.preset_engine_and_workload`): a bad value or a missing preset is one
    usage error naming it, before any engine is built."""
    import pytest

    import bench_host
    import bench_host_gap

    missing = str(tmp_path / "none.json")
    for tool, argv, message in [
            (bench_host, ["--config", missing], "none.json"),
            (bench_host, ["--config", missing, "--num-requests", "0"], "num_requests=0"),
            (bench_host_gap, ["--config", missing], "none.json"),
            (bench_host_gap, ["--config", missing, "--rate", "0"], "rate=0.0: must be > 0"),
            (bench_host_gap, ["--config", missing, "--max-output-tokens", "8"],
             "max_output_tokens=8 >= 16")]:
        with pytest.raises(SystemExit) as e:
            tool.main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (tool.__name__, argv, err)


def test_read_ceiling_reads_the_whole_array_once():
    """The read-stream ceiling (a row reduction) and the copy ceiling both give a rate; on one
    small array the read moves half the bytes of the copy."""
    import device_ceilings

    read = device_ceilings.read_bandwidth(gib=1 / 64, reps=2)
    assert read > 0


def test_bench_offline_stand_in_tokenizer_serves_the_detokenizer():
    """The random-shape benchmarks' tokenizer answers what a request's detokenizer asks (its
    missing `skips()` failed both offline GPU runs on their first request)."""
    import bench_offline
    from jaxgen.tokenizer.detokenizer import IncrementalDetokenizer

    detok = IncrementalDetokenizer(bench_offline.RandomTokenTokenizer(), [5, 6, 7])
    assert detok.push([8, 9]) == ""


def test_bench_speculative_chat_prompts_go_through_the_chat_template(cache_dir):
    """`--chat`: each workload prompt becomes one user message rendered by the model's template
    (SmolLM2-Instruct's `<|im_start|>user ... <|im_start|>assistant`); without it, plain text."""
    import bench_speculative
    from spec_workloads import copy_heavy

    from jaxgen.tokenizer import load_tokenizer
    from tests.server_process import ensure_model

    tok = load_tokenizer(os.path.join(ensure_model(cache_dir), "tokenizer"))
    texts = copy_heavy(2)
    plain = bench_speculative.encode_prompts(tok, texts, chat=False)
    chat = bench_speculative.encode_prompts(tok, texts, chat=True)
    assert plain == [tok.encode(t) for t in texts]
    for text, ids in zip(texts, chat):
        rendered = tok.decode(ids)
        assert rendered.startswith("<|im_start|>") and text in rendered
        assert rendered.endswith("<|im_start|>assistant\n")


def test_bench_speculative_default_prompts_cover_every_copy_heavy_kind():
    """At batch 1 the default prompt count gives one rewrite, one fix and one quote."""
    import bench_speculative
    from spec_workloads import copy_heavy

    args = bench_speculative.parse_args([])
    texts = copy_heavy(1 * args.prompts, seed=1)
    assert [sum(marker in t for t in texts) for marker in
            ("Original passage:", "has a typo", "Document:")] == [1, 1, 1]


def test_ngram_replay_counts_the_steps_drafting_at_every_token_would_take():
    """`ngram_replay` replays outputs through the n-gram proposer: an output that repeats its
    prompt is covered by drafts (K accepted plus one token per step), one of tokens never seen
    takes a step per token, and a draft that fails part-way keeps its matching prefix."""
    import bench_speculative

    def replay(prompts, outputs):
        return bench_speculative.ngram_replay(prompts, outputs, 4, 4, 2)

    prompt = list(range(100, 140))
    # The output starts the prompt again: its first two tokens decode (nothing matches the
    # n-grams ending the sequence), then [100, 101] is found and the other 32 tokens come in
    # verify steps of K + 1 = 5 (the last one shortened by the output's end): 7 verifies.
    copy = prompt[:34]
    assert replay([prompt], [copy]) == (34, 7, 2)
    fresh = list(range(500, 540))
    assert replay([prompt], [fresh]) == (40, 0, 40)
    # A draft that breaks after 2 tokens: [100, 101] proposes 102..105; the output has 102, 103,
    # then 999 (the step emits 102, 103, 999), then nothing matches.
    broken = [100, 101, 102, 103, 999, 998]
    assert replay([prompt], [broken]) == (6, 1, 3)
    assert replay([prompt] * 2, [copy, fresh]) == (74, 7, 42)

    assert bench_speculative.replayed_speedup((34, 7, 2)) == 34 / 9
    assert bench_speculative.replayed_speedup((34, 7, 2), verify_cost=2.0) == 34 / 16
    assert bench_speculative.replayed_speedup((40, 0, 40), verify_cost=2.0) == 1.0


def test_bench_verify_times_decode_and_verify_at_each_context(tmp_path, cache_dir, capsys):
    import json

    import bench_verify

    from tests.server_process import ensure_model

    out = tmp_path / "verify.json"
    assert bench_verify.main(["--model", ensure_model(cache_dir), "--contexts", "0,40",
                              "--num-speculative-tokens", "3", "--reps", "1",
                              "--out-json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["context"] for r in rows] == [0, 40] and all(r["k"] == 3 for r in rows)
    for r in rows:
        assert r["decode_token_ms"] > 0 and r["verify_ms"] > 0
        assert r["verify_in_tokens"] == r["verify_ms"] / r["decode_token_ms"]
    assert "context    40: decode" in capsys.readouterr().out
