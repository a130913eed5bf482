"""Layer-wise KV transfer between instances: transfer engine wrappers and communication domains.

`TransferEngine` moves raw byte ranges between processes (TCP now; NCCL / CUDA IPC later);
`KVLayout` (defined in `pdserve.kv_layout`, shared with the engine), `KVSender` and `KVReceiver`
turn KV block ids into those ranges; `CommDomain` is the link between one prefill and one decode
instance rank.

Typical use (both instances; the endpoints travel as JSON over the internal API at link time):

    engine = TransferEngine(host=my_ip)                  # one per instance rank
    engine.register_memory(kv_tensor)                    # the whole KV pool, once
    local = Endpoint.local(engine, KVLayout.from_tensor(kv_tensor, LAYER_MAJOR))
    domain = CommDomain(engine, local, Endpoint.from_dict(peer_endpoint)).open()

    # D, when reserving blocks for a request, before answering the scheduler:
    domain.receiver.expect(request_id, num_blocks=len(new_block_ids), timeout_s=30)
    # P, from the layer hook (never blocks):
    domain.sender.push_layer(request_id, layer_idx, src_block_ids, dst_block_ids)
    # both, in asyncio code (P then unpins its blocks, D starts decoding):
    sent = await domain.sender.wait_async(request_id)
    got = await domain.receiver.wait_async(request_id)
    # any failure path, either side (returns once no transfer touches the blocks):
    await loop.run_in_executor(None, engine.abort, request_id, "reason")
"""

from pdserve.kv_layout import BLOCK_MAJOR, LAYER_MAJOR, KVLayout
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
