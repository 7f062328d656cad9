"""FedSRD / FedSRD-e (fedsoda_mpi.fedsrd): importance-aware sparsification of the update, fixed-size sparse
wire format, full-rank weighted aggregation, rank-r SVD decomposition and the one-factor broadcast."""

import pytest
import torch

from fedsoda_mpi import fedsrd as srd
from fedsoda_mpi.comm import Schema
from fedsoda_mpi.fedsrd import (aggregate_full_rank, apply_update, decode, decompose, encode,
                                factor_for_round, fedsrd, fedsrd_e, importance, lora_pairs, payload_shapes,
                                random_sparsify, sparsify)
from fedsoda_mpi.strategy import download_size, traffic, upload_size

SCALE = 2.0  # alpha / r = 16 / 8
MODS = ["base_model.model.model.layers.0.self_attn.q_proj", "base_model.model.model.layers.1.mlp.down_proj"]
OUT, IN, R = 12, 10, 3


def key(mod, ab):
    return f"{mod}.lora_{ab}.weight"


def lora(seed, scale_b=1.0):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for m in MODS:
        state[key(m, "A")] = torch.randn(R, IN, generator=g)
        state[key(m, "B")] = torch.randn(OUT, R, generator=g) * scale_b
    return state


def product(state, mod, scale=SCALE):
    return scale * state[key(mod, "B")].double() @ state[key(mod, "A")].double()


def rel(x, y):
    return float((x.double() - y.double()).norm() / y.double().norm())


def delta(local, received):
    return {n: local[n] - received[n] for n in local}


def test_lora_pairs_sorted_and_unpaired_key_raises():
    state = lora(0)
    pairs = lora_pairs(state)
    assert pairs == sorted((key(m, "A"), key(m, "B")) for m in MODS)
    with pytest.raises(ValueError):
        lora_pairs({k: v for k, v in state.items() if k != key(MODS[1], "B")})
    with pytest.raises(ValueError):
        lora_pairs({**state, "stray.weight": torch.zeros(1)})


def test_identical_clients_density_one_recover_the_client():
    received = lora(0)
    # A round: the clients trained A only, so the one-factor broadcast can represent their product exactly
    local = {**received, **{key(m, "A"): received[key(m, "A")] + 0.3 * torch.randn(R, IN) for m in MODS}}
    upd = sparsify(local, received, 1.0)
    for fn in (fedsrd, fedsrd_e):
        update, rejected = fn([upd, upd, upd], [5, 1, 7], received, SCALE, 1.0, "A")
        new = apply_update(received, update)
        assert rejected == []
        for m in MODS:
            assert rel(product(new, m), product(local, m)) < 1e-5
            assert torch.count_nonzero(update[key(m, "B")]) == 0
        if fn is fedsrd_e:
            assert all(rel(new[n], local[n]) < 1e-5 for n in local)
    # B round: B trained only
    local = {**received, **{key(m, "B"): received[key(m, "B")] + 0.3 * torch.randn(OUT, R) for m in MODS}}
    update, _ = fedsrd([delta(local, received)] * 2, [1, 1], received, SCALE, 1.0, factor_for_round(1))
    new = apply_update(received, update)
    assert all(rel(new[n], local[n]) < 1e-5 for n in local)


def test_broadcast_is_the_least_squares_projection_of_the_rank_r_target():
    received, c1, c2 = lora(0), lora(1), lora(2)
    ups = [delta(c1, received), delta(c2, received)]
    update, _ = fedsrd(ups, [1, 3], received, SCALE, 1.0, "A")
    update_e, _ = fedsrd_e(ups, [1, 3], received, SCALE, 1.0, "A")
    new, new_e = apply_update(received, update), apply_update(received, update_e)
    for m in MODS:
        b0 = received[key(m, "B")].double()
        full = 0.25 * product(c1, m) + 0.75 * product(c2, m)  # rank 2r > r: the SVD changes the target
        u, s, vh = torch.linalg.svd(full)
        best = (u[:, :R] * s[:R]) @ vh[:R]
        # normal equations: B0^T (scale B0 A_new - target) = 0, target = rank-r SVD (fedsrd) or full (fedsrd_e)
        assert float((b0.T @ (product(new, m) - best)).norm()) < 1e-4 * float(best.norm())
        assert float((b0.T @ (product(new_e, m) - full)).norm()) < 1e-4 * float(full.norm())
        assert rel(new[key(m, "A")], new_e[key(m, "A")]) > 1e-3
        assert torch.equal(new[key(m, "B")], received[key(m, "B")])


def test_decompose_is_the_best_rank_r_approximation():
    g = torch.Generator().manual_seed(3)
    w = {MODS[0]: torch.randn(OUT, IN, generator=g, dtype=torch.float64)}
    f = decompose(w, R, SCALE, torch.float64)
    assert f[key(MODS[0], "A")].shape == (R, IN) and f[key(MODS[0], "B")].shape == (OUT, R)
    approx = product(f, MODS[0])
    s = torch.linalg.svd(w[MODS[0]]).S
    err = float((w[MODS[0]] - approx).norm())
    assert err == pytest.approx(float(s[R:].pow(2).sum().sqrt()), rel=1e-10)
    u, s2, vh = torch.linalg.svd(w[MODS[0]])
    assert torch.allclose(approx, (u[:, :R] * s2[:R]) @ vh[:R], atol=1e-10)
    # sqrt(S) split evenly: both factors have the same singular values
    assert torch.allclose(torch.linalg.svdvals(f[key(MODS[0], "A")]), torch.linalg.svdvals(f[key(MODS[0], "B")]))
    # a rank-r aggregate (two clients sharing A) is reconstructed exactly
    c1, c2 = lora(4), lora(5)
    c2 = {**c2, **{key(m, "A"): c1[key(m, "A")] for m in MODS}}
    agg = aggregate_full_rank([c1, c2], [1, 2], SCALE, torch.float64)
    back = decompose(agg, R, SCALE, torch.float32)
    assert back[key(MODS[1], "A")].dtype == torch.float32
    for m in MODS:
        assert rel(product(back, m), agg[m]) < 1e-5


def test_aggregate_weights_three_to_one():
    c1, c2 = lora(6), lora(7)
    agg = aggregate_full_rank([c1, c2], [3, 1], SCALE, torch.float64)
    for m in MODS:
        assert torch.allclose(agg[m], 0.75 * product(c1, m) + 0.25 * product(c2, m), atol=1e-12)
    assert set(agg) == set(MODS)


def test_encode_decode_round_trip_and_fixed_sizes():
    state = {key(MODS[0], "A"): torch.randn(4, 20), key(MODS[0], "B"): torch.randn(20, 4)}
    shapes = {n: tuple(t.shape) for n, t in state.items()}
    pos, val = encode(state, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(decode(pos, val, shapes).values(), state.values()))
    dense_bytes = Schema.of(state).nbytes
    for d in (1.0, 0.5, 0.1):
        pos, val = encode(state, d)
        pshapes, vshapes = payload_shapes(shapes, d)
        k = round(d * 80)
        assert {n: tuple(t.shape) for n, t in pos.items()} == pshapes == {f"{n}.pos": (10,) for n in state}  # 80 bits
        assert {n: tuple(t.shape) for n, t in val.items()} == vshapes == {f"{n}.val": (k,) for n in state}
        pschema, vschema = Schema.of(pos), Schema.of(val)
        assert (pschema.dtype, vschema.dtype) == ("uint8", "float32")
        assert pschema.nbytes + vschema.nbytes == 2 * (10 + 4 * k) == (d + 1 / 32) * dense_bytes
        # the kept entries are the largest |value| ones and survive the trip through the wire buffers
        out = decode(pschema.unpack(pschema.pack(pos)), vschema.unpack(vschema.pack(val)), shapes)
        for n, t in state.items():
            kept = out[n] != 0
            assert int(kept.sum()) == k and torch.equal(out[n][kept], t[kept])
            if d < 1.0:
                assert t[~kept].abs().max() <= t[kept].abs().min()


def test_positions_are_a_bitmask_or_int32_indices_whichever_is_smaller():
    """A bitmask costs numel / 8 bytes whatever the density; int32 indices 4 k. Below density 1/32 the indices
    win, so a payload never costs more than min(d + 1/32, 2 d) of the dense bytes (plus one byte of rounding)."""
    g = torch.Generator().manual_seed(0)
    for numel, d in [(3000, 0.3), (3000, 0.5), (3000, 0.02), (21, 0.1), (7, 1.0), (4096, 1 / 32)]:
        t = {"x": torch.randn(numel, generator=g)}
        k = srd.keep_count(numel, d)
        pos, val = encode(t, d)
        nbytes = pos["x.pos"].numel() + 4 * val["x.val"].numel()
        assert pos["x.pos"].dtype == torch.uint8 and pos["x.pos"].numel() == srd.position_bytes(numel, k)
        assert nbytes <= 4 * numel * min(k / numel + 1 / 32, 2 * k / numel) + 1
        back = decode(pos, val, {"x": (numel,)})["x"]
        top = t["x"].abs().topk(k).indices
        assert torch.equal(back[top], t["x"][top]) and int((back != 0).sum()) == k
    assert srd.position_bytes(3000, 900) == 375 and srd.position_bytes(3000, 60) == 240  # mask, then indices


def test_malformed_positions_are_refused_and_a_malformed_upload_is_rejected():
    state = {"x": torch.randn(64, generator=torch.Generator().manual_seed(0))}
    for d in (0.5, 0.02):  # bitmask, then indices
        pos, val = encode(state, d)
        bad = pos["x.pos"].clone()
        if d == 0.5:
            bad[:] = 0xFF  # all 64 bits set: not k = 32
        else:
            bad.view(torch.int32)[0] = 10_000  # an index out of range
        with pytest.raises(ValueError, match="positions"):
            decode({"x.pos": bad}, val, {"x": (64,)})
        with pytest.raises(ValueError, match="positions"):
            decode({"x.pos": pos["x.pos"][:-1]}, val, {"x": (64,)})
    received, local = _lora_state(0), _lora_state(1)
    strategy = _strategy("fedsrd", 0.25, 1.0, received)
    msgs = strategy.pack_upload(local, received)
    name = next(iter(msgs[0]))
    msgs[0][name] = torch.zeros_like(msgs[0][name])  # no position set
    update = strategy.unpack_upload(msgs, received)
    assert all(torch.isnan(t).all() for t in update.values())
    good = strategy.unpack_upload(strategy.pack_upload(local, received), received)
    new, rejected = strategy.aggregate([good, update], [3.0, 3.0], received, 1)
    assert new is not None and rejected == [1]


def test_index_positions_decode_from_a_misaligned_slice_of_the_wire_buffer():
    """A bitmask of ceil(numel / 8) bytes can leave the next tensor's int32 indices at an offset that is not a
    multiple of 4 inside the one received buffer; decoding must not depend on the alignment."""
    state = {"a": torch.randn(2, 8, generator=torch.Generator().manual_seed(0)),
             "b": torch.randn(8, 4096, generator=torch.Generator().manual_seed(1))}
    shapes = {n: tuple(t.shape) for n, t in state.items()}
    pos, val = encode(state, 0.01)  # a: 1 of 16 (4 index bytes > a 2-byte mask: mask); b: 328 of 32768 (indices)
    assert [pos["a.pos"].numel(), pos["b.pos"].numel()] == [2, 4 * 328]
    pschema, vschema = Schema.of(pos), Schema.of(val)
    back = decode(pschema.unpack(pschema.pack(pos)), vschema.unpack(vschema.pack(val)), shapes)
    assert all(torch.equal(back[n], decode(pos, val, shapes)[n]) for n in state)


def test_upload_bytes_at_density_0_3_on_a_real_lora_schema():
    """Issue 17: the FedSRD upload at density 0.3 on SmolLM2's adapter LoRA (r = 8 on q, k, v, o, gate, up, down
    of a 576-wide, 1536-FFN layer) costs d + 1/32 = 0.331 of FedAvg's dense upload (was 0.600 with int32 indices)."""
    D, KV, FF, r = 576, 192, 1536, 8
    shapes = {}
    for name, (i, o) in {"q": (D, D), "k": (D, KV), "v": (D, KV), "o": (D, D), "gate": (D, FF), "up": (D, FF),
                         "down": (FF, D)}.items():
        shapes[f"l.{name}.lora_A.weight"], shapes[f"l.{name}.lora_B.weight"] = (r, i), (o, r)
    state = {n: torch.zeros(s) for n, s in shapes.items()}
    dense = upload_size(_strategy("fedavg", 1.0, 1.0, state))[1]
    sparse = upload_size(_strategy("fedsrd", 0.3, 1.0, state))[1]
    assert sparse / dense == pytest.approx(0.3 + 1 / 32, abs=2e-3) and sparse / dense <= 0.35


def test_encode_of_a_sparsified_update_is_lossless():
    received, local = lora(0), lora(1)
    sparse = sparsify(local, received, 0.25)
    shapes = {n: tuple(t.shape) for n, t in sparse.items()}
    back = decode(*encode(sparse, 0.25), shapes)
    assert all(torch.equal(back[n], sparse[n]) for n in sparse)


def test_sparsify_keeps_the_entries_of_the_largest_contribution():
    # |dA| and |dB| are uniform, so only the partner norms rank the entries. The reference weights the A update
    # by the LOCAL B's column norms and the B update by the RECEIVED A's row norms; the other choices (received
    # B, local A) would pick row 0 / columns 0-1 here, the right ones pick row 2 of dA and column 2 of dB.
    m = MODS[0]
    a0 = torch.ones(R, IN) * torch.tensor([[1.0], [1.0], [4.0]])  # received A row norms favour row 2
    da = 3 * torch.ones(R, IN) * torch.tensor([[1.0], [1.0], [-1.0]])  # local A = rows 4, 4, 1
    b0 = torch.ones(OUT, R) * torch.tensor([1.5, 1.0, 0.0])  # received B column norms favour column 0
    db = torch.ones(OUT, R) * torch.tensor([-1.0, -1.0, 1.0])  # local B = columns 0.5, 0, 1
    received = {key(m, "A"): a0, key(m, "B"): b0}
    local = {key(m, "A"): a0 + da, key(m, "B"): b0 + db}
    sp = sparsify(local, received, 1 / 3)  # k = one row of dA (10), one column of dB (12)
    dA, dB = sp[key(m, "A")], sp[key(m, "B")]
    assert torch.count_nonzero(dA) == IN and torch.count_nonzero(dA[2]) == IN
    assert torch.count_nonzero(dB) == OUT and torch.count_nonzero(dB[:, 2]) == OUT
    # kept entries rescaled so the update keeps its L1 norm (x3 here), signs kept
    assert torch.allclose(dA[2], torch.full((IN,), -9.0)) and torch.allclose(dB[:, 2], torch.full((OUT,), 3.0))
    assert float(dA.abs().sum()) == pytest.approx(float(da.abs().sum()))
    assert float(dB.abs().sum()) == pytest.approx(float(db.abs().sum()))
    unscaled = sparsify(local, received, 1 / 3, rescale=False)
    assert torch.allclose(unscaled[key(m, "A")][2], da[2])


def test_importance_is_the_norm_of_each_entry_contribution_to_the_full_rank_update():
    received, local = lora(0), lora(1)
    imp = importance(local, received)
    m = MODS[1]
    a0, b0, a1, b1 = (x[key(m, ab)].double() for x in (received, local) for ab in "AB")
    da, db = a1 - a0, b1 - b0
    assert torch.allclose(b1 @ a1 - b0 @ a0, b1 @ da + db @ a0, atol=1e-10)  # exact split used by the score
    j, i, o = 2, 7, 5
    assert float(imp[key(m, "A")][j, i]) == pytest.approx(float((b1[:, j:j + 1] * da[j, i]).norm()), rel=1e-5)
    assert float(imp[key(m, "B")][o, j]) == pytest.approx(float((db[o, j] * a0[j]).norm()), rel=1e-5)


def test_sparsify_density_one_is_the_bit_identical_update_and_counts_are_fixed():
    received, local = lora(0), lora(1)
    sp = sparsify(local, received, 1.0)
    assert all(torch.equal(sp[n], local[n] - received[n]) for n in local)
    sp = sparsify(local, received, 0.1)
    assert all(int(torch.count_nonzero(sp[n])) == round(0.1 * sp[n].numel()) for n in sp)
    with pytest.raises(ValueError):
        sparsify(local, received, 0.0)


def test_download_sparsification_is_exactly_k_random_and_unbiased_scaled():
    t = torch.arange(1.0, 101.0)
    s = random_sparsify(t, 0.2, torch.Generator().manual_seed(0))
    kept = s != 0
    assert int(kept.sum()) == 20 and torch.allclose(s[kept], t[kept] * 5)
    assert torch.equal(s, random_sparsify(t, 0.2, torch.Generator().manual_seed(0)))
    assert torch.equal(random_sparsify(t, 1.0), t)
    received, local = lora(0), lora(1)
    update, _ = fedsrd([delta(local, received)], [1], received, SCALE, 0.1, "B", generator=torch.Generator())
    for m in MODS:
        assert int(torch.count_nonzero(update[key(m, "B")])) <= round(0.1 * OUT * R)
        assert torch.count_nonzero(update[key(m, "A")]) == 0


def test_non_finite_clients_rejected_and_all_rejected_gives_none():
    received, good = lora(0), lora(1)
    bad = {**good, key(MODS[0], "A"): good[key(MODS[0], "A")].clone()}
    bad[key(MODS[0], "A")][0, 0] = float("nan")
    inf = {**good, key(MODS[1], "B"): torch.full((OUT, R), float("inf"))}
    ups = [delta(good, received), delta(bad, received), delta(inf, received)]
    for fn in (fedsrd, fedsrd_e):
        update, rejected = fn(ups, [1, 1, 1], received, SCALE, 1.0, "A")
        alone, _ = fn(ups[:1], [1], received, SCALE, 1.0, "A")
        assert rejected == [1, 2] and all(torch.equal(update[n], alone[n]) for n in update)
        assert all(torch.isfinite(t).all() for t in update.values())
        update, rejected = fn(ups[1:], [1, 1], received, SCALE, 1.0, "A")
        assert update is None and rejected == [0, 1]
        update, rejected = fn(ups[:1], [0], received, SCALE, 1.0, "A")
        assert update is None and rejected == [0]


def _lora_state(seed: int, r: int = 4) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"m.layers.2.q_proj.lora_A.weight": torch.randn(r, 12, generator=g),
            "m.layers.2.q_proj.lora_B.weight": torch.randn(10, r, generator=g),
            "m.layers.2.up_proj.lora_A.weight": torch.randn(r, 12, generator=g),
            "m.layers.2.up_proj.lora_B.weight": torch.randn(20, r, generator=g)}


def _strategy(aggregator: str, up: float, down: float, state: dict):
    from fedsoda_mpi.comm import Schema
    from fedsoda_mpi.config import load_config
    from fedsoda_mpi.strategies import strategy_for

    cfg = load_config(None, [f"fed.aggregator={aggregator}", f"fed.upload_density={up}",
                             f"fed.download_density={down}"])
    return strategy_for(cfg, Schema.of(state))


CASES = [("fedavg", 1.0, 1.0), ("fedsrd", 1.0, 1.0), ("fedsrd", 0.25, 0.5), ("fedsrd-e", 0.1, 0.1)]


@pytest.mark.parametrize("aggregator,up,down", CASES)
def test_upload_round_trip_and_traffic_from_the_schemas(aggregator, up, down):
    received, local = _lora_state(0), _lora_state(1)
    strategy = _strategy(aggregator, up, down, received)
    msgs = strategy.pack_upload(local, received)
    assert [set(m) for m in msgs] == [set(s.names) for s in strategy.up]  # what is sent matches the schemas
    assert all(tuple(m[name].shape) == shape
               for m, s in zip(msgs, strategy.up) for name, shape in zip(s.names, s.shapes))
    assert all(s.torch_dtype == t.dtype for m, s in zip(msgs, strategy.up) for t in m.values())
    state = strategy.unpack_upload(msgs, received)
    dense = sum(t.numel() for t in local.values())
    if aggregator == "fedavg":
        assert all(torch.equal(state[k], local[k]) for k in local) and traffic(strategy) == (2 * dense, 8 * dense)
    elif up == 1.0:
        assert all(torch.equal(state[k], local[k] - received[k]) for k in local)
    else:
        want = srd.sparsify(local, received, up)
        assert all(torch.equal(state[k], want[k]) for k in local)
        kept = sum(srd.keep_count(t.numel(), up) for t in local.values())
        positions = sum(srd.position_bytes(t.numel(), srd.keep_count(t.numel(), up)) for t in local.values())
        assert sum(s.nbytes for s in strategy.up) == positions + 4 * kept
        assert upload_size(strategy) == (kept, positions + 4 * kept)
    params, nbytes = traffic(strategy)
    assert nbytes < 8 * dense or (up, down) == (1.0, 1.0)
    sparse_down = aggregator != "fedavg" and down < 1
    assert download_size(strategy, 1, 1) == (dense, 4 * dense)  # the first round of a run: the dense global LoRA
    assert (download_size(strategy, 2, 1) != (dense, 4 * dense)) == sparse_down


@pytest.mark.parametrize("aggregator,up,down", CASES)
def test_server_and_clients_hold_the_same_global_lora_after_each_round(aggregator, up, down):
    """Three rounds of upload -> aggregate -> download through the strategy, in one process: the global LoRA a
    client rebuilds from the downloads equals the server's bit for bit (dense first round, then sparse updates)."""
    server_global = _lora_state(0)
    server, client = _strategy(aggregator, up, down, server_global), _strategy(aggregator, up, down, server_global)
    held = None
    for rnd in (1, 2, 3):
        sent = server.download(server_global, rnd, 1)
        held = client.receive([{k: v.clone() for k, v in m.items()} for m in sent], held, rnd, 1)
        assert held.keys() == server_global.keys() and all(torch.equal(held[k], server_global[k]) for k in held)
        uploads = [client.pack_upload(_lora_state(10 * rnd + c), held) for c in range(3)]
        updates = [server.unpack_upload(m, server_global) for m in uploads]
        new, rejected = server.aggregate(updates, [4.0, 5.0, 6.0], server_global, rnd)
        assert rejected == [] and not all(torch.equal(new[k], server_global[k]) for k in new)
        server_global = new


def test_all_rejected_round_gives_no_new_global():
    received = _lora_state(0)
    for aggregator, up, down in CASES:
        strategy = _strategy(aggregator, up, down, received)
        bad = {k: torch.full_like(v, float("nan")) for k, v in received.items()}
        msgs = strategy.pack_upload(bad, received)
        new, rejected = strategy.aggregate([strategy.unpack_upload(msgs, received)], [3.0], received, 1)
        assert new is None and rejected == [0]
