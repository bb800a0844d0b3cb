"""Compression policy: an ordered tuple of frozen rules keyed by module-path regex.

A `Rule` is a match key (`module_path`) and a `WeightSpec` (bits, granularity, N:M
pattern, mask schedule, pruning gradient). `Policy.resolve(path)` returns the spec of the
FIRST rule whose `module_path` regex `re.fullmatch`es the layer path, or None (the layer
stays float, bit for bit). A rule whose spec has neither bits nor N:M is a "keep float"
rule: put it first to exempt layers from a later catch-all.

Paths are the `path=` strings the model hands to `compress.layers.Dense/Conv`, e.g.
``blocks/ffn1/w_in`` or ``subsample/conv1`` (`compress.layers.compressible_layers` lists
a model's). `re.fullmatch` (as qwix does) means a rule names whole paths: ``.*ffn.*``
for a substring, ``blocks/.*`` for a subtree.

Named policies (`Policy.named`, the DESIGN.md shorthands) quantize the WHOLE model as
USM-Lite does: every Dense/Conv -- attention and feed-forward projections, the
convolution module's point- and depthwise convs, the subsampling convs and the CTC head.
Per-output-channel symmetric weights, no clip search. N:M applies to every one of them
except `NM_EXEMPT`: the depthwise convs (not matrix products, which is what N:M sparse
kernels and hardware accelerate, and only `conv_kernel_size` taps per channel) and the
first subsampling conv (3x3 taps of one input channel); those get the setting's bits,
dense (README gives what pruning them cost). N:M groups run along
the layer's contraction axes (flattened, input channel innermost; rows whose length is
not a multiple of M end in a padded partial group, see `ops.nm_mask`), by default mask
computed one-shot at step 0 from the weights then, gradient only to kept weights
(`PruneGrad.MASKED`); `Policy.named` takes another schedule and pruning gradient for
the N:M rule (config: `policy.mask_every`, `policy.prune_grad`, `policy.srste_lambda`).
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


class Granularity(enum.Enum):
    """Which weights share one quantization scale."""

    # One scale per output channel: reduce over all contraction axes of the kernel.
    PER_CHANNEL = "per_channel"
    # One scale per block of `block_size` consecutive weights along the last contraction
    # axis (the input-channel axis), per output channel ("sub-channel" quantization); for
    # a conv kernel [*window, in, out] a block spans the whole window: [*window, K].
    SUB_CHANNEL = "sub_channel"


class PruneGrad(enum.Enum):
    """Gradient that reaches the dense master weight W through W_eff = fq(mask ⊙ W)."""

    # dL/dW = mask ⊙ g: pruned weights are frozen (ASP-style fine-tuning of a fixed mask).
    MASKED = "masked"
    # dL/dW = g: plain straight-through, pruned weights keep learning and can return
    # at a later mask recompute.
    STE = "ste"
    # dL/dW = g + λ (1 − mask) ⊙ W: SR-STE (Zhou et al. 2021), dense gradient plus a
    # decay that pulls pruned weights towards 0, so masks settle.
    SRSTE = "srste"


@dataclasses.dataclass(frozen=True, kw_only=True)
class OneShot:
    """Compute the mask once, at `step == at_step`; before that the layer is dense."""

    # The train step at which the N:M mask is computed from |W| and then frozen.
    at_step: int = 0

    def __post_init__(self):
        _check_int("OneShot.at_step", self.at_step, minimum=0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Every:
    """Recompute the mask at steps start, start + every, start + 2·every, ...

    Only useful with a dense gradient (`PruneGrad.STE`/`SRSTE`): with `MASKED` the
    pruned weights are frozen and re-ranking keeps the same set (see `ops.mask_update`).
    """

    # Recompute period in steps (>= 1).
    every: int
    # First recompute step; the layer is dense before it.
    start: int = 0

    def __post_init__(self):
        _check_int("Every.every", self.every, minimum=1)
        _check_int("Every.start", self.start, minimum=0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Gradual:
    """Prune gradually from dense to N:M between steps `begin` and `end`.

    Keep count per group of M at step t (clamped to [begin, end]):

        n_t = M − ⌊(M − N) · (t − begin) / (end − begin)⌋,    n_begin = M, n_end = N,

    recomputed at begin, begin + every, ... and always at `end`; fixed afterwards.
    """

    # First step of the ramp (mask all-ones there).
    begin: int
    # Step at which the target N:M pattern is reached; the mask is frozen after it.
    end: int
    # Recompute period within [begin, end] (end itself is always a recompute step).
    every: int = 1

    def __post_init__(self):
        _check_int("Gradual.begin", self.begin, minimum=0)
        _check_int("Gradual.end", self.end, minimum=0)
        _check_int("Gradual.every", self.every, minimum=1)
        if self.end <= self.begin:
            raise ValueError(f"Gradual needs end > begin, got begin={self.begin}, end={self.end}")


MaskSchedule = OneShot | Every | Gradual

SUPPORTED_BITS = (2, 4, 8, 16)
# Runtime-valued settings (`WeightSpec.runtime`): the bit widths one compiled program
# switches between (0 = float values), and the group size M every N:M setting shares.
RUNTIME_BITS = (0, 8, 4, 2)
RUNTIME_M = 4


@dataclasses.dataclass(frozen=True, kw_only=True)
class WeightSpec:
    """What one layer's weight becomes: the resolved, hashable per-layer setting.

    Hashable and compared by value, so it is a static attribute of jitted code (one
    compile per distinct spec). W_eff = fake_quant(mask ⊙ W); see `ops.compressed_weight`.
    """

    # Integer bits of the weight values (2, 4, 8; 16 = near-lossless, for tests), or
    # None for float values (pruning only).
    weight_bits: int | None = None
    # Scale sharing: per output channel, or sub-channel blocks along the contraction.
    granularity: Granularity = Granularity.PER_CHANNEL
    # Block length K along the last contraction axis for SUB_CHANNEL, else None. If that
    # axis is not longer than K the block is the whole axis (per-channel for that layer).
    block_size: int | None = None
    # Symmetric (scale only, absmax) or asymmetric (scale + zero point, min/max).
    symmetric: bool = True
    # Per scale group, pick the clip ratio r in `ops.CLIP_RATIOS` that minimises
    # ||fq(clip(W, r·range)) − W||²; r = 1 is plain absmax/minmax.
    clip_search: bool = False
    # Learned quantization ranges (LSQ, Esser et al. 2020, with LSQ+'s learned offset for
    # asymmetric grids, Bhalgat et al. 2020): each scale group's range is a trained
    # parameter of the layer (`layers.QuantRange`: log hi, and log −lo when asymmetric)
    # that sets its scale (and zero point); a run starts it at the clip-searched range of
    # its weights (`layers.calibrate_ranges`). See `ops.compressed_weight`. Static
    # settings only (not `runtime`); `clip_search` is then unused.
    learned_scale: bool = False
    # N:M pattern (keep N of every M along `nm_axis`), or None for no pruning.
    nm: tuple[int, int] | None = None
    # Kernel axis (or axes, flattened in order) along which groups of M run; None = the
    # layer's contraction axes (input channel innermost).
    nm_axis: int | tuple[int, ...] | None = None
    # When the mask is (re)computed from the weights.
    mask_schedule: MaskSchedule = OneShot()
    # Gradient to the pruned weights.
    prune_grad: PruneGrad = PruneGrad.MASKED
    # SR-STE decay λ (used only with PruneGrad.SRSTE); 2e-4 is Zhou et al.'s default.
    srste_lambda: float = 2e-4
    # Runtime-valued setting: the compiled step reads the bit width and N of N:M from the
    # layer's `CompressionSetting` variable (initialised from the two fields above), so
    # every named setting shares one compiled program (see `RUNTIME_BITS`).
    runtime: bool = False

    def __post_init__(self):
        _validate_behaviour(self, type(self).__name__)

    def static(self) -> WeightSpec:
        """The same setting with its values fixed at trace time (runtime=False)."""
        return dataclasses.replace(self, runtime=False) if self.runtime else self

    @property
    def bits_per_weight(self) -> float:
        """Payload bits per weight: values (+ log2 M index bits per kept value), no scales.

        int4 + 2:4 = 2·(4 + 2) / 4 = 3 bits (the USM-Lite headline); float = 32.
        """
        value_bits = 32 if self.weight_bits is None else self.weight_bits
        if self.nm is None:
            return float(value_bits)
        n, m = self.nm
        return n * (value_bits + math.ceil(math.log2(m))) / m


@dataclasses.dataclass(frozen=True)
class Rule:
    """One policy rule: a match key and the compression it applies.

    Rules are tried in order; the first whose `module_path` regex fully matches a layer
    path decides that layer (see `Policy.resolve`).
    """

    # Match key: a regex matched with re.fullmatch against the layer path ('blocks/ffn1/w_in').
    module_path: str = ".*"
    # Behaviour: what the matched layers' weights become. The default keeps them float.
    spec: WeightSpec = dataclasses.field(default_factory=WeightSpec)

    def __post_init__(self):
        if not isinstance(self.module_path, str):
            raise TypeError(f"Rule.module_path must be a regex string, got {self.module_path!r}")
        try:
            re.compile(self.module_path)
        except re.error as e:
            raise ValueError(f"Rule.module_path {self.module_path!r} is not a valid regex: {e}") from e
        if not isinstance(self.spec, WeightSpec):
            raise TypeError(f"Rule.spec must be a WeightSpec, got {self.spec!r}")

    @property
    def keeps_float(self) -> bool:
        """True for a rule that leaves its layers float (no bits, no N:M, not runtime)."""
        return self.spec.weight_bits is None and self.spec.nm is None and not self.spec.runtime


def _validate_behaviour(obj: Any, owner: str) -> None:
    """Checks of the WeightSpec fields; normalises lists to tuples."""
    if obj.weight_bits is not None and obj.weight_bits not in SUPPORTED_BITS:
        raise ValueError(f"{owner}.weight_bits must be None or one of {SUPPORTED_BITS}, got {obj.weight_bits!r}")
    if not isinstance(obj.granularity, Granularity):
        raise TypeError(f"{owner}.granularity must be a Granularity, got {obj.granularity!r}")
    if obj.granularity is Granularity.SUB_CHANNEL:
        _check_int(f"{owner}.block_size", obj.block_size, minimum=1)
    elif obj.block_size is not None:
        raise ValueError(f"{owner}.block_size is only meaningful with Granularity.SUB_CHANNEL")
    if obj.nm is not None:
        nm = tuple(obj.nm)
        if len(nm) != 2:
            raise ValueError(f"{owner}.nm must be (N, M), got {obj.nm!r}")
        _check_int(f"{owner}.nm N", nm[0], minimum=1)
        _check_int(f"{owner}.nm M", nm[1], minimum=1)
        if nm[0] > nm[1]:
            raise ValueError(f"{owner}.nm needs N <= M, got {nm[0]}:{nm[1]}")
        object.__setattr__(obj, "nm", nm)
    if isinstance(obj.nm_axis, list):
        object.__setattr__(obj, "nm_axis", tuple(obj.nm_axis))
    if not isinstance(obj.mask_schedule, OneShot | Every | Gradual):
        raise TypeError(f"{owner}.mask_schedule must be OneShot | Every | Gradual, got {obj.mask_schedule!r}")
    if not isinstance(obj.prune_grad, PruneGrad):
        raise TypeError(f"{owner}.prune_grad must be a PruneGrad, got {obj.prune_grad!r}")
    if not obj.srste_lambda >= 0:
        raise ValueError(f"{owner}.srste_lambda must be >= 0, got {obj.srste_lambda!r}")
    if obj.learned_scale and obj.weight_bits is None:
        raise ValueError(f"{owner}.learned_scale needs integer weight_bits (a range to learn), got None")
    if obj.learned_scale and obj.runtime:
        raise ValueError(
            f"{owner}.learned_scale: a learned range belongs to one bit width; runtime settings "
            "switch widths inside one program (use runtime=False)"
        )
    if obj.runtime:
        problems = runtime_value_problems(obj.weight_bits, obj.nm)
        if isinstance(obj.mask_schedule, Gradual):  # N is the layer's setting: no ramp
            problems.append("mask_schedule must be OneShot or Every")
        if problems:
            raise ValueError(f"{owner}.runtime: " + "; ".join(problems))


def runtime_value_problems(bits: int | None, nm: tuple[int, int] | None) -> list[str]:
    """What keeps (bits, N:M) from being a runtime setting (`RUNTIME_BITS`, M =
    `RUNTIME_M`, 1 <= N <= M); empty when it is one."""
    problems = []
    if bits not in (None, *RUNTIME_BITS[1:]):
        problems.append(f"runtime weight bits must be None or one of {RUNTIME_BITS[1:]}, got weight_bits {bits!r}")
    if nm is not None and (nm[1] != RUNTIME_M or not 1 <= nm[0] <= RUNTIME_M):
        problems.append(
            f"nm {nm[0]}:{nm[1]} has M != {RUNTIME_M} or N outside 1..{RUNTIME_M}: runtime N:M must be N:{RUNTIME_M}"
        )
    return problems


# The DESIGN.md shorthands: name -> (weight_bits, nm).
NAMED_POLICIES: dict[str, tuple[int | None, tuple[int, int] | None]] = {
    "float": (None, None),
    "int8": (8, None),
    "int4": (4, None),
    "int2": (2, None),
    "2:4": (None, (2, 4)),
    "1:4": (None, (1, 4)),
    "int8+2:4": (8, (2, 4)),
    "int4+2:4": (4, (2, 4)),
    "int2+2:4": (2, (2, 4)),
    "int8+1:4": (8, (1, 4)),
    "int4+1:4": (4, (1, 4)),
}


# The ten settings of USM-Lite's study (Ding et al., ICASSP 2024), in the order of its table.
PAPER_SETTINGS = (
    "int8", "int4", "int2", "2:4", "1:4",
    "int8+2:4", "int4+2:4", "int2+2:4", "int8+1:4", "int4+1:4",
)


# Layers the named policies never prune (module docstring): the Conformer's depthwise
# convs and its first subsampling conv. They keep the setting's bit width.
NM_EXEMPT = r".*(blocks/conv/dw|subsample/conv1)"


def setting_name(bits: int | None, nm: tuple[int, int] | None, symmetric: bool = True) -> str:
    """The DESIGN.md name of (weight bits, N:M): 'float', 'int4', '2:4', 'int4+2:4', and
    likewise for settings that have no named policy ('int2+1:4'); asymmetric integer
    values (min/max grid with a zero point) add an 'a' to the bits: 'int2a+2:4'."""
    ints = [] if bits is None else [f"int{bits}{'' if symmetric else 'a'}"]
    parts = ints + ([] if nm is None else [f"{nm[0]}:{nm[1]}"])
    return "+".join(parts) or "float"


def _spec_columns(spec: WeightSpec) -> tuple[str, str, str, str]:
    """Policy.report's description of a rule's setting: value grid ('int2a' when
    asymmetric), N:M, scale groups ('channel', or 'block64' for sub-channel blocks of
    64) and how each group's range is set ('absmax', 'minmax' when asymmetric, 'clip'
    (clip search), 'learned'); '-' where the values stay float."""
    nm = "-" if spec.nm is None else f"{spec.nm[0]}:{spec.nm[1]}"
    if spec.weight_bits is None:
        return "float", nm, "-", "-"
    scales = "channel" if spec.granularity is Granularity.PER_CHANNEL else f"block{spec.block_size}"
    if spec.learned_scale:
        kind = "learned"
    elif spec.clip_search:
        kind = "clip"
    else:
        kind = "absmax" if spec.symmetric else "minmax"
    return setting_name(spec.weight_bits, None, spec.symmetric), nm, scales, kind


def setting_rules(
    bits: int | None,
    nm: tuple[int, int] | None,
    *,
    runtime: bool = False,
    mask_schedule: MaskSchedule = WeightSpec.mask_schedule,
    prune_grad: PruneGrad = WeightSpec.prune_grad,
    srste_lambda: float = WeightSpec.srste_lambda,
    symmetric: bool = True,
) -> tuple[Rule, ...]:
    """The rules of a whole-model setting (`Policy.named`'s, for any bits and N:M): every
    layer at `bits` with N:M `nm`, except `NM_EXEMPT`, which keeps `bits` dense; () for
    float. The pruning options go to the N:M rule (see `Policy.named`); `symmetric` to
    both (`WeightSpec.symmetric`)."""
    if bits is None and nm is None and not runtime:
        return ()
    pruning = {}
    if nm is not None or runtime:
        pruning = dict(mask_schedule=mask_schedule, prune_grad=prune_grad, srste_lambda=srste_lambda)
    rules = [Rule(".*", WeightSpec(weight_bits=bits, nm=nm, runtime=runtime, symmetric=symmetric, **pruning))]
    if nm is not None or runtime:  # runtime: the same two rules for every name
        rules.insert(0, Rule(NM_EXEMPT, WeightSpec(weight_bits=bits, runtime=runtime, symmetric=symmetric)))
    return tuple(rules)


@dataclasses.dataclass(frozen=True)
class Policy:
    """An ordered tuple of rules; the first rule whose regex fully matches a path wins."""

    rules: tuple[Rule, ...] = ()

    def __post_init__(self):
        rules = tuple(self.rules)
        for i, r in enumerate(rules):
            if not isinstance(r, Rule):
                raise TypeError(f"Policy.rules[{i}] must be a Rule, got {type(r).__name__}")
        object.__setattr__(self, "rules", rules)

    # ---- construction -------------------------------------------------------------

    @classmethod
    def named(
        cls,
        name: str,
        *,
        runtime: bool = False,
        mask_schedule: MaskSchedule = WeightSpec.mask_schedule,
        prune_grad: PruneGrad = WeightSpec.prune_grad,
        srste_lambda: float = WeightSpec.srste_lambda,
    ) -> Policy:
        """The DESIGN.md shorthand `name` (see module docstring for what it compresses).

        runtime=True: the same setting as runtime values (`WeightSpec.runtime`): every
        name, 'float' included, then builds the same model structure and compiles to the
        same program; only the values of the layers' `CompressionSetting` differ.
        mask_schedule, prune_grad, srste_lambda: those of the N:M rule (the catch-all of
        an N:M or runtime setting; ignored by the dense names, whose masks are all-ones).
        """
        if name not in NAMED_POLICIES:
            raise ValueError(f"unknown policy name {name!r}; known: {' '.join(NAMED_POLICIES)}")
        bits, nm = NAMED_POLICIES[name]
        return cls(rules=setting_rules(
            bits, nm, runtime=runtime, mask_schedule=mask_schedule, prune_grad=prune_grad,
            srste_lambda=srste_lambda,
        ))

    @classmethod
    def from_config(cls, rules: Iterable[Mapping[str, Any]]) -> Policy:
        """Policy from config data: a list of dicts with `Rule` field names as keys.

        Enums by value ("per_channel", "sub_channel"; "masked", "ste", "srste"); `nm` as
        "2:4" or [2, 4]; `mask_schedule` as {"kind": "one_shot"|"every"|"gradual", ...}
        with that schedule's fields. Unknown keys and values are errors naming the rule.
        """
        if isinstance(rules, Mapping | str) or _as_mapping(rules) is not None:
            raise TypeError("Policy.from_config takes a list of rule dicts")
        return cls(rules=tuple(_rule_from_dict(i, d) for i, d in enumerate(rules)))

    @property
    def learns_ranges(self) -> bool:
        """Whether some rule trains its quantization ranges (`WeightSpec.learned_scale`)."""
        return any(r.spec.learned_scale for r in self.rules)

    # ---- resolution ---------------------------------------------------------------

    def match_index(self, path: str) -> int | None:
        """Index of the first rule whose module_path fully matches `path`, else None."""
        for i, rule in enumerate(self.rules):
            if re.fullmatch(rule.module_path, path):
                return i
        return None

    def resolve(self, path: str) -> WeightSpec | None:
        """The WeightSpec of `path` (first matching rule), or None: keep the layer float."""
        i = self.match_index(path)
        return None if i is None or self.rules[i].keeps_float else self.rules[i].spec

    def check_all_rules_matched(self, paths: Iterable[str]) -> None:
        """Raise ValueError if some rule decides no layer among `paths`.

        A rule whose regex matches only layers already taken by an earlier rule is dead
        configuration too; the message says which earlier rule shadows it.
        """
        paths = list(paths)
        winners = {self.match_index(p) for p in paths}
        problems = []
        for i, rule in enumerate(self.rules):
            if i in winners:
                continue
            hits = [p for p in paths if re.fullmatch(rule.module_path, p)]
            if hits:
                shadow = self.match_index(hits[0])
                problems.append(
                    f"rule #{i} (module_path={rule.module_path!r}) matches {len(hits)} layer(s) "
                    f"(e.g. {hits[0]!r}) but each is taken by an earlier rule, e.g. #{shadow} "
                    f"(module_path={self.rules[shadow].module_path!r})"
                )
            else:
                problems.append(f"rule #{i} (module_path={rule.module_path!r}) matches no layer")
        if problems:
            sample = ", ".join(repr(p) for p in paths[:4]) + (", ..." if len(paths) > 4 else "")
            raise ValueError(
                "compression policy has unused rules (regexes use re.fullmatch):\n  "
                + "\n  ".join(problems)
                + f"\n  ({len(paths)} layer paths checked: {sample})"
            )

    # ---- reporting ----------------------------------------------------------------

    def report(self, resolved: Mapping[str, tuple[WeightSpec | None, int]]) -> str:
        """A text table: rule -> its setting (`_spec_columns`), matched layers,
        parameters, payload bits per weight.

        `resolved` maps layer path -> (spec, number of weight parameters), e.g. from
        `compress.layers.compressible_layers(model)`. Bits per weight count values plus N:M
        index bits (`WeightSpec.bits_per_weight`), not scales; float = 32. Layers left
        float are listed by name at the end.
        """
        rows = []
        counts: dict[int | None, list[int]] = {}  # rule index -> [layers, params, bits]
        float_paths = []
        for path, (spec, num_params) in resolved.items():
            i = self.match_index(path)
            bpw = 32.0 if spec is None else spec.bits_per_weight
            c = counts.setdefault(i, [0, 0, 0.0])
            c[0] += 1
            c[1] += int(num_params)
            c[2] += bpw * int(num_params)
            if spec is None:
                float_paths.append(path)
        header = ("#", "module_path", "bits", "N:M", "scales", "range", "layers", "params", "bits/weight")
        for i, rule in enumerate(self.rules):
            n_layers, n_params, bits = counts.get(i, (0, 0, 0.0))
            rows.append((
                str(i), rule.module_path, *_spec_columns(rule.spec),
                str(n_layers), f"{n_params:,}", f"{bits / n_params:.2f}" if n_params else "-",
            ))
        if None in counts:
            n_layers, n_params, bits = counts[None]
            rows.append(("-", "(no rule)", "float", "-", "-", "-", str(n_layers), f"{n_params:,}", "32.00"))
        total_params = sum(c[1] for c in counts.values())
        total_bits = sum(c[2] for c in counts.values())
        rows.append((
            "", "total", "", "", "", "", str(sum(c[0] for c in counts.values())), f"{total_params:,}",
            f"{total_bits / total_params:.2f}" if total_params else "-",
        ))
        widths = [max(len(r[k]) for r in (header, *rows)) for k in range(len(header))]
        fmt = lambda r: "  ".join(s.ljust(w) if k < 6 else s.rjust(w) for k, (s, w) in enumerate(zip(r, widths)))
        lines = [fmt(header), fmt(tuple("-" * w for w in widths))]
        lines += [fmt(r) for r in rows]
        lines.append(f"float layers ({len(float_paths)}): " + (", ".join(float_paths) if float_paths else "none"))
        return "\n".join(lines)


# ---- config parsing -------------------------------------------------------------------

# The N:M options of a named policy (config ``policy.mask_every``, ``policy.prune_grad``,
# ``policy.srste_lambda``) and their defaults: masks one-shot at step 0, gradient only to
# kept weights, Zhou et al.'s SR-STE decay.
NAMED_PRUNING_DEFAULTS = {
    "mask_every": 0, "prune_grad": WeightSpec.prune_grad.value, "srste_lambda": WeightSpec.srste_lambda,
}


def policy_from_config(block: Any) -> Policy:
    """The policy of a config's ``policy`` block: its ``rules`` (custom), else the named
    setting ``name`` with the N:M options ``runtime``, ``mask_every``, ``prune_grad`` and
    ``srste_lambda``. Errors name the key."""
    p = _as_mapping(block) or block
    pruning = {k: p[k] for k in NAMED_PRUNING_DEFAULTS}
    if p["rules"]:
        changed = [k for k, v in pruning.items() if v != NAMED_PRUNING_DEFAULTS[k]]
        if p["runtime"] or changed:
            raise ValueError(
                f"policy.{'runtime' if p['runtime'] else changed[0]} applies to named policies "
                "(custom policy.rules carry their own fields): leave policy.rules empty"
            )
        return Policy.from_config([_as_mapping(r) or r for r in p["rules"]])
    prune_grad = _enum(PruneGrad, pruning["prune_grad"], "policy.prune_grad")
    every = pruning["mask_every"]
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise ValueError(f"policy.mask_every must be an int >= 0 (0: one-shot at step 0), got {every!r}")
    if p["name"] not in NAMED_POLICIES:
        raise ValueError(f"policy.name: unknown policy name {p['name']!r}; known: {' '.join(NAMED_POLICIES)}")
    return Policy.named(
        p["name"],
        runtime=p["runtime"],
        mask_schedule=Every(every=every) if every else OneShot(),
        prune_grad=prune_grad,
        srste_lambda=float(pruning["srste_lambda"]),
    )


# The keys of a rule in config data: the match key and the WeightSpec fields, flat.
_SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(WeightSpec))
_RULE_FIELDS = ("module_path", *_SPEC_FIELDS)
_SCHEDULES = {"one_shot": OneShot, "every": Every, "gradual": Gradual}


def _as_mapping(value: Any) -> Mapping | None:
    """A Mapping view of dict-like config data (ml_collections ConfigDicts are no Mapping)."""
    if isinstance(value, Mapping):
        return value
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return None


def _enum(cls: type[enum.Enum], value: Any, where: str) -> enum.Enum:
    if isinstance(value, cls):
        return value
    try:
        return cls(str(value).lower())
    except ValueError:
        raise ValueError(f"{where}: {value!r} is not one of {[e.value for e in cls]}") from None


def _schedule(value: Any, where: str) -> MaskSchedule:
    if isinstance(value, OneShot | Every | Gradual):
        return value
    value = _as_mapping(value) or value
    if not isinstance(value, Mapping) or "kind" not in value:
        raise ValueError(f"{where}: mask_schedule must be a dict with a 'kind' in {list(_SCHEDULES)}, got {value!r}")
    kind = value["kind"]
    if kind not in _SCHEDULES:
        raise ValueError(f"{where}: unknown mask_schedule kind {kind!r}; known: {list(_SCHEDULES)}")
    cls = _SCHEDULES[kind]
    known = {f.name for f in dataclasses.fields(cls)}
    args = {k: v for k, v in value.items() if k != "kind"}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown} for mask_schedule {kind!r}; known: {sorted(known)}")
    return cls(**args)


def _nm(value: Any, where: str) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", value)
        if not m:
            raise ValueError(f"{where}: nm must look like '2:4', got {value!r}")
        return int(m.group(1)), int(m.group(2))
    if isinstance(value, Sequence) and len(value) == 2:
        return tuple(value)
    raise ValueError(f"{where}: nm must be 'N:M' or [N, M], got {value!r}")


def _rule_from_dict(i: int, d: Mapping[str, Any]) -> Rule:
    if isinstance(d, Rule):
        return d
    where = f"policy rule #{i}"
    d = _as_mapping(d) or d
    if not isinstance(d, Mapping):
        raise TypeError(f"{where}: expected a dict, got {type(d).__name__}")
    unknown = sorted(set(d) - set(_RULE_FIELDS))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known keys: {list(_RULE_FIELDS)}")
    kw = dict(d)
    if "granularity" in kw:
        kw["granularity"] = _enum(Granularity, kw["granularity"], f"{where} granularity")
    if "prune_grad" in kw:
        kw["prune_grad"] = _enum(PruneGrad, kw["prune_grad"], f"{where} prune_grad")
    if "mask_schedule" in kw:
        kw["mask_schedule"] = _schedule(kw["mask_schedule"], where)
    if "nm" in kw:
        kw["nm"] = _nm(kw["nm"], where)
    if isinstance(kw.get("nm_axis"), Sequence):
        kw["nm_axis"] = tuple(kw["nm_axis"])
    try:
        return Rule(kw.pop("module_path", ".*"), WeightSpec(**kw))
    except (TypeError, ValueError) as e:
        # Name the key as the config writes it (the rule's flat fields).
        raise type(e)(f"{where}: {str(e).replace('WeightSpec.', '').replace('Rule.', '')}") from e
