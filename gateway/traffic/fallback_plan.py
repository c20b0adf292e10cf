"""Which models a request may fall back to, and in which order; and the checks of a config's
fallbacks that need the whole file: every name configured, and no cycle.

A model's chain is its `fallbacks` in order, each followed at once by that model's own
(depth first, each model once): with `a: [b, d]` and `b: [c]`, a request for `a` may go to
b, c, then d. An adapter's chain starts from its `adapter_fallbacks` entry alone: it never
borrows its base model's, whose answers would come without the adapter.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

from gateway.model_settings import ModelSettings

# node (a model's canonical name, or an adapter's) -> the nodes its fallbacks name, in order
Graph = dict[str, list[str]]


def fallback_graph(models: Sequence[ModelSettings], names: Mapping[str, str]) -> Graph:
    """``names``: every configured name or alias -> its canonical name (adapters: their own)."""
    graph: Graph = {}
    for _, node, targets in _sources(models):
        found = [names[t] for t in targets if t in names]
        graph[node] = list(dict.fromkeys(found))
    return graph


def chains(graph: Graph) -> dict[str, tuple[str, ...]]:
    """Each node's fallbacks in the order they are tried; nodes without any are left out."""
    found = {}
    for node in graph:
        order: list[str] = []
        _follow(graph, node, {node}, order)
        if order:
            found[node] = tuple(order)
    return found


def _follow(graph: Graph, node: str, seen: set[str], order: list[str]) -> None:
    for target in graph.get(node, ()):
        if target not in seen:
            seen.add(target)
            order.append(target)
            _follow(graph, target, seen, order)


def fallback_problems(models: Sequence[ModelSettings], names: Mapping[str, str]) -> list[str]:
    """One line per problem, each with its path: names not configured, names given twice,
    and cycles (each reported once, at the first of its models in the file)."""
    problems = []
    where: dict[str, str] = {}
    for path, node, targets in _sources(models):
        where.setdefault(node, path)
        problems += [
            f"{path}[{j}]: model {target!r} is not configured"
            for j, target in enumerate(targets)
            if target not in names
        ]
    graph = fallback_graph(models, names)
    order = list(graph)
    for node in order:
        cycle = _cycle_through(graph, node)
        if cycle is not None and min(order.index(n) for n in cycle) == order.index(node):
            problems.append(f"{where[node]}: a cycle: {' -> '.join([*cycle, node])}")
    return problems


def _cycle_through(graph: Graph, start: str) -> list[str] | None:
    """A path from ``start`` back to itself (its nodes, ``start`` first), if there is one."""
    stack: list[tuple[str, list[str]]] = [(start, [start])]
    seen: set[str] = set()
    while stack:
        node, path = stack.pop()
        for target in graph.get(node, ()):
            if target == start:
                return path
            if target not in seen:
                seen.add(target)
                stack.append((target, [*path, target]))
    return None


def _sources(models: Sequence[ModelSettings]) -> Iterator[tuple[str, str, list[str]]]:
    """Each list of fallbacks in the file: its path, the node it belongs to, the names."""
    for i, model in enumerate(models):
        if model.fallbacks:
            yield f"models[{i}].fallbacks", model.name, model.fallbacks
        for adapter, targets in model.adapter_fallbacks.items():
            yield f"models[{i}].adapter_fallbacks.{adapter}", adapter, targets
