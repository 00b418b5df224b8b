"""Where a run executes: processes (``torchrun``/DDP), device, numeric precision, seeds; and the
assembly of model and objective from a config."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import threading
import time
import weakref
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .config import ConfigError


@dataclass
class Distributed:
    """This process's place in the run: its ``rank`` among ``world`` processes, its local rank and device."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        """Whether this is the main process (rank 0), the one that writes shared files."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every process of the group (nothing when alone)."""
        if self.world > 1:
            dist.barrier()

    def all_sum(self, values: list[float]) -> list[float]:
        """Sum a few numbers over processes (float64)."""
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()


LAUNCHER_POLL_S = 0.05  # how often a worker looks whether its launcher is still there (a getppid call)


@lru_cache(maxsize=1)
def die_with_launcher() -> None:
    """End this process (SIGKILL, what a killed launcher got) once the process that started it is gone.
    ``torchrun`` starts every worker in a session of its own, so a ``kill -9`` of the launcher or of its
    process group does not reach the workers, which went on training and saving for many minutes. A daemon
    thread compares the parent's pid with the one at start (an orphan is adopted by another process);
    started once per process."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(LAUNCHER_POLL_S)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="unmask-launcher-watch", daemon=True).start()


def init_distributed(group: bool = False) -> Distributed:
    """Join the process group that ``torchrun`` describes (gloo on CPU, NCCL on CUDA), or run alone
    (in a process group of one with ``group``: what FSDP's device mesh needs). A worker of ``torchrun``
    dies with it (:func:`die_with_launcher`)."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        die_with_launcher()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world == 1:
        device = torch.device("cuda" if cuda else "cpu")
        if group and not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1)
        return Distributed(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Distributed(rank, world, local_rank, device)


def shutdown_distributed() -> None:
    """Leave the process group, if one was joined."""
    if dist.is_initialized():
        dist.destroy_process_group()


@lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 matrix instructions (AVX-512 BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> bf16 on CUDA and on CPUs with native bf16 matmul (measured 2.3x faster than
    fp32 on an AVX-512 BF16 machine), fp32 elsewhere."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_bf16() else "fp32"


def autocast(device: torch.device, precision: str):
    """A bf16 autocast context on ``device`` when ``precision`` is ``bf16``; otherwise one that does nothing."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_for(*parts: int) -> int:
    """A 63-bit seed derived from integers (run seed, step, rank, purpose...)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def generator_for(*parts: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded by :func:`seed_for` of ``parts``."""
    return torch.Generator(device=device).manual_seed(seed_for(*parts))


def set_threads(threads: int, world: int) -> None:
    """Use ``threads`` intra-op threads, or split the machine's cores among local processes."""
    if threads <= 0:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        threads = max(1, (os.cpu_count() or 1) // local)
    torch.set_num_threads(threads)


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool, device: torch.device):
    """Within the block, PyTorch picks deterministic kernels where it has them (warning where it has
    none); on the CPU this makes a run bit-reproducible for a fixed thread count, which two-thread
    training was not otherwise (``benchmarks/determinism.py``: every repeated pair differed). cuBLAS
    needs its workspace setting before CUDA starts, so it is set here only if CUDA has not started."""
    if not enabled:
        yield
        return
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.utils.deterministic.fill_uninitialized_memory)
    if device.type == "cuda" and not torch.cuda.is_initialized():
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False  # costs time, fixes nothing here
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.utils.deterministic.fill_uninitialized_memory = before[2]


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory in MiB: the CUDA allocator's peak on a GPU, else the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class LiveTensorBytes(TorchDispatchMode):
    """Within the block: the bytes of tensor storages created there and still alive (``current``), and
    their peak (``peak``): the measurement the memory plan is checked against, on any device, without
    the allocator's caching. Storages resized in place (FSDP frees and refills its gathered weights so)
    are counted at their size when last seen, and all are re-read every few operations."""

    REFRESH = 16  # operations between re-reading the size of every live storage

    def __init__(self):
        super().__init__()
        self.current = self.peak = self.calls = 0
        self.sizes: dict[int, int] = {}
        self.refs: dict[int, weakref.ref] = {}

    def _release(self, key: int) -> None:
        self.current -= self.sizes.pop(key, 0)
        self.refs.pop(key, None)

    def _resize(self, key: int, nbytes: int) -> None:
        self.current += nbytes - self.sizes[key]
        self.sizes[key] = nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, DTensor):  # the mode sees sharded ops whole: count this process's shard
                t = t._local_tensor
            if isinstance(t, torch.Tensor) and not t.is_meta:
                storage = t.untyped_storage()
                key = id(storage)
                if key not in self.sizes:
                    self.sizes[key], self.refs[key] = 0, weakref.ref(storage)
                    weakref.finalize(storage, self._release, key)
                self._resize(key, storage.nbytes())
        self.calls += 1
        if self.calls % self.REFRESH == 0:
            for key, ref in list(self.refs.items()):
                storage = ref()
                if storage is not None:
                    self._resize(key, storage.nbytes())
        self.peak = max(self.peak, self.current)
        return out


def memory_bytes() -> int:
    """Physical memory of this machine."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def device_for(name: str | None) -> torch.device:
    """The device ``--device`` names (default: CUDA when available), checked to exist here."""
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device (cpu, cuda, cuda:1, mps ...)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: no CUDA device is available to this PyTorch "
                              f"({'a CPU-only build' if torch.version.cuda is None else 'no GPU visible'})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {name}: MPS is not available here")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"--device {name}: unmask runs on cpu, cuda or mps")
    return device
