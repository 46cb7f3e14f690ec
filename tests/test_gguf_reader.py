"""`gguf_reader.GGUFFile` against its slow twin, `gguf.GGUFReader`: the same metadata values
(and Python types) and the same tensor names, shapes, types and bytes, on a bundled model and
on a file with every value type; damaged files raise `GGUFFormatError`, never a stray error."""

import gguf
import numpy as np
import pytest

from jaxgen.gguf_reader import GGUFFile, GGUFFormatError
from jaxgen.checkpoints.registry import bundled


def assert_same(path):
    ours, ref = GGUFFile(path), gguf.GGUFReader(path)
    keys = [k for k in ref.fields if not k.startswith("GGUF.")]  # gguf's header pseudo-fields
    assert list(ours.fields) == keys
    for key in keys:
        want, got = ref.fields[key].contents(), ours.fields[key].contents()
        assert type(got) is type(want), key
        if isinstance(want, float) or (isinstance(want, list) and want and isinstance(want[0], float)):
            np.testing.assert_array_equal(np.float64(got), np.float64(want), err_msg=key)
        else:
            assert got == want, key
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for o, r in zip(ours.tensors, ref.tensors):
        assert o.shape == tuple(int(d) for d in r.shape) and o.tensor_type == r.tensor_type, o.name
        assert o.offset == r.data_offset and o.n_bytes == r.n_bytes, o.name
        assert o.data.dtype == r.data.dtype and o.data.shape == r.data.shape, o.name
        assert np.array_equal(o.data.view(np.uint8), np.asarray(r.data).view(np.uint8)), o.name
    return ours


def test_bundled_model_reads_as_gguf_reads_it():
    ours = assert_same(bundled("smollm2-135m").locate_gguf())
    assert len(ours.tensors) > 100 and len(ours.fields["tokenizer.ggml.tokens"].contents()) == 49152


@pytest.mark.parametrize("name,arch,vocab", [("smollm2-135m", "llama", 49152),
                                             ("gemma3-270m", "gemma3", 262144)])
def test_the_vocabulary_free_copy_keeps_the_tensors_and_the_model_metadata(tmp_path, name,
                                                                          arch, vocab):
    """tests/helpers.py's copy that HF parity loads HF's model from: every tensor's bytes, type
    and shape and every metadata entry but the tokenizer's arrays are the original's, and the
    vocabulary size is still there for HF's config (added where the original has none)."""
    from tests.helpers import gguf_without_vocabulary

    path = bundled(name).locate_gguf()
    ours, copy = GGUFFile(path), GGUFFile(gguf_without_vocabulary(path, tmp_path))
    arrays = {k for k, f in ours.fields.items()
              if k.startswith("tokenizer.ggml.") and f.element_type is not None}
    assert arrays >= {"tokenizer.ggml.tokens", "tokenizer.ggml.token_type"}
    size_key = f"{arch}.vocab_size"
    assert {k: f.value for k, f in copy.fields.items() if k != size_key} == \
        {k: f.value for k, f in ours.fields.items() if k not in arrays and k != size_key}
    assert copy.fields[size_key].value == vocab
    assert [(t.name, t.shape, t.tensor_type) for t in copy.tensors] == \
        [(t.name, t.shape, t.tensor_type) for t in ours.tensors]
    for a, b in zip(copy.tensors, ours.tensors):
        assert np.array_equal(a.data.view(np.uint8), b.data.view(np.uint8)), a.name


def _every_type_file(path):
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -100)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 0.1)
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -(2**62))
    w.add_float64("t.f64", 1 / 3)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo ▁世界 🙂")
    w.add_string("t.empty", "")
    w.add_array("t.ints", [1, -2, 3])
    w.add_array("t.floats", [0.5, -1.25])
    w.add_array("t.strs", ["a", "", "▁b", "<0x0A>"])
    w.add_array("t.bools", [True, False])
    rng = np.random.default_rng(0)
    w.add_tensor("f32", rng.standard_normal((3, 64)).astype(np.float32))
    w.add_tensor("f16", rng.standard_normal((2, 5, 32)).astype(np.float16))
    w.add_tensor("i32", np.arange(7, dtype=np.int32))
    q = gguf.quants.quantize(rng.standard_normal((4, 256)).astype(np.float32),
                             gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("q8", q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_every_value_and_tensor_type(tmp_path):
    ours = assert_same(_every_type_file(tmp_path / "all.gguf"))
    f = ours.fields
    assert f["t.u64"].contents() == 2**63 + 5 and f["t.str"].contents() == "héllo ▁世界 🙂"
    assert f["t.strs"].contents() == ["a", "", "▁b", "<0x0A>"] and f["t.bool"].contents() is True
    q8 = next(t for t in ours.tensors if t.name == "q8")
    assert q8.shape == (256, 4) and q8.data.shape == (4, 256 // 32 * 34)
    deq = gguf.quants.dequantize(q8.data, q8.tensor_type)
    assert deq.shape == (4, 256) and np.isfinite(deq).all()


def test_damaged_files_raise_format_errors(tmp_path):
    data = _every_type_file(tmp_path / "all.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    # Every cut through the header and the data: a clear error, never IndexError / struct.error.
    header_end = GGUFFile(tmp_path / "all.gguf").data_offset
    for n in sorted(set(range(0, header_end, 7)) | {header_end + 1, len(data) - 1}):
        cut.write_bytes(data[:n])
        with pytest.raises(GGUFFormatError):
            GGUFFile(cut)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + data[4:])
    with pytest.raises(GGUFFormatError, match="magic b'GGML'"):
        GGUFFile(bad)
    bad.write_bytes(data[:4] + (1).to_bytes(4, "little") + data[8:])
    with pytest.raises(GGUFFormatError, match="version 1: supported versions are 2, 3"):
        GGUFFile(bad)
    bad.write_bytes(data[:4] + (3).to_bytes(4, "big") + data[8:])
    with pytest.raises(GGUFFormatError, match="big-endian"):
        GGUFFile(bad)
