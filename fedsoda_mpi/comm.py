"""The only module that touches MPI: typed flat buffers with an agreed schema, byte counters, abort on error.

A message is a dict of tensors. Its `Schema` (names, shapes, one dtype) is agreed once; after that
each message travels as ONE contiguous buffer: `broadcast` with Bcast (root -> all) and `gatherv`
with Gatherv (all -> root). No pickles: tensors go through MPI as typed memory (bfloat16 and
float16 as an int16 view, bit exact). Buffers over `CHUNK_ELEMS` elements (the one-time sub-model
shipment of an 8B model is > 2 GiB) are sent in chunks.

A collective that follows a long phase of one rank (the server's SGP/ODA/evaluation, the clients' local training)
takes `idle=True`: every rank first sleeps in `Comm.idle_wait` until all have arrived, so the waiting ranks leave
the CPU cores to the working ones instead of spinning inside a blocking MPI call.

Byte counters (`Comm.bytes`) count per rank and direction the payload bytes this rank handed to or
received from MPI, category by category; the server's broadcast to W-1 clients counts W-1 copies.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import traceback
import warnings
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch

from .host import as_numpy, copy_into

CHUNK_ELEMS = 1 << 30  # < 2^31: the classic MPI count limit

# torch dtype -> (torch dtype of the wire view, MPI datatype name)
_WIRE = {
    torch.float32: (torch.float32, "FLOAT"),
    torch.float64: (torch.float64, "DOUBLE"),
    torch.bfloat16: (torch.int16, "INT16_T"),
    torch.float16: (torch.int16, "INT16_T"),
    torch.int64: (torch.int64, "INT64_T"),
    torch.int32: (torch.int32, "INT32_T"),
    torch.int16: (torch.int16, "INT16_T"),
    torch.int8: (torch.int8, "INT8_T"),
    torch.uint8: (torch.uint8, "UINT8_T"),
}
_DTYPES = {str(d).removeprefix("torch."): d for d in _WIRE}


class SchemaError(ValueError):
    """A message does not match the agreed schema (names, shapes or dtype)."""


@dataclass(frozen=True)
class Schema:
    """Names, shapes and the single dtype of a message; offsets follow from the order."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtype: str

    @classmethod
    def of(cls, tensors: dict[str, torch.Tensor]) -> "Schema":
        dtypes = {str(t.dtype).removeprefix("torch.") for t in tensors.values()}
        if len(dtypes) != 1:
            raise SchemaError(f"a message has one dtype, got {sorted(dtypes)}")
        names = tuple(sorted(tensors))
        return cls(names, tuple(tuple(tensors[n].shape) for n in names), dtypes.pop())

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def numel(self) -> int:
        return sum(int(np.prod(s, dtype=np.int64)) for s in self.shapes)

    @property
    def nbytes(self) -> int:
        return self.numel * self.torch_dtype.itemsize

    def to_json(self) -> str:
        return json.dumps({"names": self.names, "shapes": self.shapes, "dtype": self.dtype})

    @classmethod
    def from_json(cls, text: str) -> "Schema":
        d = json.loads(text)
        if d["dtype"] not in _DTYPES:
            raise SchemaError(f"unsupported dtype {d['dtype']!r} in schema")
        return cls(tuple(d["names"]), tuple(tuple(int(x) for x in s) for s in d["shapes"]), d["dtype"])

    def pack(self, tensors: dict[str, torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
        """Flatten a message into one contiguous 1-D tensor, checking it against the schema exactly."""
        if set(tensors) != set(self.names):
            missing, extra = set(self.names) - set(tensors), set(tensors) - set(self.names)
            raise SchemaError(f"message keys differ from the schema (missing {sorted(missing)[:3]}, "
                              f"extra {sorted(extra)[:3]})")
        flat = torch.empty(self.numel, dtype=self.torch_dtype) if out is None else out
        offset = 0
        for name, shape in zip(self.names, self.shapes):
            t = tensors[name]
            if tuple(t.shape) != shape or t.dtype != self.torch_dtype:
                raise SchemaError(f"{name}: got {tuple(t.shape)} {t.dtype}, schema says {shape} {self.dtype}")
            n = t.numel()
            copy_into(flat[offset:offset + n], t)
            offset += n
        return flat

    def unpack(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views into `flat` named and shaped by the schema (after checking size and dtype)."""
        if flat.dtype != self.torch_dtype or flat.numel() != self.numel:
            raise SchemaError(f"buffer of {flat.numel()} x {flat.dtype} does not match schema "
                              f"{self.numel} x {self.dtype}")
        out, offset = {}, 0
        for name, shape in zip(self.names, self.shapes):
            n = int(np.prod(shape, dtype=np.int64))
            out[name] = flat[offset:offset + n].view(shape)
            offset += n
        return out


def _byte_tensor(data) -> torch.Tensor:
    """A uint8 tensor over a bytes-like object without copying it (only ever read: packed into a send buffer)."""
    if not len(data):
        return torch.empty(0, dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "The given buffer is not writable": it is never written
        return torch.frombuffer(data, dtype=torch.uint8)


def _wire(flat: torch.Tensor):
    """(numpy view, MPI datatype) of a contiguous tensor for a bit-exact transfer."""
    from mpi4py import MPI

    wire_dtype, mpi_name = _WIRE[flat.dtype]
    return as_numpy(flat.view(wire_dtype)), getattr(MPI, mpi_name)


class Comm:
    """Rank roles, device choice, schema-typed Bcast/Gatherv and byte counters over COMM_WORLD."""

    def __init__(self, comm=None):
        from mpi4py import MPI

        self.MPI = MPI
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.bytes = defaultdict(lambda: {"sent": 0, "recv": 0})  # category -> counters
        self.mpi_seconds = 0.0  # wall time inside MPI data calls
        self.idle_seconds = 0.0  # wall time waiting for other ranks in idle_wait
        self._local_rank = None

    @property
    def is_server(self) -> bool:
        return self.rank == 0

    @property
    def client_ranks(self) -> list[int]:
        return list(range(1, self.size))

    def _node(self) -> tuple[int, int]:
        """(rank, size) among the processes on this node (MPI Split_type shared; collective on first use)."""
        if self._local_rank is None:
            node = self.comm.Split_type(self.MPI.COMM_TYPE_SHARED, key=self.rank)
            self._local_rank = (node.Get_rank(), node.Get_size())
            node.Free()
        return self._local_rank

    def local_rank(self) -> int:
        return self._node()[0]

    def local_size(self) -> int:
        return self._node()[1]

    def torch_threads(self) -> int:
        """Torch threads for this rank. The server's phases (SGP, ODA, evaluation) and the clients' local
        training never overlap (the idle side sleeps in `idle_wait`), so rank 0 takes every core it may use,
        and the client ranks of a node share the cores (or take OMP_NUM_THREADS when set). Collective."""
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        ranks_here = self.local_size()
        if self.is_server:
            return cores
        from .validation import omp_num_threads  # checked before start-up (validation.check_environment)

        return omp_num_threads() or max(1, cores // ranks_here)

    def agree_devices(self, setting: str, bf16_keys: list[str]):
        """Every rank's device under the `device` setting (devices.assign on the reports of all ranks, gathered to
        every rank, so that all of them stop together on a setting that cannot hold). Collective."""
        from . import devices

        seen = devices.Seen.here(self.local_rank())
        table = [devices.Seen(**{**d, "names": tuple(d["names"]), "uuids": tuple(d["uuids"])})
                 for d in self.allgather_json(seen.__dict__)]
        self.assignment = devices.assign(setting, table, bf16_keys)
        return self.assignment

    def device(self) -> torch.device:
        """This rank's device, as `agree_devices` assigned it."""
        return torch.device(self.assignment.devices[self.rank])

    def allgather_json(self, obj) -> list:
        """Every rank's JSON-encodable `obj`, in rank order, on every rank (lengths, then the bytes). Collective."""
        data = np.frombuffer(json.dumps(obj).encode(), dtype=np.uint8)
        sizes = np.zeros(self.size, dtype=np.int64)
        self._timed(self.comm.Allgather, [np.array([data.size], dtype=np.int64), self.MPI.INT64_T],
                    [sizes, self.MPI.INT64_T])
        displs = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        recv = np.empty(int(sizes.sum()), dtype=np.uint8)
        self._timed(self.comm.Allgatherv, [data, self.MPI.BYTE],
                    [recv, (sizes.tolist(), displs.tolist()), self.MPI.BYTE])
        self._count("control", sent=data.size * (self.size - 1), recv=int(sizes.sum()) - data.size)
        return [json.loads(bytes(recv[d:d + n])) for d, n in zip(displs, sizes)]

    def _count(self, category: str, sent: int = 0, recv: int = 0) -> None:
        self.bytes[category]["sent"] += sent
        self.bytes[category]["recv"] += recv

    def totals(self) -> dict[str, int]:
        return {"sent": sum(v["sent"] for v in self.bytes.values()),
                "recv": sum(v["recv"] for v in self.bytes.values())}

    def _timed(self, fn, *args):
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.mpi_seconds += time.perf_counter() - t0

    def _bcast_flat(self, flat: torch.Tensor, root: int) -> None:
        for start in range(0, max(flat.numel(), 1), CHUNK_ELEMS):
            buf, mpitype = _wire(flat[start:start + CHUNK_ELEMS])
            self._timed(self.comm.Bcast, [buf, mpitype], root)

    def idle_wait(self, poll_s: float = 0.005) -> None:
        """Barrier that sleeps instead of spinning: ranks waiting for a long phase of another rank
        (the server's SGP/ODA, the clients' local training) leave the CPU cores to the working ranks; the collectives
        run it first when called with `idle=True`."""
        t0 = time.perf_counter()
        req = self.comm.Ibarrier()
        while not req.Test():
            time.sleep(poll_s)
        self.idle_seconds += time.perf_counter() - t0

    def settle(self, timeout_s: float = 10.0) -> bool:
        """A barrier that gives up after `timeout_s`: every rank leaving with the same error waits here until
        rank 0 has printed it (a rank that exits first makes mpirun kill the others); returns whether all came."""
        req, deadline = self.comm.Ibarrier(), time.perf_counter() + timeout_s
        while not req.Test():
            if time.perf_counter() > deadline:
                return False
            time.sleep(0.01)
        return True

    def agree_schema(self, schema: Schema | None, root: int = 0, category: str = "schema",
                     idle: bool = False) -> Schema:
        """Root sends the schema (JSON as bytes, never pickled); every rank returns the same Schema. `idle`: sleep in
        `idle_wait` first."""
        if idle:
            self.idle_wait()
        text = schema.to_json().encode() if self.rank == root else b""
        n = torch.tensor([len(text)], dtype=torch.int64)
        self._bcast_flat(n, root)
        buf = (torch.frombuffer(bytearray(text), dtype=torch.uint8) if self.rank == root
               else torch.empty(int(n), dtype=torch.uint8))
        self._bcast_flat(buf, root)
        self._count(category, *((8 + int(n)) * (self.size - 1), 0) if self.rank == root else (0, 8 + int(n)))
        return schema if self.rank == root else Schema.from_json(bytes(as_numpy(buf)).decode())

    def broadcast(self, tensors: dict[str, torch.Tensor] | None, schema: Schema, root: int = 0,
                  category: str = "broadcast", idle: bool = False) -> dict[str, torch.Tensor]:
        """Bcast one message from `root`; every rank returns it as tensors (views into one buffer). `idle`: sleep in
        `idle_wait` first."""
        if idle:
            self.idle_wait()
        flat = schema.pack(tensors) if self.rank == root else torch.empty(schema.numel, dtype=schema.torch_dtype)
        self._bcast_flat(flat, root)
        if self.rank == root:
            self._count(category, sent=schema.nbytes * (self.size - 1))
        else:
            self._count(category, recv=schema.nbytes)
        return schema.unpack(flat)

    def gatherv(self, messages: list[dict[str, torch.Tensor]], schema: Schema, counts: list[int], root: int = 0,
                category: str = "gather", idle: bool = False) -> list[list[dict[str, torch.Tensor]]] | None:
        """Gatherv to `root`: rank i sends `counts[i]` messages (its virtual clients) in one buffer (`idle`: after
        sleeping in `idle_wait`).

        Every rank passes the same `counts` (derived from the shared client schedule), so no size
        exchange is needed; the root receives a list per rank of its messages, the others None."""
        if len(messages) != counts[self.rank]:
            raise SchemaError(f"rank {self.rank} has {len(messages)} messages, the schedule says {counts[self.rank]}")
        if idle:
            self.idle_wait()
        n = schema.numel
        send = torch.empty(n * len(messages), dtype=schema.torch_dtype)
        for i, m in enumerate(messages):
            schema.pack(m, out=send[i * n:(i + 1) * n])
        if sum(counts) * n >= 2**31:
            raise SchemaError(f"gather of {sum(counts) * n} elements exceeds the MPI count limit; "
                              "uploads are small by design")
        sbuf, mpitype = _wire(send)
        if self.rank == root:
            recv = torch.empty(sum(counts) * n, dtype=schema.torch_dtype)
            rbuf, _ = _wire(recv)
            sizes = [c * n for c in counts]
            displs = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64).tolist()
            self._timed(self.comm.Gatherv, [sbuf, mpitype], [rbuf, (sizes, displs), mpitype], root)
            self._count(category, recv=(sum(counts) - counts[root]) * schema.nbytes)
            out, k = [], 0
            for c in counts:
                out.append([schema.unpack(recv[(k + i) * n:(k + i + 1) * n]) for i in range(c)])
                k += c
            return out
        self._timed(self.comm.Gatherv, [sbuf, mpitype], None, root)
        self._count(category, sent=len(messages) * schema.nbytes)
        return None

    def broadcast_bytes(self, files: dict[str, bytes] | None, root: int = 0, category: str = "model",
                        views: bool = False, idle: bool = False) -> dict:
        """Ship a set of files (e.g. the sub-LLM's safetensors + config) as one uint8 message. The root packs its
        files into the send buffer directly (one copy); with `views` the other ranks get memoryviews into the
        receive buffer instead of bytes copies (the 8B sub-LLM is ~5 GB: one host copy per rank, not two).
        `idle`: sleep in `idle_wait` first."""
        schema = None
        tensors = None
        if self.rank == root:
            tensors = {name: _byte_tensor(data) for name, data in files.items()}
            schema = Schema.of(tensors) if tensors else Schema((), (), "uint8")
        schema = self.agree_schema(schema, root, category=category, idle=idle)
        got = self.broadcast(tensors, schema, root, category=category)
        if self.rank == root:
            return files
        return {k: memoryview(as_numpy(v)) if views else bytes(as_numpy(v)) for k, v in got.items()}

    def broadcast_flag(self, value: bool | None, root: int = 0, idle: bool = False) -> bool:
        """One bool from `root` to every rank (8 bytes, counted as control; `idle`: after sleeping in `idle_wait`)."""
        if idle:
            self.idle_wait()
        buf = torch.tensor([int(bool(value)) if self.rank == root else 0], dtype=torch.int64)
        self._bcast_flat(buf, root)
        self._count("control", *((8 * (self.size - 1), 0) if self.rank == root else (0, 8)))
        return bool(buf.item())


def exit_with_launcher(poll_s: float = 0.5) -> threading.Thread:
    """Kill this rank as soon as its launcher (mpirun/prterun, slurmstepd) is gone: a daemon thread watches
    the parent pid. mpirun puts each rank in its own process group, so a SIGKILL of mpirun's group leaves the
    ranks orphaned; without this a rank busy computing would run on until its next MPI call."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(poll_s)
        sys.stderr.write(f"[pid {os.getpid()}] the launcher (pid {parent}) is gone: exiting\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    thread = threading.Thread(target=watch, name="exit-with-launcher", daemon=True)
    thread.start()
    return thread


def install_abort_hook(log=None) -> None:
    """Any uncaught exception on any rank aborts the whole job (MPI_Abort) after logging rank + error.

    Works in both launch forms: `python -m mpi4py -m fedsoda_mpi.main` and plain `python -m fedsoda_mpi.main`."""
    def hook(exc_type, exc, tb):
        from mpi4py import MPI

        rank = MPI.COMM_WORLD.Get_rank()
        text = "".join(traceback.format_exception(exc_type, exc, tb))
        msg = f"[rank {rank}] FATAL {exc_type.__name__}: {exc}"
        try:
            if log is not None:
                log(msg + "\n" + text)
        finally:
            sys.stderr.write(f"{text}{msg}\n[rank {rank}] aborting the whole MPI job\n")
            sys.stderr.flush()
            MPI.COMM_WORLD.Abort(1)

    sys.excepthook = hook
