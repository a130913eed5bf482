"""Tensor parallelism across processes: rank 0 runs in the driver (the engine's process, which keeps the
scheduler, block manager and radix tree), ranks 1..N-1 in worker processes that own their weight and
KV shards. Each step the driver sends the prepared batch (StepInputs) and every rank runs it.

Commands reach multiprocessing workers through one OS pipe each, pickled once (10-20 µs a step on a
2-core box, where gloo's broadcast of the same bytes took ~250 µs: bench/bench_tp.py --commands);
Ray workers get them over the gloo control group.

Lockstep rule: every rank issues the same collectives in the same order. Anything that breaks it on the
driver (an exception mid-forward) or a worker's death makes the engine unusable: the runner raises
WorkerFailure and tears the workers down instead of hanging.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import pickle
import shutil
import signal
import tempfile
import threading
import time
import traceback
import weakref
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import torch

from pdserve.engine import distributed
from pdserve.engine.config import EngineConfig, ModelConfig
from pdserve.engine.distributed import TPGroup, WorkerFailure
from pdserve.engine.model_runner import ModelRunner, resolve_device
from pdserve.engine.sampler import Sampled
from pdserve.engine.scheduler import ScheduledBatch
from pdserve.engine.step_inputs import StepInputs
from pdserve.kv_layout import KVLayout

_JOIN_TIMEOUT_S = 300.0  # workers import torch and connect within this
_SHM_ROOT = "/dev/shm" if os.path.isdir("/dev/shm") else None


# ---- worker side ---------------------------------------------------------------------------------
class _WorkerRunner(ModelRunner):
    """A worker rank's ModelRunner. On CPU its KV cache lives in a shared-memory file the driver maps,
    so the driver (and a transfer engine there) can address every rank's blocks."""

    def __init__(self, config, model_config, tp_group, shm_dir: str | None):
        self._shm_path = (
            os.path.join(shm_dir, f"kv-rank{tp_group.rank}") if shm_dir is not None else None
        )
        super().__init__(config, model_config, tp_group)

    def _new_kv_tensor(self, shape: tuple[int, ...]) -> torch.Tensor:
        if self.device.type != "cpu" or self._shm_path is None:
            return super()._new_kv_tensor(shape)
        numel = 1
        for n in shape:
            numel *= n
        nbytes = numel * torch.empty((), dtype=self.dtype).element_size()
        stat = os.statvfs(os.path.dirname(self._shm_path))
        free_nbytes = stat.f_bavail * stat.f_frsize
        # tmpfs pages are committed on first touch: a too-small /dev/shm would kill the worker (SIGBUS)
        # mid-step, so refuse now; every worker rank needs its own file
        if free_nbytes < nbytes * (self.tp_size - 1):
            raise ValueError(
                f"{os.path.dirname(self._shm_path)} has {free_nbytes / 2**30:.2f} GiB free, but the "
                f"{self.tp_size - 1} worker ranks' KV caches need {nbytes / 2**30:.2f} GiB each; lower "
                "kv_cache_gb / num_kv_blocks or enlarge it (docker: --shm-size)"
            )
        kv = torch.from_file(self._shm_path, shared=True, size=numel, dtype=self.dtype)
        return kv.view(shape)

    def describe_kv(self) -> dict[str, Any]:
        """How the driver maps this rank's KV: a shared-memory file (CPU) or a CUDA IPC handle."""
        if self.device.type == "cuda":
            from torch.multiprocessing.reductions import reduce_tensor

            return {"cuda_ipc": reduce_tensor(self.kv_cache)}
        return {"shm_path": self._shm_path, "numel": self.kv_cache.numel()}

    def copy_blocks_ok(self, src: list[int], dst: list[int], to_host: bool) -> bool:
        try:
            self.copy_blocks(src, dst, to_host)
        except (RuntimeError, IndexError):
            return False
        return True


def worker_main(
    rank: int,
    world_size: int,
    store_port: int,
    config: EngineConfig,
    model_config: ModelConfig,
    device: str,
    shm_dir: str | None,
    shared_device: bool = False,
    commands: Connection | None = None,
) -> None:
    """A worker process: joins the groups, builds its shard, then runs the driver's commands (from
    the `commands` pipe, else the control group) until "shutdown" or the driver's end of the pipe
    closes. On any error it leaves its traceback in the store (the driver reports it) and exits."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, torch.get_num_threads() // world_size))
    store = distributed.connect_store(store_port, world_size)
    group = None
    try:
        store.add("joined", 1)
        group = distributed.init_group(store, rank, world_size, torch.device(device), shared_device)
        with distributed.use_group(group):
            runner = _WorkerRunner(config, model_config, group, shm_dir)
            group.gather_objects({"num_blocks": runner.num_blocks, "kv": None})
            while True:
                if commands is None:
                    command, args = group.broadcast_object()
                else:
                    try:
                        command, args = pickle.loads(commands.recv_bytes())
                    except EOFError:  # the driver is gone, maybe mid-step: free our waiting kernels
                        group.abort()
                        break
                if command == "execute":
                    runner.execute(*args)
                elif command == "copy_blocks":
                    group.gather_objects(runner.copy_blocks_ok(*args))
                elif command == "describe_kv":
                    group.gather_objects(runner.describe_kv())
                elif command == "shutdown":
                    break
                else:
                    raise RuntimeError(f"unknown command {command!r} from the driver")
    except BaseException as exc:  # noqa: BLE001  (reported to the driver, then the process ends)
        text = traceback.format_exc()
        with contextlib.suppress(Exception):
            store.set(f"error_type/{rank}", type(exc).__name__)
            store.set(f"error/{rank}", text)
        print(f"pdserve tensor-parallel worker rank {rank} failed:\n{text}", flush=True)
        os._exit(1)
    finally:
        if group is not None:
            group.shutdown()


def _ray_worker_main(*args: Any) -> None:
    worker_main(*args)


# ---- worker handles (multiprocessing or Ray) -----------------------------------------------------
class _ProcessWorker:
    def __init__(self, rank: int, args: tuple):
        ctx = multiprocessing.get_context("spawn")
        self.rank = rank
        reader, self.commands = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(
            target=worker_main, args=(*args, reader), name=f"pdserve-tp-rank{rank}", daemon=True
        )
        self.proc.start()
        reader.close()  # the worker holds its own copy

    def send(self, data: bytes) -> None:
        """Hands the worker one pickled command; raises OSError (BrokenPipeError) if it is gone."""
        self.commands.send_bytes(data)

    def is_alive(self) -> bool:
        return self.proc.is_alive()

    def describe(self) -> str:
        return f"pid {self.proc.pid}, exit code {self.proc.exitcode}"

    def stop(self, timeout_s: float) -> None:
        self.proc.join(timeout_s)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5.0)
        self.commands.close()


class _RayWorker:
    def __init__(self, rank: int, args: tuple, use_gpu: bool):
        import ray

        if not ray.is_initialized():
            ray.init(ignore_reinit_error=True)
        self._ray = ray
        self.rank = rank
        remote = ray.remote(num_cpus=1, num_gpus=1 if use_gpu else 0)(_ray_worker_main)
        self.ref = remote.remote(*args)

    def is_alive(self) -> bool:
        ready, _ = self._ray.wait([self.ref], timeout=0)
        return not ready

    def describe(self) -> str:
        return f"Ray task {self.ref}"

    def stop(self, timeout_s: float) -> None:
        ready, _ = self._ray.wait([self.ref], timeout=timeout_s)
        if not ready:
            with contextlib.suppress(Exception):
                self._ray.cancel(self.ref, force=True)


def _use_ipc_collectives(
    config: EngineConfig, devices: list[torch.device], shared_device: bool
) -> bool:
    """Whether the ranks use the IPC collectives: on GPUs of this machine that reach each other's
    memory, unless turned off or the workers are Ray tasks (which may see other GPUs, or none of
    ours). Ranks sharing one GPU need them (NCCL refuses two ranks on one device)."""
    if shared_device:
        if not config.custom_all_reduce or config.worker_use_ray:
            raise ValueError(
                f"tensor-parallel ranks sharing one GPU ({distributed.SHARE_DEVICE_ENV}=1) talk "
                "through the IPC collectives only: leave custom_all_reduce on and worker_use_ray off"
            )
        return True
    if not config.custom_all_reduce or config.worker_use_ray or devices[0].type != "cuda":
        return False
    indices = [d.index for d in devices]
    return all(torch.cuda.can_device_access_peer(a, b) for a in indices for b in indices if a != b)


def _require_ray() -> None:
    try:
        import ray  # noqa: F401
    except ImportError:
        raise ValueError(
            "worker_use_ray=True (--worker-use-ray) but Ray is not installed; install it "
            "(pip install ray) or leave worker_use_ray off to start the workers with multiprocessing"
        ) from None


# ---- driver side ---------------------------------------------------------------------------------
class TensorParallelRunner:
    """Looks like a ModelRunner to the engine (run, copy_blocks, kv_layout(s), num_blocks, ...), but
    runs every step on all tensor_parallel_size ranks. Call shutdown() (the engine does) when done;
    it also runs at garbage collection and interpreter exit."""

    def __init__(self, config: EngineConfig, model_config: ModelConfig):
        tp_size = config.tensor_parallel_size
        mc = model_config
        distributed.check_tp_size(
            tp_size, mc.num_attention_heads, mc.num_key_value_heads, mc.vocab_size,
            mc.intermediate_size,
        )  # fmt: skip
        if config.worker_use_ray:
            _require_ray()
        devices = distributed.rank_devices(resolve_device(config.device), tp_size)
        shared_device = devices[0].type == "cuda" and len(set(devices)) < len(devices)
        config = dataclasses.replace(
            config, custom_all_reduce=_use_ipc_collectives(config, devices, shared_device)
        )
        self.config, self.model_config = config, model_config
        self.tp_size = tp_size
        self._failure: str | None = None
        self._worker_value_error = False
        self._watchdog: threading.Thread | None = None
        self._watchdog_fired = False
        self._workers: list[Any] = []
        self._worker_kv: list[torch.Tensor] = []  # ranks 1.. KV caches mapped into this process
        self.group: TPGroup | None = None
        self._store = distributed.create_store(tp_size)
        use_shm = devices[0].type == "cpu"
        self._shm_dir = tempfile.mkdtemp(prefix="pdserve-kv-", dir=_SHM_ROOT) if use_shm else None
        self._finalizer = weakref.finalize(
            self, _teardown, self._workers, [None], self._shm_dir, self._store
        )
        try:
            for rank in range(1, tp_size):
                worker_device = (
                    "cuda:0"
                    if config.worker_use_ray and devices[rank].type == "cuda"
                    else str(devices[rank])
                )
                args = (
                    rank, tp_size, self._store.port, config, mc, worker_device, self._shm_dir,
                    shared_device,
                )  # fmt: skip
                if config.worker_use_ray:
                    self._workers.append(_RayWorker(rank, args, devices[rank].type == "cuda"))
                else:
                    self._workers.append(_ProcessWorker(rank, args))
            self._wait_joined()
            self.group = distributed.init_group(self._store, 0, tp_size, devices[0], shared_device)
            if devices[0].type == "cuda":
                # a dead peer leaves NCCL / IPC kernels waiting: abort the group so the driver's wait
                # fails (from here on: building the model already runs collectives, graph warm-ups)
                self._watchdog = threading.Thread(
                    target=self._watch, name="pdserve-tp-watchdog", daemon=True
                )
                self._watchdog.start()
            self._finalizer.detach()
            self._finalizer = weakref.finalize(
                self, _teardown, self._workers, [self.group], self._shm_dir, self._store
            )
            with distributed.use_group(self.group):
                self.runner = self._guard(ModelRunner, config, mc, self.group)
                self._guard(self.group.gather_objects, {"num_blocks": self.runner.num_blocks})
            if use_shm:
                self._map_worker_kv_shm()
        except WorkerFailure as exc:
            self.shutdown()
            if self._worker_value_error:  # a bad setting seen by a worker, e.g. /dev/shm too small
                raise ValueError(str(exc)) from exc
            raise
        except BaseException:
            self.shutdown()
            raise
        # what the engine reads off a ModelRunner
        self.num_blocks = self.runner.num_blocks
        self.num_host_blocks = self.runner.num_host_blocks
        self.kv_layers = self.runner.kv_layers
        self.device = self.runner.device

    # ---- set-up ----------------------------------------------------------------------------------
    def _wait_joined(self) -> None:
        deadline = time.monotonic() + _JOIN_TIMEOUT_S
        while self._store.add("joined", 0) < self.tp_size - 1:
            self._check_workers()
            if time.monotonic() > deadline:
                raise WorkerFailure(
                    f"tensor-parallel workers did not start within {_JOIN_TIMEOUT_S:.0f} s"
                )
            time.sleep(0.02)

    def _map_worker_kv_shm(self) -> None:
        for rank in range(1, self.tp_size):
            path = os.path.join(self._shm_dir, f"kv-rank{rank}")
            kv = torch.from_file(
                path, shared=True, size=self.runner.kv_cache.numel(), dtype=self.runner.dtype
            ).view(self.runner.kv_cache.shape)
            self._worker_kv.append(kv)
        # the mappings stay valid; nothing is left in /dev/shm if this process dies later
        shutil.rmtree(self._shm_dir, ignore_errors=True)

    # ---- failure handling ------------------------------------------------------------------------
    def _check_workers(self) -> None:
        """Raises WorkerFailure (and tears down) when a worker is dead or reported an error."""
        if self._failure is not None:
            raise WorkerFailure(self._failure)
        for worker in self._workers:
            error = self._worker_error(worker.rank)
            if error is not None or not worker.is_alive():
                self._fail(
                    f"tensor-parallel worker rank {worker.rank} ({worker.describe()}) "
                    + (f"failed:\n{error}" if error else "died")
                )

    def _worker_error(self, rank: int) -> str | None:
        key = f"error/{rank}"
        with contextlib.suppress(Exception):
            if self._store is not None and self._store.check([key]):
                kind = self._store.get(f"error_type/{rank}").decode(errors="replace")
                self._worker_value_error |= kind == "ValueError"
                return self._store.get(key).decode(errors="replace")
        return None

    def _fail(self, message: str) -> None:
        self._failure = message + "; this engine cannot run any more steps"
        self.shutdown()
        raise WorkerFailure(self._failure)

    def _guard(self, fn: Callable, *args: Any) -> Any:
        """Calls fn; any error or interruption breaks lockstep, so it ends the workers. A worker's
        death or error is reported as WorkerFailure with what the worker said."""
        if self._failure is not None:
            raise WorkerFailure(self._failure)
        try:
            return fn(*args)
        except BaseException as exc:
            # let a dying worker finish writing its error before reading it (gloo reports a peer's
            # death as a RuntimeError; an interruption on the driver needs no wait)
            deadline = time.monotonic() + (2.0 if isinstance(exc, RuntimeError) else 0.0)
            while time.monotonic() < deadline and all(w.is_alive() for w in self._workers):
                if any(self._worker_error(w.rank) for w in self._workers):
                    break
                time.sleep(0.02)
            with contextlib.suppress(WorkerFailure):
                self._check_workers()
            if self._failure is None:
                self._failure = f"the driver (rank 0) stopped mid-collective: {exc!r}"
                self.shutdown()
                raise
            raise WorkerFailure(self._failure) from exc

    def _watch(self) -> None:
        while self._failure is None and self.group is not None:
            if any(not w.is_alive() for w in self._workers):
                # the step in flight may finish on garbage: run() checks this flag after it
                self._watchdog_fired = True
                self.group.abort()
                return
            time.sleep(0.5)

    @property
    def worker_pids(self) -> list[int | None]:
        """Process ids of ranks 1..N-1 (None for a Ray task)."""
        return [getattr(getattr(w, "proc", None), "pid", None) for w in self._workers]

    # ---- what the engine calls -------------------------------------------------------------------
    def run(
        self, batch: ScheduledBatch, after_layer: Callable[[int | None], None] | None = None
    ) -> Sampled:
        """Runs the batch on every rank; returns rank 0's sampled tokens (see ModelRunner.run).

        after_layer fires on the driver after rank 0 finished layer l (None: all layers, a graph
        replay); the all-reduce inside layer l means every rank has written its layer-l KV by then.
        An exception it raises is re-raised after the step, so the ranks stay in lockstep."""
        inputs = self.runner.prepare_inputs(batch)
        inputs.use_graph = self.runner.graph_eligible(inputs)
        hook_errors: list[BaseException] = []
        hook = None
        if after_layer is not None:

            def hook(layer_idx: int | None) -> None:
                if hook_errors:
                    return
                try:
                    after_layer(layer_idx)
                except Exception as exc:  # noqa: BLE001  (re-raised once the ranks are done)
                    hook_errors.append(exc)

        tokens = self._guard(self._execute, inputs, hook)
        if self._watchdog_fired:
            self._check_workers()
        if hook_errors:
            raise hook_errors[0]
        return tokens

    def _command(self, message: tuple) -> None:
        """Sends (command, args) to every worker (they run it; rank 0 runs its part itself)."""
        _send_command(self._workers, self.group, message)

    def _execute(self, inputs: StepInputs, hook: Callable[[int | None], None] | None) -> Sampled:
        # only rank 0 samples: the sampling params and the penalties' token history stay here
        sent = dataclasses.replace(inputs, sampling_params=[], output_token_ids=None)
        self._command(("execute", (sent,)))
        with distributed.use_group(self.group):
            return self.runner.execute(inputs, hook)

    def copy_blocks(
        self, src_block_ids: list[int], dst_block_ids: list[int], to_host: bool
    ) -> None:
        """Copies blocks between device KV and the host tier on every rank; raises RuntimeError if any
        rank could not."""

        def copy() -> list[bool]:
            args = (list(src_block_ids), list(dst_block_ids), to_host)
            self._command(("copy_blocks", args))
            ok = True
            try:
                self.runner.copy_blocks(*args)
            except (RuntimeError, IndexError):
                ok = False
            return [ok, *self.group.gather_objects(ok)[1:]]

        oks = self._guard(copy)
        if not all(oks):
            raise RuntimeError(
                f"block copy failed on ranks {[r for r, ok in enumerate(oks) if not ok]}"
            )

    def kv_layout(self) -> KVLayout:
        """Rank 0's KV layout (see kv_layouts for every rank)."""
        return self.runner.kv_layout()

    def kv_layouts(self) -> list[KVLayout]:
        """Rank i's KV shard (its num_kv_heads / tp_size heads), addresses valid in this process: rank
        0's own tensor, the others mapped (CPU: shared memory; CUDA: IPC handles, opened on first call)."""
        return [KVLayout.from_tensor(kv, self.config.kv_layout) for kv in self.rank_kv_caches()]

    def rank_kv_caches(self) -> list[torch.Tensor]:
        """Every rank's KV tensor as seen from this process (index = rank); shares the ranks' memory."""
        if not self._worker_kv and self.tp_size > 1:
            self._map_worker_kv_cuda()
        return [self.runner.kv_cache, *self._worker_kv]

    def _map_worker_kv_cuda(self) -> None:
        def describe() -> list[Any]:
            self._command(("describe_kv", ()))
            return self.group.gather_objects(None)[1:]

        for info in self._guard(describe):
            rebuild, args = info["cuda_ipc"]
            self._worker_kv.append(rebuild(*args))

    @torch.inference_mode()
    def logits_for(self, batch: ScheduledBatch) -> torch.Tensor:
        raise NotImplementedError("logits_for is a single-rank test helper")

    def shutdown(self) -> None:
        """Stops the workers (asking first, then killing) and frees the groups; idempotent."""
        healthy = self._failure is None  # workers idle on the control group: ask them to exit
        if healthy:
            self._failure = "the engine was shut down"
        group, self.group = self.group, None
        self._worker_kv = []
        self._finalizer.detach()
        _teardown(self._workers, [group], self._shm_dir, self._store, ask=healthy)


def _send_command(workers: list, group: TPGroup, message: tuple) -> None:
    """(command, args) to every worker: through their pipes, or the control group (Ray workers)."""
    if workers and isinstance(workers[0], _ProcessWorker):
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        for worker in workers:
            worker.send(data)
    else:
        group.broadcast_object(message)


def _teardown(workers: list, groups: list, shm_dir: str | None, store, ask: bool = True) -> None:
    """Ends the workers (a "shutdown" command when the group still works, a kill after a grace
    period otherwise), closes the group and removes the shared-memory directory."""
    group = groups[0] if groups else None
    if group is not None and not ask:
        group.abort()  # kernels of ours still waiting for a peer about to be killed give up
    if group is not None and ask and all(w.is_alive() for w in workers):
        with contextlib.suppress(Exception):
            if group.device.type == "cuda":  # our last kernels may still read the workers' buffers
                torch.cuda.synchronize(group.device)
            _send_command(workers, group, ("shutdown", ()))
    for worker in workers:
        with contextlib.suppress(Exception):
            worker.stop(timeout_s=5.0 if ask else 0.0)
    if group is not None:
        group.shutdown()
    if shm_dir is not None:
        shutil.rmtree(shm_dir, ignore_errors=True)
    del store
