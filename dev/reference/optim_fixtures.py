#!/usr/bin/env python3
"""Write optimizer-step fixtures for tests/train/test_optimizers.cpp.

Four small tensors (a 6x10 hidden matrix, a 10x6 hidden matrix, an 8x4 embedding and a 6-vector norm) start
from seeded random values. Five steps of seeded random gradients (saved in the fixture) are applied by each
optimizer case, and the parameters after every step are recorded. Weight decay is on for the matrices and
the embedding and off for the norm, as llm::make_param_views groups them.

Where the truth comes from:
  * adamw                      torch.optim.AdamW
  * adafactor*                 transformers.optimization.Adafactor (not torch.optim.Adafactor, whose
                               update rule differs; the C++ follows transformers' semantics)
  * lion, muon*, sophia        written below from the published algorithms, in float32 torch ops:
      Lion   Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", Algorithm 2.
      Muon   Keller Jordan's reference (github.com/KellerJordan/Muon): momentum kept as an EMA
             (buf.lerp_(g, 1 - mu)), Nesterov direction g.lerp(buf, mu), quintic Newton-Schulz, scale
             max(1, rows/cols)^0.5, decoupled decay; non-matrix tensors go to torch.optim.AdamW at
             0.1 x lr.
             The reference runs Newton-Schulz in bfloat16; here the Muon cases run the momentum
             arithmetic, Newton-Schulz and the parameter update in float64 (momentum and parameters are
             stored in float32, rounded once a step). Not float32: Newton-Schulz amplifies rounding (up
             to a^5 = 3.4445^5 ~ 480x along small singular directions), and two correct float32
             implementations summing in different orders differ by ~1e-6 of the largest entry, more
             than the C++ test's 1e-6 relative check on parameters allows. The C++ CPU default
             (muon_ns_precision "fp64") computes the same way. A separate "newton_schulz" entry records
             the orthogonaliser alone in float64, float32 and bfloat16 (CPU torch), for the C++ fp64 and
             fp32 paths and its bf16-rounding emulation.
      SophiaG Liu et al. 2023, official code (github.com/Liuhong99/Sophia, sophia.py): the Hessian EMA is
             h = b2 h + (1 - b2) g_hat^2 from gradients of sampled labels, taken after every k-th step; the
             update is p *= 1 - lr wd; p -= lr sign(m) min(|m| / (rho bs h + 1e-15), 1). The Hessian
             gradients g_hat are random and saved in the fixture.

Usage (needs torch and transformers):
    python3 dev/reference/optim_fixtures.py > tests/fixtures/optim/optim_steps.json
"""

import json
import sys

import torch
import transformers
from transformers.optimization import Adafactor

STEPS = 5
WEIGHT_DECAY = 0.1
TENSORS = [
    # name, shape, role
    ("layers.0.w_a", (6, 10), "matrix"),
    ("layers.0.w_b", (10, 6), "matrix"),
    ("embed", (8, 4), "embedding"),
    ("norm", (6,), "norm"),
]
SOPHIA_K = 2
SOPHIA_BS = 256


def decays(role):
    return role not in ("norm", "bias")


def make_data():
    gen = torch.Generator().manual_seed(1234)
    init = [torch.randn(shape, generator=gen) * 0.5 for _, shape, _ in TENSORS]
    # Different gradient scales per tensor, so that per-tensor quantities (RMS, norms) matter.
    scales = [0.1, 0.03, 0.2, 0.05]
    grads = [[torch.randn(shape, generator=gen) * s for (_, shape, _), s in zip(TENSORS, scales)]
             for _ in range(STEPS)]
    hess = [[torch.randn(shape, generator=gen) * 0.8 for _, shape, _ in TENSORS] for _ in range(STEPS)]
    return init, grads, hess


def new_params(init):
    return [torch.nn.Parameter(t.clone()) for t in init]


def snapshot(params):
    return [p.detach().clone() for p in params]


# ---------------------------------------------------------------------------------------------------------
# The published algorithms, written out.


def lion_run(init, grads, lr, beta1, beta2):
    params = new_params(init)
    m = [torch.zeros_like(p) for p in params]
    out = []
    with torch.no_grad():
        for step in range(STEPS):
            for i, (p, (_, _, role)) in enumerate(zip(params, TENSORS)):
                g = grads[step][i]
                wd = WEIGHT_DECAY if decays(role) else 0.0
                c = m[i] * beta1 + g * (1 - beta1)
                p.mul_(1 - lr * wd)
                p.add_(torch.sign(c), alpha=-lr)
                m[i].mul_(beta2).add_(g, alpha=1 - beta2)
            out.append(snapshot(params))
    return out


def newton_schulz(G, steps, dtype):
    a, b, c = (3.4445, -4.7750, 2.0315)
    X = G.to(dtype)
    transposed = G.size(0) > G.size(1)
    if transposed:
        X = X.T
    X = X / (X.norm() + 1e-7)
    for _ in range(steps):
        A = X @ X.T
        B = b * A + c * A @ A
        X = a * X + B @ X
    if transposed:
        X = X.T
    return X


def muon_run(init, grads, lr, momentum, nesterov, ns_steps, adamw_lr_scale, betas, eps):
    params = new_params(init)
    muon_idx = [i for i, (_, shape, role) in enumerate(TENSORS) if role == "matrix" and len(shape) == 2]
    other_idx = [i for i in range(len(TENSORS)) if i not in muon_idx]
    groups = []
    for i in other_idx:
        wd = WEIGHT_DECAY if decays(TENSORS[i][2]) else 0.0
        groups.append({"params": [params[i]], "weight_decay": wd})
    adamw = torch.optim.AdamW(groups, lr=lr * adamw_lr_scale, betas=betas, eps=eps)
    buf = {i: torch.zeros_like(params[i]) for i in muon_idx}
    out = []
    for step in range(STEPS):
        with torch.no_grad():
            for i in muon_idx:
                p = params[i]
                # The reference's buf.lerp_(g, 1 - mu) and g.lerp(buf, mu), in float64 arithmetic with the
                # momentum stored in float32; NS5 in float64 (see the module docstring); the update is
                # then applied in float32.
                g = grads[step][i].double()
                buf[i] = (momentum * buf[i].double() + (1 - momentum) * g).float()
                direction = (1 - momentum) * g + momentum * buf[i].double() if nesterov else buf[i].double()
                update = newton_schulz(direction, ns_steps, torch.float64).float()
                scale = max(1, p.size(0) / p.size(1)) ** 0.5
                # p = p (1 - lr wd) - lr scale update, in float64 and rounded once: three float32
                # roundings a step would add up to ~1e-6 of the smallest values over five steps.
                p.copy_((p.double() * (1 - lr * WEIGHT_DECAY) - lr * scale * update.double()).float())
        for i in other_idx:
            params[i].grad = grads[step][i].clone()
        adamw.step()
        out.append(snapshot(params))
    return out


def sophia_run(init, grads, hess_grads, lr, beta1, beta2, rho, k, bs):
    params = new_params(init)
    m = [torch.zeros_like(p) for p in params]
    h = [torch.zeros_like(p) for p in params]
    out = []
    with torch.no_grad():
        for step in range(1, STEPS + 1):
            for i, (p, (_, _, role)) in enumerate(zip(params, TENSORS)):
                wd = WEIGHT_DECAY if decays(role) else 0.0
                p.mul_(1 - lr * wd)
                m[i].mul_(beta1).add_(grads[step - 1][i], alpha=1 - beta1)
                ratio = (m[i].abs() / (rho * bs * h[i] + 1e-15)).clamp(None, 1)
                p.addcmul_(m[i].sign(), ratio, value=-lr)
            if step % k == 0:  # the trainer estimates the Hessian after every k-th step
                for i in range(len(params)):
                    g_hat = hess_grads[step - 1][i]
                    h[i].mul_(beta2).addcmul_(g_hat, g_hat, value=1 - beta2)
            out.append(snapshot(params))
    return out


# ---------------------------------------------------------------------------------------------------------
# Library optimizers.


def torch_run(init, grads, make):
    params = new_params(init)
    groups = [{"params": [p], "weight_decay": WEIGHT_DECAY if decays(role) else 0.0}
              for p, (_, _, role) in zip(params, TENSORS)]
    opt = make(groups)
    out = []
    for step in range(STEPS):
        for i, p in enumerate(params):
            p.grad = grads[step][i].clone()
        opt.step()
        out.append(snapshot(params))
    return out


def flat(t):
    # 9 significant digits identify a float32 exactly.
    return [float("%.9g" % x) for x in t.detach().float().reshape(-1).tolist()]


def main():
    torch.set_num_threads(1)
    init, grads, hess = make_data()

    cases = {}

    def add(name, config, lr, trajectory, extra=None):
        case = {"config": config, "lr": lr, "params": [[flat(t) for t in snap] for snap in trajectory]}
        if extra:
            case.update(extra)
        cases[name] = case

    lr = 1e-2
    add("adamw", {"optimizer": "adamw", "adamw_beta1": 0.9, "adamw_beta2": 0.95, "adamw_eps": 1e-8}, lr,
        torch_run(init, grads, lambda g: torch.optim.AdamW(g, lr=lr, betas=(0.9, 0.95), eps=1e-8)))

    lr = 3e-3
    add("lion", {"optimizer": "lion", "lion_beta1": 0.9, "lion_beta2": 0.99}, lr,
        lion_run(init, grads, lr, 0.9, 0.99))

    lr = 2e-2
    for name, nesterov in (("muon", True), ("muon_no_nesterov", False)):
        add(name, {"optimizer": "muon", "muon_momentum": 0.95, "muon_nesterov": nesterov,
                   "muon_ns_steps": 5, "muon_adamw_lr_scale": 0.1, "adamw_beta1": 0.9, "adamw_beta2": 0.95,
                   "adamw_eps": 1e-8}, lr,
            muon_run(init, grads, lr, 0.95, nesterov, 5, 0.1, (0.9, 0.95), 1e-8))

    lr = 1e-2
    add("sophia", {"optimizer": "sophia", "sophia_beta1": 0.965, "sophia_beta2": 0.99, "sophia_rho": 0.04,
                   "sophia_k": SOPHIA_K}, lr,
        sophia_run(init, grads, hess, lr, 0.965, 0.99, 0.04, SOPHIA_K, SOPHIA_BS),
        {"batch_tokens": SOPHIA_BS,
         "hessian_grads": {str(s): [flat(t) for t in hess[s - 1]]
                           for s in range(1, STEPS + 1) if s % SOPHIA_K == 0}})

    lr = 1e-2
    add("adafactor", {"optimizer": "adafactor"}, lr,
        torch_run(init, grads, lambda g: Adafactor(g, lr=lr, scale_parameter=True, relative_step=False,
                                                   warmup_init=False)))
    add("adafactor_relative_step_beta1",
        {"optimizer": "adafactor", "adafactor_relative_step": True, "adafactor_beta1": 0.9}, 0.0,
        torch_run(init, grads, lambda g: Adafactor(g, lr=None, scale_parameter=True, relative_step=True,
                                                   warmup_init=False, beta1=0.9)))
    add("adafactor_unscaled_clip",
        {"optimizer": "adafactor", "adafactor_scale_parameter": False, "adafactor_clip_threshold": 0.5,
         "adafactor_decay_rate": -0.6}, 1e-2,
        torch_run(init, grads, lambda g: Adafactor(g, lr=1e-2, scale_parameter=False, relative_step=False,
                                                   warmup_init=False, clip_threshold=0.5,
                                                   decay_rate=-0.6)))

    # The orthogonaliser alone, on the 6x10 and 10x6 gradients of step 1.
    ns = []
    for i in (0, 1):
        G = grads[0][i]
        ns.append({"shape": list(G.shape), "input": flat(G),
                   "float64": newton_schulz(G.double(), 5, torch.float64).reshape(-1).tolist(),
                   "float32": flat(newton_schulz(G, 5, torch.float32)),
                   "bfloat16": flat(newton_schulz(G, 5, torch.bfloat16).float())})

    fixture = {
        "generator": "dev/reference/optim_fixtures.py",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "steps": STEPS,
        "weight_decay": WEIGHT_DECAY,
        "tensors": [{"name": n, "shape": list(s), "role": r, "init": flat(t)}
                    for (n, s, r), t in zip(TENSORS, init)],
        "grads": [[flat(t) for t in step] for step in grads],
        "cases": cases,
        "newton_schulz": ns,
    }
    sys.stdout.write(json.dumps(fixture, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    main()
