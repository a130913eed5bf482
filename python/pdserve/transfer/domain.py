"""Communication domain between one prefill and one decode instance rank: the endpoints both sides
exchange once at link time, and the connected sender/receiver pair each side then uses.

With TCP an endpoint is a listening address; the NCCL backend will carry its unique id / rank pair
and the CUDA-IPC backend its memory handles in the same `Endpoint.extra` dict, so the link protocol
of the servers does not change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pdserve.transfer.engine import TransferEngine
from pdserve.transfer.kv import KVLayout, KVReceiver, KVSender, check_compatible


@dataclass(frozen=True)
class Endpoint:
    """What one instance rank announces to its peer (JSON-serialisable through `to_dict`)."""

    backend: str
    address: str
    layout: KVLayout
    rank: int = 0
    instance_id: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "address": self.address,
            "layout": self.layout.to_dict(),
            "rank": self.rank,
            "instance_id": self.instance_id,
            "extra": dict(self.extra),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Endpoint:
        return cls(
            backend=d["backend"],
            address=d["address"],
            layout=KVLayout.from_dict(d["layout"]),
            rank=int(d.get("rank", 0)),
            instance_id=str(d.get("instance_id", "")),
            extra=dict(d.get("extra", {})),
        )

    @classmethod
    def local(
        cls, engine: TransferEngine, layout: KVLayout, rank: int = 0, instance_id: str = ""
    ) -> Endpoint:
        """This process's endpoint for `engine` and its KV `layout`."""
        return cls(engine.backend, engine.address, layout, rank, instance_id)


class CommDomain:
    """One side's view of a P↔D link (per rank pair, rank i ↔ rank i under tensor parallelism).

    Both sides call `open()` once: each connects to the other, since P pushes prefill KV to D and D
    pushes dcache blocks back to P. Afterwards `sender` writes into the peer's KV memory and
    `receiver` accepts writes from the peer only (a peer that disconnects fails its receives fast).
    `open` blocks (connect); everything else follows KVSender / KVReceiver.
    """

    def __init__(
        self,
        engine: TransferEngine,
        local: Endpoint,
        remote: Endpoint,
        *,
        send_timeout_s: float | None = None,
    ) -> None:
        if local.backend != remote.backend:
            raise ValueError(
                f"transfer backends differ: local {local.backend!r}, remote {remote.backend!r}"
            )
        if local.rank != remote.rank:
            raise ValueError(
                f"rank {local.rank} pairs with the remote rank {local.rank}, got rank {remote.rank}"
            )
        check_compatible(local.layout, remote.layout)
        self.engine = engine
        self.local = local
        self.remote = remote
        self.sender = KVSender(
            engine, remote.address, local.layout, remote.layout, timeout_s=send_timeout_s
        )
        self.receiver = KVReceiver(engine, local.layout, peer=remote.address)

    def open(self, timeout_s: float = 10.0) -> CommDomain:
        """Connects to the remote endpoint (idempotent; reconnects a lost channel). Blocks."""
        self.engine.connect(self.remote.address, timeout_s)
        return self

    @property
    def is_open(self) -> bool:
        return self.engine.connected(self.remote.address)

    def __repr__(self) -> str:
        return f"CommDomain({self.local.address} <-> {self.remote.address}, rank={self.local.rank})"
