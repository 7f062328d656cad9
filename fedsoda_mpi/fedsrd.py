"""FedSRD: Sparsify-Reconstruct-Decompose for federated LoRA (Yan et al. 2025), and FedSRD-e.

Follows the reference code Youth-49/FedSRD_2025 (main_fedsrd.py, federated_learning/fed_global.py):
- Sparsify (client): the round's UPDATE dA = A_k - A0, dB = B_k - B0 (A0, B0 = received global) is
  pruned per tensor by importance = |entry| x norm of its partner in the pair: |dA[j, :]| * ||B_k[:, j]||,
  |dB[:, j]| * ||A0[j, :]||, i.e. the Frobenius norm of the entry's contribution to the full-rank update
  B_k A_k - B0 A0 = B_k dA + dB A0; kept entries are rescaled to the tensor's original L1 norm.
  The reference prunes a kurtosis-adaptive fraction; a fixed MPI schema needs a fixed count, so
  `sparsify` keeps exactly k = max(1, round(density * numel)) entries (fed.upload_density).
- Reconstruct + Aggregate (server): W = sum_k w_k / sum w * scale * (B0 + dB_k) @ (A0 + dA_k).
- Decompose (server): rank-r truncated SVD of W (FedSRD) or W itself (FedSRD-e, no SVD), then the target
  dW = W_r - scale * B0 @ A0 is projected onto ONE factor (A on even rounds via pinv(B0), B on odd ones
  via pinv(A0), the other factor's update is zero) and randomly sparsified at the download density with
  rescale numel / k (the reference's Bernoulli mask, made exactly k for a fixed schema).
  Clients and server then apply global <- global + update (`apply_update`). As in the reference, an A
  round with B0 = 0 (PEFT's initial B) broadcasts a zero update (pinv(0) = 0): start with a B round.
Wire format: `encode` -> (positions, values): two fixed Schemas, `<name>.pos` uint8 and `<name>.val` float32
(k values, ascending position). A tensor's positions are a bitmask (1 bit per entry, numel / 8 bytes) or, when
that is smaller (density below 1/32), its int32 flat indices (4 bytes per kept entry); every rank derives which
from (numel, k), so a density-d payload costs min(d + 1/32, 2 d) of the dense float32 bytes (0.331 at d = 0.3).
`FedSRD` is the aggregation strategy (strategy.py's `Strategy`) that moves them.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .comm import Schema
from .host import as_numpy
from .seeds import FEDSRD_STREAM, torch_seed
from .strategy import State, accepted, payload


def lora_pairs(state: State) -> list[tuple[str, str]]:
    """(lora_A key, lora_B key) of every LoRA module, sorted; ValueError on an unpaired key."""
    a_keys = sorted(k for k in state if "lora_A" in k)
    pairs = [(a, a.replace("lora_A", "lora_B")) for a in a_keys]
    paired = {k for p in pairs for k in p}
    missing = [b for _, b in pairs if b not in state]
    stray = sorted(set(state) - paired)
    if missing or stray:
        raise ValueError(f"unpaired LoRA keys: missing {missing[:3]}, unmatched {stray[:3]}")
    return pairs


def prefix_of(key_a: str) -> str:
    """Module name of a lora_A key (`...q_proj.lora_A.weight` -> `...q_proj`)."""
    return key_a.split(".lora_A")[0]


def keep_count(numel: int, density: float) -> int:
    """Fixed number of entries a tensor of `numel` keeps at `density`: max(1, round(density * numel))."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    return min(numel, max(1, round(density * numel)))


def importance(local: State, received: State) -> State:
    """Sparsify: importance of each entry of the update (reference `contribution_aware_adaptive_prune`)."""
    out = {}
    for ka, kb in lora_pairs(local):
        da, db = local[ka].float() - received[ka].float(), local[kb].float() - received[kb].float()
        out[ka] = da.abs() * torch.linalg.norm(local[kb].float(), dim=0).unsqueeze(1)
        out[kb] = db.abs() * torch.linalg.norm(received[ka].float(), dim=1).unsqueeze(0)
    return out


def sparsify(local: State, received: State, density: float, rescale: bool = True) -> State:
    """Sparsify: the update local - received, keeping per tensor the k most important entries (importance
    above), rescaled to the update's L1 norm. Density 1.0 returns local - received unchanged."""
    out, scores = {}, importance(local, received)
    for name in local:
        delta = local[name] - received[name]
        k = keep_count(delta.numel(), density)
        if k == delta.numel():
            out[name] = delta
            continue
        flat = delta.float().flatten()
        keep = torch.zeros_like(flat)
        idx = torch.topk(scores[name].flatten(), k).indices
        keep[idx] = flat[idx]
        kept_l1 = keep.abs().sum()
        if rescale and kept_l1 > 1e-9:
            keep *= flat.abs().sum() / kept_l1
        out[name] = keep.view_as(delta).to(delta.dtype)
    return out


def position_bytes(numel: int, k: int) -> int:
    """Bytes of the positions of k kept entries out of numel: int32 indices (4 k) if smaller than a bitmask."""
    return min(4 * k, math.ceil(numel / 8))


def payload_shapes(shapes: dict[str, tuple], density: float) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """Sparsify (wire): the fixed shapes of (`<name>.pos` uint8, `<name>.val` float32) at `density`."""
    ks = {n: (math.prod(s), keep_count(math.prod(s), density)) for n, s in shapes.items()}
    return ({f"{n}.pos": (position_bytes(numel, k),) for n, (numel, k) in ks.items()},
            {f"{n}.val": (k,) for n, (_, k) in ks.items()})


def wire_schemas(shapes: dict[str, tuple], density: float) -> tuple[Schema, Schema]:
    """Sparsify (wire): the fixed (positions uint8, values float32) Schemas of `encode` at `density`."""
    pos, val = payload_shapes(shapes, density)
    return Schema(tuple(pos), tuple(pos.values()), "uint8"), Schema(tuple(val), tuple(val.values()), "float32")


def positions_to_bytes(positions: torch.Tensor, numel: int) -> torch.Tensor:
    """Wire: ascending flat positions of k entries as `position_bytes(numel, k)` uint8 (bitmask: bit i of byte j
    is entry 8 j + i; else little-endian int32 indices)."""
    k = positions.numel()
    if 4 * k < math.ceil(numel / 8):
        return torch.from_numpy(as_numpy(positions).astype("<i4").view(np.uint8).copy())
    mask = np.zeros(numel, dtype=bool)
    mask[as_numpy(positions)] = True
    return torch.from_numpy(np.packbits(mask, bitorder="little"))


def bytes_to_positions(blob: torch.Tensor, numel: int, k: int) -> torch.Tensor:
    """Wire: the k ascending flat positions of `positions_to_bytes`; ValueError if they are not k distinct
    positions in [0, numel) (a malformed message)."""
    if blob.dtype != torch.uint8 or blob.numel() != position_bytes(numel, k):
        raise ValueError(f"positions: {blob.numel()} x {blob.dtype}, expected {position_bytes(numel, k)} x uint8")
    if 4 * k < math.ceil(numel / 8):
        positions = torch.from_numpy(np.frombuffer(as_numpy(blob).tobytes(), dtype="<i4").astype(np.int64))
        if k and (positions[0] < 0 or positions[-1] >= numel or (positions.diff() <= 0).any()):
            raise ValueError(f"positions: indices not ascending in [0, {numel})")
        return positions
    bits = np.unpackbits(as_numpy(blob), bitorder="little")
    positions = torch.from_numpy(np.flatnonzero(bits[:numel]))
    if positions.numel() != k or bits[numel:].any():
        raise ValueError(f"positions: bitmask has {int(bits.sum())} set bits, expected {k} in [0, {numel})")
    return positions


def encode(state: State, density: float) -> tuple[State, State]:
    """Sparsify (wire): per tensor the k largest-|value| entries as (positions, float32 values in ascending
    position order). Lossless when a tensor has at most k non-zeros (e.g. the output of `sparsify`)."""
    pos, val = {}, {}
    for name, t in state.items():
        if t.numel() >= 2 ** 31:
            raise ValueError(f"{name}: {t.numel()} entries do not fit int32 indices")
        flat = t.detach().float().flatten()
        top = torch.topk(flat.abs(), keep_count(flat.numel(), density)).indices.sort().values
        pos[f"{name}.pos"], val[f"{name}.val"] = positions_to_bytes(top, flat.numel()), flat[top]
    return pos, val


def decode(pos: State, val: State, shapes: dict[str, tuple], dtype: torch.dtype = torch.float32) -> State:
    """Reconstruct (wire): dense tensors of `shapes` from an `encode` payload, zeros where dropped; ValueError
    on malformed positions."""
    out = {}
    for name, shape in shapes.items():
        numel, values = math.prod(shape), val[f"{name}.val"]
        dense = torch.zeros(numel, dtype=torch.float32)
        dense[bytes_to_positions(pos[f"{name}.pos"], numel, values.numel())] = values.float()
        out[name] = dense.view(shape).to(dtype)
    return out


def sparse_update(shapes: dict[str, tuple], pos: State, val: State, part: dict[str, tuple]) -> State:
    """Reconstruct: a full update of `shapes` from a payload that covers the tensors of `part` (zeros elsewhere)."""
    return {**{n: torch.zeros(s) for n, s in shapes.items()}, **decode(pos, val, part)}


def apply_update(received: State, update: State, dtype: torch.dtype | None = None) -> State:
    """Reconstruct: received + update (a client's local LoRA on the server, the new global everywhere),
    summed in float32, returned in `dtype` (default: the received dtype)."""
    return {n: (received[n].float() + update[n].float()).to(dtype or received[n].dtype) for n in received}


def aggregate_full_rank(states: list[State], weights: list[float], scale: float,
                        dtype: torch.dtype = torch.float32) -> State:
    """Aggregate: {module prefix: sum_k w_k / sum w * scale * B_k @ A_k} in `dtype`."""
    total = float(sum(weights))
    out = {}
    for ka, kb in lora_pairs(states[0]):
        acc = None
        for state, w in zip(states, weights):
            term = (scale * w / total) * (state[kb].to(dtype) @ state[ka].to(dtype))
            acc = term if acc is None else acc + term
        out[prefix_of(ka)] = acc
    return out


def decompose(delta: State, r: int, scale: float, dtype: torch.dtype = torch.float32) -> State:
    """Decompose: truncated SVD (float64) so that scale * B @ A is the best rank-r approximation of each
    delta; B = U_r sqrt(S_r / scale), A = sqrt(S_r / scale) V_r^T, keyed `<prefix>.lora_{A,B}.weight`."""
    out = {}
    for prefix, w in delta.items():
        u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
        root = torch.sqrt(s[:r] / scale)
        out[f"{prefix}.lora_B.weight"] = (u[:, :r] * root).to(dtype)
        out[f"{prefix}.lora_A.weight"] = (root.unsqueeze(1) * vh[:r]).to(dtype)
    return out


def factor_for_round(round_idx: int) -> str:
    """Decompose: the factor the broadcast updates, as the reference alternates (A even, B odd rounds)."""
    return "A" if round_idx % 2 == 0 else "B"


def random_sparsify(t: torch.Tensor, density: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sparsify (download): exactly k uniformly random entries kept, scaled by numel / k (unbiased)."""
    k = keep_count(t.numel(), density)
    if k == t.numel():
        return t
    flat = t.flatten()
    out = torch.zeros_like(flat)
    idx = torch.randperm(flat.numel(), generator=generator)[:k]
    out[idx] = flat[idx] * (flat.numel() / k)
    return out.view_as(t)


def broadcast_update(target: State, received: State, scale: float, factor: str, density: float,
                     generator: torch.Generator | None = None) -> State:
    """Decompose: project target - scale * B0 @ A0 onto one factor (least squares via pinv), the other
    factor's update is zero, then sparsify it for broadcast; returned in the received dtype."""
    if factor not in ("A", "B"):
        raise ValueError(f"factor must be 'A' or 'B', got {factor!r}")
    out = {}
    for ka, kb in lora_pairs(received):
        a0, b0 = received[ka].double(), received[kb].double()
        dw = target[prefix_of(ka)].double() / scale - b0 @ a0
        if factor == "A":
            upd, zero = ka, kb
            value = torch.linalg.pinv(b0) @ dw
        else:
            upd, zero = kb, ka
            value = dw @ torch.linalg.pinv(a0)
        out[upd] = random_sparsify(value, density, generator).to(received[upd].dtype)
        out[zero] = torch.zeros_like(received[zero])
    return out


def _server_round(updates: list[State], weights: list[float], received: State, scale: float, r: int | None,
                  download_density: float, factor: str, generator: torch.Generator | None):
    """Reconstruct + Aggregate (+ Decompose if r is not None) + broadcast; rejects as `strategy.accepted`."""
    keep, rejected = accepted(updates, weights)
    if not keep:
        return None, rejected
    states = [apply_update(received, updates[i], torch.float32) for i in keep]
    target = aggregate_full_rank(states, [weights[i] for i in keep], scale, torch.float64)
    if r is not None:
        factors = decompose(target, r, scale, torch.float64)
        target = {p: scale * factors[f"{p}.lora_B.weight"] @ factors[f"{p}.lora_A.weight"] for p in target}
    return broadcast_update(target, received, scale, factor, download_density, generator), rejected


def fedsrd(updates: list[State], weights: list[float], received: State, scale: float, download_density: float,
           factor: str, r: int | None = None, generator: torch.Generator | None = None):
    """FedSRD server round on the clients' sparse updates: Reconstruct, Aggregate in full rank, Decompose by
    rank-r SVD (r default: the LoRA rank), project on `factor`, Sparsify. Returns (update or None, rejected)."""
    r = r if r is not None else received[lora_pairs(received)[0][0]].shape[0]
    return _server_round(updates, weights, received, scale, r, download_density, factor, generator)


def fedsrd_e(updates: list[State], weights: list[float], received: State, scale: float, download_density: float,
             factor: str, generator: torch.Generator | None = None):
    """FedSRD-e server round: as `fedsrd` without the SVD (the full-rank aggregate is projected directly)."""
    return _server_round(updates, weights, received, scale, None, download_density, factor, generator)


class FedSRD:
    """FedSRD (svd=True) / FedSRD-e as an aggregation strategy. Uploads: the dense local LoRA, or at
    fed.upload_density < 1 the top-k update as (uint8 positions, float32 values) messages. Downloads: the dense global
    LoRA in the first round of a run (or of a resume), then at fed.download_density < 1 the previous round's
    sparse update of one factor (`factor_for_round`, known to every rank); the server keeps what it sent
    (`pending`) and applies the same decoded values, so it and the clients stay bit-identical."""

    def __init__(self, schema: Schema, cfg, svd: bool = True):
        self.schema, self.cfg, self.shapes = schema, cfg, dict(zip(schema.names, schema.shapes))
        self.svd, self.up_d, self.down_d = svd, cfg.fed.upload_density, cfg.fed.download_density
        self.pending = None  # server: (factor, pos, val) that the next round downloads
        self.up = [schema] if self.up_d >= 1 else list(wire_schemas(self.shapes, self.up_d))
        self.down = {}
        for factor in ("A", "B"):
            part = {n: s for n, s in self.shapes.items() if f"lora_{factor}" in n}
            self.down[factor] = (part, *wire_schemas(part, self.down_d))

    def sparse_round(self, rnd: int, first: int) -> bool:
        """Round `rnd` downloads the previous round's sparse update (not in the first round of a run or resume)."""
        return self.down_d < 1 and rnd > first

    def download_schemas(self, rnd: int, first: int) -> list[Schema]:
        """Line 7: the dense global LoRA, or the (positions, values) of the previous round's factor."""
        if not self.sparse_round(rnd, first):
            return [self.schema]
        return list(self.down[factor_for_round(rnd - 1)][1:])

    def download(self, global_state: State, rnd: int, first: int) -> list[State]:
        """Line 7, server: the dense global LoRA, or the sparse update the previous round's `aggregate` kept."""
        if not self.sparse_round(rnd, first):
            return [global_state]
        factor, pos, val = self.pending
        assert factor == factor_for_round(rnd - 1)
        return [pos, val]

    def receive(self, msgs: list[State], held: State | None, rnd: int, first: int) -> State:
        """Reconstruct (client): the dense global LoRA, or `held` + the decoded sparse update."""
        if not self.sparse_round(rnd, first):
            return msgs[0]
        return apply_update(held, sparse_update(self.shapes, *msgs, self.down[factor_for_round(rnd - 1)][0]))

    def pack_upload(self, local: State, received: State) -> list[State]:
        """Sparsify (client): the dense local LoRA, or the top-k update."""
        if self.up_d >= 1:
            return [local]
        return list(encode(sparsify(local, received, self.up_d), self.up_d))

    def unpack_upload(self, msgs: list[State], received: State) -> State:
        """Reconstruct (server): the client's update local - received; malformed positions give a NaN update,
        which `aggregate` rejects and reports like a diverged one."""
        if self.up_d >= 1:
            return {n: msgs[0][n].clone() - received[n] for n in self.shapes}
        try:
            return decode(msgs[0], msgs[1], self.shapes)
        except ValueError:
            return {n: torch.full(s, float("nan")) for n, s in self.shapes.items()}

    def aggregate(self, updates: list[State], weights: list[float], global_state: State, rnd: int):
        """Reconstruct, Aggregate, Decompose (SVD unless FedSRD-e), project on this round's factor, Sparsify;
        the new global is global + the (decoded) update. Round 1 updates B (PEFT's B starts at 0)."""
        c = self.cfg
        factor = factor_for_round(rnd)
        gen = torch.Generator().manual_seed(torch_seed(c.seed, rnd, FEDSRD_STREAM))
        args = (updates, weights, global_state, c.lora.alpha / c.lora.r, self.down_d, factor)
        update, rejected = fedsrd(*args, generator=gen) if self.svd else fedsrd_e(*args, generator=gen)
        if update is None:
            return None, rejected
        if self.down_d < 1:
            part = self.down[factor][0]
            pos, val = encode({n: update[n] for n in part}, self.down_d)
            self.pending = (factor, pos, val)
            update = sparse_update(self.shapes, pos, val, part)
        return apply_update(global_state, update), rejected

    def steady_download_size(self) -> tuple[float, float]:
        """The dense global LoRA, or (sparse) one factor per round: the mean of an A and a B round."""
        if self.down_d >= 1:
            return payload([self.schema])
        sizes = [payload(list(self.down[f][1:])) for f in "AB"]
        return sum(v for v, _ in sizes) / 2, sum(b for _, b in sizes) / 2
