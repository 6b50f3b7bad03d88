"""Self-contained HTML report and summary PNG: metric table, per-filter galleries, training curves (issue 7).

Everything is embedded (PNG images as base64 data URIs, inline CSS): ``report.html`` opens offline.
Figures use matplotlib's Agg backend. Heatmap overlays use :func:`fastexplain.visualize.overlay_heatmap`
when that module exists, else :func:`overlay_heatmap_basic` (same contract).
"""
from __future__ import annotations

import base64
import html
import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .metrics import check_targets

METRIC_ROWS: tuple[tuple[str, str, str], ...] = (
    ("location_instability", "Location instability", "lower is better"),
    ("part_interpretability", "Part interpretability", "higher is better"),
    ("part_interpretability_pre_mask", "Part interpretability (before mask)", "explainer only"),
    ("p", "p (share explained by part filters)", "explainer only"),
    ("reconstruction_error", "Reconstruction error ‖x̂−x*‖²/‖x*‖²", "explainer only"),
    ("agreement", "Performer agreement through x̂", "explainer only"),
    ("accuracy", "Performer test accuracy", ""),
)


@dataclass
class FilterGallery:
    """The top-activating images of one filter with its map for each: images [3,H,W] in [0,1], heatmaps [h,w]."""

    group: str  # "performer" or "explainer"
    filter_index: int
    images: list[Tensor]
    heatmaps: list[Tensor]
    caption: str = ""
    scores: list[float] = field(default_factory=list)


def overlay_heatmap_basic(image: Tensor, heat: Tensor, alpha: float = 0.5) -> np.ndarray:
    """Blend a jet-coloured heatmap (normalised to its max, bilinear-upsampled) over an image: uint8 [H,W,3]."""
    from matplotlib import colormaps

    height, width = image.shape[-2:]
    heat = heat.detach().float()
    heat = heat / heat.max() if float(heat.max()) > 0 else torch.zeros_like(heat)
    up = F.interpolate(heat[None, None], size=(height, width), mode="bilinear", align_corners=False)[0, 0]
    colour = colormaps["jet"](up.clamp(0, 1).numpy())[..., :3]
    base = image.detach().float().clamp(0, 1).permute(1, 2, 0).numpy()
    weight = alpha * up.clamp(0, 1).numpy()[..., None]
    return np.round((base * (1 - weight) + colour * weight) * 255).astype(np.uint8)


def overlay(image: Tensor, heat: Tensor) -> np.ndarray:
    """The project's overlay (fastexplain.visualize) when available, else :func:`overlay_heatmap_basic`."""
    try:
        from .visualize import overlay_heatmap
    except ImportError:
        return overlay_heatmap_basic(image, heat)
    return overlay_heatmap(image, heat)


def top_activating_galleries(group: str, maps: Tensor, images: Tensor, filters: Sequence[int], per_filter: int = 6,
                             captions: Mapping[int, str] | None = None) -> list[FilterGallery]:
    """For each filter, the ``per_filter`` images with the largest max activation and their maps.

    ``maps`` [N,F,h,w]; ``images`` [N,3,H,W] float in [0,1] or uint8.
    """
    peaks = maps.detach().flatten(2).float().max(dim=2).values  # [N, F]
    galleries = []
    for f in filters:
        order = torch.sort(peaks[:, f], descending=True, stable=True).indices[:per_filter]
        picked = images[order]
        picked = picked.float() / 255.0 if picked.dtype == torch.uint8 else picked.float()
        galleries.append(FilterGallery(group, int(f), list(picked), [maps[i, f].detach().float() for i in order.tolist()],
                                       (captions or {}).get(int(f), ""), peaks[order, f].tolist()))
    return galleries


def _png_data_uri(figure_or_array: Any) -> str:
    buffer = io.BytesIO()
    if isinstance(figure_or_array, np.ndarray):
        import matplotlib.image

        matplotlib.image.imsave(buffer, figure_or_array, format="png")
    else:
        figure_or_array.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
        import matplotlib.pyplot as plt

        plt.close(figure_or_array)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _gallery_strip(gallery: FilterGallery) -> np.ndarray:
    tiles = [overlay(image, heat) for image, heat in zip(gallery.images, gallery.heatmaps)]
    pad = np.full((tiles[0].shape[0], 2, 3), 255, dtype=np.uint8)
    pieces: list[np.ndarray] = []
    for tile in tiles:
        pieces += [tile, pad]
    strip = np.concatenate(pieces[:-1], axis=1)
    scale = max(1, 96 // strip.shape[0])
    return np.repeat(np.repeat(strip, scale, axis=0), scale, axis=1)


def _format(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "–" if not math.isfinite(float(value)) else f"{float(value):.4g}"
    return html.escape(str(value))


def _curves_figure(curves: Mapping[str, Mapping[str, Sequence[float]] | Sequence[float]]):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = list(curves.items())
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.0), squeeze=False)
    for axis, (title, series) in zip(axes[0], panels):
        named = series if isinstance(series, Mapping) else {title: series}
        for name, values in named.items():
            axis.plot(range(1, len(values) + 1), list(values), marker="o", markersize=3, label=name)
        axis.set_title(title)
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    return figure


def metric_table_rows(metrics: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, str, str, str]]:
    """(label, performer value, explainer value, note) for every metric either side reports."""
    performer, explainer = metrics.get("performer", {}), metrics.get("explainer", {})
    rows = []
    for key, label, note in METRIC_ROWS:
        if key in performer or key in explainer:
            rows.append((label, _format(performer.get(key, math.nan)), _format(explainer.get(key, math.nan)), note))
    return rows


def write_report(out_dir: str | os.PathLike[str], metrics: Mapping[str, Mapping[str, Any]],
                 galleries: Sequence[FilterGallery] = (), curves: Mapping[str, Any] | None = None,
                 title: str = "fastexplain report", notes: Sequence[str] = ()) -> Path:
    """Write ``out_dir/report.html`` and return its path.

    ``metrics`` is shaped like metrics.json: ``{"performer": {...}, "explainer": {...}}``; the SPEC §7
    targets are checked with :func:`fastexplain.metrics.check_targets`. ``curves`` maps a panel title to
    a list of values per epoch, or to ``{series name: values}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
             "body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse}"
             "td,th{border:1px solid #bbb;padding:4px 10px;text-align:left}.pass{color:#070}.fail{color:#b00}"
             "figure{margin:0.6em 0}figcaption{font-size:0.9em;color:#333}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    for note in notes:
        parts.append(f"<p>{html.escape(note)}</p>")
    parts.append("<h2>Metrics</h2><table><tr><th>metric</th><th>performer filters</th><th>explainer part filters</th>"
                 "<th></th></tr>")
    for label, mine, theirs, note in metric_table_rows(metrics):
        parts.append(f"<tr><td>{html.escape(label)}</td><td>{mine}</td><td>{theirs}</td><td>{html.escape(note)}</td></tr>")
    parts.append("</table><h2>Targets (SPEC §7)</h2><table><tr><th>goal</th><th>value</th><th>target</th><th>result</th></tr>")
    for row in check_targets(dict(metrics.get("performer", {})), dict(metrics.get("explainer", {}))):
        verdict = "pass" if row["passed"] else "fail"
        parts.append(f"<tr><td>{html.escape(str(row['name']))}</td><td>{_format(row['value'])}</td>"
                     f"<td>{html.escape(str(row['target']))}</td><td class='{verdict}'>{verdict}</td></tr>")
    parts.append("</table>")
    if curves:
        parts.append(f"<h2>Training curves</h2><img alt='training curves' src='{_png_data_uri(_curves_figure(curves))}'>")
    for group in dict.fromkeys(g.group for g in galleries):
        parts.append(f"<h2>Top-activating images: {html.escape(group)} filters</h2>")
        for gallery in (g for g in galleries if g.group == group):
            caption = f"filter {gallery.filter_index}" + (f" — {gallery.caption}" if gallery.caption else "")
            parts.append(f"<figure><img alt='{html.escape(caption)}' src='{_png_data_uri(_gallery_strip(gallery))}'>"
                         f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    parts.append("</body></html>")
    path = out / "report.html"
    temporary = path.with_suffix(".html.tmp")
    temporary.write_text("\n".join(parts), encoding="utf-8")
    os.replace(temporary, path)
    return path


def render_summary_png(path: str | os.PathLike[str], metrics: Mapping[str, Mapping[str, Any]],
                       galleries: Sequence[FilterGallery] = (), max_per_group: int = 3) -> Path:
    """A one-image summary for the README: the metric table above a few galleries per group."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    chosen: list[FilterGallery] = []
    for group in dict.fromkeys(g.group for g in galleries):
        chosen += [g for g in galleries if g.group == group][:max_per_group]
    rows = metric_table_rows(metrics)
    figure = plt.figure(figsize=(9, 1.2 + 0.35 * len(rows) + 1.3 * len(chosen)))
    grid = figure.add_gridspec(1 + len(chosen), 1, height_ratios=[0.6 + 0.35 * len(rows)] + [1.3] * len(chosen))
    table_axis = figure.add_subplot(grid[0])
    table_axis.axis("off")
    if rows:
        table = table_axis.table(cellText=[list(r[:3]) for r in rows], colLabels=["metric", "performer", "explainer"],
                                 loc="center", cellLoc="left", colWidths=[0.5, 0.25, 0.25])
        table.auto_set_font_size(False)
        table.set_fontsize(9)
        table.scale(1, 1.3)
    for n, gallery in enumerate(chosen, start=1):
        axis = figure.add_subplot(grid[n])
        axis.imshow(_gallery_strip(gallery))
        axis.set_title(f"{gallery.group} filter {gallery.filter_index} {gallery.caption}", fontsize=9, loc="left")
        axis.axis("off")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target, dpi=90, bbox_inches="tight")
    plt.close(figure)
    return target
