#!/usr/bin/env python3
"""Prints the import cycles between the top-level modules of a crate's src/ directory.

A module is a top-level file or folder under src/ (`batch.rs`, `dlq/`); module A uses module B
when a file of A names `crate::B` (in a `use` or a path) or, in a binary crate's own modules,
`super::B` from a direct child. Exit status 1 when there is a cycle.

    ./scripts/module-cycles.py gateway/src simulator/src
"""
import re
import sys
from pathlib import Path


def modules(src: Path) -> dict:
    found = {}
    for p in sorted(src.iterdir()):
        if p.suffix == ".rs" and p.stem not in ("lib", "main"):
            found[p.stem] = [p]
        elif p.is_dir():
            found[p.name] = sorted(p.rglob("*.rs"))
    return found


def strip_tests(text: str) -> str:
    # Test modules may reach anywhere, and comments (doc links) are not uses: the graph is
    # the shipped code's.
    m = re.search(r"#\[cfg\(test\)\]\s*(pub(\(crate\))?\s+)?mod tests", text)
    text = text[: m.start()] if m else text
    return re.sub(r"//[^\n]*", "", text)


def edges(src: Path) -> dict:
    mods = modules(src)
    graph = {m: set() for m in mods}
    for m, files in mods.items():
        for f in files:
            text = strip_tests(f.read_text())
            # `crate::x`, and `crate::{x, y::z}` groups.
            for name in re.findall(r"\bcrate::(\w+)", text):
                if name in mods and name != m:
                    graph[m].add(name)
            for group in re.findall(r"\bcrate::\{([^}]*)\}", text, re.S):
                for name in re.findall(r"(?:^|[,{\s])(\w+)", group):
                    if name in mods and name != m:
                        graph[m].add(name)
            # A top-level file's `super::x` names a sibling in a binary crate.
            if f.parent == src:
                for name in re.findall(r"\bsuper::(\w+)", text):
                    if name in mods and name != m:
                        graph[m].add(name)
    return graph


def cycles(graph: dict) -> list:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def main() -> int:
    bad = 0
    for arg in sys.argv[1:] or ["gateway/src", "simulator/src"]:
        src = Path(arg)
        found = cycles(edges(src))
        if not found:
            print(f"{src}: no import cycles between its {len(modules(src))} modules")
        for comp in found:
            bad = 1
            g = edges(src)
            detail = "; ".join(f"{a} → {', '.join(sorted(g[a] & set(comp)))}" for a in comp)
            print(f"{src}: cycle among {', '.join(comp)} ({detail})")
    return bad


if __name__ == "__main__":
    sys.exit(main())
