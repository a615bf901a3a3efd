"""Draw a run's metrics.jsonl as PNG curves, one file per metric.

    python tools/plot_metrics.py runs/sft_tiny                # -> runs/sft_tiny/plots/train_loss.png ...
    python tools/plot_metrics.py runs/sft_tiny --out plots --metrics loss accuracy

Uses matplotlib when it is installed; otherwise a small built-in rasteriser writes plain line plots
(curve, axes box and min/max ticks, no text), so the tool works in a bare training environment.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import struct
import sys
import zlib

import numpy as np


def read_series(path: pathlib.Path) -> dict[str, tuple[list[int], list[float]]]:
    """'split/metric' -> (steps, values); the last value wins for a step logged twice (a resume)."""
    series: dict[str, dict[int, float]] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{path}:{n}: not a JSON line") from None
        for k, v in row.items():
            if k in ("step", "split", "time") or not isinstance(v, (int, float)):
                continue
            series.setdefault(f"{row.get('split', 'train')}/{k}", {})[int(row["step"])] = float(v)
    return {k: (sorted(d), [d[s] for s in sorted(d)]) for k, d in series.items()}


def _png(path: pathlib.Path, rgb: np.ndarray) -> None:
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def _raster_plot(path: pathlib.Path, steps, values, size=(640, 400), margin=30) -> None:
    w, h = size
    img = np.full((h, w, 3), 255, np.uint8)
    img[margin, margin:w - margin] = img[h - margin, margin:w - margin] = 0
    img[margin:h - margin, margin] = img[margin:h - margin + 1, w - margin] = 0
    x, y = np.asarray(steps, float), np.asarray(values, float)
    ok = np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x):
        sx = (x - x.min()) / max(x.max() - x.min(), 1e-12)
        sy = (y - y.min()) / max(y.max() - y.min(), 1e-12)
        px = margin + sx * (w - 2 * margin)
        py = h - margin - sy * (h - 2 * margin)
        for i in range(max(len(px) - 1, 0)):  # segments sampled densely enough to look continuous
            n = int(max(abs(px[i + 1] - px[i]), abs(py[i + 1] - py[i]))) + 2
            xs, ys = np.linspace(px[i], px[i + 1], n).round().astype(int), np.linspace(py[i], py[i + 1], n).round().astype(int)
            img[ys, xs] = (31, 119, 180)
        if len(px) == 1:
            img[int(py[0]) - 1:int(py[0]) + 2, int(px[0]) - 1:int(px[0]) + 2] = (31, 119, 180)
    _png(path, img)


def plot(run_dir, out_dir=None, metrics=None) -> list[pathlib.Path]:
    run_dir = pathlib.Path(run_dir)
    path = run_dir / "metrics.jsonl" if run_dir.is_dir() else run_dir
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl at {path}")
    out_dir = pathlib.Path(out_dir) if out_dir else path.parent / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    series = read_series(path)
    if metrics:
        series = {k: v for k, v in series.items() if k.split("/", 1)[1] in metrics}
    try:
        import matplotlib  # noqa: PLC0415  (optional: without it the plots are written as plain PNGs)
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415  (as above; after use("Agg"))
    except ImportError:
        plt = None
    written = []
    for name, (steps, values) in sorted(series.items()):
        target = out_dir / (name.replace("/", "_") + ".png")
        if plt is not None:
            fig, ax = plt.subplots(figsize=(6.4, 4))
            ax.plot(steps, values, marker="." if len(steps) < 50 else None)
            ax.set_xlabel("step")
            ax.set_title(name)
            ax.grid(alpha=0.3)
            fig.tight_layout()
            fig.savefig(target, dpi=100)
            plt.close(fig)
        else:
            _raster_plot(target, steps, values)
        written.append(target)
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", help="a run folder (train.output_dir) or its metrics.jsonl")
    p.add_argument("--out", help="folder for the PNGs (default: <run>/plots)")
    p.add_argument("--metrics", nargs="*", help="only these metric names (e.g. loss accuracy)")
    args = p.parse_args(argv)
    try:
        for path in plot(args.run, args.out, args.metrics):
            print(path)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
