"""fleetlm: the local-first middle layer that makes LLM applications cheap."""

import os

# OpenMP threads that spin while waiting steal the core from the thread doing the work when the machine is
# busy: on the shared 2-core host one attention call took 24 ms with 2 spinning threads and 0.02 ms with
# PASSIVE (bench/decode.py). Set before torch loads its OpenMP runtime; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
