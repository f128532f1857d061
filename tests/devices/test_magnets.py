"""Single magnets: SI <-> hardware through the calibrations, limits, tolerance-based completion."""

import numpy as np
import pytest
from ophyd_async.core import (
    callback_on_mock_put,
    get_mock_put,
    init_devices,
    set_mock_value,
    wait_for_value,
)

from accplans.config import DeviceSpec, LinearCalibration, PolynomialCalibration
from accplans.devices import Corrector, LimitError, Quadrupole, Rf


def _cubic_root(coefficients, strength, limits):
    """The current giving ``strength`` on s = c0 + c1 h + c2 h^2 + c3 h^3, by numpy's roots."""
    c0, c1, c2, c3 = coefficients
    roots = np.roots([c3, c2, c1, c0 - strength])
    real = roots[np.abs(roots.imag) < 1e-12].real
    inside = real[(real >= limits[0]) & (real <= limits[1])]
    assert inside.size == 1
    return float(inside[0])


@pytest.fixture
def corrector_spec():
    return DeviceSpec(
        name="HCM042",
        kind="corrector",
        section="SR",
        elements=[3],
        field="KickAngle[0]",
        plane="h",
        pvs={"setpoint": "T:HCM042:SP", "readback": "T:HCM042:RB"},
        unit="A",
        calibration=LinearCalibration(gain=2e-4, offset=1e-5),
        limits=(-5.0, 5.0),
        tolerance=1e-3,
    )


async def test_linear_calibration_hardware_and_si(corrector_spec):
    async with init_devices(mock=True):
        hcm = Corrector(corrector_spec)
    await hcm.set(3.1e-4)
    # strength = gain * I + offset  ->  I = (3.1e-4 - 1e-5) / 2e-4 = 1.5 A
    get_mock_put(hcm.setpoint).assert_called_once()
    assert get_mock_put(hcm.setpoint).call_args.args[0] == pytest.approx(1.5, rel=1e-12)
    set_mock_value(hcm.readback, -2.0)
    reading = await hcm.read()
    assert reading["HCM042"]["value"] == pytest.approx(2e-4 * -2.0 + 1e-5)
    assert reading["HCM042-readback"]["value"] == -2.0
    assert reading["HCM042-setpoint"]["value"] == pytest.approx(1.5)
    described = await hcm.describe()
    assert described["HCM042"].get("units") == "rad"
    assert described["HCM042-readback"].get("units") == "A"
    assert described["HCM042-setpoint"].get("units") == "A"
    assert hcm.limits == pytest.approx((-2e-4 * 5 + 1e-5, 2e-4 * 5 + 1e-5))


async def test_polynomial_calibration_of_the_small_ring_quadrupoles(machine):
    quad = machine.quadrupoles["Q001"]
    cal = quad.spec.calibration
    assert isinstance(cal, PolynomialCalibration)
    k1 = 1.7  # m^-2
    await quad.set(k1)
    written = get_mock_put(quad.setpoint).call_args.args[0]
    assert written == pytest.approx(_cubic_root(cal.coefficients, k1, quad.spec.limits), rel=1e-10)
    # the readback in SI is the polynomial of the readback current
    set_mock_value(quad.readback, 60.0)
    c = cal.coefficients
    expected = c[0] + c[1] * 60.0 + c[2] * 60.0**2 + c[3] * 60.0**3
    assert (await quad.read())["Q001"]["value"] == pytest.approx(expected, rel=1e-12)
    assert (await quad.describe())["Q001"].get("units") == "m^-2"
    assert (await machine.sextupoles[0].describe())["S001"].get("units") == "m^-3"
    assert (await machine.skew[0].describe())["SQ001"].get("units") == "m^-2"


async def test_a_kick_beyond_the_limit_writes_nothing(corrector_spec):
    async with init_devices(mock=True):
        hcm = Corrector(corrector_spec)
    set_mock_value(hcm.readback, 1.0)
    with pytest.raises(LimitError) as err:
        await hcm.set(2e-3)
    text = str(err.value)
    assert "HCM042" in text
    assert "requested 0.002 rad" in text  # the request, in SI ...
    assert "9.95 A" in text  # ... and in amperes
    assert "current 0.00021 rad" in text
    assert "[-0.00099, 0.00101] rad ([-5, 5] A)" in text
    get_mock_put(hcm.setpoint).assert_not_called()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
async def test_non_finite_requests_write_nothing(corrector_spec, bad):
    async with init_devices(mock=True):
        hcm = Corrector(corrector_spec)
    with pytest.raises(LimitError, match=r"HCM042: requested strength .* not a finite number"):
        await hcm.set(bad)
    get_mock_put(hcm.setpoint).assert_not_called()


async def test_polynomial_strength_beyond_saturation_is_refused(machine):
    quad = machine.quadrupoles[0]
    _, high = quad.limits
    with pytest.raises(LimitError, match="Q001"):
        await quad.set(1.5 * high)
    get_mock_put(quad.setpoint).assert_not_called()


async def test_completion_waits_for_the_readback_within_tolerance(corrector_spec):
    async with init_devices(mock=True):
        hcm = Corrector(corrector_spec)
    tol = corrector_spec.tolerance
    callback_on_mock_put(hcm.setpoint, lambda v: set_mock_value(hcm.readback, v + 3 * tol))
    status = hcm.set(2.1e-4)  # 1 A
    await wait_for_value(hcm.setpoint, 1.0, timeout=1)
    await wait_for_value(hcm.readback, 1.0 + 3 * tol, timeout=1)
    assert not status.done  # readback 3 tolerances away: not there yet
    set_mock_value(hcm.readback, 1.0 - 0.5 * tol)  # within tolerance, not equal
    await status
    assert status.success


async def test_a_readback_outside_tolerance_times_out_with_a_clear_message(corrector_spec):
    async with init_devices(mock=True):
        hcm = Corrector(corrector_spec)
    tol = corrector_spec.tolerance
    callback_on_mock_put(hcm.setpoint, lambda v: set_mock_value(hcm.readback, v + 2 * tol))
    with pytest.raises(TimeoutError, match=r"HCM042: readback 1.002 A did not come within 0.001 A"):
        await hcm.set(2.1e-4, timeout=0.2)


async def test_timeout_follows_the_ramp_rate(corrector_spec):
    async with init_devices(mock=True):
        slow = Corrector(corrector_spec, ramp_rate=0.5)
    # 0 A -> 4 A at 0.5 A/s: 8 s, plus the 10 s allowance
    assert slow.move_timeout(slow.to_strength(0.0), slow.to_strength(4.0)) == pytest.approx(18.0)
    assert await slow.movable_logic.calculate_timeout(
        slow.to_strength(-1.0), slow.to_strength(1.0)
    ) == pytest.approx(14.0)


async def test_stop_interrupts_a_move(corrector_spec):
    async with init_devices(mock=True):
        hcm = Corrector(corrector_spec)
    callback_on_mock_put(hcm.setpoint, lambda v: None)  # the readback never follows
    status = hcm.set(2.1e-4)
    await wait_for_value(hcm.setpoint, 1.0, timeout=1)
    await hcm.stop(success=False)
    with pytest.raises(RuntimeError, match="HCM042 was stopped"):
        await status


async def test_rf_frequency_moves_in_hz_within_limits(machine):
    rf = machine.rf
    assert isinstance(rf, Rf)
    assert rf.spec.limits is not None
    low, high = rf.spec.limits
    f0 = 0.5 * (low + high)
    await rf.frequency.set(f0 + 100.0)
    assert get_mock_put(rf.frequency.setpoint).call_args.args[0] == f0 + 100.0
    assert (await rf.read())["RF-frequency"]["value"] == f0 + 100.0
    with pytest.raises(LimitError, match=r"RF: requested .* Hz"):
        await rf.frequency.set(high + 1.0)
    assert get_mock_put(rf.frequency.setpoint).call_count == 1
    described = await rf.describe()
    assert described["RF-frequency"].get("units") == "Hz"
    assert described["RF-voltage"].get("units") == "V"


async def test_wrong_kind_is_refused(corrector_spec):
    with pytest.raises(ValueError, match="HCM042 is a corrector, not a quadrupole"):
        Quadrupole(corrector_spec)


async def test_writing_the_strength_signal_goes_through_the_calibration(corrector_spec):
    async with init_devices(mock=True):
        hcm = Corrector(corrector_spec)
    await hcm.strength.set(-1.9e-4)
    assert get_mock_put(hcm.setpoint).call_args.args[0] == pytest.approx(-1.0)
    assert await hcm.strength.get_value() == pytest.approx(-1.9e-4)
    with pytest.raises(LimitError):
        await hcm.strength.set(5e-3)
    assert get_mock_put(hcm.setpoint).call_count == 1
