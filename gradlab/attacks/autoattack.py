"""AutoAttack: the parameter-free ensemble of Croce & Hein (ICML 2020), in the reference order.

"Reliable evaluation of adversarial robustness with an ensemble of diverse parameter-free
attacks", Section 5, with the settings of the reference code (fra31/auto-attack):

* ``standard``: APGD-CE (100 steps, no restarts), APGD-T (targeted DLR loss, 100 steps, each of
  the 9 most likely classes after the top one), FAB-T (100 steps, 9 target classes), Square
  (5000 queries, ``p_init = 0.8``), all at the same eps and norm;
* ``rand`` (for randomised models): APGD-CE and APGD-DLR, each with EOT over 20 passes.

``eot``/``eot_noise`` go to the APGD members (standard: EOT 1 unless set).

Each attack runs only on the examples still robust after the attacks before it (clean-correct
ones to begin with), so an example counts as robust only when it survives all of them.
The number of examples each attack broke is added to the robustness table (``broken_by_*``
columns of ``attack.csv``, summed over the batches of one eps). Where no attack succeeds the
result is APGD-CE's highest-loss point. On models with fewer classes than the DLR losses need
(3; targeted: 4) those members use the cross-entropy (targeted: towards each target).
Shapes: ``(B, *input_shape)`` in [0, 1]; eps in pixel units.

This differs from torchattacks' ``AutoAttack``, which runs APGD, APGD-T and FAB with 10 steps
(its defaults), not the reference's 100.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from gradlab.attacks import ATTACKS
from gradlab.attacks.base import ATTACK_OPTIONS, STEPS, Attack
from gradlab.core.errors import GradlabError
from gradlab.core.options import Option, Options

VERSIONS = ("standard", "rand")
RAND_EOT = 20  # the reference's eot_iter for the rand version

OPTIONS = ATTACK_OPTIONS.without("targeted", "target_class", "eot") + Options(
    Option("targeted", bool, False, "refused: AutoAttack is untargeted; its APGD-T and FAB-T members pick their "
           "targets (one target class: apgd --target-class)"),
    Option("target_class", int, None, "refused, as targeted", low=0),
    Option("version", str, "standard", "standard: APGD-CE, APGD-T, FAB-T, Square; rand: APGD-CE and APGD-DLR "
           "with EOT, for randomised models", choices=VERSIONS, paper="Croce & Hein 2020"),
    replace(STEPS, default=100),  # of APGD-CE, APGD-T and FAB-T
    Option("n_queries", int, 5000, "query budget of Square", low=1, paper="Andriushchenko et al. 2020"),
    Option("n_target_classes", int, 9, "target classes of APGD-T and FAB-T", low=1),
    Option("eot", int, None, "EOT passes of the APGD members (unset: 20 for rand, the reference's eot_iter; 1 for standard)", low=1,
           paper="Athalye et al. 2018"),
)


def members(version: str, steps: int, n_queries: int, n_targets: int, eot: int,
            eot_noise: float = 0.0) -> list[tuple[str, str, dict]]:
    """``(column name, attack, options)`` of each member of ``version``, in the order they run.

    ``eot``/``eot_noise`` go to the APGD members (the gradient-based ones with EOT).
    """
    grads = {"steps": steps, "eot": eot, "eot_noise": eot_noise}
    if version == "rand":
        return [("apgd_ce", "apgd", {"loss": "ce", **grads}), ("apgd_dlr", "apgd", {"loss": "dlr", **grads})]
    return [("apgd_ce", "apgd", {"loss": "ce", **grads}),
            ("apgd_t", "apgd", {"loss": "dlr", "targeted": True, "n_target_classes": n_targets, **grads}),
            ("fab_t", "fab", {"targeted": True, "n_target_classes": n_targets, "steps": steps}),
            ("square", "square", {"n_queries": n_queries})]


@ATTACKS.register(
    "autoattack",
    "AutoAttack: APGD-CE, APGD-T, FAB-T, Square in turn, robust only if all fail (Croce & Hein 2020)",
    options=OPTIONS,
    paper="Croce & Hein 2020",
)
class AutoAttack(Attack):
    """The ensemble; see the module docstring. Options: :data:`OPTIONS`."""

    name = "autoattack"
    options = OPTIONS
    version: str
    steps: int
    n_queries: int
    n_target_classes: int

    @classmethod
    def eot_passes(cls, opts: dict) -> int:
        if opts.get("eot") is not None:
            return opts["eot"]
        return RAND_EOT if opts.get("version") == "rand" else 1

    def __init__(self, model, eps: float, **opts):
        super().__init__(model, eps, **opts)
        if self.targeted:
            raise GradlabError("invalid targeted: true (autoattack is untargeted; for one target class use apgd "
                               "--target-class C)")
        # The members' EOT happens inside them: the ensemble's own calls stay deterministic.
        self.member_eot, self.eot = self.eot_passes(opts), 1
        self.plan = members(self.version, self.steps, self.n_queries, self.n_target_classes, self.member_eot,
                            self.eot_noise)
        self.eot_noise = 0.0
        self.broken = {col: 0 for col, _, _ in self.plan}  # summed over this object's calls

    def summary(self) -> dict:
        return {f"broken_by_{col}": n for col, n in self.broken.items()}

    def perturb(self, x: Tensor, y: Tensor) -> Tensor:
        with torch.no_grad():
            clean = self.logits(x)
        robust = clean.argmax(dim=1) == y
        out = x.clone()
        for i, (col, attack, opts) in enumerate(self.plan):
            if opts.get("loss") == "dlr" and clean.shape[1] < (4 if opts.get("targeted") else 3):
                opts = {**opts, "loss": "ce"}  # the DLR losses need 3 (targeted: 4) classes
            idx = robust.nonzero()[:, 0]
            if idx.numel() == 0:
                break
            seed = int(torch.randint(0, 2**62, (1,), generator=self.generator, device=x.device).item())
            member = ATTACKS.entry(attack).obj(self.model, self.eps, norm=self.norm, seed=seed, **opts)
            member.criterion = self.criterion  # the run's loss for the members' CE objectives
            adv = member(x[idx], y[idx])
            with torch.no_grad():
                fooled = self.logits(adv).argmax(dim=1) != y[idx]
            keep = fooled if i else torch.ones_like(fooled)  # APGD-CE's point also for the survivors
            out[idx[keep]] = adv[keep]
            robust[idx[fooled]] = False
            self.broken[col] += int(fooled.sum())
        return out
