"""ISPyB for the local Zocalo.

One ISPyB database, an SQLite file (the embedded default) or MariaDB, holding
the real ISPyB tables a grid scan needs, written and read through the
``ispyb`` package's SQLAlchemy models:

* :class:`Ispyb` registers grid scans as Diamond's beamlines do
  (:meth:`Ispyb.add_scan`) and answers what a Zocalo dispatcher's ISPyB filter
  adds to a message's parameters for a DCID (:meth:`Ispyb.parameters`);
* :func:`ispyb_dc_info` and :func:`ispyb_dcg_dcids` are those dispatcher
  filters, reading the database that :func:`database_url` names.

SQLAlchemy and ``ispyb`` are imported on first use, not with this module: the
filters are installed as entry points for every Zocalo dispatcher on the
machine, and a dispatcher that has no ISPyB configured must still start.
"""

from __future__ import annotations

import configparser
import contextlib
import datetime
import decimal
import functools
import itertools
import logging
import os
import secrets
import threading
import time
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from ..grid import GridInfo
from .._text import quoted

if TYPE_CHECKING:
    import sqlalchemy
    from sqlalchemy.orm import Session

log = logging.getLogger(__name__)

#: The environment variable naming the database (an SQLAlchemy URL) when :func:`configure` has not.
ENV_URL = "ZOCALO_XRC_ISPYB"
#: ispyb's own credentials file (``[ispyb_sqlalchemy]`` section), the facility's way.
ENV_CREDENTIALS = "ISPYB_CREDENTIALS"

#: The ISPyB keys of one grid, as ``GridInfo.to_ispyb()`` gives them and the GridInfo table holds them.
GRID_KEYS = (
    "steps_x", "steps_y", "dx_mm", "dy_mm", "micronsPerPixelX", "micronsPerPixelY",
    "snapshot_offsetXPixel", "snapshot_offsetYPixel", "snaked", "orientation",
)

#: The tables :meth:`Ispyb.add_scan` writes; :meth:`Ispyb.create_schema` creates
#: them and every table their foreign keys reach.
TABLES = ("Person", "Proposal", "BLSession", "DataCollectionGroup", "DataCollection", "GridInfo")

#: How long an SQLite connection waits for another process's write lock, in seconds.
SQLITE_BUSY_TIMEOUT_S = 30.0
#: How long a dispatcher filter holds one request while ISPyB is unreachable,
#: in seconds, before it gives the request back to the Dispatcher (which then
#: requeues it, counted against the queue's delivery limit).
UNREACHABLE_WAIT_S = 120.0
#: The pauses between a waiting filter's attempts, in seconds (then the last, again and again).
UNREACHABLE_RETRY_S = (0.5, 1.0, 2.0, 4.0, 5.0)

#: The proposal code of the local proposals: commissioning, one per beamline.
PROPOSAL_CODE = "cm"
#: The Person every local proposal belongs to.
PERSON_LOGIN = "zocalo-xrc"
#: What a registered data collection's runStatus says.
RUN_STATUS = "DataCollection Successful"

_ATTEMPTS = 5  # add_scan's transactions, when other processes make the same beamline's session at once
_WRITE = "zocalo_xrc_ispyb_write"  # an execution option: this transaction writes (SQLite: BEGIN IMMEDIATE)


# ---- errors -----------------------------------------------------------------


class IspybError(RuntimeError):
    """A database could not be used: unreachable, no ISPyB tables, bad credentials file, ..."""


class IspybUnreachableError(IspybError):
    """The database server did not answer: refused, gone away, shutting down, busy (SQLite: locked)."""


class IspybNotConfiguredError(IspybError):
    """No ISPyB database is configured for this process."""


class UnknownDcidError(IspybError, LookupError):
    """The database has no data collection with this DCID."""

    def __init__(self, dcid: int, database: str) -> None:
        super().__init__(f"ISPyB has no data collection {dcid} (DCID) in {database}")
        self.dcid = dcid


# ---- the database -------------------------------------------------------------


@dataclass(frozen=True)
class RegisteredScan:
    """What :meth:`Ispyb.add_scan` registered: the group, one DCID per grid in
    grid order (ascending), and the beamline's visit."""

    dcgid: int
    dcids: tuple[int, ...]
    beamline: str
    visit: str


class Ispyb:
    """A handle on one ISPyB database, given an SQLAlchemy URL:
    ``sqlite:///path/ispyb.db`` or ``mysql+pymysql://user:password@host:port/db``.

    Each call uses a session of its own, so one handle serves several threads;
    an SQLite file serves several processes (writers wait for each other up to
    :data:`SQLITE_BUSY_TIMEOUT_S`). The URL's password never appears in
    ``repr``, logs or errors: :attr:`url` is the URL with it hidden."""

    def __init__(self, url: str) -> None:
        _sqlalchemy()  # a clear message if SQLAlchemy is missing
        import sqlalchemy as sa
        from sqlalchemy import event
        from sqlalchemy.exc import ArgumentError

        try:
            parsed = sa.engine.make_url(url)
        except (ArgumentError, ValueError, TypeError):
            del url  # it may hold a password: not in the error, not in a traceback's locals
            raise ValueError(
                "ISPyB: not an SQLAlchemy database URL (expected sqlite:///path/ispyb.db "
                "or mysql+pymysql://user:password@host:port/database)"
            ) from None
        del url
        #: The database's URL with the password hidden, for people.
        self.url: str = parsed.render_as_string(hide_password=True)
        backend = parsed.get_backend_name()
        if backend == "sqlite":
            if parsed.database in (None, "", ":memory:") or (parsed.database or "").startswith("file::memory:"):
                raise ValueError(f"ISPyB: {self.url}: an SQLite database must be a file (sqlite:///path/ispyb.db)")
            engine = sa.create_engine(parsed, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})
            event.listen(engine, "connect", _sqlite_connect)
            event.listen(engine, "begin", _sqlite_begin)
        elif backend in ("mysql", "mariadb"):
            try:
                engine = sa.create_engine(parsed, pool_pre_ping=True, pool_recycle=3600)
            except ImportError as e:  # mysql:// means MySQLdb, which is not installed: name the one that is
                raise ValueError(f"ISPyB: {self.url}: no database driver {e.name or ''} here; "
                                 "use mysql+pymysql://user:password@host:port/database") from None
        else:
            raise ValueError(f"ISPyB: {self.url}: unsupported database {backend!r} (use sqlite or mysql+pymysql)")
        self._engine: sqlalchemy.Engine = engine
        self._writer: sqlalchemy.Engine = engine.execution_options(**{_WRITE: True})

    def __repr__(self) -> str:
        return f"Ispyb({self.url!r})"

    def __enter__(self) -> Ispyb:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the pooled connections (the handle reconnects if used again)."""
        self._engine.dispose()

    @property
    def engine(self) -> sqlalchemy.Engine:
        """The SQLAlchemy engine, for reading or writing other ISPyB rows
        through the models (SQLite: foreign keys on, WAL, busy timeout)."""
        return self._engine

    @property
    def dialect(self) -> str:
        """``"sqlite"`` or ``"mysql"`` (also for MariaDB)."""
        return str(self._engine.dialect.name)

    # ---- schema ----

    def create_schema(self) -> None:
        """Create the ISPyB tables :data:`TABLES` and every table their foreign
        keys reach (39 of ISPyB's ~200), from ``ispyb.sqlalchemy``'s models;
        tables already there are left as they are. On MariaDB the models are
        created as they are; on SQLite from a copy that swaps MySQL-only types
        and defaults for SQLite's (see :func:`sqlite_tables`).
        Safe to race: on SQLite, processes creating the tables (and making the
        new file WAL) take turns, by a lock on ``<file>.lock``; on MariaDB, a
        table another process created between the check and the CREATE is
        found on a second pass."""
        tables = sqlite_tables() if self.dialect == "sqlite" else schema_tables()
        for attempt in range(1, _ATTEMPTS + 1):
            try:
                with self._errors("creating the ISPyB tables"), self._schema_lock():
                    with self._writer.begin() as conn:
                        for table in tables:  # in dependency order
                            table.create(conn, checkfirst=True)
                return
            except IspybError as e:
                if attempt < _ATTEMPTS and _mysql_code(e.__cause__) == 1050:  # MySQL: table already exists
                    continue
                raise

    @contextlib.contextmanager
    def _schema_lock(self) -> Iterator[None]:
        """SQLite: the other processes' schema creation waits (an flock on ``<file>.lock``)."""
        database = self._engine.url.database if self.dialect == "sqlite" else None
        if not database:
            yield
            return
        import fcntl

        with open(f"{database}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    # ---- writing ----

    def add_scan(
        self,
        *,
        beamline: str,
        grids: Sequence[Mapping[str, Any]],
        experiment_type: str,
        sample_id: int | None,
        image_directory: str,
        file_template: str,
        start_frames: Sequence[int] | None = None,
    ) -> RegisteredScan:
        """Register one grid scan as Diamond's beamlines do, in one transaction:
        a DataCollectionGroup (``experiment_type``: ``"Mesh3D"`` for a 3D scan
        of two grids, ``"Mesh"`` for 2D) in the beamline's session, and per
        grid a DataCollection and its GridInfo row.

        Each of ``grids`` holds exactly the ISPyB keys :data:`GRID_KEYS` (as
        ``GridInfo.to_ispyb()`` gives them). The first beamline scan makes the
        beamline's proposal and session (visit ``cm0000N-1``), reused after.
        ``start_frames`` are the data collections' startImageNumber (1-based);
        by default the grids follow each other in one file (1, 1 + the first
        grid's images, ...). The sample id is stored in DataCollection.BLSAMPLEID,
        which has no foreign key in ISPyB's schema; the group's blSampleId (a
        foreign key to BLSample) stays NULL. Bad arguments raise ``ValueError``
        naming what is wrong."""
        checked = _check_grids(grids)
        starts = _start_numbers(start_frames, checked)
        _check_text("beamline", beamline, 45)
        _check_text("image_directory", image_directory, 255)
        _check_text("file_template", file_template, 255)
        _check_experiment_type(experiment_type)
        if sample_id is not None and (isinstance(sample_id, bool) or not isinstance(sample_id, int) or sample_id < 1):
            raise ValueError(f"add_scan: sample_id must be a positive whole number or None, got {quoted(sample_id)}")
        import sqlalchemy as sa
        m = _models()
        now = datetime.datetime.now().replace(microsecond=0)
        for attempt in range(1, _ATTEMPTS + 1):
            try:
                with self._errors(f"registering a scan on {beamline}"), self._session(write=True) as s, s.begin():
                    session_id, visit = _beamline_session(s, beamline, now)
                    run = 1 + (s.scalar(
                        sa.select(sa.func.count()).select_from(m.DataCollectionGroup)
                        .where(m.DataCollectionGroup.sessionId == session_id)) or 0)
                    dcg = m.DataCollectionGroup(sessionId=session_id, experimentType=experiment_type, startTime=now,
                                                comments="zocalo-xrc local ISPyB",
                                                dataCollectionGroupId=_first_id(s, m.DataCollectionGroup))
                    s.add(dcg)
                    s.flush()
                    dcids: list[int] = []
                    for i, (grid, start) in enumerate(zip(checked, starts)):
                        dc = m.DataCollection(
                            dataCollectionGroupId=dcg.dataCollectionGroupId, SESSIONID=session_id,
                            BLSAMPLEID=sample_id, dataCollectionNumber=run, experimenttype=experiment_type[:24],
                            startTime=now, runStatus=RUN_STATUS,
                            axisStart=90.0 * i, axisEnd=90.0 * i, axisRange=0.0, overlap=0.0,
                            numberOfImages=grid.image_count, startImageNumber=start, numberOfPasses=1,
                            imageDirectory=image_directory, fileTemplate=file_template,
                            dataCollectionId=_first_id(s, m.DataCollection),
                        )
                        s.add(dc)
                        s.flush()
                        dcids.append(dc.dataCollectionId)
                        s.add(m.GridInfo(dataCollectionId=dc.dataCollectionId, **_grid_columns(grid)))
                    s.flush()
                    return RegisteredScan(int(dcg.dataCollectionGroupId), tuple(int(d) for d in dcids), beamline, visit)
            except IspybError as e:
                # Another process made this beamline's session (or the Person) at
                # the same moment (a duplicate key, or MariaDB's deadlock): a
                # new transaction finds and reuses theirs.
                if attempt < _ATTEMPTS and _is_conflict(e.__cause__):
                    log.info("ISPyB %s: retrying a scan registration on %s after a conflict", self.url, beamline)
                    continue
                raise
        raise AssertionError("unreachable")

    # ---- reading ----

    def parameters(self, dcid: int) -> dict[str, Any]:
        """What a Zocalo dispatcher's ISPyB filter adds for ``dcid`` (Diamond's
        ispybtbx is the model), JSON-serialisable:

        ``ispyb_dcid``, ``ispyb_dcgid``, ``ispyb_beamline``, ``ispyb_visit``,
        ``ispyb_dcg_experiment_type``, ``ispyb_image_directory``,
        ``ispyb_image_template``, ``ispyb_sample_id``, ``ispyb_number_of_images``,
        ``ispyb_start_image_number``; ``ispyb_dc_info``, the DataCollection
        row's non-null columns by ISPyB name plus ``"gridinfo"``, the grid's
        ISPyB keys (its GridInfo row found by DCID, else one of the group's;
        ``{}`` when there is none); and ``ispyb_dcg_dcids``, the group's other
        DCIDs, ascending. An unknown DCID raises :class:`UnknownDcidError`."""
        return self._lookup(dcid, info=True, group=True)

    def _lookup(self, dcid: int, *, info: bool, group: bool) -> dict[str, Any]:
        if isinstance(dcid, bool) or not isinstance(dcid, int):
            raise ValueError(f"ISPyB: a DCID must be a whole number, got {quoted(dcid)}")
        import sqlalchemy as sa
        m = _models()
        DC, DCG, S, P = m.DataCollection, m.DataCollectionGroup, m.BLSession, m.Proposal
        out: dict[str, Any] = {}
        with self._errors(f"looking up DCID {dcid}"), self._session() as s, s.begin():
            dc = s.execute(sa.select(DC.__table__).where(DC.dataCollectionId == dcid)).mappings().first()
            if dc is None:
                raise UnknownDcidError(dcid, self.url)
            dcgid = dc["dataCollectionGroupId"]
            if info:
                where = s.execute(
                    sa.select(DCG.experimentType, DCG.blSampleId, S.beamLineName, S.visit_number,
                              P.proposalCode, P.proposalNumber)
                    .select_from(DCG)
                    .outerjoin(S, S.sessionId == DCG.sessionId)
                    .outerjoin(P, P.proposalId == S.proposalId)
                    .where(DCG.dataCollectionGroupId == dcgid)
                ).first()
                experiment_type, group_sample, beamline, visit_number, code, number = (
                    tuple(where) if where is not None else (None,) * 6)
                sample = dc["BLSAMPLEID"] if dc["BLSAMPLEID"] is not None else group_sample
                dc_info = {k: _json(v) for k, v in dc.items() if v is not None}
                dc_info["gridinfo"] = _gridinfo(s, dcid, dcgid)
                out.update(
                    ispyb_dcid=dcid,
                    ispyb_dcgid=_int(dcgid),
                    ispyb_beamline=beamline,
                    ispyb_visit=f"{code}{number}-{visit_number}" if None not in (code, number, visit_number) else None,
                    ispyb_dcg_experiment_type=experiment_type,
                    ispyb_image_directory=dc["imageDirectory"],
                    ispyb_image_template=dc["fileTemplate"],
                    ispyb_sample_id=_int(sample),
                    ispyb_number_of_images=_int(dc["numberOfImages"]),
                    ispyb_start_image_number=_int(dc["startImageNumber"]),
                    ispyb_dc_info=dc_info,
                )
            if group:
                others = s.scalars(
                    sa.select(DC.dataCollectionId)
                    .where(DC.dataCollectionGroupId == dcgid, DC.dataCollectionId != dcid)
                    .order_by(DC.dataCollectionId)
                )
                out["ispyb_dcg_dcids"] = [int(d) for d in others]
        return out

    # ---- plumbing ----

    def _session(self, *, write: bool = False) -> Session:
        from sqlalchemy.orm import Session

        return Session(self._writer if write else self._engine, expire_on_commit=False)

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Database errors as :class:`IspybError`: what was being done, where
        (password hidden) and the driver's reason (no statement, no URL)."""
        from sqlalchemy.exc import DBAPIError, DisconnectionError, SQLAlchemyError
        from sqlalchemy.exc import TimeoutError as PoolTimeoutError

        try:
            yield
        except DBAPIError as e:
            reason = str(e.orig) if e.orig is not None else type(e).__name__
            kind = IspybUnreachableError if _is_unreachable(e) else IspybError
            raise kind(f"ISPyB {self.url}: {what} failed: {reason}") from e
        except (DisconnectionError, PoolTimeoutError) as e:
            raise IspybUnreachableError(f"ISPyB {self.url}: {what} failed: {e}") from e
        except SQLAlchemyError as e:
            raise IspybError(f"ISPyB {self.url}: {what} failed: {e}") from e


# ---- the schema ---------------------------------------------------------------


@functools.cache
def schema_tables() -> tuple[sqlalchemy.Table, ...]:
    """The models' tables :meth:`Ispyb.create_schema` makes: :data:`TABLES`
    and every table their foreign keys reach, in dependency order."""
    metadata = _models().Base.metadata
    needed: set[str] = set()
    todo = list(TABLES)
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo.extend(fk.column.table.name for fk in metadata.tables[name].foreign_keys)
    return tuple(t for t in metadata.sorted_tables if t.name in needed)


@functools.cache
def sqlite_tables() -> tuple[sqlalchemy.Table, ...]:
    """:func:`schema_tables` for SQLite: copies in a MetaData of their own
    whose MySQL-only column types (TINYINT, MEDIUMINT, LONGTEXT, ...) are
    SQLite's, whose MySQL-only server defaults (``current_timestamp()``,
    ``... ON UPDATE current_timestamp()``, ``current_user()``) are SQLite's or
    gone, and whose index names start with their table's (SQLite's index
    names are per database, MySQL's per table). The models themselves, and so
    MySQL, are untouched."""
    import sqlalchemy as sa
    from sqlalchemy.dialects import mysql
    from sqlalchemy.sql.elements import TextClause, quoted_name

    swap: dict[type, Any] = {
        mysql.TINYINT: sa.Integer, mysql.SMALLINT: sa.Integer, mysql.MEDIUMINT: sa.Integer,
        mysql.INTEGER: sa.Integer, mysql.BIGINT: sa.Integer,
        mysql.TINYTEXT: sa.Text, mysql.MEDIUMTEXT: sa.Text, mysql.LONGTEXT: sa.Text,
        mysql.TINYBLOB: sa.LargeBinary, mysql.MEDIUMBLOB: sa.LargeBinary, mysql.LONGBLOB: sa.LargeBinary,
    }
    metadata = sa.MetaData()
    copies = []
    for table in schema_tables():
        copy = table.to_metadata(metadata)
        for column in copy.columns:
            if type(column.type) in swap:
                column.type = swap[type(column.type)]()
            default = column.server_default
            if isinstance(default, sa.DefaultClause) and isinstance(default.arg, TextClause):
                text = default.arg.text.strip().lower()
                if text.startswith("current_timestamp"):
                    column.server_default = sa.DefaultClause(sa.text("CURRENT_TIMESTAMP"))
                elif text.endswith("()"):  # current_user() and other MySQL functions
                    column.server_default = None
        for index in copy.indexes:  # SQLite's index names are per database, MySQL's per table
            index.name = quoted_name(f"{copy.name}_{index.name}", None)
        copies.append(copy)
    return tuple(copies)


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # SQLAlchemy's recipe for pysqlite: the driver's own transaction handling
    # off, BEGIN emitted by _sqlite_begin; foreign keys enforced as on MariaDB;
    # WAL so that readers in other processes do not wait for a writer.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.execute("PRAGMA journal_mode = WAL")
    finally:
        cursor.close()


def _sqlite_begin(conn: Any) -> None:
    # A writing transaction takes SQLite's write lock at once (waiting for
    # another writer up to the busy timeout) rather than failing when it
    # first writes after reading.
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(_WRITE) else "BEGIN")


# ---- add_scan's parts ---------------------------------------------------------


def _beamline_session(s: Session, beamline: str, now: datetime.datetime) -> tuple[int, str]:
    """The beamline's local session (its id and visit), made with its proposal
    (and the local Person) if it has none yet."""
    import sqlalchemy as sa
    m = _models()
    S, P = m.BLSession, m.Proposal
    row = s.execute(
        sa.select(S.sessionId, P.proposalNumber, S.visit_number)
        .join(P, P.proposalId == S.proposalId)
        .where(S.beamLineName == beamline, P.proposalCode == PROPOSAL_CODE)
        .order_by(S.sessionId).limit(1)
    ).first()
    if row is not None:
        session_id, number, visit_number = tuple(row)
        return int(session_id), f"{PROPOSAL_CODE}{number}-{visit_number}"
    person_id = s.scalar(sa.select(m.Person.personId).where(m.Person.login == PERSON_LOGIN))
    if person_id is None:
        person = m.Person(login=PERSON_LOGIN, familyName="zocalo-xrc", givenName="local ISPyB")
        s.add(person)
        s.flush()
        person_id = person.personId
    numbers = s.scalars(sa.select(P.proposalNumber).where(P.proposalCode == PROPOSAL_CODE))
    number = f"{1 + max((int(n) for n in numbers if n and n.isdigit()), default=0):05d}"
    proposal = m.Proposal(personId=person_id, proposalCode=PROPOSAL_CODE, proposalNumber=number,
                          proposalType="MX", state="Open", title=f"zocalo-xrc local ISPyB: {beamline}")
    s.add(proposal)
    s.flush()
    session = m.BLSession(proposalId=proposal.proposalId, visit_number=1, beamLineName=beamline,
                          startDate=now, endDate=now + datetime.timedelta(days=365),
                          comments="zocalo-xrc local ISPyB")
    s.add(session)
    s.flush()
    return int(session.sessionId), f"{PROPOSAL_CODE}{number}-1"


def _first_id(s: Session, model: Any) -> int | None:
    """The id of a table's first row: somewhere random in 10,000,000..99,999,999
    (then the database counts on from there). A fresh ISPyB never hands out
    DCIDs 1, 2, ... again, so the results an earlier local Zocalo left on a
    broker never pass for a new scan's. None once the table has rows."""
    import sqlalchemy as sa

    if s.scalar(sa.select(sa.func.count()).select_from(model)):
        return None
    return 10_000_000 + secrets.randbelow(90_000) * 1000


def _check_grids(grids: Any) -> list[GridInfo]:
    if isinstance(grids, (str, bytes, Mapping)) or not isinstance(grids, Sequence):
        raise ValueError(f"add_scan: grids must be a sequence of gridinfo mappings, got {type(grids).__name__}")
    if not grids:
        raise ValueError("add_scan: grids is empty (a scan has one grid or more)")
    checked = []
    for i, grid in enumerate(grids):
        if not isinstance(grid, Mapping):
            raise ValueError(f"add_scan: grids[{i}]: expected a mapping, got {type(grid).__name__}")
        extra = sorted(str(k) for k in grid if k not in GRID_KEYS)
        if extra:
            raise ValueError(f"add_scan: grids[{i}]: gridinfo: unknown key {quoted(extra[0])} "
                             f"(the ISPyB keys are {', '.join(GRID_KEYS)})")
        try:
            checked.append(GridInfo.from_ispyb(grid))
        except ValueError as e:
            raise ValueError(f"add_scan: grids[{i}]: {e}") from None
    return checked


def _start_numbers(start_frames: Sequence[int] | None, grids: list[GridInfo]) -> list[int]:
    if start_frames is None:
        starts, next_start = [], 1
        for grid in grids:
            starts.append(next_start)
            next_start += grid.image_count
        return starts
    if isinstance(start_frames, (str, bytes)) or not isinstance(start_frames, Sequence):
        raise ValueError(f"add_scan: start_frames must be a sequence of whole numbers, got {quoted(start_frames)}")
    if len(start_frames) != len(grids):
        raise ValueError(f"add_scan: start_frames has {len(start_frames)} numbers for {len(grids)} grids")
    for i, start in enumerate(start_frames):
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise ValueError(f"add_scan: start_frames[{i}] must be a whole number >= 0, got {quoted(start)}")
    return list(start_frames)


def _check_text(name: str, value: Any, limit: int) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"add_scan: {name} must be a non-empty string, got {quoted(value)}")
    if len(value) > limit:
        raise ValueError(f"add_scan: {name} is {len(value)} characters long; ISPyB holds at most {limit}")


def _check_experiment_type(value: Any) -> None:
    allowed = _models().DataCollectionGroup.__table__.c.experimentType.type.enums
    if value not in allowed:
        raise ValueError(f"add_scan: experiment_type {quoted(value)} is not one of ISPyB's "
                         f"(e.g. 'Mesh3D' for a 3D grid scan, 'Mesh' for 2D)")


def _grid_columns(grid: GridInfo) -> dict[str, Any]:
    d = grid.to_ispyb()
    d["snaked"] = int(d["snaked"])
    return d


def _is_conflict(error: BaseException | None) -> bool:
    from sqlalchemy.exc import IntegrityError

    return isinstance(error, IntegrityError) or _is_deadlock(error)


def _is_deadlock(error: BaseException | None) -> bool:
    return _mysql_code(error) in (1205, 1213)  # MySQL: lock wait timeout, deadlock


#: MySQL's codes for a server that did not answer: too many connections, shutting
#: down, connection killed; the client's can't connect (socket, TCP, host),
#: server gone away, lost connection (three ways), disconnected for inactivity.
_UNREACHABLE_CODES = frozenset({1040, 1053, 1927, 2002, 2003, 2005, 2006, 2013, 2014, 2055, 4031})


def _is_unreachable(error: BaseException | None) -> bool:
    """A database error that says the server did not answer (waiting may help),
    not that the request was wrong."""
    from sqlalchemy.exc import DBAPIError

    if not isinstance(error, DBAPIError):
        return False
    if error.connection_invalidated or _mysql_code(error) in _UNREACHABLE_CODES:
        return True
    return error.orig is not None and type(error.orig).__module__ == "sqlite3" and "locked" in str(error.orig)


def _mysql_code(error: BaseException | None) -> Any:
    from sqlalchemy.exc import DBAPIError

    if not isinstance(error, DBAPIError) or error.orig is None:
        return None
    args: tuple[Any, ...] = tuple(getattr(error.orig, "args", ()))
    return getattr(error.orig, "errno", args[0] if args else None)  # mysql.connector: errno; pymysql: args[0]


# ---- parameters()' parts ------------------------------------------------------


def _gridinfo(s: Session, dcid: int, dcgid: Any) -> dict[str, Any]:
    """The grid of ``dcid`` as ISPyB keys: its own GridInfo row, else the first
    of its group's (older scans keyed GridInfo by group), else ``{}``."""
    import sqlalchemy as sa
    G = _models().GridInfo
    columns = [G.__table__.c[k] for k in GRID_KEYS]
    row = s.execute(sa.select(*columns).where(G.dataCollectionId == dcid).order_by(G.gridInfoId).limit(1)).first()
    if row is None:
        row = s.execute(
            sa.select(*columns).where(G.dataCollectionGroupId == dcgid).order_by(G.gridInfoId).limit(1)
        ).first()
    if row is None:
        return {}
    return {k: _json(v) for k, v in zip(GRID_KEYS, row)}


def _json(value: Any) -> Any:
    """A column's value as JSON can hold it."""
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    return value


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


# ---- lazy imports -------------------------------------------------------------


def _sqlalchemy() -> types.ModuleType:
    try:
        import sqlalchemy
    except ImportError as e:
        raise ImportError("zocalo_xrc.local.ispyb needs SQLAlchemy >= 2: pip install sqlalchemy ispyb pymysql") from e
    return sqlalchemy


def _models() -> Any:
    try:
        import ispyb.sqlalchemy  # type: ignore[import-untyped]
    except ImportError as e:
        raise ImportError("zocalo_xrc.local.ispyb needs the ispyb package's models: pip install ispyb") from e
    return ispyb.sqlalchemy


# ---- the process's database, for the dispatcher filters --------------------------

_lock = threading.Lock()
_released = threading.Condition(_lock)  # notified by release_waiting() and configure()
_releasing = False  # release_waiting() was called, configure() not since: filters do not wait for ISPyB
_configured: str | None = None
_handles: dict[str, Ispyb] = {}
_warned_unconfigured = False
_unreachable_since: dict[str, float] = {}  # per database (URL, password hidden): when it stopped answering


def configure(url: str | None) -> None:
    """Set the database the dispatcher filters (and :func:`database`) use in
    this process; ``None`` clears it (then the environment decides)."""
    global _configured, _releasing
    if url is not None and not isinstance(url, str):
        raise TypeError(f"configure: url must be a string or None, got {type(url).__name__}")
    with _lock:
        _configured, _releasing = url, False
        _released.notify_all()


def release_waiting() -> None:
    """The requests the dispatcher filters of this process hold for an
    unreachable ISPyB go back to the Dispatcher at once (it requeues them),
    and they hold none until :func:`configure` is called again: for a
    Dispatcher in a thread that is about to stop."""
    global _releasing
    with _lock:
        _releasing = True
        _released.notify_all()


def database_url() -> str:
    """The database this process uses: the URL given to :func:`configure`,
    else ``$ZOCALO_XRC_ISPYB``, else, when ``$ISPYB_CREDENTIALS`` names an
    ispyb credentials file, the URL ``ispyb.sqlalchemy.url()`` makes of it.
    None of them: :class:`IspybNotConfiguredError`."""
    with _lock:
        configured = _configured
    if configured:
        return configured
    from_env = os.environ.get(ENV_URL)
    if from_env:
        return from_env
    credentials = os.environ.get(ENV_CREDENTIALS)
    if credentials:
        try:
            return str(_models().url())
        except (AttributeError, KeyError, OSError, configparser.Error) as e:
            raise IspybError(f"ISPyB: {ENV_CREDENTIALS}={credentials}: not a usable ispyb credentials file "
                             f"(needs an [ispyb_sqlalchemy] section with username, password, host, port, "
                             f"database): {type(e).__name__}") from None
    raise IspybNotConfiguredError(
        "no ISPyB database configured: call zocalo_xrc.local.ispyb.configure(url), or set "
        f"{ENV_URL} to an SQLAlchemy URL (sqlite:///path/ispyb.db or mysql+pymysql://user:password@host:port/db), "
        f"or set {ENV_CREDENTIALS} to an ispyb credentials file"
    )


def database(url: str | None = None) -> Ispyb:
    """The process's shared handle on ``url`` (default :func:`database_url`),
    made on first use and kept: one engine per URL."""
    if url is None:
        url = database_url()
    with _lock:
        handle = _handles.get(url)
        if handle is None:
            handle = _handles[url] = Ispyb(url)
        return handle


def close_shared(url: str) -> None:
    """Close the process's shared handle on ``url`` (:func:`database`), if
    any: its last connection closed, SQLite folds its ``-wal`` file back into
    the database and removes it and the ``-shm``. Used again, it reconnects."""
    with _lock:
        handle = _handles.pop(url, None)
    if handle is not None:
        handle.close()


# ---- the dispatcher filters ---------------------------------------------------


def ispyb_dc_info(message: dict[str, Any], parameters: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Zocalo dispatcher filter: when the parameters name an ``ispyb_dcid``,
    add what ISPyB knows of it (every key of :meth:`Ispyb.parameters` but
    ``ispyb_dcg_dcids``). No ``ispyb_dcid``, or no database configured in
    this process (a warning, once), or a DCID ISPyB does not hold (a
    warning): the inputs unchanged. A DCID that is not a number raises, and
    the dispatcher rejects the message. While the database is unreachable
    the request waits for it, up to :data:`UNREACHABLE_WAIT_S`."""
    found = _filter_lookup(parameters, info=True, group=False)
    return (message, parameters) if found is None else (message, {**parameters, **found})


def ispyb_dcg_dcids(message: dict[str, Any], parameters: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Zocalo dispatcher filter: when the parameters name an ``ispyb_dcid``,
    add ``ispyb_dcg_dcids``, the other DCIDs of its group, ascending. Same
    rules as :func:`ispyb_dc_info`."""
    found = _filter_lookup(parameters, info=False, group=True)
    return (message, parameters) if found is None else (message, {**parameters, **found})


def _filter_lookup(parameters: Mapping[str, Any], *, info: bool, group: bool) -> dict[str, Any] | None:
    global _warned_unconfigured
    if not isinstance(parameters, Mapping) or parameters.get("ispyb_dcid") is None:
        return None
    try:
        url = database_url()
    except IspybNotConfiguredError as e:  # another project's dispatcher: not ours to judge its messages
        with _lock:
            warn, _warned_unconfigured = not _warned_unconfigured, True
        if warn:
            log.warning("ISPyB filters pass messages through unchanged: %s", e)
        return None
    dcid, db = _dcid(parameters["ispyb_dcid"]), database(url)
    try:
        return _answered(db, lambda: db._lookup(dcid, info=info, group=group))
    except UnknownDcidError as e:  # a request for a collection ISPyB does not hold: says so (once), and goes on
        if info:
            log.warning("%s: the request goes on without ISPyB's values", e)
        return None


_T = TypeVar("_T")


def _answered(db: Ispyb, lookup: Callable[[], _T]) -> _T:
    """``lookup()``, tried again while ``db`` is unreachable, pausing
    :data:`UNREACHABLE_RETRY_S` between attempts, for up to
    :data:`UNREACHABLE_WAIT_S`; then, or when :func:`configure` is called
    after :func:`release_waiting`, its :class:`IspybUnreachableError`.
    One warning in the process when the database stops answering, one line
    when it answers again: not one per request or attempt."""
    deadline: float | None = None
    for attempt in itertools.count():
        try:
            found = lookup()
        except IspybUnreachableError as e:
            now = time.monotonic()
            deadline = now + UNREACHABLE_WAIT_S if deadline is None else deadline
            with _lock:
                first = db.url not in _unreachable_since
                _unreachable_since.setdefault(db.url, now)
            if first:
                log.warning("ISPyB is unreachable: %s; the Dispatcher holds each request up to %g s for it",
                            e, UNREACHABLE_WAIT_S)
            pause = min(UNREACHABLE_RETRY_S[min(attempt, len(UNREACHABLE_RETRY_S) - 1)], deadline - now)
            with _released:
                released = _released.wait_for(lambda: _releasing, max(pause, 0.0))
            if released or time.monotonic() >= deadline:
                why = "stopping" if released else f"waited {UNREACHABLE_WAIT_S:g} s"
                raise IspybUnreachableError(f"{e} ({why}: the request goes back to its queue)") from e
            continue
        with _lock:
            since = _unreachable_since.pop(db.url, None)
        if since is not None:
            log.info("ISPyB %s answers again, after %.0f s", db.url, time.monotonic() - since)
        return found
    raise AssertionError("unreachable")


def _dcid(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        return int(value.strip())
    raise ValueError(f"ispyb_dcid must be a whole number (or a string of one), got {quoted(value)}")
