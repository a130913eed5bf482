"""CUDA KV block copy kernels (built from cuda/ + bindings/cuda/ when nvcc is found).

Raw interface: addresses are integers (`tensor.data_ptr()`), sizes are bytes, `stream` is a
`cudaStream_t` as an integer (`torch.cuda.Stream.cuda_stream`; 0 = legacy default stream). Every
call enqueues one kernel on `stream` of the *current* CUDA device and returns (GIL released); the
caller keeps the memory alive until the stream reaches it. Pool addresses may be device memory of
the current device or mapped pinned host memory; id arrays are device int32. Ids outside their pool
are skipped by the kernel, so validate them first (`pdserve.cache.kernels` does).
Raises ValueError for bad arguments (null or unknown pointers, wrong device, sizes, alignment for a
forced 16-byte `version`) and RuntimeError for CUDA errors. Use `pdserve.cache.kernels` instead.
"""

NUM_KERNEL_VERSIONS: int
"""Versions: 0 auto, 1 vec16x1, 2 vec16x4, 3 vec16x8, 4 vec16x4-stream, 5 narrow, 6 vec16x8-stream."""

def gather_blocks(
    src_addr: int,
    block_stride_nbytes: int,
    src_num_blocks: int,
    block_ids_addr: int,
    num_ids: int,
    dst_addr: int,
    piece_nbytes: int,
    stream: int,
    version: int = 0,
) -> None:
    """Piece `src_addr + ids[i] * block_stride_nbytes` → `dst_addr + i * piece_nbytes`."""

def scatter_blocks(
    src_addr: int,
    block_ids_addr: int,
    num_ids: int,
    dst_addr: int,
    block_stride_nbytes: int,
    dst_num_blocks: int,
    piece_nbytes: int,
    stream: int,
    version: int = 0,
) -> None:
    """Piece `src_addr + i * piece_nbytes` → `dst_addr + ids[i] * block_stride_nbytes` (ids distinct)."""

def copy_blocks(
    src_addr: int,
    src_stride_nbytes: int,
    src_num_blocks: int,
    dst_addr: int,
    dst_stride_nbytes: int,
    dst_num_blocks: int,
    src_ids_addr: int,
    dst_ids_addr: int,
    num_pairs: int,
    piece_nbytes: int,
    stream: int,
    version: int = 0,
) -> None:
    """Piece `src_ids[i]` of the source pool → piece `dst_ids[i]` of the destination pool."""

def kernel_version_name(version: int) -> str:
    """Short name of a kernel version, e.g. "vec16x4"; ValueError if unknown."""

def copy_runs_address() -> int:
    """Address of the C function pdserve_copy_runs (cuda/copy_runs.h): one kernel for a cuda_ipc
    message's copies; the transfer engine calls it (TransferEngine passes it on for you)."""

# ---- IPC collectives of tensor parallelism (cuda/ipc_collectives.h; use pdserve.engine.ipc_collectives)

IPC_SIGNAL_NBYTES: int
"""Bytes of the signal area at the start of each rank's region (data halves follow)."""
IPC_MAX_RANKS: int
IPC_MAX_BLOCKS: int
"""CTAs per call at most; the per-CTA counters array has this many uint32."""

class IpcCall:
    """One rank's fixed arguments: its device, every rank's region as mapped here, its rank, the
    device address of its counters, the mapped pinned host abort flag, the capacity of one data half
    and the wait timeout (a CTA waiting longer for a peer traps)."""

    device: int
    regions: list[int]
    rank: int
    counters_addr: int
    abort_addr: int
    capacity: int
    timeout_ns: int
    def __init__(self) -> None: ...

def ipc_alloc(device: int, nbytes: int) -> int:
    """cudaMalloc'd, zeroed region on `device`."""

def ipc_free(device: int, addr: int) -> None: ...
def ipc_handle(device: int, addr: int) -> bytes:
    """The 64-byte CUDA IPC handle of a region from ipc_alloc."""

def ipc_open(device: int, handle: bytes) -> int:
    """Maps another process's region on `device` (peer access enabled lazily)."""

def ipc_close(device: int, addr: int) -> None: ...
def ipc_all_reduce(
    call: IpcCall, in_addr: int, out_addr: int, nbytes: int, dtype: int, stream: int
) -> None:
    """out = the ranks' in summed in fp32 in rank order; dtype 0 fp32, 1 fp16, 2 bf16; nbytes a
    multiple of 16 and at most call.capacity; 16-byte aligned addresses; in == out allowed."""

def ipc_gather(
    call: IpcCall,
    in_addr: int,
    out_addr: int,
    nbytes: int,
    out_rank_stride: int,
    root: int,
    stream: int,
) -> None:
    """Rank r's nbytes land at out + r * out_rank_stride on `root` (every rank when root < 0)."""
