"""The declarative base of ppml's models and its column types: timezone-aware UTC
datetimes on every backend, JSON (JSONB on PostgreSQL), and typed JSON columns that validate
one pydantic shape on the way in and out; ids and clocks."""

from __future__ import annotations

import json
import secrets
import time
from datetime import UTC, datetime
from typing import Any, TypeVar

from pydantic import BaseModel, TypeAdapter, ValidationError
from sqlalchemy import JSON, DateTime, MetaData, TypeDecorator
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.orm.attributes import instance_dict
from sqlalchemy.types import TypeEngine

from ppml.cache import LRUCache

__all__ = [
    "NAMING_CONVENTION",
    "Base",
    "JSONType",
    "Typed",
    "UTCDateTime",
    "detached",
    "new_id",
    "utcnow",
]

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


_M = TypeVar("_M")


def utcnow() -> datetime:
    return datetime.now(UTC)


def detached(model: type[_M], values: dict[str, Any]) -> _M:
    """A detached ``model`` holding ``values`` (each already of its column's Python type),
    built as the ORM's loader builds a query's objects: no constructor, so no attribute
    events and no validators, a fraction of the cost of ``model(**values)``. A column left
    out reads as None."""
    instance: _M = model.__mapper__.class_manager.new_instance()  # type: ignore[attr-defined]
    instance_dict(instance).update(values)
    return instance


def new_id(prefix: str) -> str:
    """Opaque id that sorts by creation time (48-bit ms clock + 64 random bits)."""
    return f"{prefix}_{int(time.time() * 1000):012x}{secrets.token_hex(8)}"


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


JSONType = JSON().with_variant(JSONB(), "postgresql")


class Typed(TypeDecorator[Any]):
    """A JSON column holding one pydantic shape: validated on the way in and out.

    Plain dicts are accepted when binding (and coerced on assignment by the models'
    validators), so a wrong shape fails where it is written, not where it is read.
    """

    impl = JSON
    cache_ok = True

    def __init__(self, shape: Any) -> None:
        super().__init__()
        self.shape = shape
        self.adapter: TypeAdapter[Any] = TypeAdapter(shape)
        frozen = isinstance(shape, type) and issubclass(shape, BaseModel)
        self._frozen = frozen and bool(shape.model_config.get("frozen"))
        # A frozen record's values by their JSON text (with the text's length, their
        # weight): at most 1024 of them and 4 MB of text per column (see from_json).
        self._texts: LRUCache[bytes | str, tuple[Any, int]] = LRUCache(
            1024, max_weight=4 << 20, weigh=lambda kept: kept[1]
        )

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        return dialect.type_descriptor(JSONB() if dialect.name == "postgresql" else JSON())

    def coerce(self, value: Any) -> Any:
        return None if value is None else self.adapter.validate_python(value)

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if value is None:
            return None
        return self.adapter.dump_python(self.coerce(value), mode="json")

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        return self.coerce(value)

    def from_json(self, raw: bytes | str) -> Any:
        """The column's value from the JSON text the database returned: what
        :meth:`process_result_value` gives for the parsed text, parsed and validated in one
        pass (no intermediate Python objects).

        A frozen record's value is kept by its text, so polling one job validates each
        record of its row once, not at every poll: the same text makes the same frozen value,
        which no reader can change.
        """
        if raw in (b"null", "null"):  # JSON null (jsonb's text form of it), as SQL NULL
            return None
        if not self._frozen:
            return self._validate_json(raw)
        kept = self._texts.get(raw)
        if kept is None:
            kept = (self._validate_json(raw), len(raw))
            self._texts.put(raw, kept)
        return kept[0]

    def _validate_json(self, raw: bytes | str) -> Any:
        try:
            return self.adapter.validate_json(raw)
        except ValidationError:  # what JSON mode refuses, Python mode decides, as before
            return self.coerce(json.loads(raw))

    def __repr__(self) -> str:  # what Alembic renders: the JSON column it is
        return "JSON()"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSONType,
        list[dict[str, Any]]: JSONType,
    }
