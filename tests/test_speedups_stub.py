"""The type stub edgeproxy/_speedups.pyi describes the compiled edgeproxy._speedups exactly.

The stub is read with :mod:`ast`; the compiled module by introspection.  Compared:

* ``__all__``, as the same list in the same order;
* the public names the module defines itself (functions and classes whose
  ``__module__`` is the extension; ``FrameError``, imported from edgeproxy.errors,
  is not one): a public function or class of the extension with no stub entry fails
  the test with its name, and so does a stub entry the extension lacks;
* per function, class ``__init__`` and public method: the parameter names, their
  order, their kinds (positional-only, keyword-only, ``*args``...) and their default
  values (as values: ``0``, ``False`` and ``0.0`` differ);
* per class: its bases, its public methods, and its public attributes with whether
  they can be assigned (``cdef public`` is a plain annotation in the stub,
  ``cdef readonly`` and Cython properties are ``@property`` without a setter).

Types and return annotations are not compared: the compiled module does not carry them.

Where the signatures come from: module-level functions and methods are Cython 3
``cyfunction`` objects (``binding=True`` is Cython 3's default), so
:func:`inspect.signature` reads them.  A ``cdef class`` ``__init__`` is a slot
wrapper whose signature is only ``(self, /, *args, **kwargs)``; its real one is the
first line of the class docstring, which ``embedsignature=True`` (set in
ext/_speedups.pyx) makes Cython write from the ``def __init__`` it compiled.  If that
line is missing the test fails and says so rather than comparing nothing.

Skipped when the extension is not built, unless ``EDGEPROXY_REQUIRE_EXT=1`` (then the
missing module is an error), as in tests/core/test_equivalence.py.
"""

from __future__ import annotations

import ast
import inspect
import re
import types
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import import_compiled

compiled = import_compiled(module_level=True)

# the stub of this checkout; the module may come from elsewhere (an editable install of another
# checkout serves its own build when this one has none), so failures name the module's file
STUB = Path(__file__).resolve().parents[1] / "edgeproxy" / "_speedups.pyi"

NO_DEFAULT = "<no default>"
# (name, kind, default): kind is an inspect.Parameter kind name, default a (type name, repr) pair
Param = tuple[str, str, object]


@dataclass
class ClassShape:
    bases: list[str] = field(default_factory=list)
    init: list[Param] | None = None  # None: could not be read (reported as a difference)
    methods: dict[str, list[Param] | None] = field(default_factory=dict)
    attributes: dict[str, bool | None] = field(default_factory=dict)  # name -> writable (None: unknown)


@dataclass
class ModuleShape:
    all: list[str] | None
    functions: dict[str, list[Param] | None]
    classes: dict[str, ClassShape]


def _default(value: object) -> object:
    return NO_DEFAULT if value is inspect.Parameter.empty else (type(value).__name__, repr(value))


def _params_from_ast(args: ast.arguments) -> list[Param]:
    """The parameters of a `def`, with literal defaults evaluated (``...`` stays Ellipsis)."""
    positional = [(a, "POSITIONAL_ONLY") for a in args.posonlyargs] + [
        (a, "POSITIONAL_OR_KEYWORD") for a in args.args
    ]
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    params: list[Param] = []
    for (arg, kind), node in zip(positional, defaults, strict=True):
        params.append((arg.arg, kind, NO_DEFAULT if node is None else _default(ast.literal_eval(node))))
    if args.vararg:
        params.append((args.vararg.arg, "VAR_POSITIONAL", NO_DEFAULT))
    for arg, node in zip(args.kwonlyargs, args.kw_defaults, strict=True):
        params.append((arg.arg, "KEYWORD_ONLY", NO_DEFAULT if node is None else _default(ast.literal_eval(node))))
    if args.kwarg:
        params.append((args.kwarg.arg, "VAR_KEYWORD", NO_DEFAULT))
    return params


def _params_from_callable(obj: object) -> list[Param] | None:
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    return [(p.name, p.kind.name, _default(p.default)) for p in signature.parameters.values()]


# ---------------------------------------------------------------------------
# the stub


def _decorators(node: ast.FunctionDef) -> set[str]:
    names = set()
    for d in node.decorator_list:
        if isinstance(d, ast.Name):
            names.add(d.id)
        elif isinstance(d, ast.Attribute):
            names.add(d.attr)  # x.setter, typing.final...
    return names


def _stub_class(node: ast.ClassDef) -> ClassShape:
    shape = ClassShape(bases=[ast.unparse(b) for b in node.bases])
    setters = set()
    for item in node.body:
        if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
            if not item.target.id.startswith("_"):
                shape.attributes[item.target.id] = True
        elif isinstance(item, ast.FunctionDef):
            decorators = _decorators(item)
            if item.name == "__init__":
                shape.init = _params_from_ast(item.args)
            elif item.name.startswith("_"):
                continue
            elif "property" in decorators:
                shape.attributes[item.name] = False
            elif "setter" in decorators:
                setters.add(item.name)
            else:
                shape.methods[item.name] = _params_from_ast(item.args)
    for name in setters:
        shape.attributes[name] = True
    if shape.init is None:  # no __init__ in the stub: object's
        shape.init = [("self", "POSITIONAL_OR_KEYWORD", NO_DEFAULT)]
    return shape


def stub_shape(source: str) -> ModuleShape:
    tree = ast.parse(source)
    all_names = None
    functions: dict[str, list[Param] | None] = {}
    classes: dict[str, ClassShape] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            all_names = list(ast.literal_eval(node.value))
        elif isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
            functions[node.name] = _params_from_ast(node.args)
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            classes[node.name] = _stub_class(node)
    return ModuleShape(all_names, functions, classes)


# ---------------------------------------------------------------------------
# the compiled module

_TYPE_PREFIX = re.compile(r"^(?:[A-Za-z_][\w.]*\s+)+(?=\**[A-Za-z_]\w*$)")  # "RelayCore relay" -> "relay"


def _split_top_level(text: str) -> list[str]:
    """`text` split at the commas outside brackets and quotes."""
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _embedded_init(cls: type) -> list[Param] | None:
    """``__init__``'s parameters from the ``Name(args)`` line embedsignature puts in the class doc."""
    first = (cls.__doc__ or "").split("\n", 1)[0].strip()
    match = re.fullmatch(re.escape(cls.__name__) + r"\((.*)\)", first)
    if match is None:
        return None
    pieces = []
    for piece in _split_top_level(match.group(1)):
        head, eq, default = piece.partition("=")
        head = re.sub(r"\s+(?:not|or)\s+None$", "", head.strip())  # Cython's "T x not None"
        pieces.append(_TYPE_PREFIX.sub("", head) + eq + default)
    return _params_from_ast(ast.parse(f"def __init__(self, {', '.join(pieces)}): pass").body[0].args)


def _writable(instance: object, name: str) -> bool | None:
    """Whether ``instance.name = instance.name`` is allowed; None when it cannot be tried."""
    if instance is None:
        return None
    try:
        value = getattr(instance, name)
    except Exception:  # noqa: BLE001 - an attribute that cannot be read on a bare instance
        return None
    try:
        setattr(instance, name, value)
    except AttributeError:
        return False
    return True


def _compiled_class(cls: type) -> ClassShape:
    shape = ClassShape(bases=[b.__name__ for b in cls.__bases__ if b is not object])
    init = cls.__dict__.get("__init__")
    if init is None:
        shape.init = [("self", "POSITIONAL_OR_KEYWORD", NO_DEFAULT)]
    elif isinstance(init, types.WrapperDescriptorType):  # a cdef class's tp_init slot
        shape.init = _embedded_init(cls)
    else:
        shape.init = _params_from_callable(init)
    try:
        instance = cls.__new__(cls)  # no __init__: the attributes have their C defaults
    except Exception:  # noqa: BLE001 - a __cinit__ with required arguments: writability unknown
        instance = None
    for name, value in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(value, staticmethod | classmethod):
            shape.methods[name] = _params_from_callable(value.__func__)
            if isinstance(value, classmethod) and shape.methods[name]:
                shape.methods[name].insert(0, ("cls", "POSITIONAL_OR_KEYWORD", NO_DEFAULT))
        elif callable(value):
            shape.methods[name] = _params_from_callable(value)
        else:  # getset/member descriptors: readonly, public and property attributes
            shape.attributes[name] = _writable(instance, name)
    return shape


def compiled_shape(module: types.ModuleType) -> ModuleShape:
    functions: dict[str, list[Param] | None] = {}
    classes: dict[str, ClassShape] = {}
    for name, value in vars(module).items():
        if name.startswith("_") or getattr(value, "__module__", None) != module.__name__:
            continue  # private, or imported from elsewhere (FrameError)
        if isinstance(value, type):
            classes[name] = _compiled_class(value)
        elif callable(value):
            functions[name] = _params_from_callable(value)
    all_names = getattr(module, "__all__", None)
    return ModuleShape(None if all_names is None else list(all_names), functions, classes)


# ---------------------------------------------------------------------------
# the comparison


def _compare_params(label: str, stub: list[Param] | None, real: list[Param] | None, problems: list[str]) -> None:
    if real is None:
        problems.append(f"{label}: the compiled module gives no signature to compare (embedsignature off?)")
    elif stub != real:
        problems.append(f"{label}: stub has {_show(stub)}, compiled has {_show(real)}")


def _show(params: list[Param] | None) -> str:
    if params is None:
        return "nothing"
    out = []
    for name, kind, default in params:
        prefix = {"VAR_POSITIONAL": "*", "VAR_KEYWORD": "**"}.get(kind, "")
        suffix = "" if default == NO_DEFAULT else f"={default[1]}"
        marker = {"POSITIONAL_ONLY": " (positional-only)", "KEYWORD_ONLY": " (keyword-only)"}.get(kind, "")
        out.append(f"{prefix}{name}{suffix}{marker}")
    return "(" + ", ".join(out) + ")"


def _compare_names(label: str, stub: set[str], real: set[str], problems: list[str]) -> set[str]:
    for name in sorted(real - stub):
        problems.append(f"{label}{name}: public in the compiled module, missing from the stub")
    for name in sorted(stub - real):
        problems.append(f"{label}{name}: in the stub, not in the compiled module")
    return stub & real


def differences(stub: ModuleShape, real: ModuleShape) -> list[str]:
    """Every way the stub differs from the compiled module, one readable line each."""
    problems: list[str] = []
    if stub.all != real.all:
        problems.append(f"__all__: stub has {stub.all}, compiled has {real.all}")
    for name in sorted(set(stub.functions) & set(real.classes)):
        problems.append(f"{name}: a function in the stub, a class in the compiled module")
    for name in sorted(set(stub.classes) & set(real.functions)):
        problems.append(f"{name}: a class in the stub, a function in the compiled module")
    for name in sorted(_compare_names("", set(stub.functions), set(real.functions), problems)):
        _compare_params(name, stub.functions[name], real.functions[name], problems)
    for name in sorted(_compare_names("", set(stub.classes), set(real.classes), problems)):
        s, r = stub.classes[name], real.classes[name]
        if s.bases != r.bases:
            problems.append(f"{name}: stub bases {s.bases}, compiled bases {r.bases}")
        _compare_params(f"{name}.__init__", s.init, r.init, problems)
        for method in sorted(_compare_names(f"{name}.", set(s.methods), set(r.methods), problems)):
            _compare_params(f"{name}.{method}", s.methods[method], r.methods[method], problems)
        for attr in sorted(_compare_names(f"{name}.", set(s.attributes), set(r.attributes), problems)):
            real_writable = r.attributes[attr]
            if real_writable is not None and s.attributes[attr] != real_writable:
                want = "a plain annotation (assignable)" if real_writable else "a @property (read-only)"
                problems.append(f"{name}.{attr}: should be {want} in the stub, as in the compiled module")
    return problems


# ---------------------------------------------------------------------------
# the tests


def test_stub_matches_compiled_module():
    problems = differences(stub_shape(STUB.read_text()), compiled_shape(compiled))
    assert not problems, f"{STUB} has drifted from {compiled.__file__}:\n" + "\n".join(problems)


#: classes the extension makes itself (never constructed from Python): no __init__ parameters
MADE_BY_THE_EXTENSION = {"EngineSide"}


def test_every_init_signature_is_readable():
    """The __init__ comparison is real: each compiled class gives parameters beyond self."""
    shape = compiled_shape(compiled)
    assert shape.classes, "no public classes found in the compiled module"
    for name, cls in shape.classes.items():
        if name in MADE_BY_THE_EXTENSION:
            assert cls.init is not None and [p[0] for p in cls.init] == ["self"], f"{name}.__init__: {cls.init}"
            continue
        assert cls.init is not None and len(cls.init) > 1, f"{name}.__init__: {cls.init}"


def _without(source: str, name: str) -> str:
    tree = ast.parse(source)
    tree.body = [n for n in tree.body if getattr(n, "name", None) != name]
    return ast.unparse(tree)


def _edit_class(source: str, cls: str, edit) -> str:
    tree = ast.parse(source)
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == cls:
            edit(node)
    return ast.unparse(tree)


def _set_default(node: ast.ClassDef, method: str, index: int, value: object) -> None:
    fn = next(n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == method)
    fn.args.defaults[index] = ast.Constant(value)


def _rename_arg(node: ast.ClassDef, method: str, index: int, new: str) -> None:
    fn = next(n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == method)
    fn.args.args[index].arg = new


def _property_to_attribute(node: ast.ClassDef, name: str) -> None:
    i = next(i for i, n in enumerate(node.body) if isinstance(n, ast.FunctionDef) and n.name == name)
    node.body[i] = ast.AnnAssign(ast.Name(name, ast.Store()), ast.Name("int", ast.Load()), None, 1)


STUB_DRIFTS = {
    "class missing": (lambda s: _without(s, "RelayEndpoint"), "RelayEndpoint: public in the compiled module"),
    "function missing": (lambda s: _without(s, "number_frames"), "number_frames: public in the compiled module"),
    "wrong default": (
        lambda s: _edit_class(s, "FrameScanner", lambda c: _set_default(c, "__init__", -1, 6)),
        "FrameScanner.__init__: stub has",
    ),
    "bool for int default": (
        lambda s: _edit_class(s, "RelayCore", lambda c: _set_default(c, "__init__", 0, False)),
        "RelayCore.__init__: stub has",
    ),
    "renamed parameter": (
        lambda s: _edit_class(s, "FrameScanner", lambda c: _rename_arg(c, "scan", 1, "buf")),
        "FrameScanner.scan: stub has",
    ),
    "read-only attribute made assignable": (
        lambda s: _edit_class(s, "FrameScanner", lambda c: _property_to_attribute(c, "rules")),
        "FrameScanner.rules: should be a @property",
    ),
}


@pytest.mark.parametrize("drift", sorted(STUB_DRIFTS))
def test_a_drifted_stub_is_caught(drift):
    """The comparison fails, naming the culprit, on stubs edited the ways stubs drift."""
    mutate, expected = STUB_DRIFTS[drift]
    problems = differences(stub_shape(mutate(STUB.read_text())), compiled_shape(compiled))
    assert any(p.startswith(expected) for p in problems), problems


def test_a_new_compiled_class_without_a_stub_entry_is_caught():
    """A public class added to the extension later, and not to the stub, fails with its name."""
    module = types.ModuleType(compiled.__name__)
    vars(module).update({k: v for k, v in vars(compiled).items() if k != "__name__"})
    module.FutureClass = type("FutureClass", (), {"__module__": compiled.__name__})
    problems = differences(stub_shape(STUB.read_text()), compiled_shape(module))
    assert problems == ["FutureClass: public in the compiled module, missing from the stub"]
