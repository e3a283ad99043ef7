"""The main job (`make demo`): transfer a small ViT between two halves of scikit-learn's digits.

1. Pre-train pysnell.models.TinyViT on digits 0–4 (bundled with scikit-learn, no download).
2. Fine-tune it on digits 5–9 with full fine-tuning, LoRA, SNELL, SNELLA and a Monarch-projected
   model, from the same pre-trained weights and the same data order.
3. Print a table: trainable parameters, test accuracy, time per step and peak memory.
Runs on the CPU in a few minutes and uses the GPU kernels when CUDA is present.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from torch import nn

import pysnell
from pysnell.models import VIT_TARGETS, TinyViT


def load_digits_halves(device, seed=0):
    """((x, y) pre-train, (x, y) fine-tune train, (x, y) fine-tune test); images scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    g = torch.Generator().manual_seed(seed)
    low, high = y < 5, y >= 5
    pre = (x[low], y[low])
    xh, yh = x[high], y[high] - 5
    perm = torch.randperm(len(yh), generator=g)
    cut = int(0.6 * len(yh))
    train = (xh[perm[:cut]], yh[perm[:cut]])
    test = (xh[perm[cut:]], yh[perm[cut:]])
    return [tuple(t.to(device) for t in split) for split in (pre, train, test)]


def batches(x, y, batch_size, generator):
    perm = torch.randperm(len(y), generator=generator).to(x.device)
    for i in range(0, len(y), batch_size):
        idx = perm[i : i + batch_size]
        yield x[idx], y[idx]


def accuracy(model, x, y):
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(-1) == y).float().mean().item()


def peak_memory_mib(model, opt, xb, yb, device):
    """Peak memory of one training step above what existed before it.

    CUDA: max_memory_allocated. CPU: torch's memory profiler records every tensor allocation
    and free during the step; the high-water mark of its timeline is the peak.
    """
    step = lambda: train_step(model, opt, xb, yb)  # noqa: E731
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline("cpu")
    return max((sum(s) for s in sizes), default=0) / 2**20


def train_step(model, opt, xb, yb):
    model.train()
    loss = F.cross_entropy(model(xb), yb)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss


def fit(model, data, *, epochs, lr, batch_size, seed, desc, hook=None):
    """Train `model` (only its trainable tensors); returns the median seconds per step."""
    x, y = data
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    steps_per_epoch = -(-len(y) // batch_size)
    times = []
    from tqdm.auto import tqdm

    with tqdm(total=epochs * steps_per_epoch, desc=desc, leave=False, mininterval=0.5) as bar:
        for _ in range(epochs):
            for xb, yb in batches(x, y, batch_size, g):
                t0 = time.perf_counter()
                loss = train_step(model, opt, xb, yb)
                if hook is not None:
                    hook(len(times))
                if x.device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
                bar.set_postfix(loss=f"{loss.item():.3f}")
                bar.update()
    times.sort()
    return times[len(times) // 2], opt


def new_head(model, classes, seed):
    torch.manual_seed(seed)
    model.head = nn.Linear(model.head.in_features, classes).to(next(model.parameters()).device)
    return model


def method_full(model):
    model.requires_grad_(True)
    return model, None


def method_lora(model, r=8):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        return None, None
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=VIT_TARGETS, modules_to_save=["head"])
    return get_peft_model(model, config), None


def method_snell(model, r=8, sparsity=0.9):
    config = pysnell.SNELLConfig(target_modules=VIT_TARGETS, modules_to_save=["head"], r=r, sparsity=sparsity)
    return pysnell.inject(model, config), None


def method_snella(model, total_steps, r=8):
    """SNELLA: the snella kernel plus the bi-level allocator moving a global budget across layers."""
    allocator_cls = getattr(pysnell, "SNELLAAllocator", None)
    if allocator_cls is None:
        return None, None
    config = pysnell.SNELLConfig(
        target_modules=VIT_TARGETS, modules_to_save=["head"], r=r, sparsity=0.5, kernel="snella"
    )
    pysnell.inject(model, config)
    allocator = allocator_cls(
        model, s_init=0.5, s_target=0.9, total_steps=total_steps, warmup=total_steps // 10, final=total_steps // 5
    )

    def hook(step):
        allocator.update_importance()
        allocator.step(step)

    return model, hook


def method_monarch(model, nblocks=4):
    """Project every block linear onto Monarch factors and train them (plus the head)."""
    model.requires_grad_(False)
    pysnell.monarchize(model, VIT_TARGETS, nblocks)
    model.head.requires_grad_(True)
    return model, None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12, help="fine-tuning epochs per method")
    parser.add_argument("--pretrain-epochs", type=int, default=25)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--methods", default="", help="comma-separated substrings of method names to run")
    parser.add_argument("--snell-lr", type=float, default=5e-2)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    pre, train, test = load_digits_halves(device, args.seed)

    print(f"pysnell {pysnell.__version__} demo on {device} (torch {torch.__version__})")
    print(
        f"pre-train: digits 0-4, {len(pre[1])} images; fine-tune: digits 5-9, "
        f"{len(train[1])} train / {len(test[1])} test images"
    )
    base = TinyViT(img_size=8, patch=2, dim=96, depth=4, heads=4, num_classes=5).to(device)
    fit(base, pre, epochs=args.pretrain_epochs, lr=2e-3, batch_size=64, seed=args.seed, desc="pre-train 0-4")
    print("pre-trained on 0-4: training accuracy", f"{100 * accuracy(base, *pre):.1f}%")

    steps = args.epochs * -(-len(train[1]) // args.batch_size)
    methods = [
        ("full fine-tuning", method_full, 1e-3),
        ("LoRA r=8 (peft)", method_lora, 5e-3),
        ("SNELL r=8, s=0.9", method_snell, args.snell_lr),
        ("SNELLA r=8, s 0.5->0.9 (allocated)", lambda m: method_snella(m, steps), args.snell_lr),
        ("Monarch nblocks=4", method_monarch, 2e-3),
    ]
    head_only = new_head(copy.deepcopy(base), 5, args.seed)
    rows = [("head re-initialised, no tuning", 0, accuracy(head_only, *test), float("nan"), float("nan"))]
    if args.methods:
        wanted = [w.strip().lower() for w in args.methods.split(",")]
        methods = [m for m in methods if any(w in m[0].lower() for w in wanted)]
    for name, make, lr in methods:
        model = new_head(copy.deepcopy(base), 5, args.seed)
        model, hook = make(model)
        if model is None:
            print(f"skipping {name}: its optional dependency is not installed")
            continue
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        step_s, opt = fit(
            model, train, epochs=args.epochs, lr=lr, batch_size=args.batch_size, seed=args.seed, desc=name, hook=hook
        )
        xb, yb = train[0][: args.batch_size], train[1][: args.batch_size]
        peak = peak_memory_mib(model, opt, xb, yb, device)
        rows.append((name, trainable, accuracy(model, *test), step_s * 1e3, peak))

    print()
    print("| method | trainable params | test accuracy (5-9) | ms / step | peak MiB / step |")
    print("|---|---:|---:|---:|---:|")
    for name, trainable, acc, ms, peak in rows:
        print(f"| {name} | {trainable:,d} | {100 * acc:.1f}% | {ms:.2f} | {peak:.2f} |")
    print(
        f"\ndevice: {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}; "
        f"backend used by the SNELL layer: {pysnell.last_backend('snell.layer_forward')}"
    )
    return rows


if __name__ == "__main__":
    main()
