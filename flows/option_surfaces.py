"""The CLI options and Prefect flow parameters, derived from the declared option models.

``training.recipes.options`` and ``scoring.options`` declare every option once as a pydantic
field (name, type, default, help, checks). ``declared_options`` turns a function that takes such
a model into one whose signature lists the model's fields one by one: Prefect builds the
deployment's parameter schema (UI form, ``prefect deployment run --param epochs=5`` checks) from
that signature, and typer builds the command's ``--options`` from it. The call collects the
fields back into one validated model. Why a generated signature rather than one model-typed
parameter: on-demand runs keep flat ``--param name=value`` and the CLI keeps flat flags, while
nothing is spelled twice (see docs/architecture.md).
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable
from typing import Annotated, Any, Literal

import typer
from pydantic import BaseModel, ValidationError


class OptionsError(ValueError):
    """An option value the declaration refuses; one line that names the option."""


def declared_options(*, cli: bool = False, **models: type[BaseModel]) -> Callable:
    """Replace each keyword-only parameter named in ``models`` by that model's fields.

    ``cli``: annotate the fields as typer options (plain types typer can parse; the model
    checks the value) instead of the pydantic types Prefect turns into a schema.
    """
    def decorate(fn: Callable) -> Callable:
        signature = inspect.signature(fn)
        hints = typing.get_type_hints(fn, include_extras=True)
        kept = [p.replace(annotation=hints.get(p.name, p.annotation))
                for p in signature.parameters.values() if p.name not in models]
        owners: dict[str, str] = {}
        for param, model in models.items():
            for name, field in model.model_fields.items():
                if name in owners or name in signature.parameters:
                    raise TypeError(f"{fn.__name__}: option {name!r} is declared twice")
                owners[name] = param
                # A field without a default is a required flag and a required parameter.
                default = inspect.Parameter.empty if field.is_required() else \
                    field.get_default()
                kept.append(inspect.Parameter(
                    name, inspect.Parameter.KEYWORD_ONLY, default=default,
                    annotation=_cli_annotation(field) if cli else _flow_annotation(field)))

        @functools.wraps(fn)
        def call(*args, **kwargs):
            values: dict[str, dict[str, Any]] = {param: {} for param in models}
            for name in list(kwargs):
                if name in owners:
                    values[owners[name]][name] = kwargs.pop(name)
            for param, model in models.items():
                kwargs[param] = build_options(model, values[param], flags=cli)
            return fn(*args, **kwargs)

        if not cli:
            call.__doc__ = _with_option_help(fn.__doc__, models)
        call.__signature__ = signature.replace(parameters=kept)
        call.__annotations__ = {p.name: p.annotation for p in kept} | {
            "return": hints.get("return", signature.return_annotation)}
        return call
    return decorate


def build_options(model: type[BaseModel], values: dict, *, flags: bool = False) -> BaseModel:
    """``model(**values)``; a refused value is one ``OptionsError`` line naming the option."""
    try:
        return model(**values)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            if not e["loc"]:  # a check across options names them in its own message
                problems.append(e["msg"].removeprefix("Value error, "))
                continue
            name = str(e["loc"][0])
            label = f"--{name.replace('_', '-')}" if flags else name
            problems.append(f"{label}: {e['msg']} (got {e.get('input')!r})")
        raise OptionsError("; ".join(problems)) from None


def _with_option_help(doc: str | None, models: dict[str, type[BaseModel]]) -> str:
    """``doc`` with an ``Args:`` section of the options' help, which Prefect shows in the form."""
    lines = [f"    {name}: {field.description}" for model in models.values()
             for name, field in model.model_fields.items() if field.description]
    return inspect.cleandoc(doc or "") + "\n\nArgs:\n" + "\n".join(lines)


def _flow_annotation(field) -> Any:
    """The field's type with its checks, for Prefect's parameter schema and validation."""
    extras = [*field.metadata]
    if field.description:
        from pydantic import Field

        extras.append(Field(description=field.description))
    return Annotated.__class_getitem__((field.annotation, *extras)) if extras \
        else field.annotation


def _cli_annotation(field) -> Any:
    """A type typer parses, with the field's help; anything richer arrives as text."""
    base, optional = _strip_optional(field.annotation)
    plain = base if base in (bool, int, float, str) else str
    help_text = field.description or ""
    if typing.get_origin(base) is Literal:
        help_text = help_text or " | ".join(map(str, typing.get_args(base)))
    return Annotated[plain | None if optional else plain, typer.Option(help=help_text)]


def _strip_optional(annotation: Any) -> tuple[Any, bool]:
    """(the type without ``| None``, whether None was allowed)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) < len(typing.get_args(annotation)):
            return (_unannotated(args[0]) if len(args) == 1 else str), True
    return _unannotated(annotation), False


def _unannotated(annotation: Any) -> Any:
    return typing.get_args(annotation)[0] if typing.get_origin(annotation) is Annotated \
        else annotation
