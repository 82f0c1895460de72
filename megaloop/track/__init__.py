"""Experiment tracking: the only room that talks to MLflow (imported where it is used, so that
importing this room does not load it)."""

from megaloop.track.mlflow_tracker import (
    DEFAULT_TRACKING_URI,
    NullTracker,
    Tracker,
    open_tracker,
    run_params,
    run_tags,
    tracking_uri,
)
from megaloop.track.names import Metric, Tag
from megaloop.track.runs import find_runs

__all__ = [
    "DEFAULT_TRACKING_URI",
    "Metric",
    "Tag",
    "NullTracker",
    "Tracker",
    "find_runs",
    "open_tracker",
    "run_params",
    "run_tags",
    "tracking_uri",
]
