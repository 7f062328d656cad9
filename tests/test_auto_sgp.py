"""Issue #16 parts 1 and 3 on the tiny SmolLM2-shaped model folder (`tiny_model_dir`: 30 layers, random weights):
the server's automatic (n, p) (`sgp.auto`, `sgp.remove_layers`, `sgp.max_distance`) and what it records in /sgp,
and alignment without a public data set (`data.public=self`): seeded, cached in the run folder, reused, used by
SGP and ODA. The end-to-end mpirun run (auto + self, resumed and compared bit for bit) is marked mpi + slow."""
import json

import h5py
import numpy as np
import pytest
import torch

from fedsoda_mpi import data, models, sgp
from fedsoda_mpi import public_texts
from fedsoda_mpi.config import load_config
from fedsoda_mpi.runlog import RunLog
from fedsoda_mpi.public_texts import public_batches
from fedsoda_mpi.server import Server
from tests.conftest import mpirun

AUTO = ["sgp.auto=true", "sgp.remove_layers=12"]
SMALL = ["data.public_samples=8", "data.self_max_new_tokens=12", "data.self_batch_size=6"]


def _server(model_dir, run_dir, *args) -> tuple[Server, RunLog]:
    cfg = load_config(None, [f"model.name={model_dir}", *SMALL, *args])
    log = RunLog(run_dir, 0, echo=False)
    log.open_h5(cfg, 2, cfg.model.name, mode="a" if (run_dir / "run.h5").exists() else "w")
    return Server.load(cfg, log, torch.device("cpu")), log


def _read(run_dir, *paths) -> dict:
    with h5py.File(run_dir / "run.h5", "r") as f:
        return {p: (dict(f[p].attrs) if isinstance(f[p], h5py.Group) else f[p][:]) for p in paths}


# ---- sgp.auto ---------------------------------------------------------------------------------------------------

def test_auto_plan_and_its_sgp_records(tiny_model_dir, tmp_path):
    server, log = _server(tiny_model_dir, tmp_path / "a", *AUTO)
    plan = server.plan_layers()
    log.close()
    rec = _read(tmp_path / "a", "sgp", "sgp/distance", "sgp/candidates", "sgp/groups", "sgp/layer_map",
                "sgp/kept_layers")
    dist = rec["sgp/distance"]
    assert dist.shape == (26, 27)  # auto: the whole profile, every candidate n
    chosen, tried = sgp.choose_auto(dist.astype(np.float64), 12)
    attrs = rec["sgp"]
    assert (attrs["auto"], attrs["n"], attrs["p"], attrs["remove_layers"], attrs["removed"]) == \
        (True, chosen.n, chosen.p, 12, 12)
    assert attrs["max_distance"] == 0.0
    cands = rec["sgp/candidates"]
    assert [tuple(map(int, r[:2])) for r in cands] == sgp.auto_pairs(12, 27) == [(c.n, c.p) for c in tried]
    np.testing.assert_allclose(cands[:, 2], [c.cost for c in tried], rtol=1e-12)
    best = int(np.argmin(cands[:, 2] / 12))
    assert tuple(cands[best, :2]) == (chosen.n, chosen.p)
    # the plan and the records are those of the chosen (n, p)
    assert (plan.n, plan.p) == (chosen.n, chosen.p) and plan.groups == chosen.groups
    assert rec["sgp/groups"].tolist() == [list(g) for g in chosen.groups]
    assert rec["sgp/kept_layers"].tolist() == plan.kept and len(plan.kept) == 30 - 12
    assert rec["sgp/layer_map"].tolist() == [list(m) for m in plan.layer_map]
    assert plan.align_pairs == [(t + chosen.n, s) for (t, _), (_, s) in zip(chosen.groups, plan.layer_map)]


def test_max_distance_caps_every_group(tiny_model_dir, tmp_path):
    server, log = _server(tiny_model_dir, tmp_path / "a", *AUTO)
    server.plan_layers()
    log.close()
    dist = _read(tmp_path / "a", "sgp/distance")["sgp/distance"].astype(np.float64)
    cap = float(np.sort(dist[0, :26])[14])  # half of the n = 1 groups qualify, few of the longer ones
    server, log = _server(tiny_model_dir, tmp_path / "b", *AUTO, f"sgp.max_distance={cap}")
    plan = server.plan_layers()
    log.close()
    rec = _read(tmp_path / "b", "sgp", "sgp/candidates")
    chosen, tried = sgp.choose_auto(dist, 12, max_distance=cap)
    assert (plan.n, plan.p, plan.groups) == (chosen.n, chosen.p, chosen.groups) and plan.p > 0
    assert all(dist[plan.n - 1, t] <= cap for t, _ in plan.groups)
    assert rec["sgp"]["max_distance"] == cap and rec["sgp"]["removed"] == plan.n * plan.p <= 12
    assert np.isinf(rec["sgp/candidates"][:, 2]).sum() == sum(np.isinf(c.cost) for c in tried) > 0
    # a cap no group meets: an error (the clients would receive the whole LLM), after /sgp/distance is recorded
    server, log = _server(tiny_model_dir, tmp_path / "c", "sgp.max_distance=1e-9")
    with pytest.raises(ValueError, match="sgp.max_distance=1e-09 leaves no group to prune"):
        server.plan_layers()
    log.close()
    assert _read(tmp_path / "c", "sgp/distance")["sgp/distance"].shape[1] == 27


# ---- data.public=self --------------------------------------------------------------------------------------------

def test_generation_is_seeded_and_leaves_the_run_rng_alone(tiny_model_dir):
    model, tok = models.load_causal_lm(tiny_model_dir, "float32", "cpu")
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    args = (model, tok, 7, 10, 0.8)
    a = data.generate_public(*args, seed=0, batch_size=4)
    assert torch.equal(torch.random.get_rng_state(), state)  # the run's own streams are untouched
    assert a == data.generate_public(*args, seed=0, batch_size=4)
    assert a != data.generate_public(*args, seed=1, batch_size=4)
    assert [r["prompt"] for r in a] == list(data.SELF_PROMPTS[:7])
    assert all(r["text"].startswith(r["prompt"]) and len(r["text"]) > len(r["prompt"]) for r in a)
    seen = []
    data.generate_public(*args, seed=0, batch_size=4, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(4, 7), (7, 7)]


def test_self_public_is_generated_once_cached_reused_and_used_by_sgp_and_oda(tiny_model_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    server, log = _server(tiny_model_dir, run, "data.public=self", *AUTO)
    cache = run / data.SELF_FILE
    rows = [json.loads(line) for line in cache.read_text().splitlines()]
    assert len(rows) == 8 + data.SELF_HELDOUT and [r["split"] for r in rows] == ["public"] * 8 + ["heldout"] * 16
    texts = [r["text"] for r in rows]
    assert server.texts.pool == texts[:8]
    # SGP ran on the generated texts, not on WikiText-2
    plan = server.plan_layers()
    want = sgp.distance_profile(server.full, public_batches(server.cfg, server.tok, texts[:8], 8), 26, 27)
    server.build(plan)
    server.pre_align()
    pools = []  # re-alignment samples its batches from the generated pool
    monkeypatch.setattr(public_texts, "public_batches",
                        lambda cfg, tok, pool, limit, rng=None: pools.append(pool) or public_batches(cfg, tok, pool,
                                                                                                   limit, rng))
    server.re_align(2)
    assert pools == [server.texts.pool]
    log.close()
    rec = _read(run, "public", "oda/pre", "sgp/distance")
    np.testing.assert_array_equal(rec["sgp/distance"], want)
    wiki = public_batches(server.cfg, server.tok, data.load_public("wikitext2"), 8)
    assert not np.allclose(sgp.distance_profile(server.full, wiki, 26, 27), want, equal_nan=True)
    pub = rec["public"]
    assert ((pub["mode"], pub["n_public"], pub["kl_on"], pub["seed"], pub["n_heldout"])
            == ("self", 8, "wikitext2", 0, 16))
    assert (pub["temperature"], pub["max_new_tokens"], pub["batch_size"]) == (0.8, 12, 6) and pub["generate_s"] > 0
    pre = rec["oda/pre"]  # KL on WikiText-2's held-out slice (comparable) and on the generated held-out texts
    assert pre["kl_on"] == "wikitext2" and np.isfinite([pre[k] for k in ("kl_before", "kl_after", "kl_before_self",
                                                                            "kl_after_self")]).all()
    # a second start in the same folder (resume) reads the file back: no generation, the same batches
    monkeypatch.setattr(public_texts, "public_batches", public_batches)
    monkeypatch.setattr(data, "generate_public", lambda *a, **k: pytest.fail("generated again"))
    again, log = _server(tiny_model_dir, run, "data.public=self", *AUTO)
    log.close()
    assert again.texts.pool == server.texts.pool and all(torch.equal(a["input_ids"], b["input_ids"])
                                                         for a, b in zip(again.texts.public, server.texts.public))
    assert (run / data.SELF_FILE).read_text() == "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n"
    assert len(again.texts.heldout_self) == data.SELF_HELDOUT // again.cfg.oda.batch_size
    # texts changed behind the run's back (regenerated, edited): a resume refuses them, naming the file
    text = (run / data.SELF_FILE).read_text()
    (run / data.SELF_FILE).write_text(text.replace('"text": "', '"text": "x', 1))
    with pytest.raises(data.DataError, match=r"public_self.jsonl: its sha256 .* is not the .* this run recorded"):
        _server(tiny_model_dir, run, "data.public=self", *AUTO)


def test_self_public_without_wikitext_measures_kl_on_generated_text(tiny_model_dir, tmp_path, monkeypatch):
    def no_public_file(name, holdout=False):
        raise data.DataError(f"missing data file {name}")

    monkeypatch.setattr(data, "load_public", no_public_file)
    server, log = _server(tiny_model_dir, tmp_path / "run", "data.public=self")
    log.close()
    held = server.texts
    assert held.kl_on == "self" and held.probe == held.heldout[:1]
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(held.heldout, held.heldout_self))


def test_a_damaged_cache_is_named(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / data.SELF_FILE).write_text('{"i": 0, "split": "public", "prompt": "The", "text": "The end"}\n')
    with pytest.raises(data.DataError, match=r"public_self.jsonl: holds 1 texts, expected 8 public \+ 16 held out"):
        _server(tiny_model_dir, run, "data.public=self")
    (run / data.SELF_FILE).write_text("not json\n")
    with pytest.raises(data.DataError, match=r"public_self.jsonl:1: bad JSON .*restore it, or start the run over"):
        _server(tiny_model_dir, run, "data.public=self")


# ---- end to end under mpirun ------------------------------------------------------------------------------------

E2E = ["-m", "fedsoda_mpi.main", "fed.clients=4", "fed.clients_per_round=3", "oda.every=2", "eval.every=1",
       "oda.re_samples=4", "data.max_train_per_client=16", "eval.max_examples=16", "data.val_size=16",
       "fed.local_steps=2", "eval.base=false", *AUTO, "data.public=self", *SMALL]


@pytest.mark.mpi
@pytest.mark.slow
def test_auto_sgp_with_self_public_end_to_end_and_resumed(tiny_model_dir, tmp_path):
    """mpirun -n 3: sgp.auto + data.public=self for 2 rounds (re-alignment in round 2), and the same run stopped
    after round 1 and resumed to round 2: the cached texts are reused and the two records are identical."""
    model = f"model.name={tiny_model_dir}"
    full = mpirun(3, [*E2E, model, "fed.rounds=2", f"output.dir={tmp_path / 'full'}"], timeout=1200)
    assert full.returncode == 0, full.stdout[-3000:] + full.stderr[-3000:]
    first = mpirun(3, [*E2E, model, "fed.rounds=1", f"output.dir={tmp_path / 'res'}", "resume=auto"], timeout=1200)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    cached = (tmp_path / "res" / data.SELF_FILE).read_bytes()
    second = mpirun(3, [*E2E, model, "fed.rounds=2", f"output.dir={tmp_path / 'res'}", "resume=auto"], timeout=1200)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert ((tmp_path / "res" / data.SELF_FILE).read_bytes() == cached
            == (tmp_path / "full" / data.SELF_FILE).read_bytes())
    recs = []
    for run in ("full", "res"):
        with h5py.File(tmp_path / run / "run.h5", "r") as f:
            attrs, cands, groups = dict(f["sgp"].attrs), f["sgp/candidates"][:], f["sgp/groups"][:]
            assert attrs["auto"] and attrs["n"] * attrs["p"] == 12 and groups.shape == (attrs["p"], 2)
            assert (groups[:, 1] - groups[:, 0] == attrs["n"]).all()
            assert [tuple(map(int, r[:2])) for r in cands] == sgp.auto_pairs(12, 27)
            assert f["drift/distance"].shape == (2, attrs["p"])  # one column per CHOSEN group
            assert f["public"].attrs["mode"] == "self" and f["oda/pre"].attrs["kl_on"] == "wikitext2"
            assert np.isfinite(f["oda/pre"].attrs["kl_after_self"]) and "final" in f
            recs.append({"train_loss": f["rounds/train_loss"][:], "re_loss": f["oda/re/loss"][:],
                         "drift": f["drift/distance"][:], "groups": groups,
                         "acc": f["final"].attrs["accuracy"], "kl": f["oda/pre"].attrs["kl_after"]})
    for k in recs[0]:
        assert np.array_equal(recs[0][k], recs[1][k], equal_nan=True), k
    assert "reusing the 8 + 16 generated texts" in (tmp_path / "res" / "log.txt").read_text()
