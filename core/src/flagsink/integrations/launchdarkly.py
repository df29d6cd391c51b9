"""Export the LaunchDarkly server SDK's events through a flagsink :class:`Pipeline`.

Install with ``pip install 'flagsink[launchdarkly]'``, then::

    pipeline = flagsink.from_config("flagsink.yaml")
    config = ldclient.Config(
        sdk_key, event_processor_class=flagsink_event_processor(pipeline)
    )

What becomes what:

- every flag evaluation (``variation``, ``variation_detail``, the prerequisites they
  evaluate) becomes a :class:`~flagsink.event.FeatureEvent`: ``key`` the flag key,
  ``userKey`` the context key, ``contextKind`` ``anonymousUser`` for an anonymous context
  (else ``user``), ``value`` the value returned, ``variation`` the variation **index** as a
  string (LaunchDarkly's SDK data holds no variation names), or ``SdkDefault`` with
  ``default: true`` when the SDK returned the application's default value (unknown flag,
  flag off without an off variation, error), ``version`` the flag version, ``source``
  ``SERVER``. For a multi-context, the ``user`` context if there is one, else the
  fully-qualified key (``org:acme:user:bob``). A context kind other than ``user`` is kept
  in ``metadata.ldContextKind``; a prerequisite evaluation has
  ``metadata.prerequisiteOf`` (the flag that required it).
- ``client.track(name, context, data, metric_value)`` becomes a
  :class:`~flagsink.event.TrackingEvent`: ``trackingEventDetails`` is ``data`` when it is a
  dict (else ``{"data": data}``), plus ``value`` for ``metric_value``;
  ``evaluationContext`` holds ``targetingKey``, ``kind``, ``anonymous`` (when true) and only
  the attributes you allow with ``context_attributes``: never the whole context, which may
  hold personal data.
- identify and migration events are not exported (they are forwarded when ``forward``).

``trackEvents``: LaunchDarkly's own processor sends a full event only for flags with
``trackEvents`` (or in an experiment) and summarises the rest. flagsink exports **every**
evaluation by default (that is the point: your complete evaluation data in your own
storage). With ``track_events_only=True`` it exports only the evaluations LaunchDarkly
would send as full events.

The processor never raises into the SDK and never blocks: an evaluation costs one struct
and one deque append.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping
from typing import Any

from ldclient.config import Config
from ldclient.context import Context
from ldclient.impl.events.event_processor import DefaultEventProcessor
from ldclient.impl.events.types import EventInputCustom, EventInputEvaluation
from ldclient.interfaces import EventProcessor

from flagsink.event import (
    ANONYMOUS_USER,
    SDK_DEFAULT,
    USER,
    FeatureEvent,
    TrackingEvent,
)
from flagsink.pipeline import Pipeline

__all__ = ["FlagsinkEventProcessor", "flagsink_event_processor"]

logger = logging.getLogger("flagsink.integrations.launchdarkly")

_SERVER = "SERVER"
# Variation indexes as strings, shared between events (most flags have a few variations).
_INDEX = tuple(str(index) for index in range(64))


class FlagsinkEventProcessor(EventProcessor):
    """A LaunchDarkly ``EventProcessor`` that hands events to a flagsink pipeline.

    Build it with :func:`flagsink_event_processor`, since the SDK constructs its event
    processor from the config alone.
    """

    def __init__(
        self,
        config: Config,
        pipeline: Pipeline,
        *,
        forward: bool = False,
        track_events_only: bool = False,
        metadata: Mapping[str, Any] | None = None,
        context_attributes: Collection[str] = (),
        close_pipeline: bool = False,
        stop_timeout: float = 10.0,
    ) -> None:
        """:param config: the LaunchDarkly config (passed by the SDK).
        :param pipeline: where events go.
        :param forward: also send every event to LaunchDarkly's own
            ``DefaultEventProcessor`` (built from ``config``), as without flagsink.
        :param track_events_only: export only the evaluations of flags with
            ``trackEvents`` (or in an experiment), as LaunchDarkly sends full events.
        :param metadata: static values added to every feature event's ``metadata``.
        :param context_attributes: context attributes copied into tracking events'
            ``evaluationContext`` (an allow-list; default none).
        :param close_pipeline: ``client.close()`` closes the pipeline (default: flushes it).
        :param stop_timeout: seconds ``client.close()`` waits for the pipeline.
        """
        self.pipeline = pipeline
        self.track_events_only = track_events_only
        self.metadata = dict(metadata or {})
        self.context_attributes = tuple(context_attributes)
        self.close_pipeline = close_pipeline
        self.stop_timeout = stop_timeout
        # Any: the SDK's processors are untyped.
        self.forward_to: Any = (
            DefaultEventProcessor(config)  # type: ignore[no-untyped-call]
            if forward
            else None
        )
        self.errors = 0
        # Metadata dicts shared by every event that has the same extra keys (events never
        # mutate metadata), so a plain evaluation allocates no dict.
        self._plain_metadata: dict[str, Any] | None = self.metadata or None
        self._add = pipeline.add_event
        self._last_context: tuple[Any, str, str, dict[str, Any] | None] = (None, "", "", None)
        # flag key -> (flag object, its version as a string): a flag update is a new object.
        self._versions: dict[str, tuple[Any, str]] = {}

    def send_event(self, event: Any) -> None:
        """Turn an SDK event into a flagsink event (and forward it). Never raises."""
        try:
            if type(event) is EventInputEvaluation:
                if event.track_events or not self.track_events_only:
                    self._add(self._feature_event(event))
            elif type(event) is EventInputCustom:
                self._custom(event)
        except Exception:
            self.errors += 1
            logger.exception("cannot export a LaunchDarkly event")
        forward = self.forward_to
        if forward is not None:
            try:
                forward.send_event(event)
            except Exception:
                logger.exception("LaunchDarkly's event processor failed")

    def _feature_event(self, event: EventInputEvaluation) -> FeatureEvent:
        context = event.context
        # The same context often evaluates several flags in a row: remember the last one
        # (one tuple, replaced as a whole, so threads never see half an update).
        last = self._last_context
        if last[0] is context:
            user_key, context_kind, metadata = last[1], last[2], last[3]
        else:
            user_key, context_kind, ld_kind = _user_of(context)
            metadata = self._plain_metadata
            if ld_kind is not None:
                metadata = {**self.metadata, "ldContextKind": ld_kind}
            self._last_context = (context, user_key, context_kind, metadata)
        prereq_of = event.prereq_of
        if prereq_of is not None:
            metadata = {**(metadata or {}), "prerequisiteOf": prereq_of.key}
        index = event.variation
        if index is None:
            variation = SDK_DEFAULT
        elif 0 <= index < 64:
            variation = _INDEX[index]
        else:
            variation = str(index)
        flag = event.flag
        if flag is None:
            version = ""
        else:
            known = self._versions.get(event.key)
            if known is not None and known[0] is flag:
                version = known[1]
            else:
                version = str(flag.version)
                self._versions[event.key] = (flag, version)
        return FeatureEvent(
            context_kind,
            user_key,
            event.timestamp // 1000,
            event.key,
            variation,
            event.value,
            index is None,
            version,
            _SERVER,
            metadata,
        )

    def _custom(self, event: EventInputCustom) -> None:
        context: Context = event.context
        user_key, context_kind, _ = _user_of(context)
        evaluation_context: dict[str, Any] = {"targetingKey": user_key, "kind": context.kind}
        if context_kind == ANONYMOUS_USER:
            evaluation_context["anonymous"] = True
        single = _individual(context)
        for name in self.context_attributes:
            value = single.get(name)
            if value is not None:
                evaluation_context[name] = value
        data = event.data
        if data is None:
            details: dict[str, Any] = {}
        elif isinstance(data, dict):
            details = dict(data)
        else:
            details = {"data": data}
        if event.metric_value is not None:
            details["value"] = event.metric_value
        self._add(
            TrackingEvent(
                context_kind,
                user_key,
                event.timestamp // 1000,
                event.key,
                evaluation_context,
                details,
            )
        )

    def flush(self) -> None:
        """Ask every exporter to export what it holds, without waiting. Never raises."""
        try:
            for scheduler in self.pipeline.schedulers:
                scheduler.request_flush()
        except Exception:
            logger.exception("cannot flush the flagsink pipeline")
        if self.forward_to is not None:
            try:
                self.forward_to.flush()
            except Exception:
                logger.exception("LaunchDarkly's event processor failed to flush")

    def stop(self) -> None:
        """Deliver pending events (``client.close()``): flush, or close, the pipeline
        within ``stop_timeout`` seconds. Never raises."""
        try:
            if self.close_pipeline:
                self.pipeline.close(self.stop_timeout)
            else:
                self.pipeline.flush(self.stop_timeout)
        except Exception:
            logger.exception("cannot flush the flagsink pipeline")
        if self.forward_to is not None:
            try:
                self.forward_to.stop()
            except Exception:
                logger.exception("LaunchDarkly's event processor failed to stop")


def _individual(context: Context) -> Context:
    """The context that names the user: itself, or in a multi-context the ``user`` one
    (else the first)."""
    if not context.multiple:
        return context
    single = context.get_individual_context("user") or context.get_individual_context(0)
    return context if single is None else single


def _user_of(context: Context) -> tuple[str, str, str | None]:
    """``(userKey, contextKind, LaunchDarkly kind when not "user")`` of a context."""
    if context.multiple:
        user = context.get_individual_context("user")
        if user is None:
            return context.fully_qualified_key, USER, context.kind
        context = user
    kind = context.kind
    return (
        context.key,
        ANONYMOUS_USER if context.anonymous else USER,
        None if kind == "user" else kind,
    )


def flagsink_event_processor(
    pipeline: Pipeline,
    forward: bool = False,
    *,
    track_events_only: bool = False,
    metadata: Mapping[str, Any] | None = None,
    context_attributes: Collection[str] = (),
    close_pipeline: bool = False,
    stop_timeout: float = 10.0,
) -> Callable[[Config], FlagsinkEventProcessor]:
    """What to pass as ``ldclient.Config(event_processor_class=...)``.

    The SDK builds its event processor only when ``send_events`` is true (the default) and
    ``offline`` is false. See :class:`FlagsinkEventProcessor` for the options.
    """

    def build(config: Config) -> FlagsinkEventProcessor:
        return FlagsinkEventProcessor(
            config,
            pipeline,
            forward=forward,
            track_events_only=track_events_only,
            metadata=metadata,
            context_attributes=context_attributes,
            close_pipeline=close_pipeline,
            stop_timeout=stop_timeout,
        )

    return build
