"""select=: names, indices, masks, and errors that say what is wrong."""

import numpy as np
import pytest

from accplans.devices import resolve_select

NAMES = ("HCM001", "HCM002", "HCM003", "HCM004", "HCM005")


def test_none_selects_everything_in_order():
    assert resolve_select(None, NAMES).tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    ("select", "expected"),
    [
        ("HCM003", [2]),
        (3, [3]),
        (["HCM005", "HCM001"], [4, 0]),
        ([1, -1], [1, 4]),
        (range(1, 4), [1, 2, 3]),
        (np.array([4, 2]), [4, 2]),
        (["HCM002", 3], [1, 3]),
        ([True, False, True, False, False], [0, 2]),
        (np.array([False, False, False, True, True]), [3, 4]),
        ([], []),
    ],
)
def test_names_indices_and_masks(select, expected):
    assert resolve_select(select, NAMES).tolist() == expected


def test_the_three_forms_select_the_same_members():
    by_name = resolve_select(["HCM002", "HCM004"], NAMES)
    by_index = resolve_select([1, 3], NAMES)
    by_mask = resolve_select(np.isin(np.arange(5), [1, 3]), NAMES)
    assert by_name.tolist() == by_index.tolist() == by_mask.tolist() == [1, 3]


def test_unknown_name_names_the_family_and_suggests():
    with pytest.raises(KeyError, match=r"hcorr: no member named 'HCM01'.*did you mean HCM001"):
        resolve_select(["HCM001", "HCM01"], NAMES, owner="hcorr")


def test_index_out_of_range_gives_the_valid_range():
    with pytest.raises(IndexError, match=r"hcorr: index 5 is out of range for 5 members \(0..4\)"):
        resolve_select([0, 5], NAMES, owner="hcorr")
    with pytest.raises(IndexError, match="index -6"):
        resolve_select(-6, NAMES)


def test_mask_of_the_wrong_length():
    with pytest.raises(ValueError, match=r"hcorr: a boolean mask needs 5 entries .* got 4"):
        resolve_select([True, False, True, False], NAMES, owner="hcorr")
    with pytest.raises(ValueError, match="needs 5 entries"):
        resolve_select(np.ones(6, dtype=bool), NAMES)


def test_a_member_selected_twice_is_refused():
    with pytest.raises(ValueError, match=r"more than once: \['HCM002'\]"):
        resolve_select(["HCM002", 1], NAMES)


@pytest.mark.parametrize("select", [slice(0, 2), 1.5, [0.5], True, [["HCM001"]], np.ones((2, 2))])
def test_other_types_are_type_errors(select):
    with pytest.raises(TypeError):
        resolve_select(select, NAMES)
