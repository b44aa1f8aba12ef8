"""The subset of Go's text/template that Ollama chat templates use: parse and render.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any


class Unsupported(Exception):
    """A Go-template construct beyond the subset rendered here (the template is not wrong for it)."""


class GoTemplateError(ValueError):
    """A template Go's text/template would refuse."""


ACTION = re.compile(r"\{\{(-[ \t\r\n])?(.*?)([ \t\r\n]-)?\}\}", re.S)
TOKEN = re.compile(r"""\s*(?:(?P<str>"(?:[^"\\]|\\.)*")|(?P<raw>`[^`]*`)|(?P<num>-?\d+)
    |(?P<var>\$\w*(?:\.\w+)*)|(?P<field>(?:\.\w+)+|\.)|(?P<assign>:?=)|(?P<punct>[(),|])|(?P<word>[A-Za-z_]\w*))""",
                   re.X)
GO_WS = " \t\r\n"


def _truth(value: Any) -> bool:
    if isinstance(value, (str, list, tuple, dict)):
        return len(value) > 0
    return bool(value)


def _and(*args: Any) -> Any:
    return next((a for a in args if not _truth(a)), args[-1])


def _or(*args: Any) -> Any:
    return next((a for a in args if _truth(a)), args[-1])



FUNCS: dict[str, Callable[..., Any]] = {
    "eq": lambda a, *bs: any(a == b for b in bs), "ne": lambda a, b: a != b, "and": _and, "or": _or,
    "not": lambda a: not _truth(a), "len": len, "slice": lambda x, *i: x[slice(*i)], "index": lambda x, i: x[i],
}


def _tokens(action: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(action.rstrip()):
        match = TOKEN.match(action, pos)
        if match is None or match.end() == pos:
            raise GoTemplateError(f"cannot read {action[pos:].strip()[:20]!r} in {{{{{action}}}}}")
        kind = match.lastgroup or ""
        out.append((kind, match.group(kind)))
        pos = match.end()
    return out


def _operand(toks: list[tuple[str, str]]) -> Any:
    kind, text = toks.pop(0)
    if kind in ("str", "raw"):
        return ("lit", bytes(text[1:-1], "utf-8").decode("unicode_escape") if kind == "str" else text[1:-1])
    if kind == "num":
        return ("lit", int(text))
    if kind == "field":
        return ("field", [] if text == "." else text[1:].split("."))
    if kind == "var":
        name, *fields = text.split(".")
        return ("var", name, fields)
    if kind == "punct" and text == "(":
        inner = _pipeline(toks)
        if not toks or toks.pop(0) != ("punct", ")"):
            raise GoTemplateError("unclosed parenthesis")
        return inner
    if kind == "word" and text in ("true", "false"):
        return ("lit", text == "true")
    if kind == "word":
        if text not in FUNCS:
            raise Unsupported(f"the function {text!r}")
        args = []
        while toks and toks[0] not in (("punct", ")"), ("punct", "|")):
            args.append(_operand(toks))
        return ("call", text, args)
    raise GoTemplateError(f"unexpected {text!r}")


def _pipeline(toks: list[tuple[str, str]]) -> Any:
    expr = _operand(toks)
    if toks and toks[0] == ("punct", "|"):
        raise Unsupported("pipelines with '|'")
    return expr


def parse_go_template(text: str) -> list[Any]:
    """The template as a tree of ("text", s), ("out", expr), ("if", branches, else), ("range", ...), ("set", ...)."""
    root: list[Any] = []
    stack: list[tuple[str, Any, Any]] = [("root", None, root)]
    pos, trim_next = 0, False
    for match in ACTION.finditer(text):
        piece = text[pos:match.start()]
        if trim_next:
            piece = piece.lstrip(GO_WS)
        if match.group(1):
            piece = piece.rstrip(GO_WS)
        if piece:
            stack[-1][2].append(("text", piece))
        pos, trim_next = match.end(), bool(match.group(3))
        inner = match.group(2).strip()
        if inner.startswith("/*"):
            continue
        toks = _tokens(inner)
        if not toks:
            raise GoTemplateError("empty action {{ }}")
        head = toks[0]
        if head == ("word", "if"):
            node: list[Any] = ["if", [(_pipeline(toks[1:]), [])], None]
            stack[-1][2].append(node)
            stack.append(("if", node, node[1][0][1]))
        elif head == ("word", "range"):
            rest, names = toks[1:], []
            while rest and rest[0][0] == "var" and len(rest) > 1 and rest[1] in (("punct", ","), ("assign", ":=")):
                names.append(rest[0][1])
                rest = rest[2:]
            node = ["range", names, _pipeline(rest), [], None]
            stack[-1][2].append(node)
            stack.append(("range", node, node[3]))
        elif head == ("word", "else"):
            kind, node, _ = stack[-1]
            if kind not in ("if", "range") or node[-1] is not None:
                raise GoTemplateError("{{ else }} outside an if or range")
            stack.pop()
            if len(toks) > 1 and toks[1] == ("word", "if") and kind == "if":
                node[1].append((_pipeline(toks[2:]), []))
                stack.append((kind, node, node[1][-1][1]))
            else:
                node[-1] = []
                stack.append((kind, node, node[-1]))
        elif head == ("word", "end"):
            if len(stack) == 1:
                raise GoTemplateError("{{ end }} without an if or range")
            stack.pop()
        elif head[0] == "word" and head[1] in ("with", "define", "template", "block", "break", "continue"):
            raise Unsupported(f"{{{{ {head[1]} }}}}")
        elif head[0] == "var" and len(toks) > 1 and toks[1][0] == "assign":
            stack[-1][2].append(("set", head[1], _pipeline(toks[2:]), toks[1][1] == ":="))
        else:
            stack[-1][2].append(("out", _pipeline(toks)))
    if len(stack) > 1:
        raise GoTemplateError(f"{{{{ {stack[-1][0]} }}}} without {{{{ end }}}}")
    piece = text[pos:].lstrip(GO_WS) if trim_next else text[pos:]
    if piece:
        root.append(("text", piece))
    return root


def _walk(value: Any, fields: Sequence[str]) -> Any:
    for name in fields:
        if not isinstance(value, dict) or name not in value:
            raise Unsupported(f"the field .{name}")
        value = value[name]
    return value


def _eval(expr: Any, dot: Any, scopes: list[dict[str, Any]]) -> Any:
    kind = expr[0]
    if kind == "lit":
        return expr[1]
    if kind == "field":
        return _walk(dot, expr[1])
    if kind == "var":
        for scope in reversed(scopes):
            if expr[1] in scope:
                return _walk(scope[expr[1]], expr[2])
        raise GoTemplateError(f"undefined variable {expr[1]}")
    return FUNCS[expr[1]](*(_eval(a, dot, scopes) for a in expr[2]))


def _print(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int)):
        return str(value)
    raise Unsupported(f"printing a {type(value).__name__}")


def _run(nodes: list[Any], dot: Any, scopes: list[dict[str, Any]], out: list[str]) -> None:
    for node in nodes:
        kind = node[0]
        if kind == "text":
            out.append(node[1])
        elif kind == "out":
            out.append(_print(_eval(node[1], dot, scopes)))
        elif kind == "set":
            if node[3]:
                scopes[-1][node[1]] = _eval(node[2], dot, scopes)
            else:
                owner = next((s for s in reversed(scopes) if node[1] in s), None)
                if owner is None:
                    raise GoTemplateError(f"undefined variable {node[1]}")
                owner[node[1]] = _eval(node[2], dot, scopes)
        elif kind == "if":
            body = next((b for cond, b in node[1] if _truth(_eval(cond, dot, scopes))), node[2])
            _run(body or [], dot, [*scopes, {}], out)
        else:  # range
            items = _eval(node[2], dot, scopes)
            if not isinstance(items, list):
                raise Unsupported("range over something other than a list")
            for i, item in enumerate(items):
                names = node[1]
                scope = {names[0]: item} if len(names) == 1 else dict(zip(names, (i, item), strict=False))
                _run(node[3], item, [*scopes, scope], out)
            if not items and node[4] is not None:
                _run(node[4], dot, [*scopes, {}], out)


def render_go_template(text: str, data: dict[str, Any]) -> str:
    """Render the subset of Go's text/template that chat templates use; Unsupported beyond it."""
    out: list[str] = []
    _run(parse_go_template(text), data, [{"$": data}], out)
    return "".join(out)


