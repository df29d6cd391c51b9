"""An OpenFeature hook that records every flag evaluation in a flagsink pipeline.

Needs ``pip install "flagsink[openfeature]"`` (PyPI ``openfeature-sdk``)::

    from openfeature import api
    from flagsink import from_config
    from flagsink.integrations.openfeature import FlagsinkHook

    pipeline = from_config("flagsink.yaml")
    api.add_hooks([FlagsinkHook(pipeline)])

Events have the shape GO Feature Flag's OpenFeature providers give them: ``after`` records
the variant (``SdkDefault`` when there is none), the value, the flag version from the flag
metadata ``version`` and ``default: false``; ``error`` records the default value with
``default: true``. :class:`FlagsinkTrackingProvider` routes ``client.track(...)`` to
:meth:`flagsink.Pipeline.track`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from openfeature.evaluation_context import EvaluationContext
from openfeature.flag_evaluation import FlagEvaluationDetails, FlagResolutionDetails
from openfeature.hook import Hook, HookContext, HookHints
from openfeature.provider import AbstractProvider, FeatureProvider, Metadata
from openfeature.track import TrackingEventDetails

from flagsink.event import ANONYMOUS_USER, SDK_DEFAULT, USER, FeatureEvent, _now

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from openfeature.event import ProviderEvent, ProviderEventDetails

    from flagsink.pipeline import Pipeline

__all__ = ["FlagsinkHook", "FlagsinkTrackingProvider"]

logger = logging.getLogger("flagsink.openfeature")

_UNTRACKED = (False, "false")


class FlagsinkHook(Hook):
    """Records a GO Feature Flag-shaped FeatureEvent for every evaluation.

    :param pipeline: where the events go (``flagsink.from_config(...)``).
    :param metadata: static values added to every event's ``metadata``.
    :param context_attributes: names of evaluation-context attributes copied into
        ``metadata`` when present. Only these: the context may hold personal data.
    :param source: the events' ``source`` field.

    Flags whose flag metadata says ``trackEvents: false`` are not recorded. The hook never
    raises into the application (failures are counted in :attr:`errors` and logged once)
    and never blocks: it only appends to the pipeline's in-memory buffers.
    """

    def __init__(
        self,
        pipeline: Pipeline,
        *,
        metadata: Mapping[str, Any] | None = None,
        context_attributes: Iterable[str] = (),
        source: str = "SERVER",
    ) -> None:
        self.pipeline = pipeline
        self._add = pipeline.add_event
        # Shared by reference between events, which never mutate it.
        self._static: dict[str, Any] | None = dict(metadata) if metadata else None
        self._attributes = tuple(context_attributes)
        self._source = source
        #: Evaluations the hook failed to record (the application never sees the error).
        self.errors = 0

    def _metadata(self, context: EvaluationContext) -> dict[str, Any] | None:
        static = self._static
        attributes = context.attributes
        result: dict[str, Any] | None = None
        for name in self._attributes:
            if name in attributes:
                if result is None:
                    result = static.copy() if static else {}
                result[name] = attributes[name]
        return static if result is None else result

    def _user(self, context: EvaluationContext) -> tuple[str, str]:
        key = context.targeting_key
        if type(key) is not str:
            key = "" if key is None else str(key)
        attributes = context.attributes
        anonymous = attributes.get("anonymous") is True if attributes else False
        return key, (ANONYMOUS_USER if anonymous else USER)

    def after(
        self,
        hook_context: HookContext,
        details: FlagEvaluationDetails[Any],
        hints: HookHints,
    ) -> None:
        """Record a successful evaluation (``default: false``)."""
        try:
            flag_metadata = details.flag_metadata
            version = ""
            if flag_metadata:
                if flag_metadata.get("trackEvents", True) in _UNTRACKED:
                    return
                found = flag_metadata.get("version")
                if found is not None:
                    version = str(found)
            context = hook_context.evaluation_context
            user_key, context_kind = self._user(context)
            # Built directly (as new_feature_event would): this runs on every evaluation.
            self._add(
                FeatureEvent(
                    context_kind,
                    user_key,
                    _now(),
                    hook_context.flag_key,
                    details.variant or SDK_DEFAULT,
                    details.value,
                    False,
                    version,
                    self._source,
                    self._metadata(context) if self._attributes else self._static,
                )
            )
        except Exception:
            self._failed()

    def error(self, hook_context: HookContext, exception: Exception, hints: HookHints) -> None:
        """Record a failed evaluation: the default value, ``default: true``."""
        try:
            context = hook_context.evaluation_context
            user_key, context_kind = self._user(context)
            self._add(
                FeatureEvent(
                    context_kind,
                    user_key,
                    _now(),
                    hook_context.flag_key,
                    SDK_DEFAULT,
                    hook_context.default_value,
                    True,
                    "",
                    self._source,
                    self._metadata(context),
                )
            )
        except Exception:
            self._failed()

    def _failed(self) -> None:
        self.errors += 1
        if self.errors == 1:
            logger.exception("flagsink hook could not record an evaluation (logged once)")


class FlagsinkTrackingProvider(AbstractProvider):
    """Wraps a provider so ``client.track(name, context, details)`` reaches
    :meth:`flagsink.Pipeline.track` (and still the wrapped provider's own ``track``).

    Everything else (evaluation, hooks, status, events) is the wrapped provider's::

        api.set_provider(FlagsinkTrackingProvider(MyProvider(...), pipeline))
    """

    def __init__(self, provider: FeatureProvider, pipeline: Pipeline) -> None:
        super().__init__()
        self.provider = provider
        self.pipeline = pipeline
        #: Tracking calls the pipeline failed to record.
        self.errors = 0

    def track(
        self,
        tracking_event_name: str,
        evaluation_context: EvaluationContext | None = None,
        tracking_event_details: TrackingEventDetails | None = None,
    ) -> None:
        try:
            self.pipeline.track(
                tracking_event_name,
                evaluation_context or EvaluationContext(),
                tracking_event_details,
            )
        except Exception:
            self.errors += 1
            logger.exception("flagsink could not record tracking event %r", tracking_event_name)
        self.provider.track(tracking_event_name, evaluation_context, tracking_event_details)

    # -- delegation -----------------------------------------------------------------------

    def attach(
        self,
        on_emit: Callable[[FeatureProvider, ProviderEvent, ProviderEventDetails], None],
    ) -> None:
        super().attach(on_emit)
        # Events the wrapped provider emits are reported as this provider's.
        self.provider.attach(lambda _provider, event, details: on_emit(self, event, details))

    def detach(self) -> None:
        super().detach()
        self.provider.detach()

    def initialize(self, evaluation_context: EvaluationContext) -> None:
        self.provider.initialize(evaluation_context)

    def shutdown(self) -> None:
        self.provider.shutdown()

    def get_metadata(self) -> Metadata:
        return self.provider.get_metadata()

    def get_provider_hooks(self) -> list[Hook]:
        return self.provider.get_provider_hooks()

    def resolve_boolean_details(
        self,
        flag_key: str,
        default_value: bool,
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[bool]:
        return self.provider.resolve_boolean_details(flag_key, default_value, evaluation_context)

    def resolve_string_details(
        self,
        flag_key: str,
        default_value: str,
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[str]:
        return self.provider.resolve_string_details(flag_key, default_value, evaluation_context)

    def resolve_integer_details(
        self,
        flag_key: str,
        default_value: int,
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[int]:
        return self.provider.resolve_integer_details(flag_key, default_value, evaluation_context)

    def resolve_float_details(
        self,
        flag_key: str,
        default_value: float,
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[float]:
        return self.provider.resolve_float_details(flag_key, default_value, evaluation_context)

    def resolve_object_details(
        self,
        flag_key: str,
        default_value: Sequence[Any] | Mapping[str, Any],
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[Sequence[Any] | Mapping[str, Any]]:
        return self.provider.resolve_object_details(flag_key, default_value, evaluation_context)

    async def resolve_boolean_details_async(
        self,
        flag_key: str,
        default_value: bool,
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[bool]:
        return await self.provider.resolve_boolean_details_async(
            flag_key, default_value, evaluation_context
        )

    async def resolve_string_details_async(
        self,
        flag_key: str,
        default_value: str,
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[str]:
        return await self.provider.resolve_string_details_async(
            flag_key, default_value, evaluation_context
        )

    async def resolve_integer_details_async(
        self,
        flag_key: str,
        default_value: int,
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[int]:
        return await self.provider.resolve_integer_details_async(
            flag_key, default_value, evaluation_context
        )

    async def resolve_float_details_async(
        self,
        flag_key: str,
        default_value: float,
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[float]:
        return await self.provider.resolve_float_details_async(
            flag_key, default_value, evaluation_context
        )

    async def resolve_object_details_async(
        self,
        flag_key: str,
        default_value: Sequence[Any] | Mapping[str, Any],
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[Sequence[Any] | Mapping[str, Any]]:
        return await self.provider.resolve_object_details_async(
            flag_key, default_value, evaluation_context
        )
