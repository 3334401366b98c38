"""Every ``SEQPAR_*`` option, declared once: name, type, default, allowed values, help (docs/architecture.md).

Options are read here, at the face, from ``SEQPAR_<NAME>`` environment variables or from
keyword arguments (lower-case names), and passed down as plain values; nothing below the face
reads the environment. A bad value is an error that lists what is allowed. The README's options
table is generated from this registry (``python -m seqpar_compiler.options``).

``check_environment()`` validates every ``SEQPAR_*`` variable at once: ``import seqpar_compiler``
and ``seqpar_compiler.backend(...)`` call it, so a bad value fails before Dynamo traces anything
(a typo found 20 s into tracing, wrapped in ``BackendCompilerFailed``, is a typo found
too late), and a ``SEQPAR_*`` name that is no option (a misspelt one) is a warning naming
the closest option instead of being silently ignored.
"""
from __future__ import annotations

import difflib
import os
import warnings
from dataclasses import dataclass
from typing import Any

__all__ = ["Option", "OPTIONS", "SeqparOptionWarning", "check_environment", "get_option", "resolve_options",
           "options_table", "unknown_environment_names"]

_TRUE = ("1", "true", "on", "yes")
_FALSE = ("0", "false", "off", "no")


@dataclass(frozen=True, kw_only=True)
class Option:
    """One option. ``choices`` lists the allowed strings; ``kind`` is the type name shown to users."""

    name: str
    kind: str                       # "choice", "bool", "int", "path", "text"
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    minimum: int | None = None
    values: str = ""                # kind "text": what the value may be, as shown to users

    @property
    def env(self) -> str:
        return f"SEQPAR_{self.name.upper()}"

    def allowed(self) -> str:
        if self.kind == "choice":
            return ", ".join(self.choices)
        if self.kind == "bool":
            return "1/0/true/false/on/off"
        if self.kind == "int":
            return f"int >= {self.minimum}"
        if self.kind == "text":
            return self.values
        return "a folder path"

    def parse(self, value: Any, source: str) -> Any:
        """The typed value of ``value`` (a string from the env or a Python value)."""
        def bad() -> ValueError:
            return ValueError(f"bad value {value!r} for {source}; allowed: {self.allowed()}")
        if value is None:
            return self.default
        if self.kind == "choice":
            v = str(value).strip().lower()
            if v not in self.choices:
                raise bad()
            return v
        if self.kind == "bool":
            if isinstance(value, bool):
                return value
            v = str(value).strip().lower()
            if v in _TRUE:
                return True
            if v in _FALSE:
                return False
            raise bad()
        if self.kind == "int":
            if isinstance(value, bool):
                raise bad()
            try:
                v = int(str(value).strip())
            except ValueError:
                raise bad() from None
            if self.minimum is not None and v < self.minimum:
                raise bad()
            return v
        return str(value)


def _opts(*options: Option) -> dict[str, Option]:
    return {o.name: o for o in options}


OPTIONS: dict[str, Option] = _opts(
    Option(name="degree", kind="int", default=None, minimum=1,
           help="Ranks per sequence-parallel group; must divide the world size. Consecutive ranks form a "
                "group, so data parallelism can run across groups. Default: the whole world."),
    Option(name="schedule", kind="choice", default="auto",
           choices=("ring", "zigzag", "striped", "distflash", "ulysses", "hybrid", "auto"),
           help="How the sequence is laid out and the ring is scheduled. zigzag and striped balance causal "
                "work across ranks; distflash moves queries of late ranks to idle early ranks; ring is the "
                "plain contiguous ring; ulysses is all-to-all attention (heads split over the group; needs "
                "query heads divisible by P); hybrid is all-to-all inside groups of SEQPAR_ULYSSES_DEGREE "
                "ranks and a zigzag ring across groups; auto picks by the cost model (SEQPAR_PROFILE) on rank "
                "0 and broadcasts the choice."),
    Option(name="ulysses_degree", kind="int", default=None, minimum=1,
           help="SCHEDULE=hybrid: ranks per all-to-all group (consecutive ranks, one node); must divide the "
                "sequence group's size and the query head count. Default: the largest such divisor below P "
                "that fits in a node (torchrun's LOCAL_WORLD_SIZE)."),
    Option(name="checkpoint", kind="choice", default="remat-aware", choices=("remat-aware", "full", "none"),
           help="What the backward recomputes (a partitioner policy; at P = 1 around SDPA): remat-aware saves "
                "attention's out+lse and each layer's input and recomputes the rest (norms, projections, RoPE, "
                "FFN), so attention's forward runs once per step; full saves only layer inputs and recomputes "
                "attention too (least memory, one more attention forward); none leaves the partitioner's own "
                "choice."),
    Option(name="ffn_chunks", kind="int", default=8, minimum=1,
           help="Chunks of the local sequence that per-token MLP blocks (GELU MLP, SwiGLU) run over, "
                "recomputing each chunk's hidden activation in the backward; 1 turns it off. Why 8: on a 4-layer "
                "GPT of width 256 at S=8192, 21% less activation memory than 1 chunk for a 4% slower step "
                "(bench/memory.py --P 1 --ffn-chunks 1, then 8)."),
    Option(name="kernel", kind="choice", default="auto", choices=("auto", "aten", "triton", "math"),
           help="Block attention kernel: aten (ATen's CPU flash kernel), triton (our Triton kernels; CUDA, or CPU "
                "under TRITON_INTERPRET=1), math (any device and dtype), auto (aten on CPU; on CUDA per "
                "(query chunk, key chunk) block cuDNN, FlashAttention-2 or Triton, whichever computes the "
                "block's mask exactly, see kernels/cuda_dispatch.py; math for other dtypes)."),
    Option(name="output", kind="choice", default="gather", choices=("gather", "local"),
           help="gather: outputs equal the single-device outputs; local: outputs stay this rank's shard."),
    Option(name="fallback", kind="choice", default="gather", choices=("gather", "error"),
           help="What to do with an op that cannot be sharded: gather the sequence with a warning, or raise."),
    Option(name="grad_reduce", kind="choice", default="sum", choices=("sum", "none"),
           help="sum: parameter gradients are summed over the group; none: left partial for a data-parallel "
                "reduction that spans the sequence group too."),
    Option(name="overlap", kind="bool", default=True,
           help="Post the next KV block's transfer before computing the current one."),
    Option(name="check_inputs", kind="bool", default=True,
           help="Check that every rank of a group passes the same inputs (one tiny all-reduce per call)."),
    Option(name="inner", kind="choice", default="inductor", choices=("inductor", "aot_eager"),
           help="The compiler used after the seqpar passes."),
    Option(name="dump", kind="path", default=None,
           help="A folder to write what the compiler did (graphs, schedule, fallbacks)."),
    Option(name="dump_all_ranks", kind="bool", default=False,
           help="With SEQPAR_DUMP: write every rank's dump, not only rank 0's."),
    Option(name="verify", kind="choice", default="off", choices=("off", "first", "always"),
           help="Check sharded frames against the same frame run replicated: first (the first call of each "
                "compiled frame), always (every call: debugging) or off. A checked call also runs the original "
                "graph eagerly on the whole sequence on every rank (RNG replayed) and compares outputs (fp32 1e-5, "
                "bf16 5e-2, fp16 1e-2, by the lowest precision in the frame) and the gradients of the frame's "
                "inputs for a random cotangent (fp32 1e-4, bf16 1e-1, fp16 5e-2) in float64 norms; a mismatch "
                "raises SeqparParityError naming the first "
                "graph node (forward) or the parameter (gradient) that differs. Cost per checked call: one more "
                "replicated forward and backward, the memory of the whole sequence, one more sharded backward."),
    Option(name="profile", kind="text", default=None,
           values="a100-dgx, h100-dgx, a profile .json file",
           help="The cost-model profile SCHEDULE=auto and the dump use: a shipped GPU-cluster profile, a "
                "file, or unset: this machine, calibrated on first use and cached."),
)


class SeqparOptionWarning(UserWarning):
    """A ``SEQPAR_*`` environment variable that is no option (a typo, most likely)."""


# SEQPAR_* variables that are not options but are legitimately set: none today (the dump tool
# and the launcher set options only: SEQPAR_DUMP, SEQPAR_DUMP_ALL_RANKS). Add a name here, with
# who sets it, rather than registering a fake option.
_NOT_OPTIONS: frozenset[str] = frozenset()
_warned_unknown: set[str] = set()


def unknown_environment_names(environ=None) -> list[tuple[str, str | None]]:
    """``(name, closest option's env var or None)`` for every ``SEQPAR_*`` variable that is no option."""
    environ = os.environ if environ is None else environ
    known = [o.env for o in OPTIONS.values()]
    out = []
    for name in sorted(environ):
        if name.startswith("SEQPAR_") and name not in known and name not in _NOT_OPTIONS:
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
            out.append((name, close[0] if close else None))
    return out


def check_environment(environ=None, *, warn: bool = True) -> dict[str, Any]:
    """Every option's value from ``environ`` (default ``os.environ``), all checked at once.

    Raises ``ValueError`` when any ``SEQPAR_*`` value is bad; its first line is the registry's
    message for the first bad one (``bad value 'zigzig' for SEQPAR_SCHEDULE; allowed: ...``), the
    next lines the others. Warns (``SeqparOptionWarning``, once per name and process) for each
    ``SEQPAR_*`` name that is no option, with the closest option's name.
    """
    environ = os.environ if environ is None else environ
    if warn:
        for name, close in unknown_environment_names(environ):
            if name in _warned_unknown:
                continue
            _warned_unknown.add(name)
            hint = f"did you mean {close}? " if close else ""
            warnings.warn(f"seqpar: {name}={environ[name]!r} is not a seqpar option and is ignored; {hint}"
                          f"options: {', '.join(o.env for o in OPTIONS.values())}", SeqparOptionWarning,
                          stacklevel=2)
    values, errors = {}, []
    for name, opt in OPTIONS.items():
        raw = environ.get(opt.env)
        try:
            values[name] = opt.default if raw is None or raw == "" else opt.parse(raw, opt.env)
        except ValueError as err:
            errors.append(str(err))
    if errors:
        raise ValueError("\n".join(errors))
    return values


def get_option(name: str, value: Any = None) -> Any:
    """The value of option ``name``: ``value`` if given, else ``SEQPAR_<NAME>``, else the default."""
    if name not in OPTIONS:
        raise ValueError(f"unknown seqpar option {name!r}; known: {', '.join(OPTIONS)}")
    opt = OPTIONS[name]
    if value is not None:
        return opt.parse(value, f"option {name}")
    env = os.environ.get(opt.env)
    if env is None or env == "":
        return opt.default
    return opt.parse(env, opt.env)


def resolve_options(**overrides: Any) -> dict[str, Any]:
    """All options, keyword overrides first, then the environment, then defaults."""
    unknown = set(overrides) - set(OPTIONS)
    if unknown:
        raise ValueError(f"unknown seqpar option(s) {', '.join(sorted(unknown))}; known: {', '.join(OPTIONS)}")
    return {name: get_option(name, overrides.get(name)) for name in OPTIONS}


def options_table() -> str:
    """The README's options table, in Markdown."""
    rows = ["| env var | values | default | what |", "|---|---|---|---|"]
    for o in OPTIONS.values():
        default = "—" if o.default is None else ("on" if o.default else "off") if o.kind == "bool" else o.default
        rows.append(f"| `{o.env}` | {o.allowed()} | {default} | {o.help} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(options_table())
