"""Streaming checkpoint IO: the safetensors reader and writer, corrupt files, and the
atomic output directory."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from attnfx.convert import ConvertError
from attnfx.convert.base import parse_layers
from attnfx.convert.io import SafetensorsFile, ShardWriter, TensorInfo, atomic_dir, tensor_bytes


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a": torch.randn(3, 5, generator=g),
        "b": torch.randn(7, generator=g).to(torch.bfloat16),
        "c": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "d": torch.zeros(0, 4),
        "e": torch.tensor([True, False, True]),
    }


def test_writer_round_trip_readable_by_safetensors(tmp_path):
    ts = _tensors()
    w = ShardWriter(
        tmp_path / "x.safetensors", {n: TensorInfo(t.dtype, tuple(t.shape)) for n, t in ts.items()}
    )
    for n, t in ts.items():
        w.write(n, tensor_bytes(t))
    w.close()
    back = load_file(tmp_path / "x.safetensors")
    mine = SafetensorsFile(tmp_path / "x.safetensors")
    for n, t in ts.items():
        assert torch.equal(back[n], t) and torch.equal(mine.tensor(n), t), n


def test_reader_copies_raw_bytes_of_library_files(tmp_path):
    ts = _tensors()
    save_file(ts, tmp_path / "y.safetensors")
    f = SafetensorsFile(tmp_path / "y.safetensors")
    for n, t in ts.items():
        assert f.raw(n) == tensor_bytes(t) and f.info(n) == TensorInfo(t.dtype, tuple(t.shape))


def test_writer_refuses_out_of_order_or_wrong_size(tmp_path):
    w = ShardWriter(
        tmp_path / "z.safetensors",
        {"a": TensorInfo(torch.float32, (2,)), "b": TensorInfo(torch.float32, (1,))},
    )
    with pytest.raises(RuntimeError, match="expected 'a'"):
        w.write("b", b"\0" * 4)
    with pytest.raises(RuntimeError, match="bytes"):
        w.write("a", b"\0" * 4)
    w.write("a", b"\0" * 8)
    with pytest.raises(RuntimeError, match="closed after 1"):
        w.close()


@pytest.mark.parametrize("damage", ["truncate", "header", "length", "empty"])
def test_corrupt_files_are_one_clear_error(tmp_path, damage):
    p = tmp_path / "c.safetensors"
    save_file(_tensors(), p)
    data = p.read_bytes()
    if damage == "truncate":
        p.write_bytes(data[:-5])
    elif damage == "header":
        p.write_bytes(data[:8] + b"{not json" + data[17:])
    elif damage == "length":
        p.write_bytes((10**12).to_bytes(8, "little") + data[8:])
    else:
        p.write_bytes(b"")
    with pytest.raises(ConvertError, match="corrupt shard"):
        SafetensorsFile(p)


def test_atomic_dir_renames_on_success_and_removes_on_failure(tmp_path):
    dst = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(dst, force=False) as tmp:
            (tmp / "half").write_text("x")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(dst, force=False) as tmp:
        (tmp / "f").write_text("1")
    assert (dst / "f").read_text() == "1"
    with pytest.raises(ConvertError, match="exists"):
        with atomic_dir(dst, force=False):
            pass
    with atomic_dir(dst, force=True) as tmp:
        (tmp / "g").write_text("2")
    assert sorted(p.name for p in dst.iterdir()) == ["g"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_parse_layers():
    assert parse_layers(None, 4) == (0, 1, 2, 3)
    assert parse_layers("all", 4) == (0, 1, 2, 3)
    assert parse_layers("0-1,3", 4) == (0, 1, 3)
    assert parse_layers("-1", 4) == (3,)
    for bad in ("4", "1-5", "x", "2-1", "0,,1"):
        with pytest.raises(ConvertError, match="--layers"):
            parse_layers(bad, 4)


def test_index_json_written_for_sharded_source(sharded_llama, tmp_path):
    import attnfx

    index = json.loads((sharded_llama / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    report = attnfx.convert(sharded_llama, to="selective", out=tmp_path / "o")
    out = json.loads((tmp_path / "o/model.safetensors.index.json").read_text())
    assert out["weight_map"] == index["weight_map"]
    assert report.output_drift < 1e-6
