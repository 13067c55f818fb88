"""Apply Alembic migrations by command (never at import)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

__all__ = ["alembic_config", "upgrade"]

# alembic.ini and migrations/ sit at the root of the source tree. An installed (non-editable)
# package has no source tree around it: the image runs from its WORKDIR, which holds both.
_SOURCE = Path(__file__).resolve().parents[2]
ROOT = _SOURCE if (_SOURCE / "alembic.ini").is_file() else Path.cwd()


def alembic_config(url: str) -> Config:
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "migrations"))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database at ``url`` to ``revision``."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(url), revision)
