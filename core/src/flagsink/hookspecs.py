"""The hooks a flagsink plugin implements. Each receives a ``register`` callback."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

__all__ = ["PROJECT", "hookimpl", "hookspec"]

PROJECT = "flagsink"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def flagsink_register_exporters(register: Callable[[type[Any]], None]) -> None:
    """Register exporter classes.

    :param register: call once per :class:`flagsink.Exporter` subclass; its ``kind`` is the
        name users write in config.
    """


@hookspec
def flagsink_register_stores(register: Callable[[type[Any]], None]) -> None:
    """Register flag store classes.

    :param register: call once per store class; its ``kind`` is the name used in config.
    """


@hookspec
def flagsink_register_formats(register: Callable[[type[Any]], None]) -> None:
    """Register output formats.

    :param register: call once per :class:`flagsink.formats.Format` subclass; its ``name``
        is the value users write in ``format:``.
    """
