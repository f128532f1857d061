"""Magnet families: one waveform put, limits of every member first, tolerance, knobs."""

import numpy as np
import pytest
from ophyd_async.core import callback_on_mock_put, get_mock_put, set_mock_value

from accplans.devices import LimitError, MagnetFamily


async def _preset(family: MagnetFamily, currents: np.ndarray) -> None:
    set_mock_value(family.setpoint, currents.copy())
    set_mock_value(family.readback, currents.copy())


async def test_one_waveform_put_and_untouched_members_keep_their_setpoints(machine):
    hcorr = machine.hcorr
    before = np.linspace(-1.0, 1.0, len(hcorr))  # A
    await _preset(hcorr, before)
    gain = hcorr.specs[0].calibration.gain  # rad/A, linear for correctors
    await hcorr.set_strengths([1.5e-4, -2.5e-4], select=["HCM003", "HCM010"])
    put = get_mock_put(hcorr.setpoint)
    put.assert_called_once()
    written = np.asarray(put.call_args.args[0])
    expected = before.copy()
    expected[[2, 9]] = [1.5e-4 / gain, -2.5e-4 / gain]
    np.testing.assert_allclose(written, expected, rtol=1e-12)
    # no scalar put to any member
    for member in hcorr.members.values():
        get_mock_put(member.setpoint).assert_not_called()
    np.testing.assert_allclose(await hcorr.strengths(["HCM003", "HCM010"]), [1.5e-4, -2.5e-4])
    np.testing.assert_allclose(await hcorr.hardware_setpoints(), expected)


async def test_select_by_names_indices_and_mask_write_the_same(machine):
    vcorr = machine.vcorr
    values = [1e-4, 2e-4, -3e-4]
    mask = np.zeros(len(vcorr), dtype=bool)
    mask[[1, 4, 7]] = True
    writes = []
    for select in (["VCM002", "VCM005", "VCM008"], [1, 4, 7], mask):
        await _preset(vcorr, np.zeros(len(vcorr)))
        await vcorr.set_strengths(values, select=select)
        writes.append(np.asarray(get_mock_put(vcorr.setpoint).call_args.args[0]))
    np.testing.assert_array_equal(writes[0], writes[1])
    np.testing.assert_array_equal(writes[0], writes[2])
    assert np.count_nonzero(writes[0]) == 3


async def test_a_single_out_of_range_value_writes_nothing_and_names_every_offender(machine):
    hcorr = machine.hcorr
    _, high = hcorr.limits()
    kicks = np.full(len(hcorr), 1e-4)
    kicks[[4, 17]] = [2 * high[4], -3 * high[17]]
    with pytest.raises(LimitError) as err:
        await hcorr.set_strengths(kicks)
    text = str(err.value)
    assert "hcorr: 2 of 24 requested values cannot be set; nothing was written" in text
    assert "HCM005: requested 0.001 rad (10 A) is outside its limits" in text
    assert "HCM018: requested -0.0015 rad (-15 A)" in text
    assert "current 0 rad" in text
    get_mock_put(hcorr.setpoint).assert_not_called()
    with pytest.raises(LimitError, match="HCM005"):
        hcorr.check_strengths(kicks)  # the same check, without I/O, for plans


async def test_value_count_must_match_the_selection(machine):
    with pytest.raises(ValueError, match=r"hcorr: 3 values for 2 selected members"):
        await machine.hcorr.set_strengths([1e-4, 1e-4, 1e-4], select=[0, 1])
    with pytest.raises(KeyError, match="no member named 'VCM001'"):
        await machine.hcorr.set_strengths([1e-4], select=["VCM001"])
    get_mock_put(machine.hcorr.setpoint).assert_not_called()


async def test_family_completion_is_tolerance_based(machine):
    quads = machine.quadrupoles
    tol = quads.specs[0].tolerance
    offsets = np.full(len(quads), 0.5 * tol)  # every readback a half tolerance off

    def almost(value):
        set_mock_value(quads.readback, np.asarray(value) + offsets)

    callback_on_mock_put(quads.setpoint, almost)
    await quads.set_strengths(0.8, select=["Q002"])  # completes: within tolerance
    offsets[1] = 3 * tol  # now Q002 stays 3 tolerances away
    with pytest.raises(TimeoutError, match=r"quadrupoles: 1 of 1 readbacks .* Q002 \(setpoint"):
        await quads.set_strengths(0.9, select=["Q002"], timeout=0.2)


async def test_strengths_convert_readbacks_through_each_calibration(machine):
    quads = machine.quadrupoles
    currents = np.linspace(-90.0, 90.0, len(quads))
    await _preset(quads, currents)
    c = quads.specs[0].calibration.coefficients
    expected = c[0] + c[1] * currents + c[2] * currents**2 + c[3] * currents**3
    np.testing.assert_allclose(await quads.strengths(), expected, rtol=1e-12)
    np.testing.assert_allclose(await quads.strengths([5, 0]), expected[[5, 0]], rtol=1e-12)
    reading = await quads.read()
    np.testing.assert_allclose(reading["quadrupoles-strength_readback"]["value"], expected)
    described = await quads.describe()
    assert described["quadrupoles-strength_readback"].get("units") == "m^-2"
    assert described["quadrupoles-readback"].get("units") == "A"


async def test_set_hardware_restores_exact_currents(machine):
    hcorr = machine.hcorr
    saved = np.linspace(-2.0, 2.0, len(hcorr))
    await _preset(hcorr, saved)
    before = await hcorr.hardware_setpoints()
    await hcorr.set_strengths(np.zeros(len(hcorr)))
    await hcorr.set_hardware(before)
    np.testing.assert_array_equal(get_mock_put(hcorr.setpoint).call_args.args[0], saved)
    with pytest.raises(
        LimitError, match=r"HCM001: requested 7 A is outside its limits \[-5, 5\] A"
    ):
        await hcorr.set_hardware(7.0, select=0)


async def test_a_family_array_of_the_wrong_length_is_named(machine):
    set_mock_value(machine.hcorr.readback, np.zeros(3))
    with pytest.raises(ValueError, match=r"readback array PV mock\+ca://SMALL:HCORR:RB has 3"):
        await machine.hcorr.strengths()


async def test_member_puts_show_in_the_family_arrays_in_mock_mode(machine):
    # the mock mirrors the twin: a member's put appears in the family arrays
    await machine.sextupoles[3].set(machine.sextupoles[3].to_strength(12.0))
    assert (await machine.sextupoles.hardware_setpoints(3))[0] == pytest.approx(12.0)


async def test_knob_changes_its_magnets_by_coefficient_times_delta(machine):
    quads = machine.quadrupoles
    start = np.linspace(10.0, 40.0, len(quads))
    await _preset(quads, start)
    before = await quads.strengths()
    knob = machine.knobs["QF_strength"]
    await knob.apply(0.02)
    get_mock_put(quads.setpoint).assert_called_once()
    after = await quads.strengths()
    qf = quads.select(list(knob.names))
    others = np.setdiff1d(np.arange(len(quads)), qf)
    np.testing.assert_allclose(after[qf] - before[qf], 0.02, rtol=1e-9)
    np.testing.assert_array_equal(after[others], before[others])


async def test_knob_beyond_limits_writes_nothing(machine):
    knob = machine.knobs["SF_strength"]
    _, high = machine.sextupoles.limits()
    with pytest.raises(LimitError, match=r"(?s)knob SF_strength by .*S001: requested"):
        await knob.apply(2 * float(high.max()))
    get_mock_put(machine.sextupoles.setpoint).assert_not_called()
