"""The conversion driver: read, plan, write (streaming, atomic), check, load, measure."""

from __future__ import annotations

import importlib
import json
import os
import shutil
from pathlib import Path

import torch

from attnfx.convert import io
from attnfx.convert.base import (
    ADDED_FILE,
    CONFIG_KEY,
    FORMAT_VERSION,
    KINDS,
    REPORT_FILE,
    ConvertError,
    Plan,
    Source,
    TensorInfo,
    arch_of,
    num_layers,
    parse_layers,
)
from attnfx.convert.report import DRIFT_TOLERANCE, ConvertReport, TensorRow, measure

_MODULES = {
    "sigmoid": "attnfx.convert.sigmoid",
    "selective": "attnfx.convert.selective",
    "gqa": "attnfx.convert.gqa",
    "neighborhood": "attnfx.convert.neighborhood",
    "window": "attnfx.convert.neighborhood",
    "routed": "attnfx.convert.routed",
}
_SKIP_FILES = {"config.json", io.INDEX, ADDED_FILE, REPORT_FILE, "convert_report.txt"}


def load_calibration(path, config: dict, seed: int, arch) -> tuple[dict, str]:
    """Model inputs: from ``path`` (a ``.pt`` / ``.safetensors`` with ``input_ids`` or
    ``pixel_values``, or a bare tensor; a text file of token ids, one sequence a line), or
    a synthetic batch drawn from ``seed``."""
    if path is None:
        g = torch.Generator().manual_seed(seed)
        if arch.grid:
            size = config.get("image_size", 224)
            size = size if isinstance(size, int) else size[0]
            chans = config.get("num_channels", 3)
            return {"pixel_values": torch.randn(2, chans, size, size, generator=g)}, "synthetic"
        vocab = config.get("vocab_size", 1000)
        n = min(16, config.get("max_position_embeddings", config.get("n_positions", 16)) or 16)
        return {"input_ids": torch.randint(0, vocab, (2, n), generator=g)}, "synthetic"
    p = Path(path)
    if not p.exists():
        raise ConvertError(f"--calib: no such file: {p}")
    if p.suffix in (".pt", ".pth"):
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ConvertError(f"--calib {p}: cannot read it ({str(e).splitlines()[0]})") from e
    elif p.suffix == ".safetensors":
        f = io.SafetensorsFile(p)
        obj = {n: f.tensor(n) for n in f.entries}
    else:
        try:
            rows = [
                [int(t) for t in line.split()]
                for line in p.read_text().splitlines()
                if line.strip()
            ]
        except ValueError as e:
            raise ConvertError(f"--calib {p}: expected token ids, one sequence a line") from e
        if not rows or len({len(r) for r in rows}) != 1:
            raise ConvertError(f"--calib {p}: sequences must be non-empty and of one length")
        obj = torch.tensor(rows)
    if isinstance(obj, torch.Tensor):
        obj = {"pixel_values" if obj.is_floating_point() else "input_ids": obj}
    if not isinstance(obj, dict) or not ({"input_ids", "pixel_values"} & set(obj)):
        raise ConvertError(f"--calib {p}: expected input_ids or pixel_values")
    keep = {"input_ids", "attention_mask", "pixel_values"}
    return {k: v for k, v in obj.items() if k in keep}, str(p)


def _source_model(config: dict, ckpt: io.Checkpoint):
    """The source as transformers builds it (float32), its weights read tensor by tensor."""
    import transformers

    from attnfx.convert.hf import model_class

    cfg = {k: v for k, v in config.items() if k != CONFIG_KEY}
    conf = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    model = model_class(config)._from_config(conf, dtype=torch.float32)
    sd = model.state_dict()
    with torch.no_grad():
        for name in ckpt.where:
            if name in sd:
                sd[name].copy_(ckpt.tensor(name))
    model.tie_weights()
    return model.eval()


@torch.no_grad()
def capture_qk(model, layers, arch, inputs: dict) -> dict[int, torch.Tensor]:
    """Per chosen layer, the (H, M, D) queries and keys (K/V heads repeated to the query
    heads) the model computes on ``inputs``: the routed conversion's activations."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    seen: dict[int, list[torch.Tensor]] = {}
    pattern = arch.attention_pattern()
    index = {
        id(m): int(pattern.search(n).group(1))
        for n, m in model.named_modules()
        if pattern.search(n)
    }

    def capture(module, query, key, value, attention_mask, **kwargs):
        i = index.get(id(module))
        if i in layers:
            k = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
            for t in (query, k):
                seen.setdefault(i, []).append(
                    t.transpose(0, 1).reshape(t.shape[1], -1, t.shape[-1])
                )
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("attnfx_capture", capture)
    AttentionMaskInterface.register("attnfx_capture", sdpa_mask)
    model.set_attn_implementation("attnfx_capture")
    model(**inputs)
    missing = [i for i in layers if i not in seen]
    if missing:
        raise ConvertError(f"calibration: layer {missing[0]}'s attention was not reached")
    return {i: torch.cat(seen[i], dim=1).float() for i in layers}


def _write_shard(w, reader, names, infos, plan: Plan, rows: list, progress) -> None:
    for n in names:
        info = infos[n]
        if n in plan.changed:
            before = reader.raw(n)
            new = plan.changed[n].fn(io.from_bytes(before, reader.info(n)))
            if new.dtype != info.dtype or tuple(new.shape) != info.shape:
                raise ConvertError(f"internal: {n} came out {new.dtype} {tuple(new.shape)}")
            data = io.tensor_bytes(new)
            row = TensorRow(n, "changed", str(info.dtype), info.shape, io.digest(data),
                            io.digest(before), plan.changed[n].why)  # fmt: skip
        else:
            data = reader.raw(n)
            row = TensorRow(n, "untouched", str(info.dtype), info.shape, io.digest(data))
        w.write(n, data)
        rows.append(row)
        progress.step(n)


def _write(tmp: Path, ckpt: io.Checkpoint, plan: Plan, progress) -> list[TensorRow]:
    rows: list[TensorRow] = []
    for shard, reader in ckpt.files.items():
        names = list(reader.entries)
        infos = {n: (plan.changed[n].info if n in plan.changed else reader.info(n)) for n in names}
        meta = reader.metadata if isinstance(reader, io.SafetensorsFile) else {"format": "pt"}
        w = io.ShardWriter(tmp / shard, infos, meta or {"format": "pt"})
        with w.closing_on_error():
            _write_shard(w, reader, names, infos, plan, rows, progress)
        w.close()
    if plan.added:
        infos = {n: TensorInfo(t.dtype, tuple(t.shape)) for n, t in sorted(plan.added.items())}
        w = io.ShardWriter(tmp / ADDED_FILE, infos, {"format": "pt", "attnfx": plan.kind})
        for n in infos:
            data = io.tensor_bytes(plan.added[n])
            w.write(n, data)
            rows.append(TensorRow(n, "added", str(infos[n].dtype), infos[n].shape, io.digest(data)))
            progress.step(n)
        w.close()
    return rows


def _check_untouched(tmp: Path, ckpt: io.Checkpoint, rows: list[TensorRow]) -> None:
    """Read the written shards back: every untouched tensor has its source bytes."""
    written = {shard: io.SafetensorsFile(tmp / shard) for shard in ckpt.files}
    for r in rows:
        if r.status != "untouched":
            continue
        shard = ckpt.where[r.name]
        if (
            io.digest(written[shard].raw(r.name)) != r.sha256
            or io.digest(ckpt.raw(r.name)) != r.sha256
        ):
            raise ConvertError(f"untouched tensor {r.name} is not byte-identical after writing")


def _copy_side_files(src_dir: Path | None, tmp: Path, ckpt: io.Checkpoint) -> None:
    if src_dir is None:
        return
    weights = set(ckpt.files) | {f.path.name for f in ckpt.files.values()}
    for p in sorted(src_dir.iterdir()):
        if p.name in _SKIP_FILES or p.name in weights or p.name.startswith("."):
            continue
        if p.suffix in (".safetensors", ".bin", ".pt", ".pth"):
            continue
        if p.is_file():
            shutil.copy2(p, tmp / p.name)


def _same_or_inside(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or b in a.parents


def convert(
    src,
    to: str,
    out=None,
    *,
    layers: str | None = None,
    seed: int = 0,
    calib=None,
    config=None,
    force: bool = False,
    dry_run: bool = False,
    evaluate: bool = True,
    progress: bool | None = None,
    **options,
) -> ConvertReport:
    """Convert the checkpoint at ``src`` to attention ``to``, written to ``out``.

    ``options``: ``kv_heads`` (gqa), ``window`` / ``kernel_size`` (an int or
    ``{layer: size}``), ``qk_norm`` and ``layerscale`` (sigmoid), ``clusters`` (routed).
    Raises ``ConvertError`` on bad input, with nothing written.
    """
    # seeded, without touching the caller's random state
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _convert(src, to, out, layers, seed, calib, config, force, dry_run, evaluate,
                        progress, options)  # fmt: skip


def _convert(
    src, to, out, layers, seed, calib, config, force, dry_run, evaluate, progress, options
):
    if to not in KINDS:
        raise ConvertError(f"unknown --to {to!r}; choose from {', '.join(KINDS)}")
    if out is None and not dry_run:
        raise ConvertError("--out is required (or --dry-run)")
    src_path = Path(src)
    cfg, ckpt, src_dir = io.open_source(src_path, config)
    arch = arch_of(cfg)
    chosen = parse_layers(layers, num_layers(cfg))
    if to == "routed":
        from attnfx.convert.hf import _check_loadable

        _check_loadable("routed")
    out_path = Path(out) if out is not None else None
    if out_path is not None and (
        _same_or_inside(src_path, out_path) or _same_or_inside(out_path, src_path)
    ):
        raise ConvertError(f"--out {out_path} overlaps the source {src_path}")
    inputs, calib_name = load_calibration(calib, cfg, seed, arch)
    opts = dict(options, to=to)
    if to == "routed":
        opts["activations"] = capture_qk(_source_model(cfg, ckpt), chosen, arch, inputs)
    source = Source(cfg, arch, ckpt.tensors(), chosen, opts, seed, inputs, str(src_path))
    plan: Plan = importlib.import_module(_MODULES[to]).plan(source)

    new_cfg = dict(cfg)
    new_cfg.update(plan.config_updates)
    if plan.attnfx is not None:
        new_cfg[CONFIG_KEY] = {"version": FORMAT_VERSION, "kind": to, **plan.attnfx}
    report = ConvertReport(
        source=str(src_path), destination=None if dry_run else str(out_path), kind=to,
        site_kind=plan.site_kind, architecture=arch.model_type, layers=chosen, seed=seed,
        config_updates={**plan.config_updates, **({CONFIG_KEY: new_cfg.get(CONFIG_KEY)} if CONFIG_KEY in new_cfg else {})},
        calibration=calib_name, exact=plan.exact,
        needs_finetuning=plan.needs_finetuning or (None if not plan.exact else False),
        dry_run=dry_run, notes=list(plan.notes),
    )  # fmt: skip
    if dry_run:
        for n, info in ckpt.tensors().items():
            if n in plan.changed:
                c = plan.changed[n]
                report.tensors.append(
                    TensorRow(
                        n,
                        "changed",
                        str(c.info.dtype),
                        c.info.shape,
                        "",
                        io.digest(ckpt.raw(n)),
                        c.why,
                    )
                )
            else:
                report.tensors.append(
                    TensorRow(n, "untouched", str(info.dtype), info.shape, io.digest(ckpt.raw(n)))
                )
        for n, t in sorted(plan.added.items()):
            report.tensors.append(
                TensorRow(n, "added", str(t.dtype), tuple(t.shape), io.digest(io.tensor_bytes(t)))
            )
        return report

    bar = io.Progress(len(ckpt.where) + len(plan.added), enabled=progress)
    with io.atomic_dir(out_path, force) as tmp:
        report.tensors = _write(tmp, ckpt, plan, bar)
        _check_untouched(tmp, ckpt, report.tensors)
        if io.INDEX in (p.name for p in (src_dir.iterdir() if src_dir else ())):
            index = io.read_json(src_dir / io.INDEX, "shard index")
            total = sum(
                os.path.getsize(tmp / s) - io.SafetensorsFile(tmp / s).data_start
                for s in ckpt.files
            )
            index["metadata"] = {**index.get("metadata", {}), "total_size": total}
            (tmp / io.INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        (tmp / "config.json").write_text(json.dumps(new_cfg, indent=2, sort_keys=True) + "\n")
        _copy_side_files(src_dir, tmp, ckpt)
        if evaluate:
            from attnfx.convert.hf import from_pretrained

            converted = from_pretrained(tmp, dtype=torch.float32)
            measure(report, _source_model(cfg, ckpt), converted, inputs)
            if report.needs_finetuning is None:
                report.needs_finetuning = report.output_drift > DRIFT_TOLERANCE
        (tmp / REPORT_FILE).write_text(report.to_json() + "\n")
        (tmp / "convert_report.txt").write_text(str(report) + "\n")
    return report
