"""Layer-wise KV transfer between instances: transfer engine wrappers and communication domains.

`TransferEngine` moves raw byte ranges between processes (TCP now; NCCL / CUDA IPC later);
`KVLayout`, `KVSender` and `KVReceiver` turn KV block ids into those ranges; `CommDomain` is the
link between one prefill and one decode instance rank.
"""

from pdserve.transfer.domain import CommDomain, Endpoint
from pdserve.transfer.engine import (
    ABORTED,
    DONE,
    FAILED,
    PENDING,
    TIMED_OUT,
    RecvResult,
    SendResult,
    TransferEngine,
    TransferError,
)
from pdserve.transfer.kv import (
    BLOCK_MAJOR,
    LAYER_MAJOR,
    KVLayout,
    KVReceiver,
    KVSender,
    build_pieces,
    check_compatible,
    layer_pieces,
    merge_pieces,
    request_pieces,
)

__all__ = [
    "ABORTED",
    "BLOCK_MAJOR",
    "DONE",
    "FAILED",
    "LAYER_MAJOR",
    "PENDING",
    "TIMED_OUT",
    "CommDomain",
    "Endpoint",
    "KVLayout",
    "KVReceiver",
    "KVSender",
    "RecvResult",
    "SendResult",
    "TransferEngine",
    "TransferError",
    "build_pieces",
    "check_compatible",
    "layer_pieces",
    "merge_pieces",
    "request_pieces",
]
