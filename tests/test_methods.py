"""The layer plan: index maps, adapter/emulator ranges, L_inter pairs (docs/design.md conventions); presets."""
from fedsoda_mpi.config import load_config
from fedsoda_mpi.methods import Plan
from fedsoda_mpi.sgp import uniform_drop


def test_plan_for_smollm2_groups():
    groups = [(1, 4), (8, 11), (12, 15), (16, 19)]
    kept = [0, 1, 5, 6, 7, 8, 12, 16, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29]
    plan = Plan(30, 3, kept, groups, [(1, 1), (8, 5), (12, 6), (16, 7)], 0, [1, 5, 6, 7])
    assert plan.sub_layers == 18 and plan.emulator_end == 15 and plan.train_start == 15
    assert plan.adapter_full == [27, 28, 29] and plan.adapter_sub == [15, 16, 17]
    assert plan.emulator_lora_sub == [1, 5, 6, 7]
    assert plan.align_pairs == [(4, 1), (11, 5), (15, 6), (19, 7)]  # (t_i + n, s_i)
    assert all(plan.sub_to_full[s] == t for t, s in plan.layer_map)
    assert all(plan.full_to_sub[plan.sub_to_full[s]] == s for s in range(18))
    assert Plan.from_dict(plan.to_dict()) == plan
    assert (plan.n, plan.p) == (3, 4)  # the groups' (n, p), whatever sgp.n / sgp.p asked for (sgp.auto)


def test_plan_n_p_follow_the_groups():
    plan = Plan(30, 3, [0, 1] + list(range(14, 30)), [(1, 13)], [(1, 1)], 0, [1])
    assert (plan.n, plan.p) == (12, 1) and plan.align_pairs == [(13, 1)]
    assert (Plan(30, 3, list(range(30)), [], []).n, Plan(30, 3, list(range(30)), [], []).p) == (0, 0)
    assert Plan.from_dict(plan.to_dict()).n == 12


def test_plan_without_pruning_is_fedpetuning():
    plan = Plan(30, 30, list(range(30)), [], [])
    assert plan.train_start == 0 and plan.adapter_sub == list(range(30)) and plan.emulator_lora_sub == []


def test_fedot_plan_has_bottom_and_top_adapter():
    kept = uniform_drop(32, 1, 2, 12, "round")
    plan = Plan(32, 2, kept, [], [], 1, list(range(1, 18)))
    assert plan.sub_layers == 20 and plan.adapter_sub == [0, 18, 19] and plan.adapter_full == [0, 30, 31]
    assert [plan.sub_to_full[s] for s in plan.adapter_sub] == plan.adapter_full
    assert plan.train_start == 0  # the bottom adapter layer trains: nothing before it to cache


def test_presets():
    ot = load_config(None, ["method=fedot"])
    assert (ot.model.adapter_first, ot.model.adapter_layers, ot.sgp.enabled, ot.oda.re_align, ot.quant.enabled) == \
        (1, 2, False, False, False)
    bi = load_config(None, ["method=fedbiot"])
    assert (bi.model.adapter_layers, bi.sgp.enabled, bi.oda.every, bi.oda.re_align) == (3, False, 1, True)
    ab = load_config(None, ["method=fedbiot", "oda.re_align=false", "quant.enabled=true"])  # ablations compose
    assert not ab.oda.re_align and ab.quant.enabled


def test_baselines_train_with_plain_fedavg_unless_overridden():
    """The paper's FedPETuning, FedOT and FedBiOT are plain FedAvg: mu = 0 over the job file's 0.01."""
    assert load_config(None, []).fed.mu == 0.01  # FedSODA keeps the job file's proximal weight
    for method in ("fedpetuning", "fedot", "fedbiot"):
        assert load_config(None, [f"method={method}"]).fed.mu == 0.0
        assert load_config(None, [f"method={method}", "fed.mu=0.05"]).fed.mu == 0.05
