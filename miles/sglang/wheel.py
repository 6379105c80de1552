"""Read the pinned SGLang release's HTTP contract statically, from its wheel.

Why: miles must speak to SGLang servers exactly as the pinned release expects,
but SGLang cannot be imported where miles is developed (its import pulls CUDA
kernels). Its wheel can always be downloaded (``pip download --no-deps``, no
install), and its source says everything the contract needs:

* ``sglang/srt/managers/io_struct.py``: the request classes (field names,
  annotations, which fields have no default and so are required);
* ``sglang/srt/entrypoints/http_server.py``: the route table (path, HTTP
  methods, and which request class FastAPI parses the body into);
* ``sglang/srt/sampling/sampling_params.py``: the keys of ``sampling_params``.

The conformance tests (``tests/unit/sglang/test_conformance.py``) check
every body miles builds against these. :func:`conforms` decides whether a JSON
value fits an annotation the way FastAPI/pydantic would accept it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from miles.sglang.flags import SGLANG_PIN

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
WHEEL_CACHE = REPO_ROOT / ".cache" / "sglang"
"""Where the pinned wheel is downloaded (git-ignored)."""

IO_STRUCT = "sglang/srt/managers/io_struct.py"
HTTP_SERVER = "sglang/srt/entrypoints/http_server.py"
SAMPLING_PARAMS = "sglang/srt/sampling/sampling_params.py"


def pinned_wheel(cache: Path = WHEEL_CACHE, version: str = SGLANG_PIN) -> Path:
    """Path of ``sglang-<version>`` wheel, downloaded with ``pip download --no-deps`` on first use."""
    found = sorted(cache.glob(f"sglang-{version}-*.whl"))
    if found:
        return found[-1]
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", f"sglang=={version}", "-d", str(cache)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(cache.glob(f"sglang-{version}-*.whl"))
    if proc.returncode != 0 or not found:
        raise RuntimeError(
            f"could not download the pinned SGLang wheel ({' '.join(cmd)}), exit {proc.returncode}:\n"
            f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
        )
    return found[-1]


@dataclass(frozen=True)
class FieldSpec:
    """One field of a request class: its annotation (an AST node) and whether it has a default."""

    name: str
    annotation: ast.expr
    required: bool

    @property
    def annotation_text(self) -> str:
        return ast.unparse(self.annotation)


@dataclass(frozen=True)
class RequestClass:
    """A request class of io_struct.py with its fields, base classes' fields included."""

    name: str
    fields: dict[str, FieldSpec]

    @property
    def required(self) -> set[str]:
        return {n for n, f in self.fields.items() if f.required}


@dataclass(frozen=True)
class Route:
    """One HTTP route: path, methods, and the class the JSON body is parsed into (None: no body)."""

    path: str
    methods: frozenset[str]
    body_class: str | None
    query: dict[str, ast.expr] = field(default_factory=dict)


class SglangSource:
    """The Python sources of an SGLang wheel, parsed on demand."""

    def __init__(self, wheel: Path) -> None:
        self.wheel = wheel
        with zipfile.ZipFile(wheel) as zf:
            self._files = {
                n: zf.read(n).decode("utf-8") for n in zf.namelist() if n.startswith("sglang/") and n.endswith(".py")
            }
        self.version = wheel.name.split("-")[1]

    def text(self, path: str) -> str:
        return self._files[path]

    def tree(self, path: str) -> ast.Module:
        return ast.parse(self._files[path], filename=path)

    @cached_property
    def request_classes(self) -> dict[str, RequestClass]:
        """Every top-level class of io_struct.py with its (inherited) annotated fields."""
        nodes = {n.name: n for n in self.tree(IO_STRUCT).body if isinstance(n, ast.ClassDef)}
        out: dict[str, RequestClass] = {}

        def fields_of(name: str) -> dict[str, FieldSpec]:
            node = nodes[name]
            acc: dict[str, FieldSpec] = {}
            for base in node.bases:
                base_name = base.id if isinstance(base, ast.Name) else None
                if base_name in nodes:
                    acc.update(fields_of(base_name))
            for stmt in node.body:
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                    if _is_classvar(stmt.annotation):
                        continue
                    acc[stmt.target.id] = FieldSpec(stmt.target.id, stmt.annotation, required=stmt.value is None)
            return acc

        for name in nodes:
            out[name] = RequestClass(name, fields_of(name))
        return out

    @cached_property
    def routes(self) -> dict[str, Route]:
        """Path -> route, from the ``@app.get/post/put/api_route`` decorators of http_server.py."""
        out: dict[str, Route] = {}
        for node in ast.walk(self.tree(HTTP_SERVER)):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            body_class, query = _handler_params(node)
            for dec in node.decorator_list:
                route = _route_of(dec)
                if route is None:
                    continue
                path, methods = route
                prev = out.get(path)
                merged = methods | (prev.methods if prev else frozenset())
                out[path] = Route(path, merged, body_class or (prev.body_class if prev else None), query)
        return out

    @cached_property
    def sampling_params(self) -> dict[str, FieldSpec]:
        """API fields of ``SamplingParams`` (the ones callers set; internal fields excluded)."""
        for node in self.tree(SAMPLING_PARAMS).body:
            if isinstance(node, ast.ClassDef) and node.name == "SamplingParams":
                out: dict[str, FieldSpec] = {}
                for stmt in node.body:
                    if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                        out[stmt.target.id] = FieldSpec(stmt.target.id, stmt.annotation, stmt.value is None)
                    # The class marks where the internal (normalize()-filled) fields start with a comment;
                    # the first of them is stop_strs.
                    if isinstance(stmt, ast.AnnAssign) and getattr(stmt.target, "id", "") == "custom_params":
                        return out
                return out
        raise ValueError(f"{SAMPLING_PARAMS} has no SamplingParams class")


def _is_classvar(node: ast.expr) -> bool:
    return "ClassVar" in ast.unparse(node)


def _route_of(dec: ast.expr) -> tuple[str, frozenset[str]] | None:
    """``@app.post("/x")`` -> ("/x", {"POST"}); ``@app.api_route("/x", methods=[...])`` likewise."""
    if not (isinstance(dec, ast.Call) and isinstance(dec.func, ast.Attribute)):
        return None
    owner = dec.func.value
    if not (isinstance(owner, ast.Name) and owner.id == "app"):
        return None
    if not dec.args or not isinstance(dec.args[0], ast.Constant) or not isinstance(dec.args[0].value, str):
        return None  # a path computed at run time (env-configurable routes)
    path = dec.args[0].value
    verb = dec.func.attr
    if verb in ("get", "post", "put", "delete", "patch"):
        return path, frozenset({verb.upper()})
    if verb == "api_route":
        for kw in dec.keywords:
            if kw.arg == "methods" and isinstance(kw.value, (ast.List, ast.Tuple)):
                return path, frozenset(str(ast.literal_eval(e)).upper() for e in kw.value.elts)
        return path, frozenset({"GET"})
    return None


def _handler_params(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> tuple[str | None, dict[str, ast.expr]]:
    """The request class a handler's body is parsed into, and its query parameters."""
    body: str | None = None
    query: dict[str, ast.expr] = {}
    defaults = fn.args.defaults
    args = fn.args.args
    offset = len(args) - len(defaults)
    for i, arg in enumerate(args):
        ann = arg.annotation
        if ann is None:
            continue
        text = ast.unparse(ann)
        if text in ("Request", "Response", "fastapi.Request"):
            continue
        default = defaults[i - offset] if i >= offset else None
        if isinstance(ann, ast.Subscript) and ast.unparse(ann.value) == "Annotated":
            assert isinstance(ann.slice, ast.Tuple)
            inner = ann.slice.elts[0]
            if any("Body" in ast.unparse(m) for m in ann.slice.elts[1:]):
                body = ast.unparse(inner)
                continue
            ann = inner
            text = ast.unparse(inner)
        if default is not None and "Query" in ast.unparse(default):
            query[arg.arg] = ann
        elif text[:1].isupper() and text not in ("Optional", "Any"):
            body = text  # FastAPI parses a class-typed parameter from the JSON body
        else:
            query[arg.arg] = ann
    return body, query


_PRIMITIVES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "bytes": (str,),  # JSON carries bytes as base64 text (Base64Bytes)
    "NoneType": (type(None),),
}


def conforms(value: Any, ann: ast.expr) -> bool:
    """Whether a JSON value fits an annotation as SGLang's FastAPI/pydantic layer would accept it.

    Raises ``ValueError`` for an annotation this checker does not understand, so a
    check can never pass silently on a type it did not look at.
    """
    if isinstance(ann, ast.Constant):
        if ann.value is None:
            return value is None
        if isinstance(ann.value, str):
            return conforms(value, ast.parse(ann.value, mode="eval").body)
    if isinstance(ann, ast.BinOp) and isinstance(ann.op, ast.BitOr):
        return conforms(value, ann.left) or conforms(value, ann.right)
    if isinstance(ann, (ast.Name, ast.Attribute)):
        name = ann.id if isinstance(ann, ast.Name) else ann.attr
        if name == "Any":
            return True
        if name == "None":
            return value is None
        if name in _PRIMITIVES:
            ok = isinstance(value, _PRIMITIVES[name])
            return ok and not (name in ("int", "float") and isinstance(value, bool))
        if name in ("dict", "Dict"):
            return isinstance(value, dict)
        if name in ("list", "List"):
            return isinstance(value, list)
        raise ValueError(f"cannot check a value against annotation {ast.unparse(ann)!r}")
    if isinstance(ann, ast.Subscript):
        head = ast.unparse(ann.value).split(".")[-1]
        args = list(ann.slice.elts) if isinstance(ann.slice, ast.Tuple) else [ann.slice]
        if head == "Optional":
            return value is None or conforms(value, args[0])
        if head == "Union":
            return any(conforms(value, a) for a in args)
        if head == "Annotated":
            return conforms(value, args[0])
        if head == "Literal":
            return any(isinstance(a, ast.Constant) and a.value == value for a in args)
        if head in ("List", "list", "Set", "set", "Sequence", "Tuple", "tuple"):
            if not isinstance(value, list):
                return False
            if head in ("Tuple", "tuple") and not (len(args) == 2 and ast.unparse(args[1]) == "..."):
                return len(value) == len(args) and all(conforms(v, a) for v, a in zip(value, args, strict=True))
            return all(conforms(v, args[0]) for v in value)
        if head in ("Dict", "dict", "Mapping"):
            return isinstance(value, dict) and all(
                conforms(k, args[0]) and conforms(v, args[1]) for k, v in value.items()
            )
    raise ValueError(f"cannot check a value against annotation {ast.unparse(ann)!r}")
