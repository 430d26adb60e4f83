"""``attnfx convert`` on the command line: bad input is one line and exit 2 with nothing
written; a conversion stopped midway leaves no destination; the source is never written."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch

import attnfx
from attnfx import cli
from attnfx.convert import io as convert_io


def _run(capsys, *argv):
    rc = cli.main(["convert", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def _one_line_error(err, match):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("attnfx convert: error:"), err
    assert match in lines[0], lines[0]


def _snapshot(path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def test_cli_converts_and_prints_the_report(sources, tmp_path, capsys):
    before = _snapshot(sources["bert"])
    rc, out, _ = _run(
        capsys, sources["bert"], "--to", "window", "--window", "3", "--out", tmp_path / "o"
    )
    assert rc == 0
    assert "--to window (sites: neighborhood)" in out and "drift per layer" in out
    assert "fine-tuning needed:" in out
    data = json.loads((tmp_path / "o/convert_report.json").read_text())
    assert data["counts"]["untouched"] == len(data["tensors"]) and data["drift"]
    assert all(len(t["sha256"]) == 64 for t in data["tensors"])
    assert _snapshot(sources["bert"]) == before  # SRC never written
    # existing DST refused without --force, replaced with it
    rc, _, err = _run(
        capsys, sources["bert"], "--to", "window", "--window", "3", "--out", tmp_path / "o"
    )
    assert rc == 2
    _one_line_error(err, "exists (use --force")
    rc, _, _ = _run(
        capsys,
        sources["bert"],
        "--to",
        "selective",
        "--out",
        tmp_path / "o",
        "--force",
        "--no-eval",
    )
    assert (
        rc == 0
        and json.loads((tmp_path / "o/config.json").read_text())["attnfx"]["kind"] == "selective"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


@pytest.mark.parametrize("exc", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_killed_midway_leaves_no_destination(sources, tmp_path, monkeypatch, exc):
    calls = {"n": 0}
    real = convert_io.ShardWriter.write

    def dying(self, name, data):
        calls["n"] += 1
        if calls["n"] == 4:
            raise exc
        return real(self, name, data)

    monkeypatch.setattr(convert_io.ShardWriter, "write", dying)
    with pytest.raises(type(exc)):
        attnfx.convert(sources["gpt2"], to="sigmoid", out=tmp_path / "o")
    assert calls["n"] == 4
    assert list(tmp_path.iterdir()) == []  # no DST, no temporary directory


def test_corrupt_shard_fails_cleanly(sharded_llama, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(sharded_llama, src)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    shard = src / sorted(set(index["weight_map"].values()))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    rc, _, err = _run(capsys, src, "--to", "selective", "--out", tmp_path / "o")
    assert rc == 2
    _one_line_error(err, f"corrupt shard {shard}")
    assert not (tmp_path / "o").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_bad_inputs_exit_2(sources, tmp_path, capsys):
    # unknown architecture
    odd = tmp_path / "t5"
    shutil.copytree(sources["bert"], odd)
    cfg = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**cfg, "model_type": "t5"}))
    rc, _, err = _run(capsys, odd, "--to", "sigmoid", "--out", tmp_path / "o")
    assert rc == 2
    _one_line_error(err, "unsupported architecture 't5'; supported: gpt2, llama")
    # missing config: a single file without config.json beside it
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(sources["bert"] / "model.safetensors", lone / "w.safetensors")
    rc, _, err = _run(capsys, lone / "w.safetensors", "--to", "sigmoid", "--out", tmp_path / "o")
    assert rc == 2
    _one_line_error(err, "missing config")
    # wrong --layers, missing variant option, gqa on GPT-2, routed, overlapping paths
    for argv, match in [
        (("--to", "sigmoid", "--layers", "7"), "the model has layers 0-1"),
        (("--to", "window"), "needs --window"),
        (("--to", "gqa", "--kv-heads", "1"), "native grouped-query attention"),
        (("--to", "routed"), "needs --clusters"),
    ]:
        rc, _, err = _run(capsys, sources["gpt2"], *argv, "--out", tmp_path / "o")
        assert rc == 2, argv
        _one_line_error(err, match)
    rc, _, err = _run(capsys, sources["gpt2"], "--to", "sigmoid", "--out", sources["gpt2"] / "sub")
    _one_line_error(err, "overlaps the source")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lone", "t5"]


def test_single_file_sources_pt_and_safetensors(sources, tmp_path, capsys):
    from safetensors.torch import load_file

    sd = load_file(sources["llama"] / "model.safetensors")
    torch.save(sd, tmp_path / "w.pt")
    cfg = sources["llama"] / "config.json"
    rc, _, err = _run(
        capsys, tmp_path / "w.pt", "--config", cfg, "--to", "selective", "--out", tmp_path / "a"
    )
    assert rc == 0, err
    rc, _, err = _run(capsys, sources["llama"] / "model.safetensors", "--to", "selective",
                      "--out", tmp_path / "b")  # fmt: skip
    assert rc == 0, err
    for name in ("model.safetensors", "attnfx.safetensors"):
        a, b = load_file(tmp_path / "a" / name), load_file(tmp_path / "b" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    report = json.loads((tmp_path / "a/convert_report.json").read_text())
    assert report["output_drift"] < 1e-6


def test_dry_run_writes_nothing_and_progress_goes_to_stderr(sources, tmp_path, capsys):
    rc, out, _ = _run(
        capsys,
        sources["llama"],
        "--to",
        "gqa",
        "--kv-heads",
        "2",
        "--out",
        tmp_path / "o",
        "--dry-run",
    )
    assert rc == 0 and "dry run" in out and "changed" in out
    assert list(tmp_path.iterdir()) == []
    rc, _, err = _run(capsys, sources["llama"], "--to", "gqa", "--kv-heads", "2", "--out", tmp_path / "o",
                      "--progress", "--no-eval")  # fmt: skip
    assert rc == 0 and "tensors" in err and "[" in err


def test_routed_centroids_from_calibration(sources, tmp_path):
    from attnfx.convert import core, routed
    from attnfx.convert.base import ARCHS, Source, TensorInfo

    cfg = json.loads((sources["llama"] / "config.json").read_text())
    _, ckpt, _ = convert_io.open_source(sources["llama"])
    inputs = {
        "input_ids": torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    }
    acts = core.capture_qk(core._source_model(cfg, ckpt), (0, 1), ARCHS["llama"], inputs)
    assert acts[0].shape == (4, 2 * 2 * 12, 16)
    src = Source(cfg, ARCHS["llama"], {"x": TensorInfo(torch.float32, (1,))}, (0, 1),
                 {"clusters": 3, "activations": acts}, 5, inputs, "s")  # fmt: skip
    a, b = routed.plan(src), routed.plan(src)
    assert a.added["layers.1.centroids"].shape == (4, 3, 16)
    assert all(torch.equal(a.added[k], b.added[k]) for k in a.added)  # seeded
    assert a.attnfx["layers"]["0"] == {"clusters": 3}
    # k-means finds well-separated clusters
    g = torch.Generator().manual_seed(1)
    pts = torch.cat(
        [
            torch.randn(50, 2, generator=g) * 0.01 + torch.tensor(c)
            for c in ([5.0, 0.0], [0.0, 5.0], [-5.0, -5.0])
        ]
    )
    c = routed.kmeans(pts, 3, seed=0)
    assert sorted(map(tuple, c.round().tolist())) == [(-5.0, -5.0), (0.0, 5.0), (5.0, 0.0)]


def test_a_changed_untouched_tensor_fails_the_run(sources, tmp_path, monkeypatch, capsys):
    real = convert_io.ShardWriter.write

    def flip(self, name, data):
        if name.endswith("ln_f.weight"):
            data = bytes([data[0] ^ 1]) + data[1:]
        return real(self, name, data)

    monkeypatch.setattr(convert_io.ShardWriter, "write", flip)
    rc, _, err = _run(capsys, sources["gpt2"], "--to", "selective", "--out", tmp_path / "o")
    assert rc == 2
    _one_line_error(err, "ln_f.weight is not byte-identical")
    assert list(tmp_path.iterdir()) == []


def test_calibration_inputs_from_files(sources, tmp_path):
    ids = torch.randint(0, 64, (3, 7), generator=torch.Generator().manual_seed(2))
    torch.save({"input_ids": ids}, tmp_path / "calib.pt")
    (tmp_path / "calib.txt").write_text("\n".join(" ".join(map(str, r)) for r in ids.tolist()))
    for name in ("calib.pt", "calib.txt"):
        r = attnfx.convert(sources["gpt2"], to="window", out=tmp_path / name.replace(".", "_"),
                           window=2, calib=tmp_path / name)  # fmt: skip
        assert r.calibration == str(tmp_path / name) and r.top1_agreement is not None
        assert r.needs_finetuning is (r.output_drift > 1e-3)
    (tmp_path / "bad.txt").write_text("1 2\n3\n")
    with pytest.raises(attnfx.convert.ConvertError, match="one length"):
        attnfx.convert(
            sources["gpt2"], to="selective", out=tmp_path / "x", calib=tmp_path / "bad.txt"
        )
    assert not (tmp_path / "x").exists()


def test_streaming_one_tensor_read_per_write(sharded_llama, tmp_path, monkeypatch):
    """The writer alternates: each tensor is read from the source (once) and written
    before the next is read, so at most one tensor's bytes are held."""
    events = []
    real_raw, real_write = convert_io.SafetensorsFile.raw, convert_io.ShardWriter.write
    monkeypatch.setattr(convert_io.SafetensorsFile, "raw",
                        lambda self, n: (events.append(("r", n)), real_raw(self, n))[1])  # fmt: skip
    monkeypatch.setattr(convert_io.ShardWriter, "write",
                        lambda self, n, d: (events.append(("w", n)), real_write(self, n, d))[1])  # fmt: skip
    attnfx.convert(sharded_llama, to="gqa", out=tmp_path / "o", kv_heads=2, evaluate=False)
    writes = [e for e in events if e[0] == "w"]
    assert len(writes) == len(set(writes)) > 10
    first_check = next(i for i, e in enumerate(events) if e[0] == "r" and ("w", e[1]) in events[:i])
    streamed = events[:first_check]  # before the read-back check
    assert streamed == [e for n in (w[1] for w in writes) for e in (("r", n), ("w", n))]
