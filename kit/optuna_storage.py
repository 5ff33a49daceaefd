"""The Optuna RDB storage that `kit tune` and `kit ensemble --storage` share between processes.

    storage = open_storage("sqlite:///tune.db", heartbeats=True)   # or postgresql://..., mysql://...

Any failure to reach the database is one KitError naming the URL (without its password).

SQLite needs one repair. Optuna hands a queued (enqueue_trial) trial to the process that moves it from
WAITING to RUNNING, reading its state with SELECT ... FOR UPDATE; SQLite ignores FOR UPDATE and Python's
sqlite3 opens its transaction only at the UPDATE, so two processes could both read WAITING, both run the
trial, and the later one fail with "Cannot tell a COMPLETE trial" (optuna/optuna#4621; it failed CI).
Every transaction here starts with BEGIN IMMEDIATE instead, which takes SQLite's write lock before the
read: the second process waits, then reads RUNNING and takes the next trial.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

from kit.errors import KitError

HEARTBEAT_S, GRACE_S = 30, 120
SQLITE_BUSY_S = 60  # how long a process waits for another's write lock


def redact(url: str) -> str:
    """The storage URL without its password (it goes into messages and summary.json)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1]


def open_storage(url: str, heartbeats: bool, attempts: int = 5):
    """Optuna's RDB storage at `url`; with `heartbeats`, a trial of a killed process is failed after a
    grace period and queued again with its parameters.

    Processes that open a new SQLite database together race to write its schema; the losers find it
    written when they try again."""
    import optuna
    from sqlalchemy.exc import ArgumentError, DBAPIError, SQLAlchemyError

    shown = redact(url)
    sqlite = url.startswith("sqlite")
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        if path.name != ":memory:" and not path.parent.is_dir():
            raise KitError(f"--storage {shown}: folder {path.parent} does not exist")
    # isolation_level None: sqlite3 opens no transaction of its own, the "begin" hook below opens them all
    engine = {"connect_args": {"timeout": SQLITE_BUSY_S, "isolation_level": None}} if sqlite else {}
    for attempt in range(attempts):
        try:
            with warnings.catch_warnings():  # heartbeats and retries are "experimental" since Optuna 2.8
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = optuna.storages.RDBStorage(url, engine_kwargs=engine, **_heartbeat_kwargs(heartbeats))
            if sqlite:
                _begin_immediate(storage.engine)
            return storage
        except ArgumentError as e:
            raise KitError(f"--storage {shown}: not a database URL ({_first_line(e)})") from None
        except ImportError as e:
            raise KitError(f"--storage {shown}: its database driver is not installed ({_first_line(e)})") from None
        except DBAPIError as e:
            if attempt == attempts - 1 or e.connection_invalidated:
                raise KitError(f"--storage {shown}: cannot open it ({_first_line(e.orig or e)})") from None
            time.sleep(0.2 * (attempt + 1))
        except (SQLAlchemyError, ValueError) as e:
            raise KitError(f"--storage {shown}: cannot open it ({_first_line(e)})") from None
    raise AssertionError("unreachable")


def _begin_immediate(engine) -> None:
    """Every transaction on `engine` takes SQLite's write lock first (the SQLAlchemy pysqlite recipe)."""
    from sqlalchemy import event

    event.listen(engine, "begin", lambda connection: connection.exec_driver_sql("BEGIN IMMEDIATE"))


def _heartbeat_kwargs(heartbeats: bool) -> dict:
    if not heartbeats:
        return {}
    retry, kwarg = _retry_callback()
    return {"heartbeat_interval": HEARTBEAT_S, "grace_period": GRACE_S, kwarg: retry(max_retry=2)}


def _retry_callback():
    """Optuna 4.9 renamed the callback that queues a stale trial again."""
    import optuna.storages as storages

    if hasattr(storages, "RetryHeartbeatStaleTrialCallback"):
        return storages.RetryHeartbeatStaleTrialCallback, "heartbeat_stale_trial_callback"
    return storages.RetryFailedTrialCallback, "failed_trial_callback"


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
