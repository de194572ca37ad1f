"""The layering of docs/ARCHITECTURE.md, checked on the source: the folders are the layers and a module
imports only from its own layer or lower ones; no import circle; trainers are leaves; no module reaches
for another module's private names; every optimizer step goes through the loop's machinery; and every
file stays readable in one sitting."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = SRC / "rlhfkit"
MAX_LINES = 500


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def type_checking_nodes(tree: ast.AST) -> set[ast.AST]:
    """The import statements inside `if TYPE_CHECKING:` blocks (annotations only: never run)."""
    inside: set[ast.AST] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING"):
            for stmt in node.body:
                inside.update(ast.walk(stmt))
    return inside


def imports(path: Path | str, runtime_only: bool = False) -> list[tuple[str, list[str]]]:
    """(imported rlhfkit module, names taken from it) for every import in the file (or source text), lazy
    ones included; `runtime_only` leaves out those under `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text(encoding="utf-8") if isinstance(path, Path) else path)
    skip = type_checking_nodes(tree) if runtime_only else set()
    found = []
    for node in ast.walk(tree):
        if node in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rlhfkit"):
            found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.startswith("rlhfkit")]
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for target, names in imports(path):
            # `from rlhfkit import losses` names a module; `from rlhfkit.x import f` names x
            for sub in names:
                if f"{target}.{sub}" in modules:
                    edges[name].add(f"{target}.{sub}")
            if target in modules and not all(f"{target}.{sub}" in modules for sub in names or ["?"]):
                edges[name].add(target)
    return edges


def test_no_import_circle():
    edges = graph()
    assert "rlhfkit.models.loading" in edges["rlhfkit.trainers.rm"]  # the graph sees ordinary imports
    assert "rlhfkit.losses" in edges["rlhfkit.trainers.ppo"]  # and `from rlhfkit import losses`
    # a package's __init__ re-exporting its own modules is not a circle through them
    edges = {m: {t for t in ts if not m.startswith(f"{t}.")} for m, ts in edges.items()}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join([*path[path.index(nxt) :], nxt]))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)


def test_trainers_import_no_other_trainer_but_the_shared_bases():
    for path in (PACKAGE / "trainers").glob("*.py"):
        me = module_name(path)
        for target, _ in imports(path):
            if target.startswith("rlhfkit.trainers.") and target != me:
                assert target in ("rlhfkit.trainers.rl", "rlhfkit.trainers.base"), f"{me} imports {target}"


def test_no_private_name_crosses_a_module():
    for path in PACKAGE.rglob("*.py"):
        for target, names in imports(path):
            private = [n for n in names if n.startswith("_")]
            assert not private, f"{module_name(path)} imports {private} from {target}"


def test_every_source_file_is_under_the_line_limit():
    long = {
        str(p.relative_to(SRC)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert not long, f"files over {MAX_LINES} lines: {long}"


# ---- one loop: every optimizer step goes through guard.checked_update ---------------------------------
OPTIMIZER_HOMES = {
    "construct": {"rlhfkit.device"},  # make_optimizer: AdamW (fused) or bitsandbytes' 8-bit AdamW
    "clip": {"rlhfkit.training.guard"},  # checked_update clips; the loop hands it accelerate's clip
    "step": {
        "rlhfkit.training.settings"
    },  # step_optimizer: step + version counters, called by checked_update
}


def optimizer_uses(source: str) -> set[str]:
    """Which of "construct" (an optimizer class from some `optim` namespace called), "clip"
    (`clip_grad_norm_` called) and "step" (`.step()` of something named opt... called) a source does."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        func, owner = node.func, ast.unparse(node.func.value)
        if owner.split(".")[-1] == "optim" and func.attr[:1].isupper():
            found.add("construct")
        if func.attr == "clip_grad_norm_":
            found.add("clip")
        if func.attr == "step" and owner.split(".")[-1].lower().startswith("opt"):
            found.add("step")
    return found


def test_optimizers_are_made_clipped_and_stepped_in_one_place_each():
    for path in PACKAGE.rglob("*.py"):
        me = module_name(path)
        for use in optimizer_uses(path.read_text(encoding="utf-8")):
            assert me in OPTIMIZER_HOMES[use], (
                f"{me} does '{use}' on an optimizer outside the loop's machinery"
            )


def test_the_optimizer_check_catches_a_planted_second_loop():
    planted = "opt = torch.optim.SGD(params, lr=0.1)\nloss.backward()\nopt.step()\n"
    assert optimizer_uses(planted) == {"construct", "step"}
    second = "self.optimizer = AdamW(p)\ntorch.nn.utils.clip_grad_norm_(p, 1.0)\nself.optimizer.step()\n"
    assert optimizer_uses(second) == {"clip", "step"}  # an imported AdamW is caught by its clip and step
    assert (
        optimizer_uses("make_optimizer(cfg, params, device)\nchecked_update(opt, params, 1.0, 1.0, 'x')")
        == set()
    )


# ---- the folders are the layers ------------------------------------------------------------------------
LAYERS: list[tuple[str, set[str]]] = [
    ("base", {"errors", "fileio", "console", "config", "device", "allocator"}),
    ("math", {"losses"}),
    ("data", {"data"}),
    ("models", {"models"}),
    ("rollout", {"rollout"}),
    ("agents", {"agents"}),
    ("training", {"training"}),
    ("rewards", {"rewards"}),
    ("trainers", {"trainers"}),
    ("applications", {"chat", "evaluation", "serve", "opro", "feedback"}),
    ("entry points", {"pipeline", "agent_pipeline", "cli"}),
]
"""docs/ARCHITECTURE.md's layer table: each layer is folders (or, for the base and the entry points,
modules at the package root) of rlhfkit/."""


def layer_of(module: str) -> int:
    top = module.split(".")[1] if module.count(".") else ""
    for rank, (_, names) in enumerate(LAYERS):
        if top in names:
            return rank
    raise AssertionError(
        f"{module} is in no layer of LAYERS: add its folder to docs/ARCHITECTURE.md and here"
    )


def upward_imports(module: str, source: Path | str) -> list[str]:
    """The rlhfkit modules `source` (of `module`) imports at run time from a higher layer."""
    mine = layer_of(module)
    return [t for t, _ in imports(source, runtime_only=True) if t != "rlhfkit" and layer_of(t) > mine]


def test_every_module_imports_only_its_own_layer_or_lower_ones():
    for path in PACKAGE.rglob("*.py"):
        me = module_name(path)
        if me == "rlhfkit":  # the package root: MOVED names every layer by string only
            continue
        up = upward_imports(me, path)
        assert not up, f"{me} ({LAYERS[layer_of(me)][0]}) imports from a higher layer: {up}"


def test_the_layer_check_catches_a_planted_upward_import():
    planted = "from rlhfkit.trainers.grpo import GRPOConfig\nfrom rlhfkit.data.records import load_prompts\n"
    assert upward_imports("rlhfkit.models.loading", planted) == ["rlhfkit.trainers.grpo"]
    lazy = "def f():\n    from rlhfkit.evaluation.report import build_report\n"
    assert upward_imports("rlhfkit.training.loop", lazy) == ["rlhfkit.evaluation.report"]  # lazy counts
    typing_only = (
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from rlhfkit.rollout import Rollout\n"
    )
    assert upward_imports("rlhfkit.models.prefix", typing_only) == []  # annotations only


def test_old_module_paths_give_the_moved_modules():
    import importlib

    import rlhfkit

    for old, new in rlhfkit.MOVED.items():
        assert importlib.import_module(old) is importlib.import_module(new), old
    from rlhfkit.models import load_causal_lm  # the former module rlhfkit.models, now a package
    from rlhfkit.models.loading import load_causal_lm as same

    assert load_causal_lm is same
