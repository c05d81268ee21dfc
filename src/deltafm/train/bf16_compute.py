"""bf16 compute with fp32 master weights (``train.precision: bf16-compute``).

Autocast (``train.precision: bf16``) keeps the weights in fp32 and casts at every op: each matmul's
weight and input to bf16, and the outputs of the ops autocast keeps in fp32 (LayerNorm, softmax, the
losses; on CPU also the fused attention's logits) back again, in the forward and again in the backward.
On the CPUs measured here those casts and the fp32 element-wise ops between the matmuls are a sixth of an
SiT bf16 step (benchmarks/RESULTS.md). This mode removes them the way FSDP's
``MixedPrecision(param_dtype=bfloat16)`` does:

* a bf16 copy of the model (the *compute copy*) runs the forward and the backward, so activations and
  gradients are bf16 end to end (LayerNorm and softmax still accumulate in fp32 inside their kernels);
* the model as built stays fp32 (the *master*): the optimizer, gradient clipping, the EMA and checkpoints
  see only it. After the backward, :meth:`Bf16Compute.grads_to_master` casts the compute copy's gradients
  into the master's ``.grad`` (θ.grad ← fp32(g_bf16)); after the optimizer step :meth:`Bf16Compute.refresh`
  casts the master back into the copy (θ_bf16 ← bf16(θ)).

Because the compute copy is always ``bf16(master)`` when a step starts, a run resumed from a checkpoint
(which holds the fp32 master) continues bit-for-bit as an uninterrupted run does. Under gradient
accumulation the micro-steps' gradients add up in bf16 (as FSDP's ``reduce_dtype=bfloat16`` does), and DDP
all-reduces them in bf16. The model's inputs x are cast to bf16 and its floating outputs back to fp32; the
time t is passed unchanged (the time embedding computes its sinusoids in fp32 and casts them to its
weights' dtype). Numerics differ from autocast's within bf16 rounding (``tests/test_bf16_compute.py``).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

__all__ = ["Bf16Compute"]


def _to_float32(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out.float() if out.is_floating_point() else out
    if isinstance(out, (tuple, list)):
        return type(out)(_to_float32(o) for o in out)
    if isinstance(out, dict):
        return {k: _to_float32(v) for k, v in out.items()}
    return out


class Bf16Compute(nn.Module):
    """A bf16 compute copy of ``master`` (see the module docstring), called like ``master``.

    Only the compute copy is a submodule (so DDP and ``torch.compile`` wrap it and its bf16 gradients); the
    fp32 master is held by reference and is what the optimizer steps.
    """

    def __init__(self, master: nn.Module) -> None:
        super().__init__()
        self.compute = copy.deepcopy(master).to(torch.bfloat16)
        object.__setattr__(self, "_master", master)  # not a submodule: its parameters stay out of ours
        pairs = [(m, c) for m, c in zip(master.parameters(), self.compute.parameters(), strict=True)
                 if m.requires_grad]
        self._m = [m for m, _ in pairs]
        self._c = [c for _, c in pairs]
        fixed = [(m, c) for m, c in zip(master.buffers(), self.compute.buffers(), strict=True)
                 if m.is_floating_point()]
        self._mb = [m for m, _ in fixed]
        self._cb = [c for _, c in fixed]  # (deepcopy and .to keep each parameter's requires_grad)

    @property
    def master(self) -> nn.Module:
        return self._master

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """``master(x, *args, **kwargs)`` computed in bf16: x cast to bf16, floating outputs cast to fp32."""
        return _to_float32(self.compute(x.to(torch.bfloat16), *args, **kwargs))

    @torch.no_grad()
    def grads_to_master(self) -> None:
        """master.grad ← fp32(compute.grad) for every trained parameter; the copy's gradients are freed.
        A parameter that got no gradient (unused this step) keeps ``grad = None`` in the master too."""
        for m, c in zip(self._m, self._c, strict=True):
            m.grad = None if c.grad is None else c.grad.float()
            c.grad = None

    @property
    def trained(self) -> list[tuple[nn.Parameter, nn.Parameter]]:
        """(master, compute copy) of every trained parameter, in the master's parameter order."""
        return list(zip(self._m, self._c, strict=True))

    @torch.no_grad()
    def refresh(self) -> None:
        """compute ← bf16(master): parameters and floating buffers (after every optimizer step)."""
        if self._c:
            torch._foreach_copy_(self._c, self._m)
        self.refresh_buffers()

    @torch.no_grad()
    def refresh_buffers(self) -> None:
        """compute ← bf16(master) for the floating buffers only (the parameters refreshed elsewhere)."""
        if self._cb:
            torch._foreach_copy_(self._cb, self._mb)
