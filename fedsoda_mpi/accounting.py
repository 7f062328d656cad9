"""What the rounds of Algorithm 2 moved and how long they took, on rank 0: the byte columns of /rounds, the traffic
fields of /final, and the /timing rows gathered from every rank (timing.py's `PhaseClock` measures them on each rank).

Bytes come from two sources: comm.py's counters (what went through MPI, including schemas and flags) and the
strategy's schemas (the LoRA payload the round had to move, strategy.py). No MPI here: federation.py gathers.
"""
from __future__ import annotations

import time

import numpy as np

from .comm import Schema
from .runlog import RunLog
from .strategy import FIT, download_size, traffic, upload_size
from .timing import PHASES, split


class Ledger:
    """The accounts of a run: per round the wall time and the bytes; at the end the per-round traffic. Every rank
    keeps one (the counters are its own); rank 0's is the one recorded."""

    def __init__(self, comm, log: RunLog, strategy, ad_schema: Schema, em_schema: Schema, clients: int, first: int):
        """`ad_schema` / `em_schema`: the adapter and emulator LoRA messages; `first`: this process's first round."""
        self.comm, self.log, self.strategy, self.clients, self.first = comm, log, strategy, clients, first
        self.ad_schema, self.em_schema = ad_schema, em_schema
        self.reset_moved()

    def reset_moved(self) -> None:
        """/rounds/moved_bytes counts rank 0's counters from here on (each row: since the previous row)."""
        self.moved_mark = self.comm.totals()

    def start_round(self) -> None:
        self.t_round, self.sent0 = time.time(), self.comm.totals()

    def round_seconds(self) -> float:
        """Wall seconds since `start_round`."""
        return time.time() - self.t_round

    def bytes_row(self, rnd: int, chosen: list[int], realigned: bool) -> dict:
        """The round's byte columns of /rounds: measured by comm's counters, and the LoRA payload the strategy's
        schemas say the round had to move (the download to every client rank, + the re-aligned emulator LoRA,
        one upload per sampled client without its `FIT` message); /rounds/upload_bytes counts the FIT message."""
        comm, strategy, em = self.comm, self.strategy, self.em_schema
        now = comm.totals()
        moved = now["sent"] + now["recv"] - self.moved_mark["sent"] - self.moved_mark["recv"]
        self.moved_mark = now
        (up_values, up_bytes), (down_values, down_bytes) = upload_size(strategy), download_size(strategy, rnd,
                                                                                                 self.first)
        upload = np.zeros(self.clients, np.int64)
        upload[chosen] = sum(s.nbytes for s in strategy.up) + FIT.nbytes
        payload = (comm.size - 1) * (down_bytes + (em.nbytes if realigned else 0)) + len(chosen) * up_bytes
        return {"upload_bytes": upload,
                "download_bytes": np.int64((now["sent"] - self.sent0["sent"]) // (comm.size - 1)),
                "comm_params": np.int64(up_values + down_values + (em.numel if realigned else 0)),
                "upload_density": np.float32(up_values / self.ad_schema.numel),
                "download_density": np.float32(down_values / self.ad_schema.numel),
                "moved_bytes": np.int64(moved), "payload_bytes": np.int64(payload)}

    def record_timing(self, rnd: int, rows: np.ndarray) -> None:
        """Every rank's phase times of round `rnd` ([W, P + E] rows, `PhaseClock.row`) -> /timing."""
        self.log.append("timing", {"round": np.int32(rnd), **split(rows)})
        self.log.set_attrs("timing", phases=list(PHASES))
        self.log.flush()

    def emulator_share(self, realign_every: int, trigger: str) -> tuple[int, int, int]:
        """(emulator LoRA messages, per this many rounds, re-alignments of the run): 1 per r with oda.trigger=every
        (the design value the tables report), re-alignments per rounds run with oda.trigger=drift (what the run
        did, from /rounds/realigned, so the rounds before a resume count too); `realign_every` = 0: never."""
        flags = self.log.column("rounds", "realigned")
        count = int(flags.sum()) if flags is not None else 0
        if not realign_every:
            return 0, 1, count
        if trigger == "every":
            return 1, realign_every, count
        return count, max(len(flags), 1), count

    def final(self, realign_every: int, trigger: str, model_bytes: int) -> dict:
        """The traffic fields of /final: the adapter LoRA's upload + download per round and the emulator LoRA's
        share of it, the re-alignments, and what a client holds (the shipped M* of `model_bytes` + both LoRAs)."""
        ad, em = self.ad_schema, self.em_schema
        values, nbytes = traffic(self.strategy)  # upload + download of the adapter LoRA
        sent, per, realignments = self.emulator_share(realign_every, trigger)
        return {"trainable_params": ad.numel, "comm_params_per_round": int(values + em.numel * sent / per),
                "comm_bytes_per_round": float(nbytes + em.nbytes * sent / per), "realignments": realignments,
                "emulator_lora_bytes": int(em.nbytes), "client_model_bytes": int(model_bytes + ad.nbytes + em.nbytes)}
