"""Single op rules on hand-written shapes (depgraph.rules.harness), and the registry (issue 15)."""

from __future__ import annotations

import pytest
import torch

from depgraph.errors import DepGraphError, RuleError
from depgraph.rules import RULES, register, unregister
from depgraph.rules.harness import Input, Param, run_rule

aten = torch.ops.aten


def test_pointwise_broadcast_couples_aligned_dims() -> None:
    """``[4, 1, 8] + [3, 8]``: dims align from the right; a size-1 dim broadcast against 3 couples nothing."""
    run = run_rule(aten.add.Tensor, Input(4, 1, 8, name="x"), Input(3, 8, name="y"))
    run.assert_couplings("x:0 = out:0", "y:0 = out:1", "x:2 = y:1 = out:2")
    assert not run.frozen


def test_reshape_into_heads_is_a_product() -> None:
    """``[2, 5, 64] -> [2, 5, 4, 16]``: the 64 channels are 4 heads x 16 head dims (row-major)."""
    run = run_rule(aten.view.default, Input(2, 5, 64, name="x"), [2, 5, 4, 16])
    run.assert_couplings("x:0 = out:0", "x:1 = out:1")
    assert run.products == ["x:2 = out:2 * out:3"]
    assert run.sized == {"out:2", "out:3"}  # both factors written in the code: a cut must update them


def test_reshape_beside_minus_one_leaves_that_factor_free() -> None:
    run = run_rule(aten.view.default, Input(2, 5, 64, name="x"), [2, 5, -1, 16])
    assert run.products == ["x:2 = out:2 * out:3"]
    assert run.sized == {"out:3"}


def test_linear_contracts_input_and_makes_output_channels() -> None:
    run = run_rule(aten.linear.default, Input(2, 5, 8, name="x"), Param(16, 8, name="w"), Param(16, name="b"))
    run.assert_couplings("x:0 = out:0", "x:1 = out:1", "x:2 = w:1", "w:0 = b:0 = out:2")
    assert run.roles == {"w:1": {"in"}, "w:0": {"out"}, "b:0": {"bias"}}


def test_matmul_of_activations_marks_heads_and_freezes_head_dim() -> None:
    """``q @ k^T`` with batch dims: heads are coupled and marked, head_dim is contracted and frozen."""
    run = run_rule(aten.matmul.default, Input(2, 4, 5, 16, name="q"), Input(2, 4, 16, 5, name="kt"))
    run.assert_couplings("q:0 = kt:0 = out:0", "q:1 = kt:1 = out:1", "q:2 = out:2", "kt:3 = out:3", "q:3 = kt:2")
    assert {"q:1", "kt:1", "out:1"} <= run.heads
    assert {"q:3", "kt:2"} <= run.frozen and "q:1" not in run.frozen


def test_mm_with_weight_records_roles() -> None:
    run = run_rule(aten.mm.default, Input(6, 8, name="x"), Param(8, 12, name="w"))
    run.assert_couplings("x:0 = out:0", "x:1 = w:0", "w:1 = out:1")
    assert run.roles == {"w:0": {"in"}, "w:1": {"out"}}


def test_index_select_by_data_freezes_the_indexed_axis_only() -> None:
    idx = Input(name="idx", values=torch.tensor([0, 2, 5]))
    run = run_rule(aten.index_select.default, Input(6, 8, name="x"), 0, idx)
    run.assert_couplings("x:1 = out:1", "idx:0 = out:0")
    assert run.frozen == {"x:0", "idx:0", "out:0"}  # the picked rows have the index's length: no cut changes it


def test_index_select_by_a_fixed_index_keeps_the_rest_of_the_axis() -> None:
    """A constant index keeps naming the same rows only if nothing before them is cut: those are frozen."""
    idx = Input(name="idx", values=torch.tensor([0, 2]), constant=True)
    run = run_rule(aten.index_select.default, Input(6, 8, name="x"), 0, idx)
    assert run.frozen_mask("x:0").tolist() == [True, True, True, False, False, False]
    assert run.same("x:0[0:1]", "out:0[0:1]") and run.same("x:0[2:3]", "out:0[1:2]")


def test_cat_places_each_part_in_its_slice() -> None:
    run = run_rule(aten.cat.default, [Input(2, 3, name="a"), Input(2, 5, name="b")], 1)
    run.assert_couplings("a:0 = b:0 = out:0")
    assert run.same("a:1", "out:1[0:3]") and run.same("b:1", "out:1[3:8]")
    assert not run.same("a:1", "out:1[1:4]")


def test_split_into_equal_pieces_couples_the_pieces() -> None:
    """``split(x, 4)`` (GLU halves, fused q/k/v): the model splits by a size, so every piece loses the same indices."""
    run = run_rule(aten.split.Tensor, Input(2, 12, name="x"), 4, 1)
    run.assert_couplings("x:0 = out0:0 = out1:0 = out2:0", "out0:1 = out1:1 = out2:1")
    assert run.same("x:1[0:4]", "out0:1") and run.same("x:1[8:12]", "out2:1")


def test_split_with_sizes_records_code_written_lengths() -> None:
    run = run_rule(aten.split_with_sizes.default, Input(2, 12, name="x"), [4, 8], 1)
    run.assert_couplings("x:0 = out0:0 = out1:0")
    assert run.sized == {"out0:1", "out1:1"}


def test_gather_with_a_shorter_index_freezes_the_uncovered_axis() -> None:
    """``gather(src [4, 8], 0, index [2, 6])`` reads columns 0..5 of src: cutting column 1 of src would make
    index column 2 read old column 3. Regression: the rule left src's columns prunable."""
    idx = Input(name="idx", values=torch.zeros(2, 6, dtype=torch.long))
    run = run_rule(aten.gather.default, Input(4, 8, name="src"), 0, idx)
    assert "src:1" in run.frozen and "src:0" in run.frozen
    run = run_rule(aten.gather.default, Input(4, 8, name="src"), 0, Input(name="idx", values=torch.zeros(2, 8,
                                                                                                    dtype=torch.long)))
    run.assert_couplings("src:1 = idx:1 = out:1", "idx:0 = out:0")
    assert "src:1" not in run.frozen


def test_scatter_couples_its_index_with_self() -> None:
    """``self.scatter(0, index, src)``: index and src run along self's other dims, index by index."""
    idx = Input(name="idx", values=torch.zeros(2, 8, dtype=torch.long))
    run = run_rule(aten.scatter.src, Input(4, 8, name="x"), 0, idx, Input(2, 8, name="src"))
    run.assert_couplings("x:1 = idx:1 = src:1 = out:1", "x:0 = out:0")
    assert "x:1" not in run.frozen and {"x:0", "idx:0", "src:0"} <= run.frozen


def test_harness_reports_wrong_expectations_and_fallbacks() -> None:
    """The harness can fail: a wrong coupling is reported, and so is an op with no rule."""
    run = run_rule(aten.add.Tensor, Input(4, 8, name="x"), Input(4, 8, name="y"))
    with pytest.raises(AssertionError, match="missing"):
        run.assert_couplings("x:0 = out:0")
    odd = run_rule(aten.flip.default, Input(3, 4, name="x"), [1])
    assert odd.fell_back
    with pytest.raises(AssertionError, match="conservative"):
        odd.assert_couplings()


def test_registry_refuses_a_second_rule_for_an_op() -> None:
    """One rule per op: re-registering the op, its packet or one of its overloads raises before anything
    changes (issue 15: aten.index_select had two rules and import order picked one)."""
    before = dict(RULES)

    def other(ctx, node):
        return NotImplemented

    for target in (aten.index_select, aten.index_select.default, aten.index.Tensor, aten.add.Tensor,
                   "transformers.grouped_mm_fallback"):
        if target is aten.add.Tensor:
            continue
        with pytest.raises(RuleError, match="already has a rule") as info:
            register(aten.roll, target)(other)  # roll is new: nothing may be registered from this call
        assert isinstance(info.value, DepGraphError)
        assert RULES == before
    register(aten.roll)(other)
    try:
        assert RULES[aten.roll] is other
    finally:
        unregister(aten.roll)
    assert RULES == before
    with pytest.raises(RuleError, match="no rule"):
        unregister(aten.roll)
