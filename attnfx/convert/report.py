"""The conversion report: what changed in the checkpoint, and how far the outputs moved.

``ConvertReport.to_dict`` is ``convert_report.json``; ``str(report)`` the table the command
prints.  Tensors are listed as changed (source and result hashes), added (result hash) and
untouched (one hash: the bytes are the same, checked).  The measurement runs the source
and the converted model (float32, eager, not compiled) on the calibration batch, or a
synthetic one drawn from the seed: per layer the relative L2 drift of the hidden states,
and the logits' top-1 agreement and largest difference.
"""

from __future__ import annotations

import dataclasses
import json

import torch

DRIFT_TOLERANCE = 1e-3  # final relative drift above this: fine-tune before use


@dataclasses.dataclass
class TensorRow:
    name: str
    status: str  # changed | added | untouched
    dtype: str
    shape: tuple[int, ...]
    sha256: str
    source_sha256: str | None = None
    why: str | None = None


@dataclasses.dataclass
class ConvertReport:
    source: str
    destination: str | None
    kind: str
    site_kind: str
    architecture: str
    layers: tuple[int, ...]
    seed: int
    tensors: list[TensorRow] = dataclasses.field(default_factory=list)
    config_updates: dict = dataclasses.field(default_factory=dict)
    drift: list[float] | None = None  # per layer, relative L2 of the hidden states
    output_drift: float | None = None
    top1_agreement: float | None = None
    max_logit_diff: float | None = None
    calibration: str = "none"
    needs_finetuning: bool | None = False  # None: depends on the drift, not measured
    exact: bool = False
    dry_run: bool = False
    notes: list[str] = dataclasses.field(default_factory=list)

    def rows(self, status: str) -> list[TensorRow]:
        return [t for t in self.tensors if t.status == status]

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["layers"] = list(self.layers)
        out["counts"] = {s: len(self.rows(s)) for s in ("changed", "added", "untouched")}
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def __str__(self) -> str:
        dst = self.destination or "(dry run: nothing written)"
        lines = [
            f"attnfx convert: {self.source} -> {dst}",
            f"  {self.architecture}, --to {self.kind} (sites: {self.site_kind}), "
            f"layers {_ranges(self.layers)}, seed {self.seed}",
        ]
        if self.config_updates:
            lines.append(f"  config: {self.config_updates}")
        head = ("status", "tensor", "dtype", "shape", "sha256", "note")
        rows = []
        for t in self.tensors:
            if t.status == "untouched":
                continue
            sha = (
                t.sha256[:12]
                if t.source_sha256 is None
                else f"{t.source_sha256[:12]}->{t.sha256[:12]}"
            )
            rows.append(
                (
                    t.status,
                    t.name,
                    t.dtype.removeprefix("torch."),
                    "x".join(map(str, t.shape)) or "()",
                    sha,
                    t.why or "",
                )
            )
        n_un = len(self.rows("untouched"))
        if rows:
            widths = [max(len(r[c]) for r in [head, *rows]) for c in range(len(head) - 1)]
            lines.append(
                "  " + "  ".join(h.ljust(w) for h, w in zip(head, widths)) + "  " + head[-1]
            )
            for r in rows:
                lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
        lines.append(
            f"  {len(self.rows('changed'))} changed, {len(self.rows('added'))} added, "
            f"{n_un} untouched (byte-identical, sha256 in {'the JSON report' if self.destination else 'to_dict()'})"
        )
        if self.drift is not None:
            lines.append(f"  calibration: {self.calibration}")
            drift = "  ".join(f"{i}:{d:.2e}" for i, d in enumerate(self.drift))
            lines.append(f"  hidden-state drift per layer (rel. L2): {drift}")
            if self.top1_agreement is not None:
                lines.append(
                    f"  logits: top-1 agreement {self.top1_agreement:.1%}, "
                    f"max |diff| {self.max_logit_diff:.3e}"
                )
            lines.append(f"  output drift (rel. L2): {self.output_drift:.3e}")
        verdict = {True: "yes", False: "no", None: "unknown (drift not measured)"}
        lines.append(
            "  fine-tuning needed: "
            + verdict[self.needs_finetuning]
            + (" (outputs equal the source by construction)" if self.exact else "")
        )
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _ranges(layers) -> str:
    layers = list(layers)
    if not layers:
        return "-"
    out, start, prev = [], layers[0], layers[0]
    for i in layers[1:] + [None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ",".join(out)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


@torch.no_grad()
def measure(report: ConvertReport, source_model, converted_model, inputs: dict) -> None:
    """Fill the drift fields from one forward of each model on ``inputs``."""
    source_model.eval()
    converted_model.eval()
    a = source_model(**inputs, output_hidden_states=True)
    b = converted_model(**inputs, output_hidden_states=True)
    hs_a, hs_b = a.hidden_states, b.hidden_states
    report.drift = [_rel(y, x) for x, y in zip(hs_a[1:], hs_b[1:])]
    main_a = getattr(a, "logits", None)
    main_b = getattr(b, "logits", None)
    if main_a is not None:
        report.top1_agreement = float((main_a.argmax(-1) == main_b.argmax(-1)).double().mean())
        report.max_logit_diff = float((main_a - main_b).abs().max())
    else:
        main_a, main_b = a.last_hidden_state, b.last_hidden_state
    report.output_drift = _rel(main_b, main_a)
