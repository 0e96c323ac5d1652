#!/usr/bin/env python3
"""A small mutation tester: do the tests notice when the code is wrong?

For each target module it makes mutants (one change each, from the AST): a comparison flipped
(== and !=, < and >=, in and not in, is and is not), `and` and `or` swapped, `not` dropped,
True and False swapped, a small integer moved by one, a call statement or a `raise` replaced by
`pass`. Each mutant is written over the module in a scratch copy of the checkout (a git
worktree, so the real tree is never touched), the module's tests run with `-x`, and the mutant is
"killed" when they fail (or time out) and "survived" when they pass. Mutants are sampled with a
fixed seed, so a run can be repeated.

    scripts/mutants.py --per-module 8 --json mutants.json \\
        builder/card/write.py=tests/test_card.py builder/verify.py=tests/test_verify.py ...

Run it from the checkout; it needs git and the project's venv (.venv/bin/python).
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FLIP = {
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.Lt: ast.GtE,
    ast.GtE: ast.Lt,
    ast.Gt: ast.LtE,
    ast.LtE: ast.Gt,
    ast.In: ast.NotIn,
    ast.NotIn: ast.In,
    ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
}


@dataclass
class Mutant:
    module: str
    line: int
    kind: str
    before: str
    after: str
    result: str = ""  # killed | survived | timeout
    seconds: float = 0.0


def _is_docstring(node: ast.stmt, parent: ast.AST) -> bool:
    body = getattr(parent, "body", None)
    return bool(
        body
        and body[0] is node
        and isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
    )


def candidates(tree: ast.Module) -> Iterator[tuple[int, str, ast.AST, object]]:
    """(index of the node in ast.walk order, kind, node, detail) of every possible mutation."""
    parents = {id(child): node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    for i, node in enumerate(ast.walk(tree)):
        if isinstance(node, ast.Compare):
            for k, op in enumerate(node.ops):
                if type(op) in FLIP:
                    yield i, "compare", node, k
        elif isinstance(node, ast.BoolOp):
            yield i, "boolop", node, None
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            yield i, "not", node, None
        elif isinstance(node, ast.Constant) and isinstance(node.value, bool):
            yield i, "bool", node, None
        elif (
            isinstance(node, ast.Constant)
            and type(node.value) is int
            and 0 <= node.value <= 8
            and not isinstance(parents.get(id(node)), ast.Subscript)
        ):
            yield i, "int", node, None
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            yield i, "drop-call", node, None
        elif isinstance(node, ast.Raise):
            yield i, "drop-raise", node, None


def mutate(tree: ast.Module, index: int, kind: str, detail: object) -> tuple[ast.Module, int, str, str]:
    tree = copy.deepcopy(tree)
    node = list(ast.walk(tree))[index]
    line = getattr(node, "lineno", 0)
    before = ast.unparse(node)
    if kind == "compare":
        assert isinstance(node, ast.Compare) and isinstance(detail, int)
        node.ops[detail] = FLIP[type(node.ops[detail])]()
        after = ast.unparse(node)
    elif kind == "boolop":
        assert isinstance(node, ast.BoolOp)
        node.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        after = ast.unparse(node)
    elif kind == "bool":
        assert isinstance(node, ast.Constant)
        node.value = not node.value
        after = ast.unparse(node)
    elif kind == "int":
        assert isinstance(node, ast.Constant)
        node.value = node.value + 1
        after = ast.unparse(node)
    else:  # not / drop-call / drop-raise: replace the node
        parents = {id(c): p for p in ast.walk(tree) for c in ast.iter_child_nodes(p)}
        parent = parents[id(node)]
        new: ast.AST = node.operand if kind == "not" else ast.Pass()  # type: ignore[attr-defined]
        for field, value in ast.iter_fields(parent):
            if isinstance(value, list):
                for k, item in enumerate(value):
                    if item is node:
                        value[k] = new
            elif value is node:
                setattr(parent, field, new)
        ast.copy_location(new, node)
        after = ast.unparse(new)
    ast.fix_missing_locations(tree)
    return tree, line, before, after


def _replayed(
    earlier: list[dict[str, object]],
    module: str,
    tree: ast.Module,
    options: list[tuple[int, str, ast.AST, object]],
) -> list[tuple[int, str, ast.AST, object]]:
    """The candidates that make the same change as the earlier run's mutants of `module`."""
    chosen = []
    for old in (m for m in earlier if m["module"] == module):
        same = []
        for option in options:
            index, kind, _node, detail = option
            if kind != old["kind"]:
                continue
            _, line, before, after = mutate(tree, index, kind, detail)
            if (before[:120], after[:120]) == (old["before"], old["after"]):
                same.append((abs(line - int(str(old["line"]))), option))
        if same:  # the same change at the nearest line (code above it may have moved)
            chosen.append(min(same, key=lambda pair: pair[0])[1])
        else:
            print(f"{module}: {old['kind']} {old['before']!r} is gone from the code", flush=True)
    return chosen


def run_tests(tests: list[str], cwd: Path, timeout: float) -> str:
    env = dict(os.environ, PYTHONPATH=str(cwd), PYTHONDONTWRITEBYTECODE="1")
    cmd = [str(REPO / ".venv/bin/python"), "-m", "pytest", "-x", "-q", "-n", "2", "-p", "no:cacheprovider"]
    cmd += ["-m", "not slow", *tests]
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return "timeout"
    return "survived" if proc.returncode == 0 else "killed"


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("targets", nargs="+", help="MODULE=TEST[,TEST...] pairs")
    ap.add_argument("--per-module", type=int, default=8, help="mutants sampled per module")
    ap.add_argument("--seed", default="airbox", help="sampling seed")
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--json", type=Path, help="write every mutant and its result here")
    ap.add_argument(
        "--replay",
        type=Path,
        help="run the mutants of an earlier --json again (matched by module, kind and code), e.g. "
        "after adding tests, instead of sampling",
    )
    args = ap.parse_args(argv)

    scratch = Path(tempfile.mkdtemp(prefix="airbox-mutants-"))
    tree_dir = scratch / "tree"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree_dir)], check=True)
    # the working tree's uncommitted changes count too
    diff = subprocess.run(["git", "-C", str(REPO), "diff", "HEAD"], capture_output=True, check=True).stdout
    if diff:
        subprocess.run(["git", "-C", str(tree_dir), "apply"], input=diff, check=True)
    results: list[Mutant] = []
    try:
        for target in args.targets:
            module, _, tests_text = target.partition("=")
            tests = tests_text.split(",")
            path = tree_dir / module
            original = path.read_text()
            tree = ast.parse(original)
            options = list(candidates(tree))
            if args.replay:
                chosen = _replayed(json.loads(args.replay.read_text()), module, tree, options)
            else:
                rng = random.Random(f"{args.seed}:{module}")
                chosen = rng.sample(options, min(args.per_module, len(options)))
            path.write_text(ast.unparse(tree) + "\n")  # mutants are unparsed: so is the baseline
            try:
                baseline = run_tests(tests, tree_dir, args.timeout)
            finally:
                path.write_text(original)
            if baseline != "survived":
                print(f"{module}: the tests fail without any mutant ({baseline}); skipped", flush=True)
                continue
            for index, kind, _node, detail in chosen:
                mutated, line, before, after = mutate(tree, index, kind, detail)
                path.write_text(ast.unparse(mutated) + "\n")
                start = time.monotonic()
                try:
                    result = run_tests(tests, tree_dir, args.timeout)
                finally:
                    path.write_text(original)
                m = Mutant(module, line, kind, before[:120], after[:120], result, time.monotonic() - start)
                results.append(m)
                print(
                    f"{result:8} {module}:{line} {kind}: {m.before!r} -> {m.after!r} ({m.seconds:.0f} s)",
                    flush=True,
                )
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree_dir)], check=False)
        shutil.rmtree(scratch, ignore_errors=True)
    killed = sum(m.result in ("killed", "timeout") for m in results)
    print(f"\n{len(results)} mutants: {killed} killed, {len(results) - killed} survived")
    for m in results:
        if m.result == "survived":
            print(f"  survived {m.module}:{m.line} {m.kind}: {m.before!r} -> {m.after!r}")
    if args.json:
        args.json.write_text(json.dumps([asdict(m) for m in results], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
