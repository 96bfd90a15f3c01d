"""Web service and page for a checkpoint: `create_app` (FastAPI) and the SQLite prediction log.

Importing this package is cheap; `cxrlab.serve.app` pulls in FastAPI and torch.
"""

from __future__ import annotations

from cxrlab.serve.predlog import DEFAULT_LOG_DB, PredictionLog

__all__ = ["DEFAULT_LOG_DB", "PredictionLog", "create_app"]


def create_app(*args, **kwargs):
    """See `cxrlab.serve.app.create_app` (imported lazily)."""
    from cxrlab.serve.app import create_app as _create_app

    return _create_app(*args, **kwargs)
