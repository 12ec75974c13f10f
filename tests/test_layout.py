"""The package's architecture: the library never imports the applications, no module imports itself
round a circle, and ``tdconv info`` stays clear of the training stack."""
import ast
import json
import os
import subprocess
import sys

import tdconv

ROOT = os.path.dirname(tdconv.__file__)
APPLICATION = ("tdconv.apps", "tdconv.cli", "tdconv.__main__")


def _modules() -> dict:
    """``{dotted name: path}`` of every module of the tdconv package."""
    found = {}
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), os.path.dirname(ROOT))[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                found[".".join(rel)] = os.path.join(folder, f)
    return found


def _imports(name: str, path: str, modules: dict) -> dict:
    """``{imported tdconv module: line}`` of every import in the module ``name`` (those inside
    functions included), relative imports resolved; ``from X import y`` counts as importing the module
    ``X.y`` where that is a module, else ``X``."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    edges = {}

    def add(target, line):
        if target in modules and target != name:
            edges.setdefault(target, line)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            for alias in node.names:
                if f"{source}.{alias.name}" in modules:
                    add(f"{source}.{alias.name}", node.lineno)
                else:
                    add(source, node.lineno)
    return edges


def _graph() -> dict:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _is_application(name: str) -> bool:
    return any(name == a or name.startswith(a + ".") for a in APPLICATION)


def test_the_graph_sees_relative_and_function_level_imports():
    graph = _graph()
    assert "tdconv.apps.train" in graph and "tdconv.cli" in graph
    assert "tdconv.apps.data" in graph["tdconv.apps.train"]  # from .data import ...
    assert "tdconv.compress" in graph["tdconv"]  # from .compress import ... in the package itself


def test_the_library_never_imports_the_applications():
    offending = [f"{name} imports {target} (line {line})" for name, edges in _graph().items()
                 if not _is_application(name) for target, line in edges.items() if _is_application(target)]
    assert not offending, "; ".join(offending)


def _find_cycle(graph: dict):
    """One import cycle as a list of modules (first == last), or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, {})):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_find_cycle_reports_a_circle():
    assert _find_cycle({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b": 1}, "b": {}, "c": {"a": 1, "b": 1}}) is None


def test_no_import_cycles():
    graph = _graph()
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(
        f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])) + f" -> {cycle[-1]}"


def test_training_needs_no_more_of_the_library_than_its_utilities():
    graph = _graph()
    for name in ("tdconv.apps.train", "tdconv.apps.data"):
        library = [t for t in graph[name] if not _is_application(t) and t != "tdconv.utils"]
        assert not library, f"{name} imports {library}"


def _uses_torch_distributed(path: str) -> bool:
    with open(path) as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        if any(n == "torch.distributed" or n.startswith("torch.distributed.") for n in names):
            return True
    return False


def test_info_does_not_load_the_training_stack():
    heavy = {"tdconv.apps.train", "tdconv.apps.experiment", "tdconv.apps.data"}
    heavy |= {name for name, path in _modules().items() if _uses_torch_distributed(path)}
    assert "tdconv.apps.distributed" in heavy  # found by scanning the sources, not listed above
    code = ("import io, contextlib, json, sys\n"
            "from tdconv.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "    rc = main(['info'])\n"
            "print(json.dumps({'rc': rc, 'out': out.getvalue(), 'modules': sorted(sys.modules)}))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["rc"] == 0 and "extension_loaded" in result["out"]
    loaded = sorted(heavy & set(result["modules"]))
    assert not loaded, f"tdconv info imported {loaded}"
    assert "torchvision" not in result["modules"]
