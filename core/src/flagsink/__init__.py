"""flagsink: export feature-flag evaluation events to where you keep data.

The public API: the event model, the exporter contract, the scheduler, pipelines built
from config, and the pluggy markers plugins use (``@flagsink.hookimpl``).
"""

from flagsink.config import Config, ConfigError, load_config
from flagsink.event import (
    Event,
    FeatureEvent,
    TrackingEvent,
    new_feature_event,
    new_tracking_event,
)
from flagsink.exporter import (
    Exporter,
    ExportError,
    ExporterSettings,
    PartialExportError,
    PermanentExportError,
    SettingsError,
)
from flagsink.hookspecs import hookimpl, hookspec
from flagsink.pipeline import Pipeline, from_config
from flagsink.plugins import core_version
from flagsink.scheduler import DataExporterScheduler, SchedulerStats

__version__ = core_version()

__all__ = [
    "Config",
    "ConfigError",
    "DataExporterScheduler",
    "Event",
    "ExportError",
    "Exporter",
    "ExporterSettings",
    "FeatureEvent",
    "PartialExportError",
    "PermanentExportError",
    "Pipeline",
    "SchedulerStats",
    "SettingsError",
    "TrackingEvent",
    "__version__",
    "from_config",
    "hookimpl",
    "hookspec",
    "load_config",
    "new_feature_event",
    "new_tracking_event",
]
