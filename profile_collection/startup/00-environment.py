"""accplans profile: its configuration, read from the environment.

Used as ``ipython --profile-dir=profile_collection`` and as the queueserver's startup
directory (``start-re-manager --startup-dir profile_collection/startup``). Variables:

ACCPLANS_MACHINE   built-in machine (``ebs``, ``small``) or a description YAML path; ``ebs``.
ACCPLANS_MODE      ``twin`` (default): a twin on this host, reached at ACCPLANS_ADDRESS;
                   ``epics``: the EPICS environment of the process decides who answers.
ACCPLANS_ADDRESS   twin mode only: the twin's ``host:port``, its CA port (or, with pva, its
                   PVA broadcast port), e.g. ``127.0.0.1:5064``; default 127.0.0.1 on the
                   protocol's default port.
ACCPLANS_PROTOCOL  ``ca`` (default) or ``pva``.
ACCPLANS_FEEDBACK  ``on`` (or a PV prefix): plans claim what they move from the orbit feedback
                   service (``accplans feedback serve``); unset: no feedback to claim from.
TILED_URI          Tiled API URI (e.g. ``http://127.0.0.1:8000/api/v1``); unset: no Tiled writer.
TILED_API_KEY      the key that may write there.

In twin mode the EPICS client is kept on loopback (variables already set are kept).
"""

import os

ACCPLANS_MACHINE = os.environ.get("ACCPLANS_MACHINE", "ebs")
ACCPLANS_MODE = os.environ.get("ACCPLANS_MODE", "twin")
ACCPLANS_ADDRESS = os.environ.get("ACCPLANS_ADDRESS") or None
ACCPLANS_PROTOCOL = os.environ.get("ACCPLANS_PROTOCOL", "ca")
ACCPLANS_FEEDBACK = os.environ.get("ACCPLANS_FEEDBACK") or None
TILED_URI = os.environ.get("TILED_URI") or None
TILED_API_KEY = os.environ.get("TILED_API_KEY") or None

if ACCPLANS_MODE not in ("twin", "epics"):
    raise ValueError(f"ACCPLANS_MODE must be 'twin' or 'epics', got {ACCPLANS_MODE!r}")
if ACCPLANS_PROTOCOL not in ("ca", "pva"):
    raise ValueError(f"ACCPLANS_PROTOCOL must be 'ca' or 'pva', got {ACCPLANS_PROTOCOL!r}")
if ACCPLANS_MODE == "twin":
    for _var in ("EPICS_CA_ADDR_LIST", "EPICS_PVA_ADDR_LIST"):
        os.environ.setdefault(_var, "127.0.0.1")
    for _var in ("EPICS_CA_AUTO_ADDR_LIST", "EPICS_PVA_AUTO_ADDR_LIST"):
        os.environ.setdefault(_var, "NO")
