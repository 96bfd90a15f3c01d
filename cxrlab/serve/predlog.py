"""Append-only SQLite log of the service's predictions (never the image itself).

Each row: ISO-8601 UTC time, endpoint (`predict` / `explain`), the upload's SHA-256, the model
id, the predicted class and the class probabilities as JSON. The database runs in WAL mode; every
write opens its own short connection under a process-wide lock, and `busy_timeout` lets several
server processes (`--workers`) share one file, so concurrent requests never lose or tear a row.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from datetime import datetime, timezone
from pathlib import Path

from cxrlab.errors import CxrlabError

DEFAULT_LOG_DB = "cxrlab_predictions.sqlite"
_SCHEMA = """CREATE TABLE IF NOT EXISTS predictions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    model TEXT NOT NULL,
    predicted TEXT NOT NULL,
    probabilities TEXT NOT NULL
)"""
_COLUMNS = ("id", "time", "endpoint", "sha256", "model", "predicted", "probabilities")


class PredictionLog:
    """The prediction log at `path` (created with its table on first use).

    Args:
        path: SQLite file; its folder is created if missing.
        create: False to open an existing log for reading only (`cxrlab history`): nothing is created or changed.

    Raises:
        CxrlabError: `path` is a folder, not an SQLite database, or cannot be written (`create`) / read.
    """

    def __init__(self, path: str | Path = DEFAULT_LOG_DB, create: bool = True):
        self.path = Path(path)
        self._lock = threading.Lock()
        if self.path.is_dir():
            raise CxrlabError(f"--log-db {self.path} is a folder; pass a file, e.g. "
                              f"--log-db {self.path / DEFAULT_LOG_DB}")
        try:
            if create:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with self._connect() as con:
                    con.execute("PRAGMA journal_mode=WAL")
                    con.execute(_SCHEMA)
            self.count()
        except (sqlite3.Error, OSError) as exc:
            raise CxrlabError(_open_error(self.path, exc, create)) from exc

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        con.execute("PRAGMA busy_timeout=30000")
        return con

    def append(self, endpoint: str, sha256: str, model: str, predicted: str, probabilities: dict[str, float]) -> int:
        """Add one entry (committed before returning).

        Returns:
            The new row id.
        """
        row = (datetime.now(timezone.utc).isoformat(timespec="milliseconds"), endpoint, sha256, model, predicted,
               json.dumps({k: float(v) for k, v in probabilities.items()}))
        with self._lock:
            con = self._connect()
            try:
                with con:
                    cur = con.execute("INSERT INTO predictions (time, endpoint, sha256, model, predicted, probabilities) "
                                      "VALUES (?, ?, ?, ?, ?, ?)", row)
                return int(cur.lastrowid)
            finally:
                con.close()

    def recent(self, limit: int = 50) -> list[dict]:
        """The newest `limit` entries, newest first, probabilities decoded."""
        con = self._connect()
        try:
            rows = con.execute(f"SELECT {', '.join(_COLUMNS)} FROM predictions ORDER BY id DESC LIMIT ?",
                               (int(limit),)).fetchall()
        finally:
            con.close()
        out = [dict(zip(_COLUMNS, r)) for r in rows]
        for r in out:
            r["probabilities"] = json.loads(r["probabilities"])
        return out

    def count(self) -> int:
        """Number of entries."""
        con = self._connect()
        try:
            return int(con.execute("SELECT COUNT(*) FROM predictions").fetchone()[0])
        finally:
            con.close()


def _open_error(path: Path, exc: Exception, create: bool) -> str:
    reason = str(exc)
    if "not a database" in reason or "no such table" in reason:
        what = f"--log-db {path} is not a cxrlab prediction log ({reason})"
        if create:
            return f"{what}; the server does not overwrite it: pass a new file name or an existing log with --log-db PATH"
        return f"{what}: pass the file that `cxrlab serve --log-db` wrote"
    if create:
        return f"cannot write the prediction log --log-db {path}: {reason}. Pass a writable file with --log-db PATH"
    return f"cannot read the prediction log --log-db {path}: {reason}. Check the file's permissions"


def open_existing(path: str | Path) -> PredictionLog:
    """Open a log for reading (nothing is created or changed), with a clear error when it does not exist."""
    if not Path(path).exists():
        raise CxrlabError(f"no prediction log at {path}. Pass the file the service writes with --log-db PATH "
                          f"(default ./{DEFAULT_LOG_DB} in the folder where `cxrlab serve` ran)")
    return PredictionLog(path, create=False)
