"""Layer groups: split a backbone's body into ``(early, late)`` for freezing and discriminative LRs.

Private machinery of ``training.models.backbones`` (as timm keeps its in ``_manipulate``): timm
bodies split along timm's own coarse parameter grouping; others along their biggest containers.
"""

from __future__ import annotations

from torch import nn

from training.errors import TrainingError


class LayerGroup(nn.Module):
    """A view onto part of a body: its whole submodules plus parameters owned by a container."""

    def __init__(self, blocks: list[nn.Module], loose: list[nn.Parameter]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.loose = nn.ParameterList(loose)



_MIN_UNITS = 4  # fewer parameter-holding units than this and a container gets opened up


def timm_units(body: nn.Module) -> list[list[str]]:
    """Stem, then one unit per stage, from timm's own coarse grouping (used for layer decay)."""
    from timm.models import group_parameters

    try:
        matcher = body.group_matcher(coarse=True)
    except (AttributeError, NotImplementedError):
        return module_units(body)
    return [list(names) for names in group_parameters(body, matcher).values()]


def module_units(body: nn.Module) -> list[list[str]]:
    """Parameter names per unit, in forward order, opening the biggest container until ≥ 4 units.

    A torchvision resnet opens once (conv1, bn1, layer1..4); a mobilenet or vit opens its
    ``features`` / ``encoder.layers`` container into blocks. Parameters a container owns itself
    (vit's class token, position embedding) travel with its first child.
    """
    units: list[tuple[str, list[str]]] = [("", [])]  # (module name, loose parameter names)
    while len(units) < _MIN_UNITS:
        sizes = [(_numel(body, name), i) for i, (name, _) in enumerate(units)
                 if _param_children(body, name)]
        if not sizes:
            break
        _, i = max(sizes)
        name, loose = units[i]
        module = body.get_submodule(name)
        own = [_join(name, n) for n, _ in module.named_parameters(recurse=False)]
        children = [(_join(name, n), []) for n, _ in _param_children(body, name)]
        children[0] = (children[0][0], loose + own)
        units[i:i + 1] = children
    return [loose + [_join(name, n) for n, _ in body.get_submodule(name).named_parameters()]
            for name, loose in units]


def split_groups(arch: str, body: nn.Module, units: list[list[str]]) -> tuple[nn.Module, ...]:
    """Early = stem and the first half of the stages, late = the rest."""
    if len(units) < 2:
        raise TrainingError(f"arch {arch!r}: cannot split its body into two layer groups")
    cut = min(len(units) // 2 + 1, len(units) - 1)
    names = ([n for u in units[:cut] for n in u], [n for u in units[cut:] for n in u])
    all_names = [n for n, _ in body.named_parameters()]
    if sorted(names[0] + names[1]) != sorted(all_names):
        raise TrainingError(f"arch {arch!r}: layer groups do not partition its parameters")
    return tuple(group_from_names(body, group) for group in names)


def group_from_names(body: nn.Module, names: tuple[str, ...] | list[str]) -> LayerGroup:
    """The fewest whole submodules (plus loose parameters) holding exactly ``names``."""
    wanted = set(names)
    blocks: list[nn.Module] = []
    loose: list[nn.Parameter] = []

    def visit(prefix: str, module: nn.Module) -> None:
        own = {_join(prefix, n) for n, _ in module.named_parameters()}
        if not own & wanted:
            return
        if own <= wanted:
            blocks.append(module)
            return
        loose.extend(p for n, p in module.named_parameters(recurse=False)
                     if _join(prefix, n) in wanted)
        for child_name, child in module.named_children():
            visit(_join(prefix, child_name), child)

    visit("", body)
    return LayerGroup(blocks, loose)


def param_names_of(body: nn.Module, group: nn.Module) -> tuple[str, ...]:
    ids = {id(p) for p in group.parameters()}
    return tuple(n for n, p in body.named_parameters() if id(p) in ids)


def _param_children(body: nn.Module, name: str) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in body.get_submodule(name).named_children()
            if any(True for _ in m.parameters())]


def _numel(body: nn.Module, name: str) -> int:
    return sum(p.numel() for p in body.get_submodule(name).parameters())


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
