"""Per-example gradient moments of Linear layers without per-example gradients (the "ghost" trick).

For a Linear layer ``o = W a + b`` seen once per forward pass with a ``(B, in)`` input, example
``i``'s own gradients are the outer product ``dW_i = e_i a_i^T`` and ``db_i = e_i``, where
``e_i = B * dL/do_i`` is the output gradient of example ``i``'s own loss when the batch loss
``L`` is the mean of the examples' losses (Goodfellow 2015, "Efficient per-example gradient
computations"). So, with no ``(B, out, in)`` tensor ever formed:

* ``s_i = ||dW_i||^2 + ||db_i||^2 = ||e_i||^2 (||a_i||^2 + 1)``;
* the mean gradient ``dW = (1/B) sum_i e_i a_i^T = G^T A`` (``G = dL/do``, ``A`` the inputs),
  ``db = sum_i G_i``, and ``||g||^2 = ||dW||^2 + ||db||^2``;
* ``v_i = dW_i . dW + db_i . db = e_i^T dW a_i + e_i . db``.

These are the per-layer moments ``(s, v, ||g||^2)`` of :func:`gradlab.probes.gradstats.moments`
from one ordinary forward and backward pass (a backward to the layer outputs only), in float64.
:func:`linear_moments` returns None where the trick does not apply -- a parameter outside an
``nn.Linear``, a frozen Linear parameter, a Linear called more or less than once, an input that
is not ``(B, in)`` -- and the caller then uses :func:`gradlab.curvature.per_example.per_example_grads`.
Like that primitive it assumes ``loss_fn`` is the mean of per-example losses and that the model
mixes no examples (BatchNorm in eval mode).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn


def _linear_layers(model: nn.Module) -> Optional[dict]:
    """``{module name: Linear}`` if every trainable parameter belongs to a Linear, else None."""
    layers = {}
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False)]
        if not own:
            continue
        if not name or not isinstance(module, nn.Linear) or not all(p.requires_grad for p in own):
            return None
        layers[name] = module
    return layers or None


def linear_moments(model: nn.Module, loss_fn: Callable, x: Tensor, y: Tensor) -> Optional[dict]:
    """``{layer: (s (B,), v (B,), ||g||^2)}`` of every Linear layer of ``model`` on ``(x, y)``
    (layer: the module's name, as :func:`gradlab.probes.gradstats.layer_of` names it), or None
    where the trick does not apply (module docstring). Parameters' ``.grad`` are untouched."""
    layers = _linear_layers(model)
    if layers is None:
        return None
    seen: dict = {name: [] for name in layers}

    def keep(name):
        def hook(module, inputs, output):
            seen[name].append((inputs[0], output))
        return hook

    handles = [m.register_forward_hook(keep(name)) for name, m in layers.items()]
    try:
        out = model(x)
    finally:
        for h in handles:
            h.remove()
    if any(len(v) != 1 or v[0][0].dim() != 2 or not v[0][1].requires_grad for v in seen.values()):
        return None
    names = list(layers)
    outputs = [seen[n][0][1] for n in names]
    grads = torch.autograd.grad(loss_fn(out, y), outputs, allow_unused=True)
    b = len(x)
    result = {}
    for name, g_out in zip(names, grads):
        a = seen[name][0][0].detach().to(torch.float64)
        module = layers[name]
        if g_out is None:
            g_out = torch.zeros(b, module.out_features, dtype=torch.float64, device=x.device)
        g = g_out.detach().to(torch.float64)  # dL/do: (B, out)
        e = g * b  # each example's own output gradient
        dw = g.T @ a  # the mean gradient of W: (out, in)
        e2 = (e * e).sum(1)
        a2 = (a * a).sum(1)
        v = ((e @ dw) * a).sum(1)
        g2 = float((dw * dw).sum())
        if module.bias is not None:
            db = g.sum(0)
            s = e2 * (a2 + 1.0)
            v = v + e @ db
            g2 += float(db.dot(db))
        else:
            s = e2 * a2
        result[name] = (s, v, g2)
    return result


__all__ = ["linear_moments"]
