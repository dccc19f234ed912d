"""Explaining a plan: the ranked table, the rejection summary, JSON of every candidate, YAML."""

from __future__ import annotations

import dataclasses
import json
import re

import yaml

from tetrad.config import ConfigError
from tetrad.config.schema import OffloadConfig, StrategyConfig
from tetrad.strategy.search import Estimate, Plan
from tetrad.strategy.shapes import dp_degree


def layout(s: StrategyConfig, world: int) -> str:
    """'tp2 pp4 sp1 cp2 dp8 shard4 msp z3 hpz4 qw qg mbs2 selective interleaved/v2 off:cpu/none'
    (cp 1 and other defaults left out; 'cp2/contig' without the zigzag load balance)."""
    parts = [f"tp{s.tp}", f"pp{s.pp}", f"sp{s.sp}"]
    parts += [f"cp{s.cp}" + ("" if s.cp_load_balance else "/contig")] if s.cp > 1 else []
    parts += [f"dp{dp_degree(s, world)}"]
    parts += [f"shard{s.dp_shard}"] if s.dp_shard != "auto" else []
    parts += ["msp"] if s.megatron_sp else []
    z = s.zeropp
    parts += ([f"hpz{z.hpz}"] if z.hpz > 1 else []) + (["qw"] if z.quantize_weights else []) + \
        (["qg"] if z.quantize_grads else [])
    parts += [f"z{s.zero}", f"mbs{s.micro_batch_size}", s.recompute]
    if s.pp > 1:
        parts.append(s.pipeline_schedule + (f"/v{s.virtual_stages}" if s.virtual_stages > 1 else ""))
    if s.offload.optimizer != "none" or s.offload.params != "none":
        parts.append(f"off:{s.offload.optimizer}/{s.offload.params}")
        if s.offload.host_memory_gb:
            parts.append(f"host:{s.offload.host_memory_gb}GiB")
    return " ".join(parts)


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f}"


def table(plan: Plan, top: int = 10) -> str:
    """The ranked table `tetrad plan` prints, then why the rest were rejected."""
    head = f"{'#':>3}  {'layout':<58} {'step s':>9} {'tokens/s':>11} {'mem GB/rank':>11} {'MFU':>6}"
    lines = [f"plan for world {plan.world} on {plan.costs_name}; memory budget {_gb(plan.budget)} GB/rank", head]
    for i, e in enumerate(plan.ranked[:top], 1):
        mfu = plan.mfu(e)
        lines.append(f"{i:>3}  {layout(e.strategy, plan.world):<58} {e.step_s:>9.4g} "
                     f"{plan.tokens_per_s(e):>11.4g} {_gb(e.memory['device'] + (e.memory['host'] if plan.costs_name == 'this machine' else 0)):>11} "
                     f"{'' if mfu is None else f'{100 * mfu:.1f}%':>6}")
    if not plan.ranked:
        lines.append("  (no candidate fits and runs)")
    lines.append(f"{len(plan.ranked)} candidates fit; rejected or pruned:")
    for reason, n in plan.reason_counts().most_common(12):
        lines.append(f"  {n:>7} x {reason}")
    if plan.chosen is not None:
        lines.append("chosen: " + layout(plan.chosen.strategy, plan.world) + _breakdown(plan.chosen))
    lines += plan.notes
    return "\n".join(lines)


def _breakdown(e: Estimate) -> str:
    parts = ", ".join(f"{k} {v:.3g}s" for k, v in e.time.items() if k != "total" and v > 0)
    return f"  ({parts})"


def _record(plan: Plan, e: Estimate) -> dict:
    return {"layout": layout(e.strategy, plan.world), "strategy": e.strategy.to_dict(full=True),
            "status": e.status, "reason": e.reason, "predicted_step_s": e.step_s,
            "tokens_per_s": plan.tokens_per_s(e), "mfu": plan.mfu(e), "measured_step_s": e.measured_s,
            "time": e.time, "memory": e.memory}


def to_json(plan: Plan) -> dict:
    """Every priced candidate, and the invalid ones grouped by reason (with up to 3 examples)."""
    groups: dict[str, dict] = {}
    for s, reason in plan.rejected:
        g = groups.setdefault(reason, {"reason": reason, "count": 0, "examples": []})
        g["count"] += 1
        if len(g["examples"]) < 3:
            g["examples"].append(layout(s, plan.world))
    return {"world": plan.world, "costs": plan.costs_name, "budget_bytes": plan.budget,
            "chosen": _record(plan, plan.chosen) if plan.chosen else None,
            "ranked": [_record(plan, e) for e in plan.ranked],
            "not_fitting_or_unavailable": [_record(plan, e) for e in plan.others],
            "invalid": sorted(groups.values(), key=lambda g: -g["count"]),
            "dominated": plan.dominated}


def write_json(plan: Plan, path) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(to_json(plan), fh, indent=1)


def strategy_yaml(s: StrategyConfig) -> str:
    """The chosen strategy as a `strategy:` section a run config (or tetrad.parallelize) reads."""
    body = s.to_dict(full=True)
    body.pop("auto", None)
    return yaml.safe_dump({"strategy": body}, sort_keys=False)


_SCHEDULES = ("gpipe", "1f1b", "interleaved", "zero_bubble")
_POLICIES = ("none", "selective", "full")


def parse_layout(text: str, base: StrategyConfig | None = None) -> StrategyConfig:
    """The inverse of ``layout``: 'tp2 pp4 dp8 msp z1 mbs2 full interleaved/v2 off:cpu/none'.
    Tokens may come in any order; keys not given keep ``base``'s value (default: defaults)."""
    s = dataclasses.replace(base or StrategyConfig(), auto=False)
    seen = []
    for tok in text.replace(",", " ").split():
        m = re.fullmatch(r"(tp|pp|sp|dp|z|mbs|shard|hpz)(\d+)", tok)
        if m and m.group(1) == "hpz":
            s = dataclasses.replace(s, zeropp=dataclasses.replace(s.zeropp, hpz=int(m.group(2))))
        elif m:
            key = {"z": "zero", "mbs": "micro_batch_size", "shard": "dp_shard"}.get(m.group(1), m.group(1))
            s = dataclasses.replace(s, **{key: int(m.group(2))})
        elif tok in ("qw", "qg"):
            key = "quantize_weights" if tok == "qw" else "quantize_grads"
            s = dataclasses.replace(s, zeropp=dataclasses.replace(s.zeropp, **{key: True}))
        elif tok == "msp":
            s = dataclasses.replace(s, megatron_sp=True)
        elif tok in _POLICIES:
            s = dataclasses.replace(s, recompute=tok)
        elif tok.split("/")[0] in _SCHEDULES:
            name, _, v = tok.partition("/")
            if v and not re.fullmatch(r"v\d+", v):
                raise ConfigError(f"--explain: {tok!r}: the schedule's chunks are written /vN, e.g. interleaved/v2")
            s = dataclasses.replace(s, pipeline_schedule=name, virtual_stages=int(v[1:]) if v else 1)
        elif tok.startswith("off:") and tok.count("/") == 1:
            opt, par = tok[4:].split("/")
            s = dataclasses.replace(s, offload=OffloadConfig(optimizer=opt, params=par,
                                                             nvme_dir=s.offload.nvme_dir))
        else:
            raise ConfigError(f"--explain: {tok!r} is not a layout token; valid: tpN ppN spN dpN shardN msp zN "
                              f"hpzN qw qg mbsN, "
                              f"{'|'.join(_POLICIES)}, {'|'.join(_SCHEDULES)}[/vN], off:OPT/PARAMS")
        seen.append(tok)
    if not seen:
        raise ConfigError("--explain: an empty layout; e.g. --explain 'tp2 pp2 z1 mbs1 full'")
    return s


def _share(part: float, whole: float) -> str:
    return f"{100 * part / whole:5.1f}%" if whole else "   - "


def explain(plan: Plan, e: Estimate) -> str:
    """Where one layout's predicted step time and memory go, term by term."""
    world = plan.world
    t = e.time
    lines = [f"layout: {layout(e.strategy, world)}  ({e.status}{': ' + e.reason if e.reason else ''})",
             f"step time {t['total']:.4g} s, {plan.tokens_per_s(e):.4g} tokens/s"
             + (f", MFU {100 * plan.mfu(e):.1f}%" if plan.mfu(e) is not None else "")]
    for key, value in t.items():
        if key != "total":
            lines.append(f"  {key:<22} {value:>10.4g} s  {_share(value, t['total'])}")
    mem = e.memory
    terms = mem.get("terms", {})
    lines.append(f"memory per rank on the {mem.get('stage', 'only')} pipeline stage: "
                 f"{_gb(mem['device'])} GB of {_gb(plan.budget)} GB"
                 + (f" (the allocator reserves {_gb(mem['allocator'])} GB)" if "allocator" in mem else ""))
    for key, value in terms.items():
        if key in ("host", "disk") and not value:
            continue
        where = {"host": " (host memory)", "disk": " (NVMe)"}.get(key, "")
        lines.append(f"  {key:<22} {_gb(value):>10} GB {_share(value, mem['device']) if not where else ''}{where}")
    return "\n".join(lines)
