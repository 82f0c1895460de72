"""Experiment tracking: the only room that talks to MLflow (imported lazily, so this is cheap)."""

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
