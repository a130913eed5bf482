"""Stub of the native transfer engine module (bindings/transfer). Use pdserve.transfer instead."""

from typing import Any

import numpy as np

class TransferError(RuntimeError): ...

class SendResult:
    ticket: int
    request_id: str
    peer: str
    status: str  # pending | done | timed_out | aborted | failed
    nbytes: int
    seconds: float
    error: str

class RecvResult:
    request_id: str
    status: str
    nbytes_expected: int
    nbytes_received: int
    seconds: float
    error: str

class Completion:
    is_send: bool
    send: SendResult
    recv: RecvResult

class Engine:
    def __init__(
        self,
        backend: str = "tcp",
        host: str = "127.0.0.1",
        port: int = 0,
        stall_timeout_s: float = 30.0,
        max_message_nbytes: int = 1048576,
        retention_s: float = 60.0,
        device_copy_fn: int = 0,  # cuda_ipc: address of pdserve_copy_runs (pdserve._cuda)
        cluster_token: str = "",  # "": no check; else peers must connect with the same token
    ) -> None: ...
    @property
    def backend(self) -> str: ...
    @property
    def address(self) -> str: ...
    def register_memory(self, addr: int, nbytes: int, device: int = -1) -> int: ...
    def unregister_memory(self, region: int) -> bool: ...  # releases the GIL
    def connect(self, peer: str, timeout_s: float = 10.0) -> None: ...  # releases the GIL
    def connected(self, peer: str) -> bool: ...
    def expect(
        self, request_id: str, nbytes: int, timeout_s: float, from_peer: str = ""
    ) -> None: ...
    def wait_recv(self, request_id: str, timeout_s: float = -1.0) -> RecvResult: ...  # no GIL
    def poll_recv(self, request_id: str) -> RecvResult | None: ...
    def send(
        self,
        peer: str,
        request_id: str,
        pieces: np.ndarray | Any,  # (N, 3) uint64 rows: local_addr, remote_addr, nbytes
        timeout_s: float = 0.0,
        stream: int = 0,
        ready_event: int = 0,
    ) -> int: ...
    def wait(self, ticket: int, timeout_s: float = -1.0) -> SendResult: ...  # releases the GIL
    def poll(self, ticket: int) -> SendResult | None: ...
    def abort(self, request_id: str, reason: str = "aborted") -> None: ...  # releases the GIL
    def stats(self) -> dict[str, Any]: ...
    def completion_fd(self) -> int: ...
    def watch(self, ticket: int) -> None: ...
    def watch_recv(self, request_id: str) -> None: ...
    def drain_completions(self) -> list[Completion]: ...
    def close(self) -> None: ...  # releases the GIL
