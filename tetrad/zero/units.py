"""Which parameters stage 3 gathers together, and which modules trigger the gather.

The rule works for any ``nn.Module`` without knowing its class: every element of an
``nn.ModuleList`` (a transformer block, in tetrad's models and in Hugging Face ones) is one
unit; every other module that directly owns parameters (embedding, final norm, head) is a
unit of its own. A parameter shared by several modules (tied embeddings) belongs to the
unit of its first name in ``named_parameters`` and every module holding it triggers that
unit's gather too, so the weight is present whichever module runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn


@dataclass(eq=False)
class UnitSpec:
    name: str
    params: list[tuple[str, nn.Parameter]] = field(default_factory=list)
    triggers: list[nn.Module] = field(default_factory=list)


def _block_roots(model: nn.Module) -> dict[str, nn.Module]:
    roots: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or any(name.startswith(r + ".") for r in roots):
            continue
        for child_name, child in module.named_children():
            if any(True for _ in child.parameters()):
                roots[f"{name}.{child_name}" if name else child_name] = child
    return roots


def find_units(model: nn.Module, wanted: set[nn.Parameter]) -> list[UnitSpec]:
    """Units in module order; only parameters in ``wanted`` (the trained ones) are sharded."""
    roots = _block_roots(model)
    units: dict[str, UnitSpec] = {}
    owner: dict[nn.Parameter, UnitSpec] = {}
    for mod_name, module in model.named_modules():
        root = next((r for r in roots if mod_name == r or mod_name.startswith(r + ".")), None)
        key = root if root is not None else mod_name
        for p_name, p in module.named_parameters(recurse=False):
            if p not in wanted:
                continue
            if p in owner:  # shared: this module must also bring the owner's unit in
                if module not in owner[p].triggers and not _inside(module, owner[p]):
                    owner[p].triggers.append(module)
                continue
            unit = units.setdefault(key, UnitSpec(key or "<root>"))
            if not unit.triggers:
                unit.triggers.append(roots.get(key, module))
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            unit.params.append((full, p))
            owner[p] = unit
    return list(units.values())


def _inside(module: nn.Module, unit: UnitSpec) -> bool:
    return any(module is m for t in unit.triggers for m in t.modules())
