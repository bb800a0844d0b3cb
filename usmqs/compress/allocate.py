"""Mixed precision under a size budget: layer groups, their exact stored size under each
candidate setting, and the exact choice of one candidate per group.

Groups. A `Group` is a name and a module-path regex (``re.fullmatch``, as policy rules
match); every compressible layer belongs to the first group that matches it. Layers
stacked by scan share one path (``blocks/ffn1/w_in`` is that weight in every block), and
a policy resolves a path once, when the model is built: every block of the stack gets
the same spec, and the export records one layout per path. No rule can address one
block of the stack, so a group is a set of module paths across all blocks, never a
block. `DEFAULT_GROUPS`: the subsampling front end, each stacked module (``blocks/ffn1``,
``blocks/attn`` with q, k, v, pos and out, ``blocks/conv`` with pw1, dw and pw2,
``blocks/ffn2``) and the CTC head.

Candidates. A `Candidate` is a whole-model setting (bits, N:M) applied to one group as
`Policy.named` applies it to the model (`policy.setting_rules`): the N:M-exempt layers
(depthwise convs, the first subsampling conv) keep the bits dense. `DEFAULT_CANDIDATES`:
float and int8 / int4 / int2 / int2a (asymmetric int2: zero points, counted) each dense,
2:4 and 1:4.

Sizes, from shapes only. `layer_bytes` is what the export stores for one kernel: the
codec's own `encode` traced abstractly (`codec.stored_nbytes`), put in buckets as
`export_format.size_report` puts them (`export_format.tensor_bytes`); a kernel left
float is stored as it is. A group's cost under a candidate sums its layers over every
stacked block: values + N:M indices + scales (+ zero points), float kernels at their
float32 bytes.

Allocation. `allocate` picks one candidate per group minimizing the summed sensitivity
(e.g. `usmqs.sensitivity`'s PTQ loss increases) with the summed cost within a budget,
given in bytes or in bits per weight over all the compressible layers (a float kernel
at its float32 bytes; with no group left float this is exactly the export's
``compressed_layers_bits_per_weight``, which leaves float kernels out). The solver (`solve`) is exact. The result is an
ordinary policy: one rule per group and spec, naming the group's layers.
"""

from __future__ import annotations

import dataclasses
import fractions
import math
import re
import shlex
from collections.abc import Iterable, Mapping, Sequence

from flax import nnx

from usmqs.compress import codec, export_format
from usmqs.compress.layers import Conv, Dense
from usmqs.compress.packing import IndexEncoding
from usmqs.compress.policy import Policy, Rule, WeightSpec, setting_name, setting_rules


@dataclasses.dataclass(frozen=True)
class Group:
    """Compressible layers that share one candidate: a name and a module-path regex."""

    # Shown in tables and used as the key of sizes and sensitivities.
    name: str
    # Regex matched with re.fullmatch against layer paths ('blocks/ffn1/.*').
    module_path: str


DEFAULT_GROUPS = (
    Group("subsample", r"subsample/.*"),
    Group("blocks/ffn1", r"blocks/ffn1/.*"),
    Group("blocks/attn", r"blocks/attn/.*"),
    Group("blocks/conv", r"blocks/conv/.*"),
    Group("blocks/ffn2", r"blocks/ffn2/.*"),
    Group("ctc/head", r"ctc/head"),
)


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One setting a group can get: integer bits (None = float values) and N:M."""

    weight_bits: int | None = None
    nm: tuple[int, int] | None = None
    # Asymmetric integer values (min/max grid with a zero point per scale group).
    symmetric: bool = True

    @property
    def name(self) -> str:
        return setting_name(self.weight_bits, self.nm, self.symmetric)

    @property
    def keeps_float(self) -> bool:
        """True for the float candidate (no bits, no N:M)."""
        return self.weight_bits is None and self.nm is None

    def spec(self, path: str) -> WeightSpec | None:
        """The spec of layer `path` under this setting (None: float)."""
        return Policy(setting_rules(self.weight_bits, self.nm, symmetric=self.symmetric)).resolve(path)


# int2 also asymmetric: 4 levels from min to max with a zero point, where the symmetric
# grid is {-2, -1, 0, 1}·s with s = max|W| / 1.5, whose level -2s lies beyond every
# weight (`usmqs.compress.ops`).
DEFAULT_CANDIDATES = (Candidate(),) + tuple(
    Candidate(bits, nm, symmetric) for nm in (None, (2, 4), (1, 4))
    for bits, symmetric in ((8, True), (4, True), (2, True), (2, False))
)


@dataclasses.dataclass(frozen=True)
class Kernel:
    """A compressible layer's kernel, shapes only."""

    path: str
    layer_shape: tuple[int, ...]  # one layer's kernel
    contract_axes: tuple[int, ...]
    stack: int  # layers stacked under this path (1 when not scanned)
    itemsize: int  # bytes per weight of the float kernel

    @property
    def num_weights(self) -> int:
        return self.stack * math.prod(self.layer_shape)


def kernels(model: nnx.Module) -> dict[str, Kernel]:
    """Every Dense/Conv kernel of `model` (abstract from `nnx.eval_shape` is enough) by path."""
    out = {}
    for _, node in nnx.iter_modules(model):
        if isinstance(node, Dense | Conv):
            shape = tuple(node.kernel.shape)
            stack = math.prod(shape[: len(shape) - len(node.kernel_shape)])
            out[node.path] = Kernel(
                node.path, tuple(node.kernel_shape), tuple(node.contract_axes), stack, node.kernel.dtype.itemsize
            )
    return out


def layer_bytes(kernel: Kernel, spec: WeightSpec | None, encoding: IndexEncoding = IndexEncoding.POSITION) -> dict[str, int]:
    """Bytes the export stores for `kernel` under `spec`, by size-report bucket: values,
    indices, scales, zero_points for a compressed kernel; float_layers for one left float
    (spec None) or stored as float (int16 without N:M)."""
    if spec is None:
        return export_format.tensor_bytes(codec.Kind.FLOAT.value, {"value": kernel.num_weights * kernel.itemsize})
    lay = codec.Layout.for_spec(spec, kernel.layer_shape, kernel.contract_axes, encoding)
    stored = {k: kernel.stack * n for k, n in codec.stored_nbytes(lay).items()}
    return export_format.tensor_bytes(lay.kind.value, stored)


def group_members(paths: Iterable[str], groups: Sequence[Group]) -> dict[str, tuple[str, ...]]:
    """Group name -> its layer paths (each path in the first group that matches it).

    ValueError when a path is in no group, a group matches no path, or two groups share
    a name: every compressible layer is counted, and every group decides some.
    """
    names = [g.name for g in groups]
    if len(set(names)) != len(names):
        raise ValueError(f"group names repeat: {names}")
    members: dict[str, list[str]] = {n: [] for n in names}
    orphans = []
    for path in paths:
        group = next((g for g in groups if re.fullmatch(g.module_path, path)), None)
        (members[group.name] if group else orphans).append(path)
    if orphans:
        raise ValueError(f"layers in no group: {orphans}; groups: {[(g.name, g.module_path) for g in groups]}")
    empty = [n for n in names if not members[n]]
    if empty:
        raise ValueError(f"groups that match no layer: {empty}")
    return {n: tuple(p) for n, p in members.items()}


@dataclasses.dataclass(frozen=True)
class SizeTable:
    """Exact stored bytes of every group under every candidate (`size_table`)."""

    kernels: Mapping[str, Kernel]
    members: Mapping[str, tuple[str, ...]]  # group -> layer paths
    candidates: tuple[Candidate, ...]
    # group -> candidate name -> size-report bucket -> bytes
    buckets: Mapping[str, Mapping[str, Mapping[str, int]]]
    # group -> candidate name -> weights the export counts as compressed (not stored float)
    compressed_weights: Mapping[str, Mapping[str, int]]

    def cost(self, group: str, candidate: str) -> int:
        """Bytes of `group` under `candidate`, every bucket."""
        return sum(self.buckets[group][candidate].values())

    def num_weights(self, group: str | None = None) -> int:
        """Weights of `group`, or of every compressible layer."""
        paths = self.kernels if group is None else self.members[group]
        return sum(self.kernels[p].num_weights for p in paths)


def size_table(
    kernels: Mapping[str, Kernel],
    groups: Sequence[Group] = DEFAULT_GROUPS,
    candidates: Sequence[Candidate] = DEFAULT_CANDIDATES,
    encoding: IndexEncoding = IndexEncoding.POSITION,
) -> SizeTable:
    """The stored bytes of each group under each candidate, from shapes (`layer_bytes`)."""
    members = group_members(kernels, groups)
    buckets: dict = {g: {} for g in members}
    compressed: dict = {g: {} for g in members}
    for group, paths in members.items():
        for c in candidates:
            total: dict[str, int] = {}
            compressed[group][c.name] = 0
            for p in paths:
                stored = layer_bytes(kernels[p], c.spec(p), encoding)
                for bucket, n in stored.items():
                    total[bucket] = total.get(bucket, 0) + n
                if "float_layers" not in stored:
                    compressed[group][c.name] += kernels[p].num_weights
            buckets[group][c.name] = total
    return SizeTable(dict(kernels), members, tuple(candidates), buckets, compressed)


def assignment_policy(assignment: Mapping[str, Candidate], members: Mapping[str, tuple[str, ...]]) -> Policy:
    """The policy giving each group of `assignment` its candidate (other groups float):
    per group, one rule per distinct spec, naming its layers ('a|b', escaped paths)."""
    rules = []
    for group, candidate in assignment.items():
        by_spec: dict[WeightSpec, list[str]] = {}
        for path in members[group]:
            spec = candidate.spec(path)
            if spec is not None:
                by_spec.setdefault(spec, []).append(path)
        rules += [Rule("|".join(re.escape(p) for p in paths), spec) for spec, paths in by_spec.items()]
    return Policy(rules=tuple(rules))


# --------------------------------------------------------------------------- solver


class BudgetError(ValueError):
    """A budget below the cheapest choice; `min_cost` is that choice's cost."""

    def __init__(self, message: str, min_cost: int):
        super().__init__(message)
        self.min_cost = min_cost


def solve(costs: Sequence[Sequence[int]], losses: Sequence[Sequence[float]], max_cost: int) -> tuple[int, ...]:
    """Exact multiple-choice knapsack: the option index per item minimizing the summed
    loss with summed cost <= `max_cost`; among equal losses, the cheapest.

    Dynamic programming over the items in order on the reachable integer total costs,
    kept sparse: after each item, the partial choices sorted by cost, each kept only if
    its loss is below that of every cheaper (or equally cheap) one. A dropped choice has
    a kept one costing no more and losing no more, and every completion of it is matched
    by the same completion of that one (float addition is monotone, so also in floating
    point), hence the optimum survives; choices that cannot fit even with the cheapest
    completion are dropped too. Losses are summed in item order. BudgetError when even
    the cheapest choice exceeds `max_cost`.
    """
    if len(costs) != len(losses) or any(len(c) != len(l) or not c for c, l in zip(costs, losses)):
        raise ValueError("costs and losses need the same, non-empty, option lists per item")
    floor = [sum(min(c) for c in costs[i:]) for i in range(len(costs) + 1)]  # cheapest completion
    if floor[0] > max_cost:
        raise BudgetError(f"the cheapest choice costs {floor[0]} > {max_cost}", floor[0])
    front: list[tuple[int, float, tuple[int, ...]]] = [(0, 0.0, ())]
    for i, (item_costs, item_losses) in enumerate(zip(costs, losses)):
        grown = sorted(
            (
                (cost + c, loss + l, picks + (j,))
                for cost, loss, picks in front
                for j, (c, l) in enumerate(zip(item_costs, item_losses))
                if cost + c + floor[i + 1] <= max_cost
            ),
            key=lambda entry: entry[:2],
        )
        front = []
        for entry in grown:
            if not front or entry[1] < front[-1][1]:
                front.append(entry)
    return front[-1][2]


# ----------------------------------------------------------------------- allocation


@dataclasses.dataclass(frozen=True)
class Allocation:
    """One candidate per group within a budget, and what it costs (`allocate`)."""

    name: str  # 'mixed@B' (B bits per weight) or 'mixed@NB' (N bytes)
    assignment: Mapping[str, Candidate]  # group -> candidate
    max_bytes: int  # the budget, in bytes of the compressible layers
    sizes: SizeTable
    sensitivity: Mapping[str, Mapping[str, float]]  # group -> candidate name -> cost

    @property
    def policy(self) -> Policy:
        return assignment_policy(self.assignment, self.sizes.members)

    @property
    def rules(self) -> list[dict]:
        """The policy as config data (``policy.rules``): non-default fields only."""
        return export_format.policy_to_data(self.policy, skip_defaults=True)

    def bucket_bytes(self) -> dict[str, int]:
        """Bytes of the compressible layers by size-report bucket."""
        out: dict[str, int] = {}
        for group, c in self.assignment.items():
            for bucket, n in self.sizes.buckets[group][c.name].items():
                out[bucket] = out.get(bucket, 0) + n
        return out

    @property
    def bits_per_weight(self) -> float:
        """8 x bytes / weights over every compressible layer, scales counted: the budget's
        measure."""
        return 8 * sum(self.bucket_bytes().values()) / self.sizes.num_weights()

    @property
    def export_bits_per_weight(self) -> float | None:
        """The export's ``compressed_layers_bits_per_weight`` of this policy: the same
        over the layers not stored float only (None when all are); equal to
        `bits_per_weight` when no group is float."""
        weights = sum(self.sizes.compressed_weights[g][c.name] for g, c in self.assignment.items())
        nbytes = sum(n for b, n in self.bucket_bytes().items() if b != "float_layers")
        return 8 * nbytes / weights if weights else None

    @property
    def predicted_sensitivity(self) -> float:
        return sum(self.sensitivity[g][c.name] for g, c in self.assignment.items())

    def overrides(self) -> list[str]:
        """The ``--config.`` overrides (without the prefix) that select this policy."""
        return [f"policy.name={self.name}", f"policy.rules={self.rules!r}"]

    def to_data(self) -> dict:
        """JSON data: budget, sizes, per group its candidate, bytes and sensitivity, rules."""
        buckets = self.bucket_bytes()
        weights = self.sizes.num_weights()
        scales = buckets.get("scales", 0) + buckets.get("zero_points", 0)
        groups = {
            g: {
                "candidate": c.name,
                "layers": list(self.sizes.members[g]),
                "num_weights": self.sizes.num_weights(g),
                "bytes": self.sizes.cost(g, c.name),
                "sensitivity": self.sensitivity[g][c.name],
            }
            for g, c in self.assignment.items()
        }
        return {
            "name": self.name,
            "budget_bytes": self.max_bytes,
            "budget_bits_per_weight": 8 * self.max_bytes / weights,
            "bytes": sum(buckets.values()),
            "num_weights": weights,
            "bits_per_weight": self.bits_per_weight,
            "bits_per_weight_no_scales": 8 * (sum(buckets.values()) - scales) / weights,
            "export_bits_per_weight": self.export_bits_per_weight,
            "predicted_sensitivity": self.predicted_sensitivity,
            "groups": groups,
            "rules": self.rules,
        }

    def describe(self) -> str:
        """A text table of the groups' candidates, then the config overrides as shell words."""
        lines = [f"{self.name}: {self.bits_per_weight:.4f} bits/weight (budget {8 * self.max_bytes / self.sizes.num_weights():.4f}), "
                 f"predicted sensitivity {self.predicted_sensitivity:.4g}"]
        for g, c in self.assignment.items():
            n = self.sizes.num_weights(g)
            lines.append(f"  {g:<14} {c.name:<10} {8 * self.sizes.cost(g, c.name) / n:7.3f} bits/weight  "
                         f"{n:>10,} weights  sensitivity {self.sensitivity[g][c.name]:.4g}")
        lines.append(" ".join(shlex.quote(f"--config.{o}") for o in self.overrides()))
        return "\n".join(lines)


MIXED_PREFIX = "mixed@"
# How `usmqs.sensitivity` estimates a group's damage under a candidate: "ptq", the dev
# loss increase of compressing it alone; "fisher", ½ Σ F (W − W_eff)² with the empirical
# Fisher diagonal.
SENSITIVITY_METHODS = ("ptq", "fisher")


def mixed_name(bits_per_weight: float) -> str:
    """The NAME of the mixed policy for a budget in bits per weight: ``mixed@B`` (DESIGN.md)."""
    return f"{MIXED_PREFIX}{bits_per_weight:g}"


def budget_bytes(sizes: SizeTable, bits_per_weight: float) -> int:
    """The largest byte count within `bits_per_weight` over the compressible layers (the
    decimal value as written: 3.1 means 31/10, not its binary neighbour)."""
    return math.floor(fractions.Fraction(str(bits_per_weight)) * sizes.num_weights() / 8)


def allocate(
    sizes: SizeTable,
    sensitivity: Mapping[str, Mapping[str, float]],
    *,
    bits_per_weight: float | None = None,
    max_bytes: int | None = None,
) -> Allocation:
    """The candidate per group minimizing the summed `sensitivity` (group -> candidate
    name -> finite cost) within the budget: `bits_per_weight` over all compressible
    layers (scales counted) or `max_bytes` of them, exactly one given. BudgetError,
    naming the smallest achievable bits per weight, when nothing fits."""
    if (bits_per_weight is None) == (max_bytes is None):
        raise ValueError("give exactly one budget: bits_per_weight or max_bytes")
    groups, names = list(sizes.members), [c.name for c in sizes.candidates]
    missing = [(g, n) for g in groups for n in names if not math.isfinite(sensitivity.get(g, {}).get(n, math.nan))]
    if missing:
        raise ValueError(f"sensitivity has no finite value for (group, candidate) {missing[:4]}")
    limit = budget_bytes(sizes, bits_per_weight) if max_bytes is None else int(max_bytes)
    name = mixed_name(bits_per_weight) if max_bytes is None else f"{MIXED_PREFIX}{limit}B"
    costs = [[sizes.cost(g, n) for n in names] for g in groups]
    try:
        picks = solve(costs, [[sensitivity[g][n] for n in names] for g in groups], limit)
    except BudgetError as e:
        weights = sizes.num_weights()
        raise BudgetError(
            f"{name}: the budget ({limit} bytes, {8 * limit / weights:.4f} bits/weight) is below the smallest "
            f"achievable size, {e.min_cost} bytes = {8 * e.min_cost / weights:.4f} bits/weight "
            "(every group at its smallest candidate)",
            e.min_cost,
        ) from None
    assignment = {g: sizes.candidates[j] for g, j in zip(groups, picks)}
    return Allocation(name, assignment, limit, sizes, {g: dict(sensitivity[g]) for g in groups})
