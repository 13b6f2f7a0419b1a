"""`drop_if` expressions: tiny boolean expressions over dotted trial fields.

Hand-written over `ast` because `eval` would run arbitrary code from a YAML file and no installed
library offers a safe evaluator; only names, constants, comparisons, `and`/`or`/`not`, `in` and
arithmetic are allowed.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable, Mapping
from typing import Any

from quailora.errors import QuailoraInputError

_COMPARE: dict[type, Callable[[Any, Any], bool]] = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b,
}
_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Mod: operator.mod,
}


class DropRule:
    """A parsed `drop_if` expression; `matches(trial_dict)` is True when the trial must be dropped."""

    def __init__(self, expression: str, *, where: str = "drop_if") -> None:
        self.expression = expression
        self.where = where
        try:
            self._tree = ast.parse(expression, mode="eval").body
        except SyntaxError as exc:
            raise QuailoraInputError(f"{where}: cannot parse {expression!r}: {exc.msg}") from None
        self.fields = sorted(self._collect_fields(self._tree))

    def _collect_fields(self, node: ast.AST) -> set[str]:
        if isinstance(node, ast.Name | ast.Attribute):
            return {self._dotted(node)}
        if isinstance(node, ast.Constant):
            return set()
        if isinstance(node, ast.BoolOp):
            return set().union(*(self._collect_fields(v) for v in node.values))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not | ast.USub):
            return self._collect_fields(node.operand)
        if isinstance(node, ast.Compare) and all(type(op) in _COMPARE for op in node.ops):
            return set().union(*(self._collect_fields(v) for v in [node.left, *node.comparators]))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            return self._collect_fields(node.left) | self._collect_fields(node.right)
        if isinstance(node, ast.List | ast.Tuple | ast.Set):
            return set().union(set(), *(self._collect_fields(e) for e in node.elts))
        raise QuailoraInputError(
            f"{self.where}: {ast.unparse(node)!r} is not allowed in {self.expression!r} "
            "(only fields, constants, comparisons, and/or/not, in, + - * / %)"
        )

    def _dotted(self, node: ast.AST) -> str:
        if isinstance(node, ast.Name):
            return node.id
        if isinstance(node, ast.Attribute):
            return f"{self._dotted(node.value)}.{node.attr}"
        raise QuailoraInputError(
            f"{self.where}: {ast.unparse(node)!r} is not a field path in {self.expression!r}"
        )

    def matches(self, trial: Mapping[str, Any]) -> bool:
        return bool(self._eval(self._tree, trial))

    def _eval(self, node: ast.AST, trial: Mapping[str, Any]) -> Any:
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name | ast.Attribute):
            return lookup(trial, self._dotted(node), where=f"{self.where} {self.expression!r}")
        if isinstance(node, ast.BoolOp):
            values = (self._eval(v, trial) for v in node.values)
            return all(values) if isinstance(node.op, ast.And) else any(values)
        if isinstance(node, ast.UnaryOp):
            value = self._eval(node.operand, trial)
            return (not value) if isinstance(node.op, ast.Not) else -value
        if isinstance(node, ast.Compare):
            left = self._eval(node.left, trial)
            for op, right_node in zip(node.ops, node.comparators, strict=True):
                right = self._eval(right_node, trial)
                if not _COMPARE[type(op)](left, right):
                    return False
                left = right
            return True
        if isinstance(node, ast.BinOp):
            return _BINARY[type(node.op)](self._eval(node.left, trial), self._eval(node.right, trial))
        return [self._eval(e, trial) for e in node.elts]  # List/Tuple/Set, checked at parse time


def lookup(tree: Mapping[str, Any], path: str, *, where: str) -> Any:
    """The value at a dotted path of a nested dict, or a clear error naming the path."""
    node: Any = tree
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise QuailoraInputError(f"{where}: field {path!r} does not exist in the trial config")
        node = node[part]
    return node
