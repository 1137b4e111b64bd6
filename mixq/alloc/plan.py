"""``Plan``: the chosen bits per layer with their size, BOPs and costs; ``solve_plan`` makes one."""

from __future__ import annotations

import io
import json
import math
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np

from .budgets import LatencyBudget, parse_bops_budget, parse_latency_budget, parse_size_budget
from .milp import solve_milp
from .problem import AllocationProblem, Budget, InfeasibleBudgetError, KnapsackRow, LayerLatency

if TYPE_CHECKING:
    from ..config import QuantConfig



@dataclass
class Plan:
    """The allocation: per-layer bits plus what it costs and how it was found.

    ``layers`` maps each Linear to (w_bits, a_bits) and, in a plan made with ``attention=True``, each
    attention matmul ``<module>.qk`` to (Q bits, K bits) and ``<module>.pv`` to (P bits, V bits);
    ``layer_info[name]["op"]`` says which ("qk" / "pv"; absent for a Linear). ``bops`` counts every
    planned layer, attention matmuls included; ``p_grid`` is the probability grid the attention
    matmuls were scored with (None: no attention planned).

    ``quantize_(model, plan, calib_data)`` accepts it directly (through :meth:`to_config`). It is
    JSON-serializable (:meth:`to_json`, :meth:`save`) and prints as a table.
    """

    layers: dict[str, tuple[int, int]]
    size_bits: int  # weights + scales + fp32 biases of the planned layers
    weight_bits: int  # weights only
    weight_params: int
    bops: int  # per input
    budget: Optional[dict] = None  # {"kind": "bits_per_weight"|"bytes", "value": float}
    bops_budget: Optional[int] = None
    objective: float = 0.0
    status: str = "optimal"
    gap: float = 0.0
    solve_time_s: float = 0.0
    scorer: str = ""
    lam: float = 0.0
    synergy: bool = False
    layer_info: dict[str, dict] = field(default_factory=dict)  # name -> params, macs, out_features, bias, cost[, op]
    p_grid: Optional[str] = None  # the attention matmuls' probability grid; None: Linears only
    # Predicted latency from the measured table (allocate(latency_budget=...)): ms end to end and
    # its parts, the budget, the fp32 and W8A8 references; "measured_ms" once the quantized model
    # was timed (mixq quantize, bench/latency_budget.py). None: no latency table was used.
    latency: Optional[dict] = None

    @property
    def size_bytes(self) -> float:
        return self.size_bits / 8

    @property
    def avg_bits_per_weight(self) -> float:
        return self.weight_bits / max(self.weight_params, 1)

    def op(self, name: str) -> str:
        """What layer ``name`` is: "linear", or "qk" / "pv" for an attention matmul."""
        return self.layer_info.get(name, {}).get("op", "linear")

    @property
    def attention_layers(self) -> dict[str, tuple[int, int]]:
        """The planned attention matmuls and their bit pairs."""
        return {n: b for n, b in self.layers.items() if self.op(n) != "linear"}

    @property
    def linear_layers(self) -> dict[str, tuple[int, int]]:
        return {n: b for n, b in self.layers.items() if self.op(n) == "linear"}

    @property
    def quantized_ops(self) -> str:
        """Which ops the plan quantizes, in words (reports print it)."""
        return "Linears + attention matmuls (QK^T, softmax.V)" if self.attention_layers else "Linears only"

    @property
    def attention_bops(self) -> int:
        """BOPs of the attention matmuls alone (included in ``bops``)."""
        return sum(int(self.layer_info.get(n, {}).get("macs", 0)) * b1 * b2 for n, (b1, b2) in self.attention_layers.items())

    @property
    def avg_act_bits(self) -> float:
        """Average bits of the activation operands, weighted by MACs: a Linear's input counts once
        per MAC, both operands of an attention matmul count (Q and K, P and V)."""
        bits = weight = 0
        for n, (b1, b2) in self.layers.items():
            macs = int(self.layer_info.get(n, {}).get("macs", 0))
            if self.op(n) == "linear":
                bits, weight = bits + macs * b2, weight + macs
            else:
                bits, weight = bits + macs * (b1 + b2), weight + 2 * macs
        return bits / weight if weight else float("nan")

    def to_config(self, **fields: Any) -> "QuantConfig":
        """A :class:`mixq.QuantConfig` quantizing exactly the planned layers at their bits.

        ``fields`` are QuantConfig's own (``linear=LinearConfig(fold_layernorm=True)``,
        ``backend="cpu"``, ``attention=AttentionConfig(...)``); the plan then sets the bits it chose:
        ``linear.layer_bits`` to the planned Linears with ``layer_bits_only=True`` (every other
        Linear stays float) and, when it planned attention matmuls, ``attention.layer_bits`` to them
        at the plan's ``p_grid``. A plan of Linears only keeps the ``attention`` given (uniform bits
        for the attention matmuls on top of planned Linears)."""
        from dataclasses import replace

        from ..config import AttentionConfig, QuantConfig

        base = QuantConfig(**fields)
        linear = replace(base.linear, layer_bits=dict(self.linear_layers), layer_bits_only=True)
        attention = base.attention
        if self.attention_layers:
            attention = replace(attention or AttentionConfig(), layer_bits=dict(self.attention_layers),
                                p_grid=self.p_grid or "log2")
        return replace(base, linear=linear, attention=attention)

    @property
    def size_budget_bits(self) -> Optional[int]:
        """The size budget in bits of the measure it constrains (weight bits, or everything stored)."""
        if self.budget is None:
            return None
        if self.budget["kind"] == "bits_per_weight":
            return math.floor(Fraction(self.budget["value"]) * self.weight_params)
        return math.floor(Fraction(self.budget["value"]) * 8)

    def to_dict(self) -> dict:
        """JSON form: per-layer entries carry bits plus params, MACs, score and out_features (what
        ``mixq report`` reads); derived totals are included for readers and ignored on load."""
        d = asdict(self)
        info = d.pop("layer_info")
        d["layers"] = {n: {**_bits_keys(info.get(n, {}).get("op", "linear"), w, a), **info.get(n, {})}
                       for n, (w, a) in self.layers.items()}
        d.update(size_bytes=self.size_bytes, avg_bits_per_weight=self.avg_bits_per_weight,
                 size_budget_bits=self.size_budget_bits, quantized_ops=self.quantized_ops)
        if self.attention_layers:
            d.update(attention_bops=self.attention_bops, avg_act_bits=self.avg_act_bits)
        return d

    def to_json(self, indent: Optional[int] = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        d = {k: v for k, v in d.items() if k not in _DERIVED}
        if "softmax_quant" in d:  # plans written before the one-name-per-concept rename
            d["p_grid"] = d.pop("softmax_quant")
        layers, info = {}, dict(d.pop("layer_info", {}) or {})
        for name, entry in d.pop("layers").items():
            if isinstance(entry, dict):
                keys = _BIT_KEYS.get(entry.get("op", "linear"))
                if keys is None:
                    raise ValueError(f"layer {name!r} has op {entry['op']!r}; known: {sorted(_BIT_KEYS)}")
                layers[name] = (int(entry[keys[0]]), int(entry[keys[1]]))
                # plans written before the rename call the per-choice cost "score"
                info[name] = {("cost" if k == "score" else k): v for k, v in entry.items() if k not in keys}
            else:
                layers[name] = (int(entry[0]), int(entry[1]))
        return cls(layers=layers, layer_info=info, **d)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        return cls.from_dict(json.loads(text))

    def save(self, path: Union[str, Path]) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Plan":
        return cls.from_json(Path(path).read_text())

    def __str__(self) -> str:
        from rich.console import Console
        from rich.table import Table

        attention = self.attention_layers
        summary = (f"mixq plan ({self.scorer or 'custom'} scores, synergy {'on' if self.synergy else 'off'}; "
                   f"quantizes {self.quantized_ops}): "
                   f"{self.avg_bits_per_weight:.3f} bits/weight, {self.size_bytes / 1e6:.3f} MB, "
                   f"{self.bops / 1e9:.3f} GBOPs/input"
                   + (f" (attention matmuls {self.attention_bops / max(self.bops, 1):.1%} of it; average activation "
                      f"bits {self.avg_act_bits:.3f}, MAC-weighted over Linear inputs and both operands of each "
                      f"attention matmul; probabilities on the {self.p_grid} grid)" if attention else "")
                   + f", {self.status}" + (f" (gap {self.gap:.2%})" if self.status != "optimal" else ""))
        table = Table()
        cols = ("layer", "op", "W", "A", "params", "MACs/input", "BOPs share", "cost") if attention else \
            ("layer", "W", "A", "params", "MACs/input", "cost")
        for col in cols:
            table.add_column(col, justify="left" if col in ("layer", "op") else "right")
        for name, (w, a) in self.layers.items():
            info = self.layer_info.get(name, {})
            cost = info.get("cost")
            op = self.op(name)
            if attention:  # W/A hold the two operands' bits of an attention matmul: Q, K or P, V
                first, second = _OPERANDS[op]
                share = int(info.get("macs", 0)) * w * a / max(self.bops, 1)
                table.add_row(name, {"linear": "linear", "qk": "QK^T", "pv": "softmax.V"}[op], f"{first}{w}",
                              f"{second}{a}", f"{info.get('params', 0):,}", f"{info.get('macs', 0):,}", f"{share:.2%}",
                              "" if cost is None else f"{cost:.4g}")
                continue
            table.add_row(name, str(w), str(a), f"{info.get('params', 0):,}", f"{info.get('macs', 0):,}",
                          "" if cost is None else f"{cost:.4g}")
        console = Console(file=io.StringIO(), width=200, record=True)
        console.print(summary)
        if self.latency:
            console.print(latency_line(self.latency), soft_wrap=True)
        console.print(table)
        return console.export_text()


# How each kind of layer names its two bit-widths in the plan JSON, and in the printed table.
_BIT_KEYS = {"linear": ("w_bits", "a_bits"), "qk": ("q_bits", "k_bits"), "pv": ("p_bits", "v_bits")}
_OPERANDS = {"linear": ("W", "A"), "qk": ("Q", "K"), "pv": ("P", "V")}
_DERIVED = ("size_bytes", "avg_bits_per_weight", "size_budget_bits", "quantized_ops", "attention_bops", "avg_act_bits")


def _bits_keys(op: str, b1: int, b2: int) -> dict:
    k1, k2 = _BIT_KEYS[op]
    return {k1: b1, k2: b2}


def latency_line(latency: dict) -> str:
    """One line: predicted latency against its budget and the references, measured where known."""
    lat = latency
    text = (f"latency (batch {lat.get('batch', 1)}): predicted {lat['predicted_ms']:.3f} ms end to end "
            f"(Linears {lat['layers_ms']:.3f} ms + non-Linear {lat['other_ms']:.3f} ms)")
    if lat.get("budget_ms") is not None:
        text += f", budget {lat['budget_ms']:.3f} ms ({lat.get('budget', '')})"
    text += f"; fp32 {lat['fp32_ms']:.3f} ms, uniform W8A8 {lat['w8a8_ms']:.3f} ms predicted"
    if lat.get("measured_ms") is not None:
        text += (f"; measured {lat['measured_ms']:.3f} ms (measured / predicted "
                 f"{lat['measured_ms'] / lat['predicted_ms']:.3f}"
                 + (f", measured / budget {lat['measured_ms'] / lat['budget_ms']:.3f}" if lat.get("budget_ms") else "")
                 + ")")
    return text


def latency_summary(latency: LayerLatency, choice: np.ndarray, budget: Optional[LatencyBudget]) -> dict:
    """The plan's ``latency`` dict: predicted ms end to end and its parts, budget and references."""
    layers = float(latency.seconds[np.arange(len(choice)), choice].sum())
    return {
        "batch": int(latency.batch),
        "predicted_ms": (layers + latency.other_s) * 1e3,
        "layers_ms": layers * 1e3,
        "other_ms": latency.other_s * 1e3,
        "fp32_ms": (float(latency.fp32.sum()) + latency.other_s) * 1e3,
        "w8a8_ms": (float(latency.w8a8.sum()) + latency.other_s) * 1e3,
        "fastest_ms": (float(latency.seconds.min(axis=1).sum()) + latency.other_s) * 1e3,
        "budget": None if budget is None else budget.text,
        "budget_ms": None if budget is None else budget.end_to_end_seconds(latency) * 1e3,
        "measured_ms": None,
        "machine": dict(latency.key),
    }


def _smallest_feasible(problem: AllocationProblem, rows: list[KnapsackRow], which: int) -> Optional[int]:
    """The least value row ``which`` can take under the other rows (or alone if they conflict)."""
    target = rows[which].table.astype(np.float64)
    others = [r for k, r in enumerate(rows) if k != which]
    sol = solve_milp(problem, others, objective=target, synergy=False)
    if sol is None:
        sol = solve_milp(problem, [], objective=target, synergy=False)
    if sol is None:
        return None
    return int(np.asarray(rows[which].table)[np.arange(len(problem.names)), sol.choice].sum())


def solve_plan(
    problem: AllocationProblem,
    budget: Optional[Budget] = None,
    bops_budget: Union[float, int, str, None] = None,
    synergy: bool = True,
    time_limit: Optional[float] = None,
    scorer: str = "",
    latency_budget: Union[str, None] = None,
    latency: Optional[LayerLatency] = None,
) -> Plan:
    """Solve ``problem`` under the budgets and wrap the answer as a :class:`Plan`.

    ``latency_budget`` (:func:`~mixq.alloc.budgets.parse_latency_budget`) needs ``latency``, the
    measured table of the problem's layers; with ``latency`` alone the plan carries its prediction.
    Raises :class:`InfeasibleBudgetError` naming the smallest feasible budget when none fits.
    """
    size = parse_size_budget(budget) if budget is not None else None
    bops_rhs = parse_bops_budget(bops_budget, problem)
    lat_budget = parse_latency_budget(latency_budget)
    if lat_budget is not None and latency is None:
        raise ValueError("a latency budget needs the measured latency table (latency=LayerLatency(...))")
    if latency is not None and latency.seconds.shape != (len(problem.names), len(problem.candidates)):
        raise ValueError(f"latency table has shape {latency.seconds.shape}; the problem has "
                         f"{(len(problem.names), len(problem.candidates))} layers x candidates")
    rows: list[KnapsackRow] = []
    if size is not None:
        rows.append(size.row(problem))
    if bops_rhs is not None:
        rows.append(KnapsackRow("bops", problem.bops(), bops_rhs))
    if lat_budget is not None:
        rows.append(lat_budget.row(latency))
    sol = solve_milp(problem, rows, synergy=synergy, time_limit=time_limit) if all(r.rhs >= 0 for r in rows) else None
    if sol is None:
        parts = []
        smallest_value: Optional[float] = None
        kind = ""
        for k, row in enumerate(rows):
            least = _smallest_feasible(problem, rows, k)
            if least is None or least <= row.rhs:
                continue
            if row.label == "size" and size is not None and size.kind == "bits_per_weight":
                total = sum(problem.weight_params)
                value = math.ceil(least / total * 1e4) / 1e4
                parts.append(f"size budget {size.describe()} is below the smallest feasible {value:.4f} bits/weight")
            elif row.label == "size" and size is not None:
                value = float(math.ceil(least / 8))
                parts.append(f"size budget {size.describe()} is below the smallest feasible {value:,.0f} bytes "
                             f"({value / 1e6:.6f} MB)")
            elif row.label == "latency" and lat_budget is not None and latency is not None:
                value = (least / 1e9 + latency.other_s) * 1e3
                parts.append(f"latency budget {lat_budget.describe()} ({lat_budget.end_to_end_seconds(latency) * 1e3:.3f} ms "
                             f"predicted end to end) is below the fastest reachable {value:.3f} ms (Linears "
                             f"{least / 1e6:.3f} ms + non-Linear {latency.other_s * 1e3:.3f} ms; "
                             f"{least / 1e9 / max(float(latency.fp32.sum()), 1e-12):.3f}x the fp32 Linears, "
                             f"{least / 1e9 / max(float(latency.w8a8.sum()), 1e-12):.3f}x uniform W8A8)")
            else:
                value = float(least)
                parts.append(f"BOPs budget {row.rhs:,} is below the smallest feasible {least:,} BOPs")
            if smallest_value is None:
                smallest_value, kind = value, row.label
        pinned = f" with {len(problem.pinned)} pinned layer(s)" if problem.pinned else ""
        if not parts:
            parts.append("the budgets cannot be met together" + pinned)
        raise InfeasibleBudgetError("infeasible budget: " + "; ".join(parts) + pinned, smallest_value, kind)
    L = len(problem.names)
    idx = np.arange(L)
    choice = np.asarray(sol.choice)
    layers = {n: problem.candidates[c] for n, c in zip(problem.names, sol.choice)}
    info = {
        n: {"params": int(problem.weight_params[i]), "macs": int(problem.macs[i]),
            "out_features": int(problem.out_features[i]), "bias": bool(problem.has_bias[i]),
            "cost": float(problem.costs[i, sol.choice[i]]),
            **({"op": problem.ops[i]} if problem.ops[i] != "linear" else {}),
            **({"latency_ms": float(latency.seconds[i, sol.choice[i]]) * 1e3} if latency is not None else {})}
        for i, n in enumerate(problem.names)
    }
    return Plan(
        layers=layers,
        size_bits=int(problem.size_bits()[idx, choice].sum()),
        weight_bits=int(problem.weight_bits()[idx, choice].sum()),
        weight_params=int(sum(problem.weight_params)),
        bops=int(problem.bops()[idx, choice].sum()),
        budget=None if size is None else {"kind": size.kind, "value": size.value},
        bops_budget=bops_rhs,
        objective=sol.objective,
        status=sol.status,
        gap=sol.gap,
        solve_time_s=sol.solve_time_s,
        scorer=scorer,
        lam=problem.lam,
        synergy=bool(synergy and problem.lam > 0 and problem.pairs),
        layer_info=info,
        latency=None if latency is None else latency_summary(latency, choice, lat_budget),
    )
