"""The markdown report of ``benchmarks/gpu_triton.py`` (checks, timings, scaling, profile) from its JSON."""
from __future__ import annotations


def _ms(entry: object) -> str:
    if isinstance(entry, dict) and "forward_backward_ms" in entry:
        return f"{entry['forward_backward_ms']:.3g} ms"
    if isinstance(entry, dict):
        return entry.get("skipped") or "error"
    return "—"


def markdown(report: dict) -> str:
    lines = [f"# Triton kernels on {report['device']}", "",
             f"- torch {report['torch']}, triton {report['triton']}, python {report['python']}; {report['date']}",
             f"- {report['timing']}; checks against the float64 reference", ""]
    if report.get("smoke"):
        lines += ["**Smoke run (tiny shapes, possibly the CPU interpreter): the times mean nothing.**", ""]
    lines += ["## Checks", "", "| shape | kernel | ok | errors |", "|---|---|---|---|"]
    for key, entry in report["shapes"].items():
        for name, check in entry["checks"].items():
            errors = ", ".join(f"{k} {v:.1e}" for k, v in check.items() if isinstance(v, float))
            lines.append(f"| {key} | {name} | {'yes' if check['ok'] else 'NO'} | {errors or check.get('error', '')} |")
    lines += ["", "## Filter loss, forward + backward", ""]
    for key, entry in report["shapes"].items():
        timings = entry.get("timings", {})
        if not isinstance(timings, dict) or "floor_ms" not in timings:
            continue
        lines += [f"### {key} (floor {timings['floor_ms']:.3g} ms: read x twice, write dx once at "
                  f"{timings['copy_bandwidth_GBps']:.0f} GB/s)", "",
                  "Eager: launched from Python as a training loop runs it. Graph: the same forward + backward replayed "
                  "from a CUDA graph, the device time alone (ratios against the baselines' graph replays).", "",
                  "| variant | fwd+bwd eager | × floor | vs textbook eager | vs textbook compiled | vs reference "
                  "| fwd+bwd graph | × floor | vs textbook eager | vs textbook compiled | float32 error (loss, grad) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, value in timings.items():
            if not isinstance(value, dict) or name == "mask_relu_triton":
                continue
            ratio = lambda k: f"{value[k]:.1f}×" if k in value else ""  # noqa: E731
            error = (f"{value['loss_rel_error_vs_float64']:.1e}, {value['grad_rel_error_vs_float64']:.1e}"
                     if "loss_rel_error_vs_float64" in value else "")
            graph = f"{value['graph_forward_backward_ms']:.3g} ms" if "graph_forward_backward_ms" in value else \
                value.get("graph_error", "—")[:40]
            lines.append(f"| {name} | {_ms(value)} | {ratio('x_floor')} | {ratio('speedup_vs_textbook_eager')} | "
                         f"{ratio('speedup_vs_textbook_compiled')} | {ratio('speedup_vs_reference_eager')} | {graph} | "
                         f"{ratio('graph_x_floor')} | {ratio('graph_speedup_vs_textbook_eager')} | "
                         f"{ratio('graph_speedup_vs_textbook_compiled')} | {error} |")
        mask = timings.get("mask_relu_triton")
        if isinstance(mask, dict) and "x_copy" in mask:
            lines += ["", f"ReLU + mask forward + backward: {mask['forward_backward_ms']:.3g} ms = "
                          f"{mask['x_copy']:.2f}× one copy of x ({timings['copy_ms']:.3g} ms); goal ≤ 2.5×"]
            if "graph_x_copy" in mask:
                lines += [f"From a CUDA graph: {mask['graph_forward_backward_ms']:.3g} ms = {mask['graph_x_copy']:.2f}× "
                          f"one copy ({mask['graph_copy_ms']:.3g} ms)"]
        lines.append("")
    sweep = report.get("scaling")
    if sweep:
        graphs = all("graph_forward_backward_ms" in c for c in sweep["cases"] if "forward_backward_ms" in c)
        kind = "CUDA-graph replays; eager in parentheses" if graphs and report["device"] != "CPU (Triton interpreter)" \
            else "eager"
        lines += [f"## Scaling in n (B={sweep['batch']}, C={sweep['channels']}, forward + backward; {kind})", "",
                  "| variant | " + " | ".join(f"n={n}" for n in sorted({c['n'] for c in sweep['cases']})) + " | last slope |",
                  "|---|" + "---|" * (len({c['n'] for c in sweep['cases']}) + 1)]
        for name in sorted({c["variant"] for c in sweep["cases"]}):
            row = [f"{c['graph_forward_backward_ms']:.3g} ms ({_ms(c)})" if "graph_forward_backward_ms" in c else _ms(c)
                   for c in sweep["cases"] if c["variant"] == name]
            slope = sweep["last_slope"].get(name)
            lines.append(f"| {name} | " + " | ".join(row) + f" | {slope:.2f} |" if slope is not None else
                         f"| {name} | " + " | ".join(row) + " | — |")
    if report.get("fused_sweep"):
        lines += ["", f"## Launch sweep of the fused form ({next(iter(report['shapes']))}, forward + backward)", "",
                  "| precision | BLOCK_K | BLOCK_I | warps | stages | ok | eager | CUDA graph | errors (loss, grad) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for row in report["fused_sweep"]:
            times = [f"{row[k]:.3g} ms" if k in row else row.get("skipped", row.get("error", "—"))[:60]
                     for k in ("forward_backward_ms", "graph_forward_backward_ms")]
            errors = (f"{row['loss_rel_error_vs_float64']:.1e}, {row['grad_rel_error_vs_float64']:.1e}"
                      if "loss_rel_error_vs_float64" in row else "")
            ok = "" if "ok" not in row else ("yes" if row["ok"] else "NO")
            lines.append(f"| {row['precision']} | {row['BLOCK_K']} | {row['BLOCK_I']} | {row['num_warps']} | "
                         f"{row.get('num_stages', '')} | {ok} | "
                         f"{times[0]} | {times[1]} | {errors} |")
    if report.get("mi_sweep"):
        lines += ["", f"## Launch sweep of the gemm form's MI kernels ({next(iter(report['shapes']))})", "",
                  "| launch (triton_forms.MI_LAUNCH) | ok | forward | Ḡ + ∂s | errors (loss, ∂s) |", "|---|---|---|---|---|"]
        for row in report["mi_sweep"]:
            times = [f"{row[k]:.3g} ms" if k in row else row.get("skipped", row.get("error", "—"))[:60]
                     for k in ("forward_ms", "backward_ms")]
            errors = (f"{row['loss_rel_error']:.1e}, {row['ds_rel_error']:.1e}" if "loss_rel_error" in row else "")
            ok = "" if "ok" not in row else ("yes" if row["ok"] else "NO")
            lines.append(f"| {row['launch'] or 'default'} | {ok} | {times[0]} | {times[1]} | {errors} |")
    if report.get("profile"):
        lines += ["", "## Profile (10 forward + backward steps, device kernels)", "", "```", report["profile"], "```"]
    return "\n".join(lines) + "\n"
