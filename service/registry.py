"""The study registry: SQLAlchemy on SQLite (default) or PostgreSQL, migrated by Alembic.

Reads live here; every change of a study's state goes through ``service.lifecycle``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Boolean, Float, Integer, String, Text, create_engine, func, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

_MIGRATION_LOCK = 0x1ADDE2  # a PostgreSQL advisory lock key held while the schema is migrated


class Base(DeclarativeBase):
    pass


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), index=True)
    spec_json: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16), index=True)
    created: Mapped[float] = mapped_column(Float)
    updated: Mapped[float] = mapped_column(Float)
    idempotency_key: Mapped[str | None] = mapped_column(String(200), unique=True, nullable=True)
    launcher: Mapped[str] = mapped_column(String(16), default="local")
    handle: Mapped[str | None] = mapped_column(String(200), nullable=True)  # pid or Ray job submission id
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    planned: Mapped[int] = mapped_column(Integer, default=0)


class Slot(Base):
    """One row per active study; the slot number (a primary key, < the cap) bounds how many there are."""

    __tablename__ = "active_slots"

    slot: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    study_id: Mapped[str] = mapped_column(String(64), unique=True)


def _alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


class Registry:
    """Durable study records; every write is one short transaction."""

    def __init__(self, url: str) -> None:
        self.url = url
        sqlite = url.startswith("sqlite")
        connect_args: dict[str, Any] = {"timeout": 30} if sqlite else {}
        self.engine: Engine = create_engine(url, connect_args=connect_args, pool_pre_ping=not sqlite)
        self._session = sessionmaker(self.engine, expire_on_commit=False)

    def migrate(self) -> None:
        """Bring the schema to the newest migration (idempotent; safe with several processes starting at once)."""
        with self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":  # service processes starting together migrate one at a time
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
            cfg = _alembic_config(self.url)
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._session.begin() as s:
            yield s

    def get(self, study_id: str) -> Study | None:
        with self.session() as s:
            return s.get(Study, study_id)

    def by_idempotency_key(self, key: str) -> Study | None:
        with self.session() as s:
            return s.scalars(select(Study).where(Study.idempotency_key == key)).first()

    def page(self, limit: int, offset: int, state: str | None = None) -> tuple[list[Study], int]:
        with self.session() as s:
            q = select(Study)
            count = select(func.count()).select_from(Study)
            if state:
                q, count = q.where(Study.state == state), count.where(Study.state == state)
            total = int(s.scalar(count) or 0)
            rows = s.scalars(q.order_by(Study.created.desc(), Study.id).limit(limit).offset(offset)).all()
            return list(rows), total

    def in_states(self, states: tuple[str, ...]) -> list[Study]:
        with self.session() as s:
            return list(s.scalars(select(Study).where(Study.state.in_(states))).all())

    def slots(self) -> dict[str, int]:
        """Active study id -> its slot."""
        with self.session() as s:
            return {r.study_id: r.slot for r in s.scalars(select(Slot)).all()}
