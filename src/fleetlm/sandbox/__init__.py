"""Run untrusted Python (a model's generated code) in a bubblewrap sandbox: no network, one writable folder.

`run_python(source)` returns a `SandboxResult`. See `fleetlm.sandbox.bwrap` for how it is isolated.
"""

from fleetlm.sandbox.bwrap import SandboxError, SandboxResult, check_sandbox, run_python, sandbox_available

__all__ = ["SandboxError", "SandboxResult", "check_sandbox", "run_python", "sandbox_available"]
