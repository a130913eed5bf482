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
