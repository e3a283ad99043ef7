"""Two CPU processes (gloo): DDP and FSDP training of SNELL models match one process on the combined batch,
and adapters are saved from rank 0 and load back on every rank.

FSDP on CPU: both FSDP1 (`FullyShardedDataParallel(FULL_SHARD, use_orig_params=True)`) and FSDP2
(`fully_shard`) run with gloo. FSDP1 needs use_orig_params=True because a SNELL layer mixes its frozen
base weight and its trainable adapter in one module (flat parameters must agree on requires_grad). To save
an adapter, gather the full state dict (rank 0), load it into an unsharded copy and call
pysnell.save_adapter there: save_adapter writes plain tensors, not shards.

One spawn runs every scenario (starting two interpreters dominates the cost); each test checks one report.
"""

import os
import socket
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import pysnell

WORLD = 2
STEPS = 4
LOCAL_BATCH = 3
IN, HIDDEN, OUT = 12, 20, 5


class Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(IN, HIDDEN)
        self.blocks = nn.ModuleList([Block(HIDDEN), Block(HIDDEN)])
        self.mix = pysnell.MonarchLinear(HIDDEN, HIDDEN, nblocks=4)
        self.head = nn.Linear(HIDDEN, OUT)

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return self.head(torch.tanh(self.mix(h)))


def make_model(seed: int, kernel: str = "rbf") -> nn.Module:
    torch.manual_seed(seed)
    model = Net()
    config = pysnell.SNELLConfig(
        target_modules=["fc1", "fc2"], r=4, sparsity=0.5, kernel=kernel, modules_to_save=["head"]
    )
    # float64: the only differences left are summation orders (≈1e-16), so the tolerances can be tight.
    return pysnell.inject(model, config).double()


def batches(seed: int):
    g = torch.Generator().manual_seed(seed + 1)
    return [
        (
            torch.randn(WORLD * LOCAL_BATCH, IN, generator=g, dtype=torch.float64),
            torch.randn(WORLD * LOCAL_BATCH, OUT, generator=g, dtype=torch.float64),
        )
        for _ in range(STEPS)
    ]


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def train(model, data, rank=None):
    """SGD with momentum; rank=None trains on the combined batch, otherwise on this rank's slice."""
    opt = torch.optim.SGD(trainable(model), lr=0.2, momentum=0.9)
    for x, y in data:
        if rank is not None:
            x, y = x[rank * LOCAL_BATCH : (rank + 1) * LOCAL_BATCH], y[rank * LOCAL_BATCH : (rank + 1) * LOCAL_BATCH]
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return model


def max_param_diff(reference: dict, got: dict) -> float:
    assert reference.keys() == got.keys(), (sorted(reference), sorted(got))
    return max((reference[k].float() - got[k].float()).abs().max().item() for k in reference)


def full_state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _ddp(rank, seed, workdir, report):
    from torch.nn.parallel import DistributedDataParallel as DDP

    data = batches(seed)
    reference = train(make_model(seed), data)
    model = DDP(make_model(seed))
    train(model, data, rank)
    report["ddp_max_diff"] = max_param_diff(full_state(reference), full_state(model.module))

    # Adapter written by rank 0 only, read back by every rank.
    directory = os.path.join(workdir, "ddp_adapter")
    if rank == 0:
        pysnell.save_adapter(model.module, directory)
    dist.barrier()
    fresh = make_model(seed)  # same base weights, a freshly initialised adapter that the file overwrites
    pysnell.load_adapter(fresh, directory)
    x = data[0][0]
    report["ddp_reload_diff"] = (fresh(x) - model.module(x)).abs().max().item()


def _fsdp1(rank, seed, workdir, report):
    from torch.distributed.fsdp import FullStateDictConfig, ShardingStrategy, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    # The kernel's learnable scalars (α, β, γ) are 1-element vectors: FSDP1 and FSDP2 refuse 0-dim parameters.
    data = batches(seed)
    reference = train(make_model(seed, "sigmoid"), data)
    model = FSDP(
        make_model(seed, "sigmoid"),
        sharding_strategy=ShardingStrategy.FULL_SHARD,
        auto_wrap_policy=ModuleWrapPolicy({Block}),
        use_orig_params=True,
        device_id=torch.device("cpu"),
    )
    # Each rank holds about 1/WORLD of the parameters between steps.
    local = sum(p.numel() for p in model.parameters())
    report["fsdp1_local_fraction"] = local / sum(p.numel() for p in reference.parameters())
    train(model, data, rank)
    # The parameters already live on the CPU: offload_to_cpu=True crashes (SIGSEGV) in torch 2.13 on CPU-only
    # FSDP1. On GPUs use offload_to_cpu=True, rank0_only=True.
    with FSDP.state_dict_type(
        model, StateDictType.FULL_STATE_DICT, FullStateDictConfig(offload_to_cpu=False, rank0_only=False)
    ):
        state = full_state(model)
    report["fsdp1_max_diff"] = max_param_diff(full_state(reference), state)

    directory = os.path.join(workdir, "fsdp1_adapter")
    if rank == 0:
        unsharded = make_model(seed, "sigmoid")
        unsharded.load_state_dict(state)
        pysnell.save_adapter(unsharded, directory)
    dist.barrier()
    fresh = pysnell.load_adapter(make_model(seed, "sigmoid"), directory)
    x = data[0][0]
    report["fsdp1_reload_diff"] = (fresh(x) - reference(x)).abs().max().item()


def _fsdp2(rank, seed, workdir, report):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    data = batches(seed)
    reference = train(make_model(seed), data)
    model = make_model(seed)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    train(model, data, rank)
    # cpu_offload=True would gather on rank 0 only; every rank checks here.
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
    report["fsdp2_max_diff"] = max_param_diff(full_state(reference), {k: v.detach() for k, v in state.items()})


def _worker(rank, port, seed, workdir):
    report = {}
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
        pysnell.set_backend("torch")
        for scenario in (_ddp, _fsdp1, _fsdp2):
            try:
                scenario(rank, seed, workdir, report)
            except Exception:  # noqa: BLE001 - reported to the test, which fails with the traceback
                report[scenario.__name__ + "_error"] = traceback.format_exc()
            dist.barrier()
    finally:
        torch.save(report, os.path.join(workdir, f"report{rank}.pt"))
        if dist.is_initialized():
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def reports():
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    with tempfile.TemporaryDirectory() as workdir:
        mp.spawn(_worker, args=(_free_port(), seed, workdir), nprocs=WORLD, join=True)
        out = [torch.load(os.path.join(workdir, f"report{r}.pt")) for r in range(WORLD)]
    for rep in out:
        rep["seed"] = seed
    return out


def _check(reports, key, tol):
    for rank, rep in enumerate(reports):
        errors = {k: v for k, v in rep.items() if k.endswith("_error")}
        relevant = [v for k, v in errors.items() if k.startswith("_" + key.split("_")[0])]
        assert not relevant, f"rank {rank} (seed {rep['seed']}):\n" + "\n".join(relevant)
        assert rep[key] <= tol, f"rank {rank} (seed {rep['seed']}): {key} = {rep[key]}"


def test_ddp_matches_single_process_on_combined_batch(reports):
    _check(reports, "ddp_max_diff", 1e-10)


def test_ddp_adapter_saved_on_rank0_loads_on_every_rank(reports):
    _check(reports, "ddp_reload_diff", 0.0)


def test_fsdp_full_shard_matches_single_process(reports):
    fractions = [rep.get("fsdp1_local_fraction", 1.0) for rep in reports]
    assert all(f < 0.75 for f in fractions), f"FSDP1 did not shard the parameters: local fractions {fractions}"
    _check(reports, "fsdp1_max_diff", 1e-10)


def test_fsdp_adapter_saved_from_gathered_state_loads(reports):
    _check(reports, "fsdp1_reload_diff", 1e-12)


def test_fsdp2_fully_shard_matches_single_process(reports):
    _check(reports, "fsdp2_max_diff", 1e-10)


def test_models_differ_from_their_start():
    """The comparison above is meaningful: the adapters do move in STEPS steps."""
    seed = 1234
    start = full_state(make_model(seed))
    trained = full_state(train(make_model(seed), batches(seed)))
    assert max_param_diff(start, trained) > 1e-3
    untouched = [k for k in start if torch.equal(start[k], trained[k])]
    assert any("base.weight" in k for k in untouched) and not any("snell_A" in k for k in untouched)
