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
import re
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
    ("colocation", "Mean pairwise co-location", "lower is better: 1 = all filters peak together"),
    ("colocation_groups", "Co-location groups (≥ 0.8)", "higher is better: 1 = collapse, = filters: all distinct"),
    ("group_sizes", "Group sizes", "largest first; n×s = n groups of size s"),
    ("best_part_histogram", "Best-part histogram", "filters whose best part (max hit rate) is each part"),
    ("parts_covered", "Parts covered (best part of ≥ 2 filters)", "higher is better"),
    ("filters", "Filters", ""),
    ("p", "p (share explained by part filters)", "explainer only"),
    ("reconstruction_error", "Reconstruction error ‖x̂−x*‖²/‖x*‖²", "explainer only"),
    ("agreement", "Performer agreement through x̂", "explainer only"),
    ("accuracy", "Performer accuracy", "explainer column: the performer through x̂"),
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
    part: str = ""  #: the part this filter is shown for (per-part galleries), "" otherwise
    landmarks: list[tuple[float, float]] = field(default_factory=list)  #: (x, y) px of the part, per image


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


def _mark(tile: np.ndarray, x: float, y: float) -> None:
    """Draw a small white ring with a dark outline at (x, y) pixels of ``tile`` (in place)."""
    height, width = tile.shape[:2]
    if not (math.isfinite(x) and math.isfinite(y)):
        return
    rows, cols = np.ogrid[:height, :width]
    distance = np.hypot(cols + 0.5 - x, rows + 0.5 - y)
    radius = max(5.0, height / 11)  # wide enough to leave a one-cell hot spot at the landmark visible
    tile[(distance >= radius) & (distance < radius + 1.2)] = (255, 255, 255)
    tile[(distance >= radius + 1.2) & (distance < radius + 2.2)] = (0, 0, 0)


def _gallery_strip(gallery: FilterGallery) -> np.ndarray:
    """The gallery's overlays side by side, scaled up to ≥ 128 px high, part landmarks ringed."""
    if not gallery.images:
        return np.full((32, 32, 3), 255, dtype=np.uint8)
    tiles = [overlay(image, heat) for image, heat in zip(gallery.images, gallery.heatmaps)]
    scale = max(1, 128 // tiles[0].shape[0])
    tiles = [np.repeat(np.repeat(tile, scale, axis=0), scale, axis=1) for tile in tiles]
    for tile, (x, y) in zip(tiles, gallery.landmarks):
        _mark(tile, x * scale, y * scale)
    pad = np.full((tiles[0].shape[0], 3, 3), 255, dtype=np.uint8)
    pieces: list[np.ndarray] = []
    for tile in tiles:
        pieces += [tile, pad]
    return np.concatenate(pieces[:-1], axis=1)


def _run_lengths(sizes: Sequence[int]) -> str:
    """Group sizes, largest first, with runs written n×s: [22, 5, 1, 1, 1] → "22, 5, 3×1"."""
    ordered = sorted((int(s) for s in sizes), reverse=True)
    pieces, i = [], 0
    while i < len(ordered):
        j = i
        while j < len(ordered) and ordered[j] == ordered[i]:
            j += 1
        pieces.append(str(ordered[i]) if j - i == 1 else f"{j - i}×{ordered[i]}")
        i = j
    return ", ".join(pieces)


def _format(value: Any, key: str = "") -> str:
    if key == "group_sizes" and isinstance(value, (list, tuple)):
        return _run_lengths(value)
    if isinstance(value, Mapping):  # a histogram: parts with a count of 0 are left out
        shown = [f"{name} {_format(count)}" for name, count in value.items() if count]
        return html.escape(", ".join(shown) if shown else "none")
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


def metric_table_rows(metrics: Mapping[str, Any]) -> list[tuple[str, str, str, str]]:
    """(label, performer value, explainer value, note) for every metric either side reports or omits."""
    performer, explainer = metrics.get("performer", {}), metrics.get("explainer", {})
    omitted: Mapping[str, str] = metrics.get("omitted", {})
    rows = []
    for key, label, note in METRIC_ROWS:
        if key in performer or key in explainer:
            rows.append((label, _format(performer.get(key, math.nan), key), _format(explainer.get(key, math.nan), key),
                         note))
        elif key in omitted:
            rows.append((label, "not measured", "not measured", f"needs {omitted[key]}"))
    return rows


def _target_rows(metrics: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    if "targets" in metrics:
        return list(metrics["targets"])
    return check_targets(dict(metrics.get("performer", {})), dict(metrics.get("explainer", {})))


def glance_lines(metrics: Mapping[str, Any]) -> list[str]:
    """One line per layer: for how many parts it has distinct filters, and its co-location groups."""
    choices: Mapping[str, Sequence[Mapping[str, Any]]] = metrics.get("parts", {})
    lines = []
    for kind in ("explainer", "performer"):
        picks, summary = choices.get(kind, []), metrics.get(kind, {})
        if not picks or "colocation_groups" not in summary:
            continue
        found = sum(1 for c in picks if c.get("filter") is not None)
        lines.append(f"{kind}: distinct filters for {found} of {len(picks)} parts; its {summary.get('filters', '?')} "
                     f"filters form {summary['colocation_groups']} co-location group(s) (sizes "
                     f"{_run_lengths(summary.get('group_sizes', []))})")
    return lines


def _parts_summary(metrics: Mapping[str, Any]) -> list[str]:
    """The at-a-glance sentence and the table of the filter chosen for each part, side by side."""
    choices: Mapping[str, Sequence[Mapping[str, Any]]] = metrics.get("parts", {})
    if not choices:
        return []
    out = ["<p class='glance'>"] + [re.sub(r"(\d+ of \d+|\d+(?= co-))", r"<b>\1</b>", html.escape(line)) + "<br>"
                                     for line in glance_lines(metrics)]
    out.append("</p><table><tr><th>part</th>" + "".join(
        f"<th>{kind} filter</th><th>group (size)</th><th>location instability</th><th>hit rate</th>"
        for kind in ("explainer", "performer")) + "</tr>")
    explainer, performer = choices.get("explainer", []), choices.get("performer", [])
    for index, reference in enumerate(explainer or performer):
        cells = [f"<td>{html.escape(str(reference['part']))}</td>"]
        for picks in (explainer, performer):
            pick = picks[index] if index < len(picks) else {}
            if pick.get("filter") is None:
                cells.append(f"<td colspan='4' class='none'>none: {html.escape(str(pick.get('reason', '')))}</td>")
            else:
                cells.append(f"<td>{pick['filter']}</td><td>{pick['group']} ({pick['group_size']})</td>"
                             f"<td>{_format(pick['instability'])}</td><td>{_format(pick['hit_rate'])}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return out


def _figure(gallery: FilterGallery) -> str:
    caption = f"{gallery.group} filter {gallery.filter_index}" + (f" — {gallery.caption}" if gallery.caption else "")
    return (f"<figure><img alt='{html.escape(caption)}' src='{_png_data_uri(_gallery_strip(gallery))}'>"
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def write_report(out_dir: str | os.PathLike[str], metrics: Mapping[str, Any],
                 galleries: Sequence[FilterGallery] = (), curves: Mapping[str, Any] | None = None,
                 title: str = "fastexplain report", notes: Sequence[str] = ()) -> Path:
    """Write ``out_dir/report.html`` (self-contained) and return its path.

    ``metrics`` is shaped like metrics.json: ``{"performer": {...}, "explainer": {...}}`` and optionally
    ``"targets"`` (rows of :func:`fastexplain.metrics.check_targets`, computed when absent), ``"omitted"``
    ({metric: what it needs}) and ``"parts"`` ({"explainer"|"performer": [PartChoice dicts]}). Galleries
    with a ``part`` are shown per part, the others per layer. ``curves`` maps a panel title to a list of
    values per epoch, or to ``{series name: values}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
             "body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse}"
             "td,th{border:1px solid #bbb;padding:4px 10px;text-align:left}.pass{color:#070}.fail{color:#b00}"
             ".none{color:#b00}.glance{font-size:1.1em}.pair{display:flex;gap:2em;flex-wrap:wrap}"
             "figure{margin:0.6em 0}figcaption{font-size:0.9em;color:#333}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    parts += [f"<p>{html.escape(note)}</p>" for note in notes]
    parts += _parts_summary(metrics)
    parts.append("<h2>Metrics</h2><table><tr><th>metric</th><th>performer filters</th><th>explainer part filters</th>"
                 "<th></th></tr>")
    for label, mine, theirs, note in metric_table_rows(metrics):
        parts.append(f"<tr><td>{html.escape(label)}</td><td>{mine}</td><td>{theirs}</td><td>{html.escape(note)}</td></tr>")
    parts.append("</table>")
    omitted: Mapping[str, str] = metrics.get("omitted", {})
    if omitted:
        parts.append("<p><b>Not measured on this data</b> (the dataset lacks what they need; use an annotated "
                     "dataset such as <code>cub:root=…</code> or <code>partworld</code>):</p><ul>")
        parts += [f"<li>{html.escape(name.replace('_', ' '))}: needs {html.escape(need)}</li>"
                  for name, need in omitted.items()]
        parts.append("</ul>")
    parts.append("<h2>Targets</h2><table><tr><th>goal</th><th>value</th><th>target</th><th>result</th></tr>")
    for row in _target_rows(metrics):
        verdict = {True: "pass", False: "fail"}.get(row["passed"], "not measured")
        parts.append(f"<tr><td>{html.escape(str(row['name']))}</td><td>{_format(row['value'])}</td>"
                     f"<td>{html.escape(str(row['target']))}</td><td class='{verdict.split()[0]}'>{verdict}</td></tr>")
    parts.append("</table>")
    per_part = [g for g in galleries if g.part]
    if per_part:
        parts.append("<h2>Per-part galleries</h2><p>For each part, the filter most location-stable for it among "
                     "the filters whose best part it is, never two filters of one co-location group; the top-"
                     "activating images where the part is visible, the part's landmark ringed.</p>")
        for part in dict.fromkeys(g.part for g in per_part):
            parts.append(f"<h3>{html.escape(part)}</h3><div class='pair'>")
            parts += [_figure(g) for g in per_part if g.part == part]
            parts.append("</div>")
    for kind in dict.fromkeys(g.group for g in galleries if not g.part):
        parts.append(f"<h2>Top-activating images: {html.escape(kind)} filters</h2>")
        parts += [_figure(g) for g in galleries if g.group == kind and not g.part]
    if curves:
        parts.append(f"<h2>Training curves</h2><img alt='training curves' src='{_png_data_uri(_curves_figure(curves))}'>")
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
    table_height = 0.25 * (len(rows) + 1)  # inches: header and rows at font size 8
    height = 0.6 + table_height + 1.3 * len(chosen)
    figure = plt.figure(figsize=(10, height))
    grid = figure.add_gridspec(1 + len(chosen), 1, height_ratios=[table_height] + [1.3] * len(chosen),
                               top=1 - 0.6 / height, bottom=0.1 / height, left=0.02, right=0.98)  # 0.6 in: glance lines
    table_axis = figure.add_subplot(grid[0])
    table_axis.axis("off")
    if rows:
        table = table_axis.table(cellText=[list(r[:3]) for r in rows], colLabels=["metric", "performer", "explainer"],
                                 cellLoc="left", colWidths=[0.3, 0.35, 0.35], bbox=[0, 0, 1, 1])  # fills its axis
        table.auto_set_font_size(False)
        table.set_fontsize(8)
    for n, gallery in enumerate(chosen, start=1):
        axis = figure.add_subplot(grid[n])
        axis.imshow(_gallery_strip(gallery))
        axis.set_title(f"{gallery.group} filter {gallery.filter_index} {gallery.caption}", fontsize=9, loc="left")
        axis.axis("off")
    if glance_lines(metrics):
        figure.suptitle("\n".join(glance_lines(metrics)), fontsize=10, x=0.02, y=1 - 0.05 / height, ha="left",
                        va="top")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target, dpi=90, bbox_inches="tight")
    plt.close(figure)
    return target
