"""The house: each room imports only the rooms below it (docs/architecture.md), and no module imports itself back
through others. Imports inside functions count."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "difflora"
ARCHITECTURE = PACKAGE.parent / "docs" / "architecture.md"


def room_table() -> dict[str, set[str] | None]:
    """room → the rooms it may import, from docs/architecture.md's table (``None``: anything not excepted)."""
    table, excepted = {}, {}
    for line in ARCHITECTURE.read_text(encoding="utf-8").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`"):
            continue
        room = cells[0].strip("`").removesuffix("/").removesuffix(".py")
        allowed = cells[-1]
        if allowed == "—":
            table[room] = set()
        elif allowed.startswith("everything"):
            table[room] = None
            excepted[room] = {name.strip() for name in allowed.removeprefix("everything but").split(",")} - {
                "everything"}
        else:
            table[room] = {name.strip() for name in allowed.split(",")}
    for room, names in excepted.items():
        table[room] = set(table) - names - {room}
    return table


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def room_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imported_modules(path: Path) -> set[str]:
    """Every ``difflora`` module ``path`` imports, wherever the import statement stands."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "difflora"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "difflora":
                continue
            # `from . import x` / `from .pkg import mod` imports the submodules it names; other names come from
            # `target` itself.
            for alias in node.names:
                candidate = PACKAGE.parent / Path(*f"{target}.{alias.name}".split("."))
                if candidate.with_suffix(".py").is_file() or (candidate / "__init__.py").is_file():
                    found.add(f"{target}.{alias.name}")
                else:
                    found.add(target)
    found.discard(here)
    return found


def import_graph() -> dict[str, set[str]]:
    return {module_name(path): imported_modules(path) for path in PACKAGE.rglob("*.py")}


def test_every_room_is_in_the_table():
    table = room_table()
    rooms = {room_of(module) for module in import_graph()}
    assert rooms == set(table), (sorted(rooms - set(table)), sorted(set(table) - rooms))
    for room, allowed in table.items():
        assert allowed <= set(table), (room, sorted(allowed - set(table)))


def test_rooms_import_only_rooms_below_them():
    table, wrong = room_table(), []
    for module, imports in import_graph().items():
        room = room_of(module)
        for target in imports:
            target_room = room_of(target)
            if target_room != room and target_room not in table[room]:
                wrong.append(f"{module} imports {target}")
    assert not wrong, wrong


def test_no_import_cycles():
    graph = import_graph()
    # A package's __init__ importing its own submodules is how it exports them; a submodule importing its package's
    # __init__ back would be a cycle, and is looked for like any other.
    state: dict[str, str] = {}
    cycles = []

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if target not in graph:
                continue
            if state.get(target) == "open":
                cycles.append(" -> ".join(trail[trail.index(target):] + [target]))
            elif target not in state:
                visit(target, trail + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles


@pytest.mark.parametrize("module", ["lora.py", "lycoris.py", "multilora.py"])
def test_the_maths_knows_nothing_of_diffusers(module):
    source = (PACKAGE / module).read_text(encoding="utf-8")
    imports = [node for node in ast.walk(ast.parse(source)) if isinstance(node, (ast.Import, ast.ImportFrom))]
    roots = {(alias.name if isinstance(node, ast.Import) else node.module or "").split(".")[0]
             for node in imports for alias in node.names}
    assert roots <= {"__future__", "math", "dataclasses", "torch", "errors", "lora", "lycoris", ""}, roots
