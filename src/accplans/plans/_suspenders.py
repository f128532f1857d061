"""Beam-loss suspension: a bluesky suspender fed by an ophyd-async signal (the DCCT current).

bluesky's own suspenders (``SuspendFloor``...) subscribe with ophyd (v1) arguments that
ophyd-async signals refuse; :class:`BeamCurrentSuspender` subscribes to the signal's readings
instead (``subscribe_reading``: ophyd-async 0.21 has no ``subscribe_value``), and adds what the
RunEngine's rewind needs to replay a step of an accplans plan exactly once.

How a beam loss is handled, and why there is no race
----------------------------------------------------
A step is ``checkpoint -> set -> wait for fresh orbit -> read -> save``. The twin (and a real
machine) publishes the BPM frame and the DCCT current of one tick as separate PVs; a client may
see the invalid frame before the DCCT falls, or after. So:

1. :func:`~accplans.plans.read_orbit_frame` raises :class:`~accplans.plans.BeamLost` on a
   frame without a valid BPM only when no :class:`BeamCurrentSuspender` is installed. With one,
   it waits for the next frames instead (at most its ``timeout``): the suspender, seeing the
   current fall, suspends the plan, which cancels that wait. Whichever monitor arrives first,
   the step ends in a suspension, never in a ``BeamLost``.
2. On suspension the RunEngine rewinds to the last checkpoint and, once the beam is back (the
   current above ``resume_ma`` for ``sleep`` s), replays the messages of the step (setting the
   same magnet values again is a no-op). The message the suspension cancelled gets no answer
   from the RunEngine; the plan preprocessor this suspender installs asks it again
   (``wait_for`` messages: every device call of accplans goes through them), so the step
   continues with data taken after the refill.
3. A suspension between an event's ``save`` and the next checkpoint would replay that event
   (a duplicate). The preprocessor puts a checkpoint right after every ``save``, and a trip
   that arrives before that checkpoint has been processed is held until it has: a suspension
   only ever replays the unfinished step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Generator
from typing import Any

from bluesky.suspenders import SuspenderBase
from bluesky.utils import Msg, MsgGenerator, ensure_generator
from ophyd_async.core import SignalR

__all__ = ["BeamCurrentSuspender", "beam_suspender_installed"]

_log = logging.getLogger(__name__)

#: Suspenders installed on a RunEngine (read by :func:`read_orbit_frame`).
_INSTALLED: set[BeamCurrentSuspender] = set()


def beam_suspender_installed() -> bool:
    """Whether a :class:`BeamCurrentSuspender` is installed on a RunEngine of this process."""
    return bool(_INSTALLED)


def _in_loop(loop: asyncio.AbstractEventLoop, func: Callable[..., Any], *args: Any) -> None:
    """Call ``func(*args)`` in ``loop`` (ophyd-async subscribes only there) and wait for it."""
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        func(*args)
        return

    async def call() -> None:
        func(*args)

    asyncio.run_coroutine_threadsafe(call(), loop).result(timeout=10)


class BeamCurrentSuspender(SuspenderBase):
    """Suspend plans while the stored current is below a threshold; resume when it is back.

    Install it on the RunEngine (``RE.install_suspender(s)``); while installed, a plan step
    interrupted by a beam loss is replayed from its checkpoint after the refill (module
    docstring), and :func:`~accplans.plans.read_orbit_frame` waits for the suspension instead
    of raising :class:`~accplans.plans.BeamLost`.

    Args:
        current: the DCCT's current signal (mA as served: ``machine.dcct.current``), or the
            :class:`~accplans.devices.Dcct` itself. It must be connected, in the RunEngine's
            event loop.
        threshold_ma: suspend when the current falls below this (mA).
        resume_ma: resume when the current is at least this (mA); at least ``threshold_ma``
            (hysteresis).
        sleep: wait this long (s) after the current is back before resuming.
        pre_plan: plan run when the suspension starts (e.g. close a shutter).
        post_plan: plan run before the plan resumes.

    Raises:
        ValueError: ``resume_ma < threshold_ma``, a negative ``sleep`` or a non-finite level.
    """

    def __init__(
        self,
        current: Any,
        *,
        threshold_ma: float,
        resume_ma: float,
        sleep: float = 0.0,
        pre_plan: Any = None,
        post_plan: Any = None,
    ) -> None:
        signal = getattr(current, "current", current)
        if not isinstance(signal, SignalR):
            raise TypeError(f"BeamCurrentSuspender needs an ophyd-async signal, got {current!r}")
        levels = (float(threshold_ma), float(resume_ma), float(sleep))
        if not all(abs(v) < float("inf") for v in levels):
            raise ValueError(f"threshold_ma, resume_ma and sleep must be finite, got {levels}")
        if resume_ma < threshold_ma:
            raise ValueError(
                f"resume_ma ({resume_ma} mA) is below threshold_ma ({threshold_ma} mA)"
            )
        if sleep < 0:
            raise ValueError(f"sleep must be >= 0 s, got {sleep}")
        super().__init__(
            signal,
            sleep=sleep,  # pyright: ignore[reportArgumentType]  (bluesky annotates int)
            pre_plan=None,
            post_plan=post_plan,
            tripped_message=f"beam current below {threshold_ma} mA",
        )
        self.threshold_ma = float(threshold_ma)
        self.resume_ma = float(resume_ma)
        self.signal: SignalR[float] = signal
        self.last_ma = float("nan")
        self._event: asyncio.Event | None = None
        self._pending = False  # tripped while a suspension would replay a saved event
        self._unsafe = False  # between a ``save`` and the checkpoint after it
        self._release: asyncio.TimerHandle | None = None
        self._releasing: asyncio.Event | None = None
        self._guard = threading.RLock()
        self._user_pre_plan = pre_plan
        self._in_flight = False  # requested, the RunEngine has not started suspending yet
        self._started_future: asyncio.Future[None] | None = None

    def __repr__(self) -> str:
        return (
            f"BeamCurrentSuspender({self.signal.name!r}, threshold_ma={self.threshold_ma}, "
            f"resume_ma={self.resume_ma}, sleep={self._sleep})"
        )

    # -- SuspenderBase -----------------------------------------------------------------------
    def _should_suspend(self, value: float) -> bool:
        return not value >= self.threshold_ma  # NaN (no reading) suspends too

    def _should_resume(self, value: float) -> bool:
        return value >= self.resume_ma

    def _get_justification(self) -> str:
        if not self.tripped:
            return ""
        return (
            f"{self!r}: the beam current is {self.last_ma:.4g} mA, below "
            f"{self.threshold_ma} mA; the plan resumes from its last checkpoint when it is "
            f"back above {self.resume_ma} mA for {self._sleep} s"
        )

    def install(self, RE: Any, *, event_type: Any = None) -> None:
        """Watch the current for ``RE`` and add the replay preprocessor to ``RE``."""
        del event_type
        with self._guard:
            self.RE = RE
            if self._gate not in RE.preprocessors:
                RE.preprocessors.append(self._gate)
            _INSTALLED.add(self)
        _in_loop(RE.loop, self.signal.subscribe_reading, self._on_reading)

    def remove(self) -> None:
        """Stop watching; release a suspension in progress; remove the preprocessor."""
        RE = self.RE
        if RE is not None:  # not under the lock: the loop may be waiting for it in _on_reading
            _in_loop(RE.loop, self.signal.clear_sub, self._on_reading)
        with self._guard:
            _INSTALLED.discard(self)
            if self.RE is not None:
                if self._gate in self.RE.preprocessors:
                    self.RE.preprocessors.remove(self._gate)
                if self._event is not None:
                    self.RE.loop.call_soon_threadsafe(self._event.set)
            self._event = None
            self._tripped = False
            self._pending = False
            self.RE = None

    def get_futures(self) -> tuple[list[Callable[[], Any]], str]:
        """The wait a plan starting while the beam is off must do first (RunEngine API)."""
        with self._guard:
            if not self.tripped:
                return [], ""
            return [self._make_event().wait], self._get_justification()

    # -- the signal --------------------------------------------------------------------------
    def _on_reading(self, reading: dict[str, Any]) -> None:
        """Called in the signal's event loop (the RunEngine's) on every new current reading."""
        value = float(next(iter(reading.values()))["value"])
        with self._guard:
            self.last_ma = value
            RE = self.RE
            if RE is None:
                return
            if self._should_suspend(value):
                if self._release is not None:  # lost again while waiting to resume:
                    self._release.cancel()  # the same suspension goes on
                    self._release = None
                    self._event = self._releasing
                if not self._tripped:
                    _log.warning("beam current %.4g mA: suspending plans", value)
                self._tripped = True
                if self._event is None:
                    self._make_event()
                    self._request()
            elif self._should_resume(value) and self._tripped:
                self._tripped = False
                self._pending = False
                event = self._event
                self._event = None
                if event is not None:
                    _log.warning("beam current %.4g mA: resuming in %s s", value, self._sleep)
                    self._releasing = event
                    self._release = RE.loop.call_later(self._sleep, self._set, event)

    def _set(self, event: asyncio.Event) -> None:
        with self._guard:
            self._release = None
            self._releasing = None
        event.set()

    def _make_event(self) -> asyncio.Event:
        if self._event is None:
            self._event = asyncio.Event()
        return self._event

    def _request(self) -> None:
        """Ask the RunEngine to suspend now (or after the checkpoint that follows a save)."""
        RE = self.RE
        if RE is None or self._event is None or RE.state != "running":
            return  # an idle RunEngine: the next plan waits on get_futures()
        if self._unsafe:
            self._pending = True
            return
        self._pending = False
        self._in_flight = True
        RE.request_suspend(
            self._event.wait,
            pre_plan=self._started,
            post_plan=self._post_plan,
            justification=self._get_justification(),
        )

    # -- the preprocessor --------------------------------------------------------------------
    def _gate(self, plan: MsgGenerator[Any]) -> MsgGenerator[Any]:
        """``plan``, replay-safe (module docstring)."""
        return _ReplaySafe(self, plan)

    def _started(self) -> MsgGenerator[Any]:
        """First messages of every suspension: the request has reached the RunEngine."""
        with self._guard:
            self._in_flight = False
            if self._started_future is not None and not self._started_future.done():
                self._started_future.set_result(None)
            self._started_future = None
        if self._user_pre_plan is not None:
            pre = self._user_pre_plan() if callable(self._user_pre_plan) else self._user_pre_plan
            yield from ensure_generator(pre)
        else:
            yield Msg("null")

    async def _until_started(self) -> None:
        """Await the start of the suspension in flight (at once if there is none)."""
        with self._guard:
            if not self._in_flight:
                return
            if self._started_future is None:
                self._started_future = asyncio.get_running_loop().create_future()
            future = self._started_future
        try:  # a request the RunEngine refused (no checkpoint: it aborts) never starts
            await asyncio.wait_for(asyncio.shield(future), 5.0)
        except TimeoutError:
            with self._guard:
                self._in_flight = False


class _ReplaySafe(Generator[Msg, Any, Any]):
    """The preprocessor of :class:`BeamCurrentSuspender` (module docstring, points 2 and 3).

    A generator class rather than a generator function, so that ``send``/``throw``/``close``
    reach the wrapped plan one to one (exceptions the RunEngine throws in land where the plan
    stands):

    - a ``wait_for`` answered with ``None`` (cancelled by a suspension) is asked again;
    - before a ``save``, a suspension already requested but not yet started is waited for
      (the RunEngine cancels that wait, replays the step up to here, and the save follows);
    - after a ``save``, a checkpoint; a trip between the two is held until it is done.
    """

    def __init__(self, suspender: BeamCurrentSuspender, plan: Any) -> None:
        self._s = suspender
        self._plan = ensure_generator(plan)
        self._last: Msg | None = None  # the last message yielded
        self._held_save: Msg | None = None  # a save waiting behind the in-flight suspension
        self._save_response: Any = None
        self._after_save = False  # the checkpoint after a save is out

    def _emit(self, msg: Msg) -> Msg:
        if msg.command == "save":
            with self._s._guard:
                self._s._unsafe = True
                in_flight = self._s._in_flight
            if in_flight:
                self._held_save = msg
                msg = Msg("wait_for", None, [self._s._until_started])
        self._last = msg
        return msg

    def send(self, value: Any) -> Msg:
        last = self._last
        if self._held_save is not None:  # the wait before a save ended (or was cancelled)
            save, self._held_save = self._held_save, None
            self._last = save
            return save
        if self._after_save:  # the checkpoint after a save is done: suspending is safe
            self._after_save = False
            self._safe()
            return self._emit(self._plan.send(self._save_response))
        if last is not None and last.command == "save":
            self._save_response = value
            self._after_save = True
            self._last = Msg("checkpoint")
            return self._last
        if last is not None and last.command == "wait_for" and value is None:
            _log.info("asking again after a suspension: %r", last)
            return last
        return self._emit(self._plan.send(value))

    def _safe(self) -> None:
        with self._s._guard:
            self._s._unsafe = False
            if self._s._pending:
                self._s._request()

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Msg:  # pyright: ignore[reportIncompatibleMethodOverride]
        self._held_save = None
        if self._after_save:
            self._after_save = False
            self._safe()
        with self._s._guard:
            self._s._unsafe = False
        exc = typ if val is None else val
        return self._emit(self._plan.throw(exc))

    def close(self) -> None:
        with self._s._guard:
            self._s._unsafe = False
        self._plan.close()
