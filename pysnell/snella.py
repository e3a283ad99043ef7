"""SNELLA: bi-level sparsity allocation across SNELL layers (spec/SNELL.md §5).

Inside a layer the entries of ΔW compete by magnitude (the layer's own `sparsity` s_l). Across
layers a global budget of non-zeros moves to the layers whose low-rank factors matter most:

- importance, per factor θ ∈ {snell_A, snell_B}, after every optimizer step:
  I = |θ ⊙ ∇θ| (NaN → 0), Ī ← β1·Ī + (1−β1)·I, then U ← β2·U + (1−β2)·|I − Ī| with the UPDATED Ī,
  score = Ī ⊙ U; layer score S_l = mean(score_A) + mean(score_B), π_l = S_l / Σ_k S_k.
- budget (non-zeros), cubic from V_init = Σ(1−s_init)·n_l to V_tgt = Σ(1−s_target)·n_l.
- allocation: v_l = min(n_l, ⌊V·π_l⌋), the remainder handed to layers not yet full in proportion
  to π until it is exhausted; s_l = 1 − v_l/n_l.

The pure functions `importance_update_reference`, `cubic_budget` and `allocate_nonzeros` are the
source of truth; `SNELLAAllocator` wires them to a model.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from torch import nn

from ._checks import check_sparsity
from .adapter import snell_layers

log = logging.getLogger("pysnell")

FACTORS = ("snell_A", "snell_B")


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return value


def _check_beta(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float in [0, 1), got {type(value).__name__}")
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name} must be in [0, 1) (an EMA decay), got {value}")
    return float(value)


# ---------------------------------------------------------------------------------------------
# Importance (sensitivity) and its uncertainty
# ---------------------------------------------------------------------------------------------
def importance_update_reference(theta, grad, ema_importance, ema_uncertainty, beta1: float, beta2: float):
    """One EMA step for one factor, out of place; returns (Ī_new, U_new).

    I = |θ ⊙ ∇θ| with NaN → 0 (±inf → ±the dtype's largest finite value, torch.nan_to_num's
    default, so one overflow cannot turn the EMAs into inf − inf = NaN forever);
    Ī_new = β1·Ī + (1−β1)·I; U_new = β2·U + (1−β2)·|I − Ī_new| (the updated Ī, as spec §5 reads
    and as the public code does).
    """
    importance = torch.nan_to_num((theta * grad).abs(), nan=0.0)
    new_importance = beta1 * ema_importance + (1 - beta1) * importance
    new_uncertainty = beta2 * ema_uncertainty + (1 - beta2) * (importance - new_importance).abs()
    return new_importance, new_uncertainty


@torch.no_grad()
def importance_update_(thetas, grads, ema_importance, ema_uncertainty, beta1: float, beta2: float) -> None:
    """`importance_update_reference` for many factors at once, in place, with multi-tensor ops.

    All lists share one device. A handful of multi-tensor launches cover every factor (plus one
    small nan_to_num per factor), instead of ~8 launches per factor: for a ViT-B (144 factors)
    that beats one fused kernel per factor, whose launch cost would dominate. No host sync.
    """
    if not thetas:
        return
    importance = torch._foreach_mul(thetas, grads)
    torch._foreach_abs_(importance)
    for t in importance:
        t.nan_to_num_(nan=0.0)
    torch._foreach_mul_(ema_importance, beta1)
    torch._foreach_add_(ema_importance, importance, alpha=1 - beta1)
    # |I − Ī| with the updated Ī, reusing the I buffers.
    torch._foreach_sub_(importance, ema_importance)
    torch._foreach_abs_(importance)
    torch._foreach_mul_(ema_uncertainty, beta2)
    torch._foreach_add_(ema_uncertainty, importance, alpha=1 - beta2)


# ---------------------------------------------------------------------------------------------
# Budget schedule and allocation
# ---------------------------------------------------------------------------------------------
def cubic_budget(step: int, v_init: float, v_target: float, warmup: int, final: int, total: int) -> float:
    """V(e) of spec §5: V_init while e ≤ t_i, V_tgt once e > T − t_f, cubic in between."""
    if step <= warmup:
        return float(v_init)
    if step > total - final:
        return float(v_target)
    progress = (step - warmup) / (total - final - warmup)
    return float(v_target) + (float(v_init) - float(v_target)) * (1.0 - progress) ** 3


def allocate_nonzeros(budget: int, sizes: Sequence[int], scores: Sequence[float]) -> list[int]:
    """Split `budget` non-zeros over layers of `sizes` entries in proportion to `scores`.

    v_l = min(n_l, ⌊V·π_l⌋); what is left goes to the layers not yet full, again in proportion
    to π (capped at n_l), round after round. When every open layer's share is below one
    entry, the leftover units go one each to the open layers with the largest shares (ties: the
    earlier layer), so the loop always ends and Σ v_l == budget exactly, with v_l ≤ n_l.
    Scores that are all zero (or not finite) fall back to π ∝ n_l (uniform sparsity);
    zero-score layers receive entries only after every scored layer is full.
    """
    sizes = [int(n) for n in sizes]
    if len(scores) != len(sizes):
        raise ValueError(f"scores has {len(scores)} entries but sizes has {len(sizes)}")
    if any(n < 0 for n in sizes):
        raise ValueError(f"sizes must be non-negative, got {sizes}")
    if isinstance(budget, bool) or not isinstance(budget, int) or not 0 <= budget <= sum(sizes):
        raise ValueError(f"budget must be an int in [0, {sum(sizes)}] (the total size), got {budget!r}")
    weights = [float(s) for s in scores]
    if any(w < 0 for w in weights):
        raise ValueError(f"scores must be non-negative, got {weights}")
    total_weight = math.fsum(weights)
    if not math.isfinite(total_weight) or total_weight <= 0.0:
        weights = [float(n) for n in sizes]
    alloc = [0] * len(sizes)
    remaining = budget
    while remaining > 0:
        open_layers = [i for i, n in enumerate(sizes) if alloc[i] < n and weights[i] > 0]
        if open_layers:
            layer_weights = {i: weights[i] for i in open_layers}
        else:
            # Only zero-score layers have room left: fill them in proportion to their free room.
            open_layers = [i for i, n in enumerate(sizes) if alloc[i] < n]
            layer_weights = {i: float(sizes[i] - alloc[i]) for i in open_layers}
        open_weight = math.fsum(layer_weights.values())
        shares = {i: remaining * (layer_weights[i] / open_weight) for i in open_layers}
        given = 0
        for i in open_layers:
            grant = min(sizes[i] - alloc[i], math.floor(shares[i]), remaining - given)
            alloc[i] += grant
            given += grant
        if given == 0:
            # Every share is below one entry: largest shares first, one entry each.
            for i in sorted(open_layers, key=lambda i: (-shares[i], i))[:remaining]:
                alloc[i] += 1
                given += 1
        remaining -= given
    return alloc


def _reserve_one_each(alloc: list[int], sizes: Sequence[int]) -> list[int]:
    """Give every layer at least one non-zero, taken from the largest allocations (total unchanged).

    A SNELLLinear's sparsity must stay below 1, and any s < 1 keeps at least its largest entry,
    so a layer can never hold zero non-zeros: this keeps the bookkeeping exact instead.
    """
    alloc = list(alloc)
    for i, n in enumerate(sizes):
        if alloc[i] == 0 and n > 0:
            donor = max(range(len(alloc)), key=lambda j: (alloc[j], -j))
            if alloc[donor] <= 1:
                raise ValueError("budget is smaller than one non-zero per layer")
            alloc[donor] -= 1
            alloc[i] = 1
    return alloc


def sparsity_for(nonzeros: int, size: int) -> float:
    """s_l = clamp(1 − v_l/n_l, 0, 1); v_l ≥ 1 keeps it below 1 as SNELLLinear requires."""
    return min(max(1.0 - nonzeros / size, 0.0), 1.0)


# ---------------------------------------------------------------------------------------------
# The allocator
# ---------------------------------------------------------------------------------------------
class SNELLAAllocator:
    """Moves a global budget of non-zeros between the SNELLLinear layers of `model` (spec §5).

    Call `update_importance()` after every `optimizer.step()` (before zero_grad), then
    `step(e)` with e = the number of optimizer steps taken so far (1 after the first).
    Phases of `step(e)`:
    - e ≤ warmup: every layer is set to s_init (the EMAs warm up; no reallocation).
    - warmup < e ≤ total_steps − final: every `interval` steps (e % interval == 0), the
      budget V(e) (cubic, rounded to an integer) is allocated by importance.
    - e > total_steps − final: one last allocation at V_tgt, then the pattern stays fixed
      (the public code re-allocates at every step there, although it says it fixes the pattern).
    The layers hold their sparsity in a buffer, so a model's state_dict, `copy.deepcopy`, EMA
    copies and checkpoints carry the allocation; `state_dict()` here holds the EMAs and the step.

    Guarantees: Σ_l v_l equals the budget exactly, v_l ≤ n_l, s_l = 1 − v_l/n_l ∈ [0, 1). No layer
    is ever fully dropped: one whose share rounds to zero gets one non-zero (s = 1 − 1/n_l, i.e. it
    keeps its single largest entry), taken from the largest allocation. A fused qkv layer
    (out_groups = 3) is one allocation unit here: its groups share s_l (each keeps its own threshold).
    Scores that are all zero (no importance yet, or no gradients) fall back to π ∝ n_l.
    Note: in "reference" mode s_l = 0 means "no sparsification" (dense ΔW, spec §3).
    """

    def __init__(
        self,
        model: nn.Module,
        s_init: float,
        s_target: float,
        total_steps: int,
        warmup: int = 0,
        final: int = 0,
        interval: int = 1,
        beta1: float = 0.85,
        beta2: float = 0.85,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.s_init = check_sparsity(s_init, "s_init")
        self.s_target = check_sparsity(s_target, "s_target")
        self.warmup = _check_int("warmup", warmup, 0)
        self.final = _check_int("final", final, 0)
        self.total_steps = _check_int("total_steps", total_steps, 1)
        if self.total_steps <= self.warmup + self.final:
            raise ValueError(
                f"total_steps must exceed warmup + final = {self.warmup} + {self.final}, got {self.total_steps}"
            )
        self.interval = _check_int("interval", interval, 1)
        self.beta1 = _check_beta("beta1", beta1)
        self.beta2 = _check_beta("beta2", beta2)
        self.model = model
        self.layers = snell_layers(model)
        if not self.layers:
            raise ValueError("model has no SNELLLinear layers: inject SNELL adapters first (pysnell.inject)")
        self.names = [name for name, _ in self.layers]
        self.sizes = [layer.out_features * layer.in_features for _, layer in self.layers]
        total = sum(self.sizes)
        self.v_init = (1.0 - self.s_init) * total
        self.v_target = (1.0 - self.s_target) * total
        smallest = min(round(self.v_init), round(self.v_target))
        if smallest < len(self.layers):
            which = "s_target" if round(self.v_target) <= round(self.v_init) else "s_init"
            raise ValueError(
                f"{which} is too close to 1: a budget of {smallest} non-zeros cannot give each of the "
                f"{len(self.layers)} SNELL layers one entry"
            )
        self.ema_importance: dict[str, torch.Tensor] = {}
        self.ema_uncertainty: dict[str, torch.Tensor] = {}
        self.num_updates = 0
        self.last_step: int | None = None
        self.frozen = False
        self._nonzeros: list[int] | None = None
        self._scores: list[float] | None = None

    # -- importance ---------------------------------------------------------------------------
    def _ema_pair(self, key: str, theta: torch.Tensor):
        pair = []
        for store in (self.ema_importance, self.ema_uncertainty):
            ema = store.get(key)
            if ema is None:
                ema = torch.zeros_like(theta, memory_format=torch.contiguous_format)
            elif ema.device != theta.device or ema.dtype != theta.dtype:
                ema = ema.to(device=theta.device, dtype=theta.dtype)
            store[key] = ema
            pair.append(ema)
        return pair

    @torch.no_grad()
    def update_importance(self) -> None:
        """Update Ī and U of every factor from θ and θ.grad (call after optimizer.step()).

        Ī is updated first; U then uses the updated Ī (spec §5). Factors whose grad is None
        are skipped (their EMAs keep their values). No host synchronisation.
        """
        groups: dict[tuple, tuple[list, list, list, list]] = {}
        for name, layer in self.layers:
            for factor in FACTORS:
                theta = getattr(layer, factor)
                if theta.grad is None:
                    continue
                if theta.grad.shape != theta.shape:
                    raise ValueError(f"{name}.{factor}: grad shape {tuple(theta.grad.shape)} != {tuple(theta.shape)}")
                ema_i, ema_u = self._ema_pair(f"{name}.{factor}", theta)
                lists = groups.setdefault((theta.device, theta.dtype), ([], [], [], []))
                for dst, t in zip(lists, (theta.detach(), theta.grad.detach().to(theta.dtype), ema_i, ema_u)):
                    dst.append(t)
        for thetas, grads, emas_i, emas_u in groups.values():
            importance_update_(thetas, grads, emas_i, emas_u, self.beta1, self.beta2)
        self.num_updates += 1

    def scores(self) -> list[float]:
        """S_l = mean(Ī_A ⊙ U_A) + mean(Ī_B ⊙ U_B) per layer (0 for factors never updated); syncs once."""
        means = []
        for name in self.names:
            total = None
            for factor in FACTORS:
                key = f"{name}.{factor}"
                if key in self.ema_importance:
                    m = torch.mean(self.ema_importance[key] * self.ema_uncertainty[key], dtype=torch.float64)
                    total = m if total is None else total + m.to(total.device)
            means.append(total)
        present = [m for m in means if m is not None]
        if not present:
            return [0.0] * len(self.layers)
        device = present[0].device
        zero = torch.zeros((), dtype=torch.float64, device=device)
        values = torch.stack([zero if m is None else m.to(device) for m in means]).tolist()
        if not all(math.isfinite(v) for v in values):
            log.warning("pysnell: non-finite SNELLA importance scores; allocating in proportion to layer size")
            return [0.0] * len(self.layers)
        return values

    # -- schedule and allocation -----------------------------------------------------------------
    def budget(self, step: int) -> int:
        """The integer non-zero budget at step e (the cubic V(e), rounded to the nearest integer)."""
        _check_int("step", step, 0)
        v = cubic_budget(step, self.v_init, self.v_target, self.warmup, self.final, self.total_steps)
        return min(max(round(v), 0), sum(self.sizes))

    def _write(self, nonzeros: list[int]) -> None:
        for (_, layer), v, n in zip(self.layers, nonzeros, self.sizes):
            layer.set_sparsity(sparsity_for(v, n))
        self._nonzeros = list(nonzeros)

    def reallocate(self, budget: int) -> list[int]:
        """Allocate `budget` non-zeros by the current scores and write every layer's sparsity."""
        scores = self.scores()
        nonzeros = _reserve_one_each(allocate_nonzeros(budget, self.sizes, scores), self.sizes)
        self._scores = scores
        self._write(nonzeros)
        return nonzeros

    def step(self, step: int) -> bool:
        """Apply the schedule at optimizer step e; returns True when the layers' sparsities were rewritten."""
        _check_int("step", step, 0)
        self.last_step = step
        if step <= self.warmup:
            for _, layer in self.layers:
                layer.set_sparsity(self.s_init)
            # Any s < 1 keeps at least one entry.
            self._nonzeros = [max(1, round((1.0 - self.s_init) * n)) for n in self.sizes]
            return True
        if step > self.total_steps - self.final:
            if self.frozen:
                return False
            self.reallocate(self.budget(step))
            self.frozen = True
            return True
        self.frozen = False
        if step % self.interval:
            return False
        self.reallocate(self.budget(step))
        return True

    # -- reporting -------------------------------------------------------------------------------
    def allocation(self) -> dict[str, dict]:
        """name -> {sparsity, nonzeros, size, score, share} (score S_l; share π_l) for logging.

        Before the first allocation, nonzeros is derived from each layer's current sparsity.
        """
        scores = self._scores if self._scores is not None else [0.0] * len(self.layers)
        total_score = math.fsum(scores)
        out = {}
        for i, ((name, layer), n) in enumerate(zip(self.layers, self.sizes)):
            s = float(layer.sparsity)
            v = self._nonzeros[i] if self._nonzeros is not None else round((1.0 - s) * n)
            out[name] = {
                "sparsity": s,
                "nonzeros": int(v),
                "size": n,
                "score": scores[i],
                "share": scores[i] / total_score if total_score > 0 else n / sum(self.sizes),
            }
        return out

    def table(self) -> str:
        """The allocation as a fixed-width text table with a total row."""
        rows = self.allocation()
        width = max([len("layer")] + [len(name) for name in rows])
        header = f"{'layer':<{width}}  {'size':>10}  {'nonzeros':>10}  {'sparsity':>9}  {'share':>7}  {'score':>10}"
        lines = [header, "-" * len(header)]
        for name, r in rows.items():
            lines.append(
                f"{name:<{width}}  {r['size']:>10d}  {r['nonzeros']:>10d}  {r['sparsity']:>9.6f}  "
                f"{r['share']:>7.4f}  {r['score']:>10.3e}"
            )
        size = sum(r["size"] for r in rows.values())
        kept = sum(r["nonzeros"] for r in rows.values())
        lines.append("-" * len(header))
        lines.append(f"{'total':<{width}}  {size:>10d}  {kept:>10d}  {1.0 - kept / size:>9.6f}")
        return "\n".join(lines)

    def copy_sparsity_to(self, other: nn.Module) -> None:
        """Write this model's per-layer sparsities into another copy of it (e.g. an EMA model).

        An EMA wrapper that averages every float state entry (timm's ModelEmaV2) also averages the
        sparsity buffers; call this after its update to evaluate the EMA weights at exactly s_l.
        """
        theirs = dict(snell_layers(other))
        missing = [name for name in self.names if name not in theirs]
        if missing:
            raise ValueError(f"other model lacks SNELL layers {missing[:5]}")
        for name, layer in self.layers:
            theirs[name].sparsity.copy_(layer.sparsity)

    # -- checkpointing ---------------------------------------------------------------------------
    def _hyper(self) -> dict:
        return {
            "s_init": self.s_init,
            "s_target": self.s_target,
            "total_steps": self.total_steps,
            "warmup": self.warmup,
            "final": self.final,
            "interval": self.interval,
            "beta1": self.beta1,
            "beta2": self.beta2,
        }

    def state_dict(self) -> dict:
        """EMAs, counters, the last allocation and the hyper-parameters (the layers' s_l are in the model)."""
        return {
            "hyper": self._hyper(),
            "layers": dict(zip(self.names, self.sizes)),
            "ema_importance": dict(self.ema_importance),
            "ema_uncertainty": dict(self.ema_uncertainty),
            "num_updates": self.num_updates,
            "last_step": self.last_step,
            "frozen": self.frozen,
            "nonzeros": None if self._nonzeros is None else list(self._nonzeros),
            "scores": None if self._scores is None else list(self._scores),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict()`; the layers and hyper-parameters must match this allocator."""
        hyper = state["hyper"]
        changed = {k: (hyper.get(k), v) for k, v in self._hyper().items() if hyper.get(k) != v}
        if changed:
            listing = ", ".join(f"{k}: saved {a!r} vs {b!r}" for k, (a, b) in changed.items())
            raise ValueError(f"allocator hyper-parameters differ from the checkpoint ({listing})")
        if dict(state["layers"]) != dict(zip(self.names, self.sizes)):
            raise ValueError("the checkpoint's SNELL layers (names or sizes) differ from this model's")
        params = {f"{name}.{f}": getattr(layer, f) for name, layer in self.layers for f in FACTORS}
        ema_i, ema_u = {}, {}
        for src, dst in ((state["ema_importance"], ema_i), (state["ema_uncertainty"], ema_u)):
            for key, value in src.items():
                if key not in params:
                    raise ValueError(f"checkpoint has EMA for unknown factor {key!r}")
                if tuple(value.shape) != tuple(params[key].shape):
                    raise ValueError(f"{key}: EMA shape {tuple(value.shape)} != factor {tuple(params[key].shape)}")
                dst[key] = value.detach().to(device=params[key].device, dtype=params[key].dtype).clone()
        if ema_i.keys() != ema_u.keys():
            raise ValueError("checkpoint's importance and uncertainty EMAs cover different factors")
        self.ema_importance, self.ema_uncertainty = ema_i, ema_u
        self.num_updates = int(state["num_updates"])
        self.last_step = state["last_step"]
        self.frozen = bool(state["frozen"])
        self._nonzeros = None if state["nonzeros"] is None else [int(v) for v in state["nonzeros"]]
        self._scores = None if state["scores"] is None else [float(v) for v in state["scores"]]
