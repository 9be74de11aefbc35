"""`python -m fleetlm.engine.kernels`: build our CPU kernels into the fleet home now (make setup runs it)."""

from __future__ import annotations

import sys

from fleetlm.engine import kernels


def main() -> int:
    try:
        library = kernels.build()
    except Exception as exc:  # a failed build is not fatal: the engine falls back to PyTorch's kernels
        print(f"fleetlm: our CPU kernels did not build ({type(exc).__name__}: {str(exc)[:300]}); the engine "
              "will use PyTorch's kernels", file=sys.stderr)
        return 0
    print(f"fleetlm kernels: {library} (ISA {kernels.isa()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
