"""The package's shape, checked: imports run one way between floors, no module imports itself
back round a cycle, and the search space is exactly what the rule book allows.

The floors (docs/architecture.md): a package may import only packages on a lower floor. The
graph is read from the source with ``ast``, so imports inside functions count too; imports
under ``if TYPE_CHECKING:`` do not (they never run).
"""

from __future__ import annotations

import ast
import dataclasses
import itertools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "tetrad"
FLOORS = {
    # compat: the torch APIs newer than the floor, with fallbacks; device: copies off the
    # compute stream and thread devices, for offload and checkpoint alike; traffic: the
    # collectives' byte counter, for zero and parallel alike
    "compat": 0, "device": 0, "traffic": 0, "config": 0,
    "models": 1, "data": 1,
    "checkpoint": 2, "recompute": 2,
    "parallel": 3, "zero": 3,
    "offload": 4, "profiler": 4,
    "engine": 5,
    "strategy": 6,
    "trainer": 7,
    "cli": 8, "": 8,  # "": tetrad/__init__.py, the public API on top
    "__main__": 9,    # python -m tetrad: runs the cli
}


def _modules() -> dict[str, tuple[Path, bool]]:
    out = {}
    for f in ROOT.rglob("*.py"):
        parts = list(f.relative_to(ROOT.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (f, is_pkg)
    return out


def _runtime_nodes(tree: ast.AST):
    """Every node except those under ``if TYPE_CHECKING:``."""
    todo = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            todo.extend(node.orelse)
            continue
        yield node
        todo.extend(ast.iter_child_nodes(node))


def _imports(mod: str, path: Path, is_pkg: bool, known: set[str]) -> set[str]:
    found = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            for alias in node.names:
                full = f"{name}.{alias.name}"
                found.add(full if full in known else name)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m in known and m != mod}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(m, path, is_pkg, set(mods)) for m, (path, is_pkg) in mods.items()}


def _package(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_package_has_a_floor(graph):
    assert {_package(m) for m in graph} <= set(FLOORS), {_package(m) for m in graph} - set(FLOORS)


def test_no_package_imports_one_on_its_floor_or_above(graph):
    bad = sorted(f"{m} -> {t}" for m, targets in graph.items() for t in targets
                 if _package(t) != _package(m) and FLOORS[_package(t)] >= FLOORS[_package(m)])
    assert not bad, "upward or sideways imports:\n" + "\n".join(bad)


def test_zero_knows_neither_offload_nor_the_loop(graph):
    zero = {t for m, targets in graph.items() if _package(m) == "zero" for t in targets}
    assert not {t for t in zero if _package(t) in ("offload", "trainer", "engine")}, zero


def test_no_module_cycles(graph):
    """Tarjan's strongly connected components over modules: none larger than one."""
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_the_checker_sees_function_level_imports():
    """The walk must catch an import hidden inside a function (the kind that hid the old
    zero -> offload edge), and skip TYPE_CHECKING ones."""
    src = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from tetrad.trainer import x\n"
           "def f():\n    from tetrad.offload import tier\n")
    path = ROOT.parent / "tests" / "_probe_module.py"
    path.write_text(src)
    try:
        found = _imports("tetrad.zero.probe", path, False, {"tetrad.offload", "tetrad.trainer"})
    finally:
        path.unlink()
    assert found == {"tetrad.offload"}


# ------------------------------------------------------------------ the rule book and the search
def _config(**strategy):
    from tetrad.config import load_config

    return load_config({"model": {"arch": "llama", "d_model": 64, "n_heads": 4, "n_kv_heads": 2,
                                  "n_layers": 4, "seq_len": 32, "vocab_size": 256},
                        "run": {"global_batch_size": 8},
                        "optimizer": {"grad_clip": strategy.pop("grad_clip", 1.0)},
                        "strategy": {"auto": True, **strategy}})


FREE = ("tp", "pp", "sp", "cp", "megatron_sp", "zero", "micro_batch_size", "recompute",
        "pipeline_schedule", "virtual_stages", "offload.optimizer", "offload.params")


def _key(s) -> tuple:
    return (s.tp, s.pp, s.sp, s.cp, s.megatron_sp, s.zero, s.micro_batch_size, s.recompute,
            s.pipeline_schedule, s.virtual_stages, s.offload.optimizer, s.offload.params)


def _every_combination(base, world: int, stride: int = 1):
    """The whole cross product of the searched keys' values, valid or not (``stride``: every
    stride-th of them, a fixed sample: stride and the product's sizes share no factor, so
    every value of every key is still visited)."""
    divs = [d for d in range(1, world + 1) if world % d == 0]
    schedules = [("gpipe", 1), ("1f1b", 1), ("zero_bubble", 1), ("zero_bubble_v", 1), ("zero_bubble_v", 2),
                 ("interleaved", 1), ("interleaved", 2), ("breadth_first", 2)]
    tiers = ("none", "cpu", "nvme")
    # cp 1 and 2 only (with tp, pp and sp up to the world): enough to cross every cp rule
    # with the others while keeping the cross product small.
    product = itertools.product(divs, divs, divs, (1, 2), (False, True), range(4), (1, 2, 4, 8),
                                ("none", "selective", "full"), schedules, tiers, tiers)
    for tp, pp, sp, cp, msp, zero, mbs, rc, (sched, v), opt, par in itertools.islice(product, 0, None, stride):
        yield dataclasses.replace(base, auto=False, tp=tp, pp=pp, sp=sp, cp=cp, megatron_sp=msp, zero=zero,
                                  micro_batch_size=mbs, recompute=rc, pipeline_schedule=sched,
                                  virtual_stages=v, offload=dataclasses.replace(
                                      base.offload, optimizer=opt, params=par))


# The plain case walks a fixed fifth of the cross product; the offload variants, which change
# only the offload rules, a seventh (every key value still crossed with the others).
@pytest.mark.parametrize("world,strategy,stride", [
    (4, {}, 5),
    (4, {"offload": {"nvme_dir": "/tmp/tetrad-rules"}}, 7),
    (8, {"offload": {"nvme_dir": "/tmp/tetrad-rules", "step": "delayed"}}, 7),
    (4, {"offload": {"step": "overlap"}, "grad_clip": 0.0}, 7),
])
def test_search_space_is_exactly_what_the_rule_book_allows(world, strategy, stride):
    from tetrad.strategy.space import Space

    cfg = _config(**strategy)
    space = Space(cfg, world)
    candidates = list(space.candidates())
    assert candidates, "the space must not be trivially empty"
    assert all(space.problems(c) == [] for c in candidates)  # each passes the whole rule book
    found = {_key(c) for c in candidates}
    refused = [c for c in _every_combination(cfg.strategy, world, stride) if space.problems(c)]
    assert refused and not {_key(c) for c in refused} & found
    rules = {p.rule for c in refused for p in space.problems(c)}
    assert {"layout.kv_heads_tp", "pipeline.virtual_stages", "offload.params_zero3"} <= rules, rules
    if "nvme_dir" not in strategy.get("offload", {}):
        assert not [c for c in candidates if "nvme" in (c.offload.optimizer, c.offload.params)]


def test_selector_never_ranks_a_layout_the_engine_refuses():
    """offload.step overlap fixed with clipping on: the engine refuses every offloaded layout
    (and overlap needs an offloaded optimizer), so the search has nothing to rank."""
    from tetrad.strategy.space import Space

    space = Space(_config(offload={"step": "overlap"}, grad_clip=1.0), 4)
    assert list(space.candidates()) == []
    assert {p.rule for _, r in space.rejected for p in [r] if hasattr(p, "rule")} >= {
        "offload.overlap_clip", "offload.step_tier"}


def test_engine_refuses_what_the_rule_book_refuses():
    from tetrad.config import ConfigError
    from tetrad.engine import Engine
    from tetrad.models import build_model

    model = build_model({"arch": "llama", "d_model": 32, "n_heads": 4, "n_layers": 1, "seq_len": 8})
    with pytest.raises(ConfigError, match=r"offload.optimizer='cpu' needs strategy.zero 1, 2 or 3"):
        Engine(model, strategy={"zero": 0, "offload": {"optimizer": "cpu"}})
    with pytest.raises(ConfigError, match=r"step='overlap' cannot run with optimizer.grad_clip=1.0"):
        from tetrad.config.schema import OptimizerConfig
        Engine(model, strategy={"zero": 2, "offload": {"optimizer": "cpu", "step": "overlap"}},
               optim_cfg=OptimizerConfig(grad_clip=1.0))


@pytest.mark.parametrize("strategy", ["auto", {"auto": True, "tp": 1}])
def test_parallelize_auto_is_refused_with_what_to_do(strategy):
    import tetrad
    from tetrad.models import build_model

    model = build_model({"arch": "gpt", "d_model": 32, "n_heads": 4, "n_layers": 1, "seq_len": 8})
    with pytest.raises(tetrad.ConfigError, match=r"tetrad plan CONFIG.yaml"):
        tetrad.parallelize(model, strategy=strategy)


def test_engine_takes_the_collective_timeout(monkeypatch):
    """Engine alone (no Trainer) creates the process group with run.collective_timeout_s."""
    import tetrad.engine.engine as engine_module
    from tetrad.models import build_model

    seen = []

    class Stop(Exception):
        pass

    def fake_init(timeout_s):
        seen.append(timeout_s)
        raise Stop

    monkeypatch.setattr(engine_module, "init_distributed", fake_init)
    with pytest.raises(Stop):
        engine_module.Engine(build_model({"arch": "gpt", "d_model": 32, "n_heads": 4, "n_layers": 1,
                                          "seq_len": 8}), collective_timeout_s=37.0)
    assert seen == [37.0]


def test_misplaced_key_names_its_section():
    from tetrad.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"did you mean 'run.global_batch_size'"):
        load_config({"strategy": {"global_batch_size": 4}})
    with pytest.raises(ConfigError, match=r"did you mean 'run.global_batch_size'"):
        load_config({}, ["strategy.global_batch_size=4"])
