"""Published training runs (``tetrad/strategy/published/*.yaml``): what ran, where, how fast.

Each file is one source (a paper's table, a framework's benchmark page): its citation, how its
framework runs (``software``, see tetrad.strategy.software), defaults, and runs. A run states
the model's shape, the hardware (a shipped spec), the GPU count, the global batch, the layout
(tp, pp, sp, zero, micro-batch, recompute, schedule; ``null`` where the source does not say:
the planner then fills that key with its fastest prediction, see ``fill_options``), the
measured throughput in the source's own unit, the peak memory where published, and its split:
``fit`` (calibration may use it) or ``test`` (held out: never fitted on).

``load_published`` checks every field: a bad entry fails with the file, the run and the field.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

from tetrad.config.schema import StrategyConfig
from tetrad.config.validate import (ModelShape, batch_errors, layout_errors, strategy_errors,
                                    strategy_world_errors)
from tetrad.models.args import ModelArgs
from tetrad.strategy.hardware import SHIPPED, HardwareError, load_hardware
from tetrad.strategy.layer_ops import EXTRA_POLICIES
from tetrad.strategy.shapes import param_counts
from tetrad.strategy.software import Software

THROUGHPUT = ("tokens_per_s_per_gpu", "tokens_per_s", "step_s", "tflops_per_gpu")
FLOPS_FORMULAS = ("megatron",)
LAYOUT_KEYS = ("tp", "pp", "sp", "zero", "micro_batch_size", "recompute", "pipeline_schedule",
               "virtual_stages", "megatron_sp")
FILLABLE = ("micro_batch_size", "pipeline_schedule", "virtual_stages")
RECOMPUTE = ("none", "selective", "full", *EXTRA_POLICIES)
RUN_KEYS = {"id", "table", "model", "hardware", "gpus", "global_batch", "precision", "layout",
            "throughput", "memory", "params", "split", "software", "note"}
SOURCE_KEYS = {"id", "title", "url", "framework", "accessed", "note"}
FILE_KEYS = {"source", "software", "defaults", "runs"}


class PublishedError(ValueError):
    """A malformed published-run entry: the message starts with file, run and field."""


@dataclass(frozen=True)
class Run:
    id: str
    source: str
    file: str
    table: str
    url: str
    model: ModelArgs
    hardware: str
    gpus: int
    global_batch: int
    precision: str
    layout: dict                   # the published keys; None where not published
    throughput: dict               # {unit: value} (+ "flops": formula for tflops_per_gpu)
    memory_gib: float | None
    params: float | None
    split: str
    software: Software

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.model.seq_len

    def measured_step_s(self) -> float:
        """The published throughput as seconds per optimizer step."""
        t = self.throughput
        if "step_s" in t:
            return float(t["step_s"])
        if "tokens_per_s" in t:
            return self.tokens_per_step / t["tokens_per_s"]
        if "tokens_per_s_per_gpu" in t:
            return self.tokens_per_step / (t["tokens_per_s_per_gpu"] * self.gpus)
        return megatron_flops(self.model, self.global_batch) / (t["tflops_per_gpu"] * 1e12 * self.gpus)

    def strategy(self, **fill) -> StrategyConfig:
        """The layout as a StrategyConfig (``fill`` gives the keys the source left unknown).
        Recompute policies other frameworks use (op_sac, every_2nd) are priced by the spec
        cost model only: the search never proposes them."""
        keys = {k: v for k, v in self.layout.items() if v is not None}
        keys.update(fill)
        dp = self.gpus // (keys.get("tp", 1) * keys.get("pp", 1) * keys.get("sp", 1))
        return StrategyConfig(dp=dp, **keys)

    def unknown(self) -> tuple[str, ...]:
        return tuple(k for k in FILLABLE if self.layout.get(k, 0) is None)


def megatron_flops(a: ModelArgs, batch: int) -> float:
    """FLOPs per step as Narayanan et al. count them (arXiv:2104.04473, eq. 3; with full
    recomputation): 96 B s l h^2 (1 + s/(6h) + V/(16 l h))."""
    s, h, L, V = a.seq_len, a.d_model, a.n_layers, a.vocab_size
    return 96 * batch * s * L * h * h * (1 + s / (6 * h) + V / (16 * L * h))


def _fail(where: str, msg: str):
    raise PublishedError(f"{where}: {msg}")


def _int(value, where: str, lo: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        _fail(where, f"{value!r} must be an integer >= {lo}")
    return value


def _pos(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        _fail(where, f"{value!r} must be a number > 0")
    return float(value)


def _layout(raw, where: str) -> dict:
    if not isinstance(raw, dict):
        _fail(where, "must be a mapping of " + ", ".join(LAYOUT_KEYS))
    for key in raw:
        if key not in LAYOUT_KEYS:
            _fail(f"{where}.{key}", f"unknown key; valid: {', '.join(LAYOUT_KEYS)}")
    out = {"tp": 1, "pp": 1, "sp": 1, "zero": 0, "megatron_sp": False, "recompute": "none",
           "pipeline_schedule": "1f1b", "virtual_stages": 1, "micro_batch_size": None}
    out.update(raw)
    for key in ("tp", "pp", "sp"):
        out[key] = _int(out[key], f"{where}.{key}")
    out["zero"] = _int(out["zero"], f"{where}.zero", 0)
    if out["zero"] > 3:
        _fail(f"{where}.zero", f"{out['zero']} must be 0..3")
    if out["recompute"] not in RECOMPUTE:
        _fail(f"{where}.recompute", f"{out['recompute']!r}; valid: {', '.join(RECOMPUTE)}")
    if not isinstance(out["megatron_sp"], bool):
        _fail(f"{where}.megatron_sp", f"{out['megatron_sp']!r} must be true or false")
    for key in ("micro_batch_size", "virtual_stages"):
        if out[key] is not None:
            out[key] = _int(out[key], f"{where}.{key}")
    sched = out["pipeline_schedule"]
    if sched is not None and sched not in ("gpipe", "1f1b", "interleaved", "zero_bubble"):
        _fail(f"{where}.pipeline_schedule", f"{sched!r}; valid: gpipe, 1f1b, interleaved, zero_bubble, null")
    return out


def _throughput(raw, where: str) -> dict:
    if not isinstance(raw, dict) or not raw:
        _fail(where, f"must map one of {', '.join(THROUGHPUT)} to a number")
    units = [k for k in raw if k in THROUGHPUT]
    for key in raw:
        if key not in THROUGHPUT and key != "flops":
            _fail(f"{where}.{key}", f"unknown key; valid: {', '.join(THROUGHPUT)}, flops")
    if len(units) != 1:
        _fail(where, f"needs exactly one of {', '.join(THROUGHPUT)} (got {units or 'none'})")
    out = {units[0]: _pos(raw[units[0]], f"{where}.{units[0]}")}
    if units[0] == "tflops_per_gpu":
        if raw.get("flops") not in FLOPS_FORMULAS:
            _fail(f"{where}.flops", f"{raw.get('flops')!r}: tflops_per_gpu needs the source's FLOP "
                                    f"count, one of {', '.join(FLOPS_FORMULAS)}")
        out["flops"] = raw["flops"]
    return out


def _model(raw, where: str) -> ModelArgs:
    if not isinstance(raw, dict):
        _fail(where, "must be a mapping of model shape keys (arch, vocab_size, d_model, ...)")
    known = {f.name for f in dataclasses.fields(ModelArgs)}
    for key in raw:
        if key not in known:
            _fail(f"{where}.{key}", f"unknown key; valid: {', '.join(sorted(known))}")
    try:
        return ModelArgs(**raw)
    except (TypeError, ValueError) as err:
        _fail(where, str(err))


def _run(raw: dict, defaults: dict, where: str, source: dict, software: dict) -> Run:
    if not isinstance(raw, dict):
        _fail(where, "must be a mapping")
    merged = {**defaults, **raw}
    if "id" in merged:
        where = f"{where} ({merged['id']})"
    own = merged.pop("software", None) or {}
    if not isinstance(own, dict):
        _fail(f"{where}.software", "must be a mapping of Software fields")
    try:
        software = Software.from_dict({**software, **own}, f"{where}.software")
    except ValueError as err:
        raise PublishedError(str(err)) from None
    for key in merged:
        if key not in RUN_KEYS:
            _fail(f"{where}.{key}", f"unknown key; valid: {', '.join(sorted(RUN_KEYS))}")
    for key in ("id", "table", "model", "hardware", "gpus", "global_batch", "layout", "throughput", "split"):
        if key not in merged:
            _fail(where, f"missing key {key!r}")
    if merged["split"] not in ("fit", "test"):
        _fail(f"{where}.split", f"{merged['split']!r}; valid: fit, test")
    if merged["hardware"] not in SHIPPED:
        _fail(f"{where}.hardware", f"{merged['hardware']!r}; valid: {', '.join(SHIPPED)}")
    precision = merged.get("precision", "bf16")
    if precision not in ("bf16", "fp16", "fp32"):
        _fail(f"{where}.precision", f"{precision!r}; valid: bf16, fp16, fp32")
    model = _model(merged["model"], f"{where}.model")
    layout = _layout(merged["layout"], f"{where}.layout")
    gpus = _int(merged["gpus"], f"{where}.gpus")
    batch = _int(merged["global_batch"], f"{where}.global_batch")
    memory = merged.get("memory")
    if memory is not None:
        if not isinstance(memory, dict) or set(memory) != {"gib", "measure"}:
            _fail(f"{where}.memory", "must be {gib: N, measure: max_reserved}")
        if memory["measure"] != "max_reserved":
            _fail(f"{where}.memory.measure", f"{memory['measure']!r}; valid: max_reserved")
        memory = _pos(memory["gib"], f"{where}.memory.gib")
    run = Run(id=str(merged["id"]), source=source["id"], file=where.split(": ")[0], table=str(merged["table"]),
              url=source["url"], model=model, hardware=merged["hardware"], gpus=gpus, global_batch=batch,
              precision=precision, layout=layout,
              throughput=_throughput(merged["throughput"], f"{where}.throughput"),
              memory_gib=memory, params=None if merged.get("params") is None else
              _pos(merged["params"], f"{where}.params"), split=merged["split"], software=software)
    _check_layout(run, where)
    return run


def _check_layout(run: Run, where: str) -> None:
    """The layout against tetrad's own rules, and the shape against the published size."""
    probe = {k: (1 if k in ("micro_batch_size", "virtual_stages") else "1f1b")
             for k in run.unknown()}
    s = run.strategy(**probe)
    m = run.model
    shape = ModelShape(m.n_heads, m.n_kv_heads, m.seq_len, m.n_layers, m.vocab_size, m.d_model)
    errors = strategy_world_errors(s, run.gpus) + layout_errors(shape, s)
    # the probe's schedule stands in for an unpublished one: its own rules do not apply
    errors += [e for e in strategy_errors(s) if e.rule not in ("pipeline.virtual_stages", "pipeline.interleaved_pp")]
    if s.micro_batch_size and "micro_batch_size" not in run.unknown():
        errors += batch_errors(run.global_batch, s, s.dp)
    if errors:
        _fail(f"{where}.layout", errors[0])
    if run.params is not None:
        counted = param_counts(run.model).total(run.model.n_layers)
        if abs(counted / run.params - 1) > 0.02:
            _fail(f"{where}.params", f"published {run.params:.4g} but the model shape has {counted:.4g} "
                                     "parameters (more than 2% apart): the shape is wrong")


def load_file(path: Path, text: str | None = None) -> list[Run]:
    where = str(path)
    try:
        raw = yaml.safe_load(text if text is not None else Path(path).read_text())
    except yaml.YAMLError as err:
        _fail(where, f"not valid YAML: {err}")
    if not isinstance(raw, dict):
        _fail(where, "must be a mapping with source, software, defaults, runs")
    for key in raw:
        if key not in FILE_KEYS:
            _fail(f"{where}: {key}", f"unknown key; valid: {', '.join(sorted(FILE_KEYS))}")
    source = raw.get("source")
    if not isinstance(source, dict) or not all(source.get(k) for k in ("id", "title", "url")):
        _fail(f"{where}: source", "needs id, title and url (where the numbers are published)")
    for key in source:
        if key not in SOURCE_KEYS:
            _fail(f"{where}: source.{key}", f"unknown key; valid: {', '.join(sorted(SOURCE_KEYS))}")
    software = raw.get("software") or {}
    try:
        Software.from_dict(software, f"{where}: software")
    except ValueError as err:
        raise PublishedError(str(err)) from None
    runs = raw.get("runs")
    if not isinstance(runs, list) or not runs:
        _fail(f"{where}: runs", "must be a non-empty list")
    defaults = raw.get("defaults") or {}
    out = [_run(r, defaults, f"{where}: runs[{i}]", source, software) for i, r in enumerate(runs)]
    ids = [r.id for r in out]
    dup = {i for i in ids if ids.count(i) > 1}
    if dup:
        _fail(f"{where}: runs", f"duplicate run ids {sorted(dup)}")
    return out


def load_published(directory: str | Path | None = None) -> list[Run]:
    """Every run of every file (the shipped ones by default), in file then run order."""
    if directory is None:
        root = resources.files("tetrad.strategy").joinpath("published")
        files = sorted((p for p in root.iterdir() if p.name.endswith(".yaml")), key=lambda p: p.name)
        runs = [r for p in files for r in load_file(Path(f"tetrad/strategy/published/{p.name}"), p.read_text())]
    else:
        runs = [r for p in sorted(Path(directory).glob("*.yaml")) for r in load_file(p)]
    ids = [r.id for r in runs]
    dup = {i for i in ids if ids.count(i) > 1}
    if dup:
        raise PublishedError(f"duplicate run ids across files: {sorted(dup)}")
    return runs


def hardware_of(run: Run, calib: dict | None = None):
    try:
        return load_hardware(run.hardware, calib)
    except HardwareError as err:
        raise PublishedError(f"{run.file} ({run.id}).hardware: {err}") from None


def fill_options(run: Run) -> list[dict]:
    """Every assignment of the keys the source did not publish (micro-batch size: the
    divisors of the per-replica batch up to 32; schedule: 1F1B, or interleaved with the
    chunk counts the layers allow), each a valid tetrad layout."""
    unknown = run.unknown()
    if not unknown:
        return [{}]
    base = run.strategy(**{k: (1 if k != "pipeline_schedule" else "1f1b") for k in unknown})
    per_replica = run.global_batch // base.dp
    mbs = [b for b in range(1, 33) if per_replica % b == 0] if "micro_batch_size" in unknown else [None]
    scheds = [("1f1b", 1)]
    if base.pp > 1 and "pipeline_schedule" in unknown:
        scheds += [("interleaved", v) for v in range(2, 9) if run.model.n_layers % (base.pp * v) == 0]
    out = []
    for b in mbs:
        for sched, v in scheds:
            fill = {}
            if b is not None:
                fill["micro_batch_size"] = b
            if "pipeline_schedule" in unknown:
                fill["pipeline_schedule"] = sched
            if "virtual_stages" in unknown:
                fill["virtual_stages"] = v
            s = run.strategy(**fill)
            if not (strategy_errors(s) or batch_errors(run.global_batch, s, s.dp)):
                out.append(fill)
    return out
