# pyright: reportUndefinedVariable=false
"""Turn by turn: ``tbt``, the turn-by-turn buffers of the (first) BPM family, and ``pinger``
(``None`` where the machine has no BPM family). The buffers go over PVA whatever
ACCPLANS_PROTOCOL says: EBS's (320 BPMs x 1024 turns) exceed CA's default array size.
"""

import asyncio

from bluesky.run_engine import call_in_bluesky_event_loop
from bluesky_queueserver import register_device

from accplans.devices import Pinger, TbtBuffers

tbt = pinger = None
if description.families_of_kind("bpm"):
    _family = description.families_of_kind("bpm")[0]
    _buffers = TbtBuffers.for_family(_family, description, protocol="pva", name="tbt")
    _pinger = Pinger.for_machine(description, protocol=ACCPLANS_PROTOCOL, name="pinger")

    async def _connect_tbt() -> None:
        await asyncio.gather(_buffers.connect(timeout=10), _pinger.connect(timeout=10))

    call_in_bluesky_event_loop(_connect_tbt())
    tbt, pinger = _buffers, _pinger
    register_device("tbt", depth=1)
    register_device("pinger", depth=1)
