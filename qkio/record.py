"""``Record``: a frozen record class, for the few value types on ``qkio run``'s path.

Why not ``@dataclass(frozen=True)``: start-up time.  ``dataclasses`` pulls in
``inspect`` (and with it ``ast``, ``dis``, ``tokenize``), and each decorated
class has its methods generated as source text and compiled at import time.
On this book's host that cost about 8 ms of CPU for the import plus 0.8 ms per
class -- some 15 ms before the guest's first instruction, for a dozen
classes whose instances are made a handful of times per run.  (``qkio bench
startup`` measures the whole run.)  A record needs none of that: the fields
are the class's annotated names, and one generic ``__init__`` binds them.

A subclass lists its fields as annotations, optionally with a default::

    class Module(Record):
        start: int
        end: int
        cmdline: str = ""

and gets what ``@dataclass(frozen=True)`` would give it: ``__init__`` by
position or keyword (then ``__post_init__``, if defined, which may set fields
with ``object.__setattr__``), ``__repr__``, ``__eq__`` and ``__hash__`` over
the fields in order, and attributes that cannot be set or deleted
(``dataclasses.FrozenInstanceError``'s base, ``AttributeError``).
``_replace(**changes)`` is the copy with some fields changed.
"""

from __future__ import annotations

__all__ = ["Record"]


class Record:
    _fields: tuple[str, ...] = ()
    _defaults: dict = {}

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        fields: list[str] = []
        defaults: dict = {}
        for klass in reversed(cls.__mro__):
            for name in klass.__dict__.get("__annotations__", {}):
                if name.startswith("_"):
                    continue
                if name not in fields:
                    fields.append(name)
                if name in klass.__dict__:
                    defaults[name] = klass.__dict__[name]
                else:
                    defaults.pop(name, None)
        cls._fields = tuple(fields)
        cls._defaults = defaults

    def __init__(self, *args, **kwargs) -> None:
        fields = self._fields
        if len(args) > len(fields):
            raise TypeError(f"{type(self).__name__}() takes {len(fields)} fields, got {len(args)}")
        values = dict(zip(fields, args))
        for name, value in kwargs.items():
            if name not in fields:
                raise TypeError(f"{type(self).__name__}() got an unexpected field {name!r}")
            if name in values:
                raise TypeError(f"{type(self).__name__}() got field {name!r} twice")
            values[name] = value
        for name in fields:
            if name not in values:
                if name not in self._defaults:
                    raise TypeError(f"{type(self).__name__}() missing field {name!r}")
                values[name] = self._defaults[name]
            object.__setattr__(self, name, values[name])
        post_init = getattr(self, "__post_init__", None)
        if post_init is not None:
            post_init()

    def _astuple(self) -> tuple:
        return tuple(getattr(self, name) for name in self._fields)

    def _replace(self, **changes):
        return type(self)(**{**{name: getattr(self, name) for name in self._fields}, **changes})

    def __repr__(self) -> str:
        inner = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._fields)
        return f"{type(self).__qualname__}({inner})"

    def __eq__(self, other):
        if type(other) is not type(self):
            return NotImplemented
        return self._astuple() == other._astuple()

    def __hash__(self) -> int:
        return hash((type(self), self._astuple()))

    def __setattr__(self, name, value):
        raise AttributeError(f"cannot assign to field {name!r}: {type(self).__name__} is frozen")

    def __delattr__(self, name):
        raise AttributeError(f"cannot delete field {name!r}: {type(self).__name__} is frozen")
