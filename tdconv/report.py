"""The report of a compression: per-layer and whole-model figures, printed as a table."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

__all__ = ["CompressionReport", "LayerReport"]


@dataclass
class LayerReport:
    """What factorising one conv did."""
    name: str
    kernel_shape: list
    method: str
    rank: object
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    rel_error: float
    # CP only: largest / smallest component norm, and sum of squared component norms / ||W||^2
    # (large values flag a degenerate decomposition: terms that cancel each other).
    max_component_norm: float | None = None
    min_component_norm: float | None = None
    norm_ratio: float | None = None
    # CP only: the sensitivity of Phan et al. (ECCV 2020) of the layer's factors as stored, relative to
    # ||W||^(2(N-1)/N) (see CPTensor.sensitivity); EPC (epc=True) lowers it at the same error.
    sensitivity: float | None = None
    kernel_norm: float | None = None  # ||W||_F of the original kernel
    seconds: float = 0.0
    # With calibration data: which fit the layer got ("data", or the kernel fit where it was better),
    # and the relative output error sqrt(E||D (y - y^)||^2 / E||D y||^2) (D: the scale of the BatchNorm
    # that follows) on the calibration images and on the held-out ones, with the kernel fit's beside it.
    fit: str = "kernel"
    output_error: float | None = None
    held_out_error: float | None = None
    kernel_fit_output_error: float | None = None
    kernel_fit_held_out_error: float | None = None


@dataclass
class CompressionReport:
    """Per-layer and whole-model figures of a compression; ``print(report)`` shows a table."""
    method: str
    input_size: tuple
    layers: list = field(default_factory=list)   # LayerReport per factorised conv
    skipped: list = field(default_factory=list)  # (name, reason)
    macs_before: int | None = None               # whole model, ptflops
    macs_after: int | None = None
    params_before: int | None = None
    params_after: int | None = None
    # With calibration data: images used and held out, sequential or not, the BatchNorm decision, the
    # block refinements, seconds.
    calibration: dict | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        d["skipped"] = [list(s) for s in self.skipped]
        return d

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, default=str)


    @classmethod
    def from_dict(cls, d: dict) -> "CompressionReport":
        """The report :meth:`to_dict` wrote; ``ValueError`` naming what is missing when ``d`` is incomplete."""
        if not isinstance(d, dict):
            raise ValueError(f"a saved report must be a dict, got {type(d).__name__}")
        missing = [k for k in ("method", "input_size", "layers") if k not in d]
        if missing:
            raise ValueError(f"the saved report lacks {missing}")
        try:
            layers = [LayerReport(**r) for r in d["layers"]]
        except TypeError as exc:
            raise ValueError(f"the saved report's layers are damaged: {exc}") from None
        return cls(method=d["method"], input_size=tuple(d["input_size"]), layers=layers,
                   skipped=[tuple(s) for s in d.get("skipped", [])], calibration=d.get("calibration"),
                   **{k: d.get(k) for k in ("macs_before", "macs_after", "params_before", "params_after")})

    def _rows(self):
        cols = ["layer", "kernel", "rank", "params", "MMac", "rel. error", "max/min comp.", "sum comp^2/|W|^2",
                "sensitivity"]
        rows = []
        for r in self.layers:
            ratio = (f"{r.max_component_norm / r.min_component_norm:.3g}"
                     if r.max_component_norm is not None and r.min_component_norm else "-")
            rows.append([r.name, "x".join(map(str, r.kernel_shape)), str(r.rank),
                         f"{r.params_before} -> {r.params_after}",
                         f"{r.macs_before / 1e6:.3f} -> {r.macs_after / 1e6:.3f}", f"{r.rel_error:.4f}", ratio,
                         f"{r.norm_ratio:.3g}" if r.norm_ratio is not None else "-",
                         f"{r.sensitivity:.4g}" if r.sensitivity is not None else "-"])
        if any(r.output_error is not None for r in self.layers):
            cols += ["fit", "output error: fit / held out (kernel fit's)"]
            fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
            for r, row in zip(self.layers, rows):
                row += [r.fit, f"{fmt(r.output_error)} / {fmt(r.held_out_error)} ({fmt(r.kernel_fit_output_error)} / "
                        f"{fmt(r.kernel_fit_held_out_error)})"]
        return cols, rows

    def _totals(self) -> list:
        lines = []
        c = self.calibration
        if c:
            bn = c.get("batchnorm", {})
            lines.append(f"calibration: {c['images']} images fitted, {c['held_out_images']} held out, "
                         f"{'sequential' if c['sequential'] else 'independent'} fits, BatchNorm "
                         f"{'re-estimated' if bn.get('reestimated') else 'kept'}, {c['seconds']:.1f} s")
        if self.macs_before is not None:
            lines.append(f"MACs ({'x'.join(map(str, self.input_size))}, ptflops): {self.macs_before / 1e6:.2f} M -> "
                         f"{self.macs_after / 1e6:.2f} M ({self.macs_after / self.macs_before:.1%})")
            lines.append(f"parameters: {self.params_before / 1e6:.2f} M -> {self.params_after / 1e6:.2f} M "
                         f"({self.params_after / self.params_before:.1%})")
        return lines

    def __str__(self) -> str:
        cols, rows = self._rows()
        widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
        out = [f"tdconv.compress: method={self.method}, {len(self.layers)} layer(s) factorised"]
        out.append("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
        out.append("  ".join("-" * w for w in widths))
        out += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
        out += [f"skipped {n}: {why}" for n, why in self.skipped]
        out += self._totals()
        return "\n".join(out)

    def to_markdown(self) -> str:
        cols, rows = self._rows()
        out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        out += ["| " + " | ".join(r) + " |" for r in rows]
        out += ["", *[f"- skipped `{n}`: {why}" for n, why in self.skipped]]
        out += ["", *[f"- {line}" for line in self._totals()]]
        return "\n".join(out).rstrip() + "\n"
