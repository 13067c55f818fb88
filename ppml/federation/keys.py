"""Where a federated job's rounds keep their files in the artefact store.

Store keys are flat (``kind/name``, :func:`ppml.storage.base.check_key`), so the round and
node are parts of the name. The ``federations`` kind is sealed at rest: a client-level
update is clipped but not yet noised.
"""

from __future__ import annotations

__all__ = ["global_key", "update_key"]


def global_key(job_id: str, round_: int) -> str:
    """The global weights the server loop publishes for ``round_`` (safetensors, float32)."""
    return f"federations/{job_id}.round-{round_}.global.safetensors"


def update_key(job_id: str, round_: int, node_id: str, upload: str) -> str:
    """A node's update for ``round_`` (local − global, safetensors, float32). ``upload``
    names one upload: two uploads racing for the same task write files of their own, so the
    one that loses the task's conditional update deletes its own file, never the winner's."""
    return f"federations/{job_id}.round-{round_}.update.{node_id}.{upload}.safetensors"
