"""Run under `mpirun -n 3`: rank 0 stops itself (SIGSTOP) between two collectives while ranks 1-2 block in a plain
Bcast (MPI spins in C code; no `Comm.idle_wait` runs): the other ranks' watch threads (`federation.watching`) must
end the job with one line and MPI_Abort.

    mpirun -n 3 python -m mpi4py tests/mpi_jobs/stall_job.py <run folder>
"""
import os
import signal
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from fedsoda_mpi.comm import Comm
from fedsoda_mpi.federation import watching


def main() -> None:
    run_dir, comm = Path(sys.argv[1]), Comm()
    cfg = SimpleNamespace(fed=SimpleNamespace(stall_timeout=5.0))
    with watching(cfg, comm, run_dir):
        buf = np.zeros(4)
        comm.comm.Bcast(buf, root=0)  # every rank is here, each with its heartbeat and watch threads running
        if comm.rank == 0:
            os.kill(os.getpid(), signal.SIGSTOP)
        comm.comm.Bcast(buf, root=0)  # ranks 1 and 2 block in MPI for a rank 0 that never comes
    print(f"rank {comm.rank}: past the second Bcast (rank 0 continued by the launcher's kill sequence)", flush=True)


if __name__ == "__main__":
    main()
