"""Checkpoint loading: bundled-model conversion into the cache and reuse, `jaxgen convert`,
and one clear error (no traceback from the CLI) for each kind of user mistake."""

import json
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from jaxgen import checkpoints
from jaxgen.checkpoints import CheckpointError, orbax_format
from jaxgen.checkpoints.registry import bundled
from jaxgen.models import Model
from tests.helpers import TINY_LLAMA


def _tiny_hf_dir(tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    return tmp_path


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_bundled_model_is_converted_once_then_cached(cache_dir):
    first = checkpoints.load("smollm2-135m", cache=cache_dir)
    second = checkpoints.load("SmolLM2-135M-Instruct", cache=cache_dir)  # alias, any case
    assert orbax_format.is_jaxgen_checkpoint(first.source)
    assert second.source == first.source and not second.converted
    a, b = orbax_format.flatten(first.params), orbax_format.flatten(second.params)
    for name in a:
        np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]))
    assert second.tokenizer.encode("Hello, world!") == first.tokenizer.encode("Hello, world!")


def test_a_conversion_waits_for_another_and_reuses_what_it_wrote(cache_dir, tmp_path, monkeypatch):
    """Two servers starting at once on one cold cache: the second waits for the first's lock
    and then finds the model converted (converting again would rewrite the folder under the
    first one's readers); a lock held too long is an error naming it."""
    path = str(tmp_path / "models" / "smollm2-135m")
    done = []
    with checkpoints._converting(path):  # "the first server", converting
        waiter = threading.Thread(target=lambda: done.append(
            checkpoints.ensure_converted("smollm2-135m", str(tmp_path))))
        waiter.start()
        time.sleep(1.0)
        assert not done and waiter.is_alive()  # waits for the lock
        with pytest.raises(CheckpointError, match=r"smollm2-135m.lock.*stuck"):
            with checkpoints._converting(path, timeout_s=0.3):
                pass
        shutil.copytree(checkpoints.ensure_converted("smollm2-135m", cache_dir), path)
        monkeypatch.setattr(checkpoints, "convert", lambda *a: pytest.fail("converted twice"))
    waiter.join(30)
    assert done == [path]


def test_convert_cli_round_trip(tmp_path, cache_dir):
    dst = tmp_path / "smol"
    run = subprocess.run([sys.executable, "-m", "jaxgen.cli", "convert", "smollm2-135m", str(dst),
                          "--dtype", "bfloat16"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    loaded = checkpoints.load(str(dst), dtype="float32")
    assert loaded.config.architecture == "llama" and loaded.config.num_layers == 30
    direct = checkpoints.load(bundled("smollm2-135m").locate_gguf())
    got = np.asarray(loaded.params["layers"][3]["mlp"]["gate_up"])
    want = np.asarray(direct.params["layers"][3]["mlp"]["gate_up"])
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2)  # via bf16


def test_truncated_gguf(tmp_path):
    data = open(bundled("smollm2-135m").locate_gguf(), "rb").read()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.gguf: not a readable GGUF file"):
        checkpoints.load(str(bad))


def test_unknown_architecture_gguf(tmp_path):
    import gguf

    path = tmp_path / "mamba.gguf"
    writer = gguf.GGUFWriter(str(path), "mamba")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match="general.architecture='mamba' is not supported"):
        checkpoints.load(str(path))


def test_wrong_tensor_shape(tmp_path):
    path = _tiny_hf_dir(tmp_path)
    _edit_config(path, intermediate_size=96)
    with pytest.raises(CheckpointError,
                       match=r"'model.layers.0.mlp.gate_proj.weight' has shape \(128, 64\), expected \(96, 64\)"):
        checkpoints.load(str(path))


def test_missing_tensors(tmp_path):
    path = _tiny_hf_dir(tmp_path)
    _edit_config(path, num_hidden_layers=3)
    with pytest.raises(CheckpointError, match=r"missing 9 tensor\(s\) for a llama model with 3 layers"):
        checkpoints.load(str(path))


def test_unknown_model_type(tmp_path):
    path = _tiny_hf_dir(tmp_path)
    _edit_config(path, model_type="bert")
    with pytest.raises(CheckpointError, match="model_type='bert' is not supported"):
        checkpoints.load(str(path))


def test_truncated_safetensors(tmp_path):
    path = _tiny_hf_dir(tmp_path)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        checkpoints.load(str(path))


def test_incomplete_jaxgen_checkpoint(tmp_path):
    model = Model(TINY_LLAMA)
    orbax_format.save(str(tmp_path / "c"), TINY_LLAMA, model.canonical_params(model.init_random()))
    os.rename(tmp_path / "c" / "params", tmp_path / "c" / "moved")
    with pytest.raises(CheckpointError, match="no params/ directory"):
        orbax_format.restore(str(tmp_path / "c"), model)


@pytest.mark.parametrize("args,message", [
    (["generate", "hi", "--model", "no-such-model"],
     "model 'no-such-model': not a bundled model (gemma3-270m, smollm2-135m)"),
    (["generate", "hi", "--model", "/nonexistent/x.gguf"], "no such file or directory"),
    (["convert", "/nonexistent/dir", "/tmp/out"], "/nonexistent/dir: no such file or directory"),
])
def test_cli_reports_user_errors_without_traceback(args, message):
    run = subprocess.run([sys.executable, "-m", "jaxgen.cli", *args], capture_output=True, text=True)
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    assert f"jaxgen: error: " in run.stderr and message in run.stderr


def test_fused_projections_equal_the_separate_hf_ones():
    """`qkv` and `gate_up` built from HF tensors give exactly what HF's separate projections
    give: query head h*G + j next to KV head h, K and V of each head, gate and up."""
    from jaxgen.checkpoints.hf_layout import fuse_gate_up, fuse_qkv

    rng = np.random.default_rng(0)
    e, hq, hkv, d, f = 12, 6, 2, 4, 10
    q, k, v = (rng.standard_normal((h * d, e)) for h in (hq, hkv, hkv))
    x = rng.standard_normal((3, e))
    qkv = np.einsum("te,ehcd->thcd", x, fuse_qkv(q, k, v, hq, hkv))  # [T, Hkv, G + 2, D]
    g = hq // hkv
    np.testing.assert_allclose(qkv[:, :, :g].reshape(3, hq, d), (x @ q.T).reshape(3, hq, d))
    np.testing.assert_allclose(qkv[:, :, g], (x @ k.T).reshape(3, hkv, d))
    np.testing.assert_allclose(qkv[:, :, g + 1], (x @ v.T).reshape(3, hkv, d))
    gate, up = rng.standard_normal((f, e)), rng.standard_normal((f, e))
    h = np.einsum("te,ecf->tcf", x, fuse_gate_up(gate, up))
    np.testing.assert_allclose(h[:, 0], x @ gate.T)
    np.testing.assert_allclose(h[:, 1], x @ up.T)


def test_a_cached_bundled_model_in_an_older_format_is_converted_again(cache_dir, tmp_path):
    # A private copy of the session's cache: the session's other processes read that one.
    shutil.copytree(checkpoints.ensure_converted("smollm2-135m", cache_dir),
                    tmp_path / "models" / "smollm2-135m")
    first = checkpoints.load("smollm2-135m", cache=str(tmp_path))
    config = os.path.join(first.source, orbax_format.CONFIG_FILE)
    with open(config) as f:
        data = json.load(f)
    data["format_version"] = orbax_format.FORMAT_VERSION - 1
    with open(config, "w") as f:
        json.dump(data, f)
    again = checkpoints.load("smollm2-135m", cache=str(tmp_path))
    assert again.converted and orbax_format.format_version(again.source) == orbax_format.FORMAT_VERSION
    a, b = orbax_format.flatten(first.params), orbax_format.flatten(again.params)
    for name in a:
        np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]))


def test_a_users_checkpoint_in_an_older_format_names_the_fix(tmp_path):
    model = Model(TINY_LLAMA)
    orbax_format.save(str(tmp_path / "ckpt"), TINY_LLAMA,
                      model.canonical_params(model.init_random(seed=0)))
    config = tmp_path / "ckpt" / orbax_format.CONFIG_FILE
    data = json.loads(config.read_text())
    data["format_version"] = 1
    config.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"format_version=1, this jaxgen reads 2; convert"):
        checkpoints.load(str(tmp_path / "ckpt"))
