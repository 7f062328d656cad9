"""The layer plan: index maps, adapter/emulator ranges, L_inter pairs (DESIGN.md conventions)."""
from fedsoda_mpi.methods import Plan


def test_plan_for_smollm2_groups():
    groups = [(1, 4), (8, 11), (12, 15), (16, 19)]
    kept = [0, 1, 5, 6, 7, 8, 12, 16, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29]
    plan = Plan(30, 3, kept, groups, [(1, 1), (8, 5), (12, 6), (16, 7)])
    assert plan.sub_layers == 18 and plan.emulator_size == 15
    assert plan.adapter_full == [27, 28, 29] and plan.adapter_sub == [15, 16, 17]
    assert plan.emulator_lora_sub == [1, 5, 6, 7]
    assert plan.align_pairs == [(4, 1), (11, 5), (15, 6), (19, 7)]  # (t_i + n, s_i)
    assert all(plan.sub_to_full[s] == t for t, s in plan.layer_map)
    assert all(plan.full_to_sub[plan.sub_to_full[s]] == s for s in range(18))
    assert Plan.from_dict(plan.to_dict()) == plan


def test_plan_without_pruning_is_fedpetuning():
    plan = Plan(30, 30, list(range(30)), [], [])
    assert plan.emulator_size == 0 and plan.adapter_sub == list(range(30)) and plan.emulator_lora_sub == []
