"""Which MLflow tracking server a CLI command talks to: the one named, else $MLFLOW_TRACKING_URI,
else the running local stack's. The one place that choice is made (`platformctl models`, `serve
deploy`, `spec resolve`)."""

from __future__ import annotations


def tracking_uri_for(given: str | None = None) -> str:
    """`given` (a --tracking-uri flag or a spec's tracking_uri), else $MLFLOW_TRACKING_URI, else the
    running local stack's server; raises StackError naming how to start one when there is none."""
    if given:
        return given
    from llmplatform.stack import tracking_uri

    return tracking_uri()
