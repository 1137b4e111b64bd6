"""Markdown + HTML reports with matplotlib plots: where the bits went, and what they bought.

A report is built from rows of per-layer facts (bits, params, MACs, score), the budgets, and
optionally accuracy points over several runs (the Pareto curve of accuracy vs average bits).
A row is a Linear (w_bits, a_bits) or an attention matmul of a plan made with ``attention=True``
(``op`` "qk": Q, K bits; "pv": P, V bits; no weights); the header says which ops are quantized, and
the BOPs total and the average activation bits count both kinds.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from .alloc.plan import latency_line
from .alloc.problem import stored_bits
from .formats import SUPPORTED_BITS


@dataclass
class LayerRow:
    name: str
    w_bits: int
    a_bits: int
    params: int = 0
    macs: int = 0
    cost: Optional[float] = None  # the allocation's per-choice cost of the chosen bits
    out_features: int = 0  # one fp32 scale per output channel counts toward the size
    bias: bool = False  # an fp32 bias counts too
    op: str = "linear"  # or "qk" / "pv": an attention matmul, w_bits/a_bits = its two operands' bits

    @property
    def is_linear(self) -> bool:
        return self.op == "linear"

    @property
    def bops(self) -> int:
        return self.macs * self.w_bits * self.a_bits

    @property
    def label(self) -> str:
        """"W4A8" for a Linear, "Q8K8" / "P4V8" for an attention matmul."""
        first, second = _OPERANDS[self.op]
        return f"{first}{self.w_bits}{second}{self.a_bits}"

    @property
    def size_bits(self) -> int:
        """Stored bits, counted as the allocation's byte budget counts them."""
        return stored_bits(self.params, self.out_features, self.bias, self.w_bits)


_OPERANDS = {"linear": ("W", "A"), "qk": ("Q", "K"), "pv": ("P", "V")}
_OP_NAMES = {"linear": "linear", "qk": "QK^T", "pv": "softmax.V"}
LINEARS_ONLY = "Linears only"
WITH_ATTENTION = "Linears + attention matmuls (QK^T, softmax.V)"


def choice_counts(pairs: Iterable[tuple[int, int]]) -> dict[str, int]:
    """How many layers run at each choice: {"W4A8": 24, "W8A8": 24}, sorted by label."""
    counts: dict[str, int] = {}
    for w, a in pairs:
        counts[f"W{w}A{a}"] = counts.get(f"W{w}A{a}", 0) + 1
    return dict(sorted(counts.items()))


@dataclass
class ReportData:
    title: str
    layers: list[LayerRow]
    size_budget_bits: Optional[float] = None  # bits allowed, of the measure budget_kind names
    bops_budget: Optional[float] = None
    points: list[dict] = field(default_factory=list)  # {"label", "avg_bits", <metric>: value, ...}
    metric: Optional[str] = None  # which key of the points to plot against average bits
    notes: list[str] = field(default_factory=list)
    tables: list[str] = field(default_factory=list)  # extra Markdown tables, verbatim
    budget_kind: str = "bits_per_weight"  # or "bytes": what size_budget_bits constrains (as in Plan)
    # The Pareto frontier: points as plot_frontier takes them ({"kind", "label", "bops", "wbits",
    # "metrics": {m: {"value", "lo", "hi"}}}), the metrics to draw (key -> column title), a caption.
    frontier: list[dict] = field(default_factory=list)
    frontier_metrics: dict[str, str] = field(default_factory=dict)
    frontier_caption: str = ""
    latency: Optional[dict] = None  # a plan's predicted (and, where timed, measured) latency

    @property
    def size_bits(self) -> int:
        """Weights, scales and biases of the quantized layers: the measure of a byte budget."""
        return sum(r.size_bits for r in self.layers)

    @property
    def linears(self) -> list[LayerRow]:
        return [r for r in self.layers if r.is_linear]

    @property
    def attention(self) -> list[LayerRow]:
        """The attention matmul rows (empty unless the plan quantizes attention)."""
        return [r for r in self.layers if not r.is_linear]

    @property
    def quantized_ops(self) -> str:
        return WITH_ATTENTION if self.attention else LINEARS_ONLY

    @property
    def attention_bops(self) -> int:
        return sum(r.bops for r in self.attention)

    @property
    def avg_a_bits(self) -> float:
        """Average activation bits, MAC-weighted over every activation operand: a Linear's input once
        per MAC, both operands of an attention matmul; nan when no row records MACs."""
        bits = sum(r.macs * r.a_bits for r in self.linears) + sum(r.macs * (r.w_bits + r.a_bits) for r in self.attention)
        weight = sum(r.macs for r in self.linears) + 2 * sum(r.macs for r in self.attention)
        return bits / weight if weight else float("nan")

    @property
    def weight_bits(self) -> int:
        return sum(r.params * r.w_bits for r in self.layers)

    @property
    def bops(self) -> int:
        """Every row's BOPs: the Linears' and, if planned, the attention matmuls'."""
        return sum(r.bops for r in self.layers)

    @property
    def avg_w_bits(self) -> float:
        """Average weight bits over the quantized weights (scales not counted, as in the field)."""
        total = sum(r.params for r in self.layers)
        return self.weight_bits / total if total else float("nan")

    @classmethod
    def from_plan(cls, title: str, plan: dict, **kwargs: Any) -> "ReportData":
        """A report of a plan's JSON (:meth:`mixq.alloc.Plan.to_dict`), its budget in the plan's own measure."""
        return cls(title, rows_from_plan(plan), plan.get("size_budget_bits"), plan.get("bops_budget"),
                   budget_kind=(plan.get("budget") or {}).get("kind", "bits_per_weight"),
                   latency=plan.get("latency"), **kwargs)


def _fig_bits(data: ReportData, path: Path) -> None:
    import matplotlib.pyplot as plt

    x = range(len(data.layers))
    nan = float("nan")
    fig, ax = plt.subplots(figsize=(max(6, 0.16 * len(data.layers)), 3.2))
    ax.step(x, [r.w_bits if r.is_linear else nan for r in data.layers], where="mid", label="weight bits", lw=2)
    ax.step(x, [r.a_bits + 0.08 if r.is_linear else nan for r in data.layers], where="mid", label="activation bits",
            lw=2, ls="--")
    if data.attention:  # both operands of an attention matmul are activations
        ax.scatter([i for i, r in enumerate(data.layers) if not r.is_linear],
                   [r.w_bits - 0.08 for r in data.layers if not r.is_linear], marker="x", color="tab:red",
                   label="attention matmul bits (Q,K / P,V)", zorder=3)
    ax.set_yticks(list(SUPPORTED_BITS))
    ax.set_ylim(3.5, 8.5)
    ax.set_xlabel("Linear layer and attention matmul (execution order)" if data.attention
                  else "Linear layer (execution order)")
    ax.set_ylabel("bits")
    ax.set_title("Bit-width per layer across depth")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fig_scores(data: ReportData, path: Path) -> bool:
    import matplotlib.pyplot as plt

    scores = [r.cost for r in data.layers]
    if all(s is None for s in scores):
        return False
    fig, ax = plt.subplots(figsize=(max(6, 0.16 * len(data.layers)), 3.2))
    colors = {4: "#d62728", 6: "#ff7f0e", 8: "#2ca02c"}
    ax.bar(range(len(scores)), [s or 0.0 for s in scores],
           color=[colors.get(r.w_bits, "grey") if r.is_linear else "tab:purple" for r in data.layers])
    ax.set_xlabel("Linear layer (execution order); colour = weight bits (red 4, orange 6, green 8)"
                  + ("; purple: attention matmul" if data.attention else ""))
    ax.set_ylabel("cost of the chosen bits")
    ax.set_title("Per-layer allocation cost")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _fig_budget(data: ReportData, path: Path) -> None:
    import matplotlib.pyplot as plt

    params = sum(r.params for r in data.layers) or 1
    macs = sum(r.macs for r in data.layers) or 1
    fig, axes = plt.subplots(1, 2, figsize=(7, 3))
    # The size axis is the measure the budget constrains: weight bits per weight, or stored MB.
    if data.budget_kind == "bytes":
        used, per, label = data.size_bits, 8e6, "stored size of the quantized layers (MB)"
    else:
        used, per, label = data.weight_bits, params, "average weight bits"
    axes[0].bar(["used"], [used / per], color="#1f77b4")
    if data.size_budget_bits:
        axes[0].axhline(data.size_budget_bits / per, color="k", ls="--", label="budget")
        axes[0].legend(fontsize=8)
    axes[0].set_ylabel(label)
    axes[0].set_ylim(0, max(used, data.size_budget_bits or 0) / per * 1.06)
    axes[0].set_title("Model size")
    axes[1].bar(["used"], [data.bops / macs], color="#9467bd")
    if data.bops_budget:
        axes[1].axhline(data.bops_budget / macs, color="k", ls="--", label="budget")
        axes[1].legend(fontsize=8)
    axes[1].set_ylabel("BOPs per MAC (w_bits x a_bits)")
    axes[1].set_ylim(0, 68)
    axes[1].set_title("Bit operations")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fig_pareto(data: ReportData, path: Path) -> bool:
    import matplotlib.pyplot as plt

    pts = [p for p in data.points if data.metric and p.get(data.metric) is not None and p.get("avg_bits")]
    if len(pts) < 2:
        return False
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for kind, marker in (("uniform", "s"), ("mixed", "o"), ("fp", "*")):
        sel = [p for p in pts if p.get("kind", "mixed") == kind]
        if sel:
            ax.scatter([p["avg_bits"] for p in sel], [p[data.metric] for p in sel], marker=marker, s=60, label=kind)
            for p in sel:
                ax.annotate(p["label"], (p["avg_bits"], p[data.metric]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
    mixed = sorted((p for p in pts if p.get("kind", "mixed") == "mixed"), key=lambda p: p["avg_bits"])
    if len(mixed) > 1:
        ax.plot([p["avg_bits"] for p in mixed], [p[data.metric] for p in mixed], alpha=0.5)
    ax.set_xlabel("average weight bits")
    ax.set_ylabel(data.metric)
    ax.set_title(f"{data.metric} vs average bits")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_frontier(points: Sequence[dict], metric: str, path: str | Path, x: str = "bops",
                  title: Optional[str] = None) -> Path:
    """Metric vs BOPs (``x="bops"``, fraction of W8A8) or vs size (``x="wbits"``, average weight bits):
    uniform points as labelled squares, mixed plans as circles joined into their frontier, each with
    its 95% interval as an error bar. ``points``: dicts with ``kind`` ("uniform" | "mixed"),
    ``label``, ``bops`` (fraction of W8A8), ``wbits`` and ``metrics[metric] = {"value", "lo", "hi"}``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    if x not in ("bops", "wbits"):
        raise ValueError(f"x must be 'bops' or 'wbits', got {x!r}")
    pts = [p for p in points if metric in p.get("metrics", {})]
    if not pts:
        raise ValueError(f"no point has metric {metric!r}")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind, style in (("uniform", dict(marker="s", color="tab:gray")), ("mixed", dict(marker="o", color="tab:blue"))):
        sel = sorted([p for p in pts if p["kind"] == kind], key=lambda p: (p[x], p["metrics"][metric]["value"]))
        if not sel:
            continue
        xs = np.array([p[x] for p in sel])
        ys = np.array([p["metrics"][metric]["value"] for p in sel])
        # a point without an interval ("lo"/"hi" missing) is drawn without an error bar
        err = np.array([[p["metrics"][metric]["value"] - p["metrics"][metric].get("lo", p["metrics"][metric]["value"])
                         for p in sel],
                        [p["metrics"][metric].get("hi", p["metrics"][metric]["value"]) - p["metrics"][metric]["value"]
                         for p in sel]])
        ax.errorbar(xs, ys, yerr=err, linestyle="none", capsize=3, label=kind, **style)
        if kind == "mixed":  # the upper envelope: best value at or below each x
            order = np.argsort(xs)
            fx, fy, best = [], [], -np.inf
            for i in order:
                if ys[i] > best:
                    best = ys[i]
                    fx.append(xs[i])
                    fy.append(ys[i])
            ax.plot(fx, fy, color="tab:blue", alpha=0.6)
        else:
            for p, xx, yy in zip(sel, xs, ys):
                ax.annotate(p["label"], (xx, yy), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set_xlabel("BOPs (fraction of W8A8)" if x == "bops" else "average weight bits")
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} vs {'BOPs' if x == 'bops' else 'size'}: uniform points and mixed plans (95% CI)")
    ax.grid(alpha=0.3)
    ax.legend()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _layer_table(data: ReportData) -> str:
    if data.attention:  # the two bit columns are the operands' bits: W, A; Q, K; or P, V
        total = data.bops or 1
        lines = ["| # | layer | op | bits | params | MACs | BOPs share | cost |", "|---|---|---|---|---|---|---|---|"]
        for i, r in enumerate(data.layers):
            cost = "" if r.cost is None else f"{r.cost:.4g}"
            lines.append(f"| {i} | `{r.name}` | {_OP_NAMES[r.op]} | {r.label} | {r.params:,} | {r.macs:,} | "
                         f"{r.bops / total:.2%} | {cost} |")
        return "\n".join(lines)
    lines = ["| # | layer | W | A | params | MACs | cost |", "|---|---|---|---|---|---|---|"]
    for i, r in enumerate(data.layers):
        cost = "" if r.cost is None else f"{r.cost:.4g}"
        lines.append(f"| {i} | `{r.name}` | {r.w_bits} | {r.a_bits} | {r.params:,} | {r.macs:,} | {cost} |")
    return "\n".join(lines)


def _fmt_value(m: dict) -> str:
    if "lo" in m and "hi" in m:
        return f"{m['value']:.4g} [{m['lo']:.4g}, {m['hi']:.4g}]"
    return f"{m['value']:.4g}"


def frontier_table(points: Sequence[dict], metrics: dict[str, str]) -> str:
    """Markdown table of frontier points: bits, BOPs and each metric as 'value [lo, hi]'."""
    lines = ["| point | kind | avg W bits | BOPs (x W8A8) | " + " | ".join(metrics.values()) + " |",
             "|---|---|---:|---:|" + "---:|" * len(metrics)]
    for p in sorted(points, key=lambda p: (p["bops"], p["wbits"], p["kind"] != "uniform")):
        cells = [_fmt_value(p["metrics"][m]) if m in p.get("metrics", {}) else "–" for m in metrics]
        lines.append(f"| {p['label']} | {p['kind']} | {p['wbits']:.3f} | {p['bops']:.4f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _frontier_figures(data: ReportData, out: Path) -> list[tuple[str, str]]:
    figures = []
    for metric, name in data.frontier_metrics.items():
        if not any(metric in p.get("metrics", {}) for p in data.frontier):
            continue
        for x, xname in (("bops", "BOPs"), ("wbits", "average weight bits")):
            fname = f"frontier_{metric}_{x}.png"
            plot_frontier(data.frontier, metric, out / fname, x=x, title=f"{name} vs {xname}")
            figures.append((fname, f"Frontier: {name} vs {xname}"))
    return figures


def write_report(data: ReportData, out_dir: str | Path) -> Path:
    """Write report.md, report.html and the PNG plots into ``out_dir``; returns the Markdown path.

    A report without layers (only a frontier) leaves out the per-layer plots and summary."""
    import matplotlib

    matplotlib.use("Agg")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = []
    if data.layers:
        figures.append(("bits_per_layer.png", "Bit-widths per layer"))
        _fig_bits(data, out / "bits_per_layer.png")
        if _fig_scores(data, out / "scores_per_layer.png"):
            figures.append(("scores_per_layer.png", "Scores per layer"))
        _fig_budget(data, out / "size_bops_budget.png")
        figures.append(("size_bops_budget.png", "Size and BOPs against budget"))
    if _fig_pareto(data, out / "pareto.png"):
        figures.append(("pareto.png", "Accuracy vs average bits"))

    md = [f"# {data.title}", ""]
    if data.layers:
        params = sum(r.params for r in data.layers)
        counts = choice_counts((r.w_bits, r.a_bits) for r in data.linears)
        attention = data.attention
        md += [f"- quantized ops: {data.quantized_ops}",
               f"- quantized Linear layers: {len(data.linears)} ({params:,} weights)"]
        if attention:
            att_counts: dict[str, int] = {}
            for r in attention:
                att_counts[r.label] = att_counts.get(r.label, 0) + 1
            md += [f"- quantized attention matmuls: {sum(r.op == 'qk' for r in attention)} QK^T and "
                   f"{sum(r.op == 'pv' for r in attention)} softmax.V (no weights; bits of Q, K and of P, V): "
                   + ", ".join(f"{k} x{v}" for k, v in sorted(att_counts.items()))]
        md += [f"- average weight bits: {data.avg_w_bits:.3f}" if params else "- average weight bits: n/a",
               f"- quantized-layer size: {data.size_bits / 8 / 2**20:.2f} MiB of integer weights, scales and biases "
               f"(fp32 weights would be {params * 4 / 2**20:.2f} MiB)",
               (f"- BOPs: {data.bops:.4g}" + (f" (budget {data.bops_budget:.4g})" if data.bops_budget else "")
                + (f", of which the attention matmuls {data.attention_bops:.4g} "
                   f"({data.attention_bops / max(data.bops, 1):.1%}); Linears + attention matmuls" if attention else
                   ", Linears only")) if any(r.macs for r in data.layers)
               else "- BOPs: n/a (no MACs recorded here; a plan JSON records them)",
               "- choices: " + ", ".join(f"{k} x{v}" for k, v in counts.items())]
        if data.avg_a_bits == data.avg_a_bits:  # not nan: the rows record MACs
            md.append(f"- average activation bits: {data.avg_a_bits:.3f} (MAC-weighted over "
                      + ("the Linears' inputs and both operands of each attention matmul)" if attention
                         else "the Linears' inputs)"))
    if data.latency:
        md.append("- " + latency_line(data.latency))
    md += [f"- {n}" for n in data.notes]
    md.append("")
    for t in data.tables:
        md += [t, ""]
    if data.frontier and data.frontier_metrics:
        md += ["## Pareto frontier", ""]
        if data.frontier_caption:
            md += [data.frontier_caption, ""]
        md += [frontier_table(data.frontier, data.frontier_metrics), ""]
        figures += _frontier_figures(data, out)
    for fname, caption in figures:
        md += [f"## {caption}", "", f"![{caption}]({fname})", ""]
    if data.layers:
        md += ["## Layers", "", _layer_table(data), ""]
    text = "\n".join(md)
    (out / "report.md").write_text(text)
    (out / "report.html").write_text(_to_html(data.title, md))
    return out / "report.md"


def _to_html(title: str, md_lines: list[str]) -> str:
    """A plain HTML rendering (headings, bullets, tables, images) without a Markdown dependency."""
    body, in_table = [], False
    for line in md_lines:
        if line.startswith("|"):
            cells = [html.escape(c.strip().strip("`")) for c in line.strip("|").split("|")]
            if set("".join(cells)) <= set("-"):
                continue
            if not in_table:
                body.append("<table border=1 cellspacing=0 cellpadding=3>")
                in_table = True
            body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
            continue
        if in_table:
            body.append("</table>")
            in_table = False
        if line.startswith("![") and "](" in line:
            src = line.split("](", 1)[1].rstrip(")")
            body.append(f'<p><img src="{html.escape(src)}" style="max-width:100%"></p>')
        elif line.startswith("## "):
            body.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.startswith("- "):
            body.append(f"<li>{html.escape(line[2:])}</li>")
        elif line:
            body.append(f"<p>{html.escape(line)}</p>")
    if in_table:
        body.append("</table>")
    return f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}</title></head><body>" + \
        "\n".join(body) + "</body></html>"


def rows_from_layer_configs(layers: dict[str, dict]) -> list[LayerRow]:
    """Rows from per-layer QuantLinear configs (``checkpoint.layer_configs`` or a checkpoint's metadata)."""
    return [LayerRow(n, c["w_bits"], c["a_bits"], c["in_features"] * c["out_features"], 0, None,
                     c["out_features"], bool(c.get("bias", False))) for n, c in layers.items()]


# How a plan JSON names the two bit-widths of each kind of layer (as mixq.alloc.plan writes them).
_BIT_KEYS = {"linear": ("w_bits", "a_bits"), "qk": ("q_bits", "k_bits"), "pv": ("p_bits", "v_bits")}


def rows_from_attention_configs(attention: dict[str, dict]) -> list[LayerRow]:
    """Rows for the quantized attention matmuls of a model or checkpoint (``checkpoint.attention_configs``
    or a checkpoint's "attention" metadata: module -> {"kind", "config"}), one per quantized op, named
    like a plan's ``<module>.qk`` / ``<module>.pv``. MACs are not recorded there (0: their BOPs are not
    counted)."""
    rows = []
    for module, entry in attention.items():
        c = entry.get("config", entry)
        bits = {"qk": (c["qk_bits"], c["qk_bits"]), "pv": (c["p_bits"], c["v_bits"])}
        for op in c.get("ops", ("qk", "pv")):
            rows.append(LayerRow(f"{module}.{op}", int(bits[op][0]), int(bits[op][1]), op=op))
    return rows


def rows_from_plan(plan: dict) -> list[LayerRow]:
    """Rows from a plan's JSON (per-layer bits with params, MACs and scores where recorded)."""
    rows = []
    for name, info in plan["layers"].items():
        if isinstance(info, dict):
            # "score" is what plans written before the cost/score rename call the cost
            op = info.get("op", "linear")
            if op not in _BIT_KEYS:
                raise ValueError(f"layer {name!r} has op {op!r}; known: {sorted(_BIT_KEYS)}")
            k1, k2 = _BIT_KEYS[op]
            rows.append(LayerRow(name, int(info[k1]), int(info[k2]), int(info.get("params", 0)),
                                 int(info.get("macs", 0)), info.get("cost", info.get("score")),
                                 int(info.get("out_features", 0)), bool(info.get("bias", False)), op))
        else:
            rows.append(LayerRow(name, int(info[0]), int(info[1])))
    return rows


def load_points(path: str | Path) -> list[dict]:
    """Accuracy points from a results JSON written by ``mixq demo`` / ``mixq eval`` (key "points")."""
    data: Any = json.loads(Path(path).read_text())
    return list(data.get("points", [])) if isinstance(data, dict) else list(data)
