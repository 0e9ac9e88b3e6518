"""Which failures belong to one request and which break the engine, and the test hook that forces one.

A failure attributable to one sequence (its sampling, detokenizing, stop check) fails that request alone
with a 500-class error; the batch goes on. A failure of the engine itself (the forward pass, the
scheduler, out of memory, a CUDA error, which poisons the device for every request) makes the engine
unhealthy: `/health` says why and the server process exits non-zero within seconds so its supervisor
restarts it.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

_DEVICE_ERRORS = ("CUDA error", "CUBLAS_STATUS", "CUDNN_STATUS", "device-side assert", "NCCL error")


class RequestFailedError(RuntimeError):
    """One request failed inside the engine (a bug or a fault for that request only); it answers 500."""


def is_fatal(exc: BaseException) -> bool:
    """An error after which no request can be trusted to run: memory exhausted or the device broken."""
    if isinstance(exc, MemoryError | torch.OutOfMemoryError):
        return True
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    return isinstance(exc, RuntimeError) and any(marker in str(exc) for marker in _DEVICE_ERRORS)


class InjectedFault(RuntimeError):
    """Raised by the ENGINE_TEST_FAULT hook; never set outside tests."""


def install_test_fault(engine, spec: str | None) -> None:
    """ENGINE_TEST_FAULT=fatal-after:N makes the N-th engine step fail as a broken engine would (tests of
    the unhealthy-then-exit path and of supervisors restarting it); empty or unset: nothing."""
    if not spec:
        return
    kind, _, value = spec.partition(":")
    if kind != "fatal-after" or not value.isdigit():
        raise ValueError(f"ENGINE_TEST_FAULT: expected 'fatal-after:N', got {spec!r}")
    remaining = int(value)
    step = engine.step
    log.warning("ENGINE_TEST_FAULT is set: step %d will fail the engine", remaining)

    def failing_step():
        nonlocal remaining
        remaining -= 1
        if remaining <= 0:
            raise InjectedFault("CUDA error: injected by ENGINE_TEST_FAULT")
        return step()

    engine.step = failing_step
