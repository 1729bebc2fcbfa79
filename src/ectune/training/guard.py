"""Skipping a training step whose loss, gradients or updated weights are not finite, so one bad batch cannot
poison the weights, the optimiser state or the EMA.

Two ways, one result (a skipped step leaves weights and optimiser state exactly as they were):

* `step_unless_nonfinite`: the host reads "were the loss and gradients finite?" (one sync per step; the CPU and
  multi-process default), steps, and undoes a step that made a weight non-finite.
* `DeviceStepGuard`: the same decision without the host sync (one CUDA process). Every parameter's .grad is a
  view of one flat buffer, so the finiteness check, the sanitising of a bad step's gradients and gradient clipping
  are one kernel each; the optimiser step is skipped on the device: fused Adam through its `found_inf` input (the
  mechanism GradScaler uses), any other optimiser by keeping a copy of the parameters and optimiser state and
  selecting new·good + old·bad afterwards. On a bad step the gradients are zeroed first, so the optimiser's output
  is finite and the select is exact (x·1 = x, x·0 = 0, 0 + y = y in floating point).

The result of the check is a `StepFlag`: the value is copied to pinned host memory behind a CUDA event, so
reading it later (`bool(flag)`) waits only until the gradients were checked, never for the optimiser step or
anything queued after it; a caller that reads it one step late never waits at all.
"""

from __future__ import annotations

import warnings
from typing import Iterable

import torch
from torch import Tensor, nn


class StepFlag:
    """Whether one training step was applied (its loss and gradients were finite), readable without stalling.

    `bool(flag)` blocks only until the check itself has run on the device. `ready()` never blocks.
    `tensor` is the device-side boolean (0-dim) for callers that want to keep counting on the device.
    """

    __slots__ = ("tensor", "_host", "_event")

    def __init__(self, good: Tensor) -> None:
        self.tensor = good
        if good.device.type == "cuda":
            self._host = torch.empty((), dtype=torch.bool, pin_memory=True)
            self._host.copy_(good, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = good
            self._event = None

    def ready(self) -> bool:
        return self._event is None or self._event.query()

    def __bool__(self) -> bool:
        if self._event is not None:
            self._event.synchronize()
        return bool(self._host)

    def __repr__(self) -> str:
        return f"StepFlag({bool(self) if self.ready() else 'pending'})"


class DeviceStepGuard:
    """Gradient buffer + optimiser step that skips non-finite steps on the device (see the module docstring).

    Use per step: `zero_grads()` before the backward passes, then `step(opt, loss_sum, grad_clip)` after
    them; it returns a `StepFlag` "the step was applied". One guard belongs to one optimiser and
    its parameters (all on one device, one floating dtype).
    """

    def __init__(self, params: Iterable[nn.Parameter]) -> None:
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("DeviceStepGuard: no trainable parameters")
        devices = {p.device for p in self.params}
        dtypes = {p.dtype for p in self.params}
        if len(devices) != 1 or len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
            raise ValueError(f"DeviceStepGuard needs parameters on one device with one float dtype, got {devices} {dtypes}")
        self.device = next(iter(devices))
        dtype = next(iter(dtypes))
        total = sum(p.numel() for p in self.params)
        self.flat = torch.zeros(total, dtype=dtype, device=self.device)
        self.views: list[Tensor] = []
        offset = 0
        for p in self.params:
            n = p.numel()
            # The view takes the parameter's strides (e.g. channels_last) so .grad has p's layout.
            self.views.append(self.flat[offset : offset + n].view(p.shape) if p.is_contiguous() else
                              torch.as_strided(self.flat, p.shape, p.stride(), offset))
            offset += n
        self._backup: list[Tensor] | None = None
        self._warned = False
        self.sync_steps = 0  # steps that fell back to a host sync (first step of a non-fused optimiser, etc.)

    @torch.no_grad()
    def zero_grads(self) -> None:
        """Attach the flat-buffer views as the parameters' .grad (if something detached them) and zero them."""
        for p, v in zip(self.params, self.views):
            if p.grad is not v:
                p.grad = v
        self.flat.zero_()

    def grads_attached(self) -> bool:
        """True while every .grad is still the view of the flat buffer (autograd accumulates in place)."""
        return all(p.grad is v for p, v in zip(self.params, self.views))

    @torch.no_grad()
    def step(self, opt: torch.optim.Optimizer, loss_sum: Tensor, grad_clip: float = 0.0) -> StepFlag:
        """Check, sanitise, clip and apply one optimiser step; returns the flag "the step was applied" (no host
        sync except the fallbacks counted in `sync_steps`)."""
        if not self.grads_attached():
            # Something replaced .grad (e.g. a hook or DDP): the flat buffer does not hold the gradients.
            self._warn("parameter .grad tensors were replaced; this step used the host-synchronising guard")
            return StepFlag(self._sync_step(opt, loss_sum, grad_clip=grad_clip))
        norm = torch.linalg.vector_norm(self.flat)
        good = torch.isfinite(norm) & torch.isfinite(loss_sum.to(self.device))
        self.flat.masked_fill_(~good, 0.0)  # NaN-safe: a bad step's gradients become zeros
        if grad_clip > 0:
            scale = torch.where(good, torch.clamp(grad_clip / (norm + 1e-6), max=1.0), torch.zeros_like(norm))
            self.flat.mul_(scale)
        tensors = self._state_tensors(opt)
        if tensors is None:
            return StepFlag(self._sync_step(opt, loss_sum, grad_clip=grad_clip, checked=good))
        if self._backup is None or len(self._backup) != len(tensors) or any(
                b.shape != t.shape or b.dtype != t.dtype for b, t in zip(self._backup, tensors)):
            self._backup = [torch.empty_like(t) for t in tensors]
        torch._foreach_copy_(self._backup, tensors)
        if _is_fused_adam(opt):
            opt.found_inf = (~good).to(torch.float32)  # read by torch's fused Adam/AdamW step, as under GradScaler
            opt.grad_scale = None
            try:
                opt.step()
            finally:
                del opt.found_inf, opt.grad_scale
        else:
            opt.step()
        # Finite gradients can still give non-finite weights (an lr or eps that overflows): undo such a step too.
        good = good & all_finite(self.params)
        for t, b in zip(tensors, self._backup):
            torch.where(good, t, b, out=t)  # where, not a 0/1 blend: NaN·0 is NaN
        return StepFlag(good)

    def _state_tensors(self, opt: torch.optim.Optimizer) -> list[Tensor] | None:
        """Parameters + every floating tensor of their optimiser state, all on the guard's device, or None when
        the state does not exist yet (first step) or lives elsewhere (e.g. a CPU step counter)."""
        out: list[Tensor] = list(self.params)
        for p in self.params:
            state = opt.state.get(p)
            if not state:
                return None
            for v in state.values():
                if isinstance(v, Tensor) and v.is_floating_point():
                    if v.device != self.device:
                        self._warn(f"optimiser state on {v.device} (not {self.device}); "
                                   "those steps use the host-synchronising guard (set capturable=True)")
                        return None
                    out.append(v)
        return out

    def _sync_step(self, opt: torch.optim.Optimizer, loss_sum: Tensor, *, grad_clip: float,
                   checked: Tensor | None = None) -> Tensor:
        self.sync_steps += 1
        grads = [p.grad for p in self.params if p.grad is not None]
        if checked is None:
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else torch.zeros((), device=self.device)
            checked = torch.isfinite(norm) & torch.isfinite(loss_sum.to(self.device))
            if bool(checked) and grad_clip > 0:
                torch._foreach_mul_(grads, torch.clamp(grad_clip / (norm + 1e-6), max=1.0))
        if bool(checked):  # host sync (fallback only)
            checked = torch.tensor(step_unless_nonfinite(opt, self.params), device=self.device)
        return checked

    def _warn(self, msg: str) -> None:
        if not self._warned:
            warnings.warn(f"DeviceStepGuard: {msg}", RuntimeWarning, stacklevel=3)
            self._warned = True


def all_finite(tensors: list[Tensor]) -> Tensor:
    """0-dim bool on the tensors' device: no NaN or inf in any of them (one fused norm per tensor, no sync)."""
    return torch.isfinite(torch.stack(torch._foreach_norm(tensors))).all()


@torch.no_grad()
def step_unless_nonfinite(opt: torch.optim.Optimizer, params: list[Tensor]) -> bool:
    """`opt.step()`, undone (weights and optimiser state) if it leaves a weight non-finite, as an lr or eps that
    overflows can with finite gradients. Returns whether the step was kept. Costs a copy of weights and state."""
    before = {id(p): {k: v.clone() for k, v in opt.state[p].items() if isinstance(v, Tensor)}
              for p in params if opt.state.get(p)}
    weights = [p.detach().clone() for p in params]
    opt.step()
    if bool(all_finite(params)):
        return True
    torch._foreach_copy_(params, weights)
    for p in params:
        if id(p) in before:
            for k, v in before[id(p)].items():
                opt.state[p][k] = v
        else:
            opt.state.pop(p, None)  # the first step created this state: back to none
    return False


def _is_fused_adam(opt: torch.optim.Optimizer) -> bool:
    return isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)) and bool(opt.defaults.get("fused"))


def make_state_capturable(opt: torch.optim.Optimizer, device: torch.device) -> bool:
    """On CUDA, switch a non-fused Adam/AdamW/RAdam to capturable mode (step counters on the device) so that
    `DeviceStepGuard` can skip steps without a host sync; moves existing step counters. Same update maths
    (bias corrections are computed from device tensors). Returns whether the optimiser is now capturable."""
    if device.type != "cuda" or _is_fused_adam(opt):
        return False
    if not isinstance(opt, (torch.optim.Adam, torch.optim.AdamW, torch.optim.RAdam)):
        return False
    for group in opt.param_groups:
        group["capturable"] = True
        for p in group["params"]:
            st = opt.state.get(p)
            if st and isinstance(st.get("step"), Tensor) and st["step"].device != p.device:
                st["step"] = st["step"].to(p.device)
    return True
