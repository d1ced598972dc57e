"""Training LLM-sized targets, on tiny shapes: size presets and parameter counts, the bf16 optimizer, activation
checkpointing, micro-batches, cached target features, pausing and resuming at any step."""
import numpy as np
import pytest
import torch

from padrec_export.features import TargetFeatures, pad_batch, target_outputs
from padrec_export.models import DraftConfig, Target, TargetConfig
from padrec_export.optim import AdamWBF16, round_stochastic_
from padrec_export.pipeline import target_config
from padrec_export.sizes import SIZES, ModelSize, param_count, size_by_name
from padrec_export.train import TrainConfig, _draft_step_mask, _target_step, draft_losses, train_draft, train_target
from padrec_export.trainer import Budget, Paused, load_state, save_state
from padrec_runtime.errors import CheckpointError, InputError
from padrec_runtime.grammar import Catalogue, TokenLayout

QWEN_PARAMS = {  # Hugging Face's counts of Qwen2.5 (q/k/v biases; 0.5B and 1.5B tie the head to the embedding)
    "qwen-0.5b": (151936, True, 494_032_768), "qwen-1.5b": (151936, True, 1_543_714_304),
    "qwen-7b": (152064, False, 7_615_616_512)}
# ours: the default catalogue's 261 tokens (4 levels x 64 codes + 5 special), no biases, an untied head
OUR_PARAMS = {"qwen-0.5b": 358_338_176, "qwen-1.5b": 1_311_085_056, "qwen-7b": 6_527_363_584}


@pytest.mark.parametrize("name", list(QWEN_PARAMS))
def test_size_presets_have_qwen_parameter_counts(name):
    vocab, tied, want = QWEN_PARAMS[name]
    assert param_count(size_by_name(name), vocab, qkv_bias=True, tied=tied) == want
    size = size_by_name(name)
    with torch.device("meta"):  # the model itself, allocated nowhere
        model = Target(TargetConfig(vocab_size=261, hidden_size=size.hidden, n_layers=size.layers,
                                    n_heads=size.heads, n_kv_heads=size.kv_heads, intermediate_size=size.intermediate))
    assert sum(p.numel() for p in model.parameters()) == param_count(size, 261) == OUR_PARAMS[name]


def test_unknown_size_is_refused_by_name():
    with pytest.raises(InputError, match="--size: got 'qwen-70b' .* expected one of tiny, qwen-0.5b"):
        size_by_name("qwen-70b")


def test_stochastic_rounding_is_unbiased_and_keeps_small_steps():
    torch.manual_seed(0)
    x = torch.full((20000,), 1.0 + 3e-4)  # between the bf16 neighbours 1.0 and 1.0078125
    r = round_stochastic_(torch.empty(20000, dtype=torch.bfloat16), x).float()
    assert set(r.unique().tolist()) == {1.0, 1.0078125}
    assert r.mean().item() == pytest.approx(1.0003, abs=2e-4)
    w, nearest = torch.ones(4096, dtype=torch.bfloat16), torch.ones(4096, dtype=torch.bfloat16)
    for _ in range(200):  # 200 steps of 1e-4: each far below bf16's resolution at 1.0
        round_stochastic_(w, w.float() + 1e-4)
        nearest.copy_(nearest.float() + 1e-4)
    assert nearest.float().mean().item() == 1.0  # round-to-nearest drops every step
    assert w.float().mean().item() == pytest.approx(1.02, abs=3e-3)


def test_bf16_adamw_keeps_bf16_weights_and_states_and_learns():
    torch.manual_seed(0)
    X = torch.randn(256, 32)
    y = X @ torch.randn(32, 1)
    model = torch.nn.Linear(32, 1).to(torch.bfloat16)
    opt = AdamWBF16(model.parameters(), lr=1e-2, weight_decay=0.0)
    loss = lambda: torch.nn.functional.mse_loss(model(X.bfloat16()).float(), y)  # noqa: E731
    first = loss().item()
    for _ in range(300):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert loss().item() < first / 20
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    states = [t for s in opt.state.values() for t in (s["exp_avg"], s["exp_avg_sq"])]
    assert states and all(t.dtype == torch.bfloat16 for t in states)


def _tiny(cat_vocab=40, layers=2):
    return TargetConfig(vocab_size=cat_vocab, hidden_size=32, n_layers=layers, n_heads=4, n_kv_heads=2,
                        intermediate_size=48)


def _seqs(n=24, vocab=40, seed=0):
    rng = np.random.default_rng(seed)
    return [np.concatenate([rng.integers(5, vocab, int(rng.integers(8, 14))), [2]]).astype(np.int64)
            for _ in range(n)]


def test_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    a = Target(_tiny()).train()
    b = Target(_tiny()).train()
    b.load_state_dict(a.state_dict())
    b.checkpointing = True
    ids = pad_batch(_seqs(4), range(4))
    calls = {}
    for model in (a, b):
        calls[model], layer = 0, model.layers[0]

        def mlp(x, m=model, inner=layer._mlp):  # counts the layer's runs (recomputation skips module hooks)
            calls[m] += 1
            return inner(x)
        layer._mlp = mlp
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        _target_step(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), TrainConfig(), ids)
    assert (calls[a], calls[b]) == (1, 2)  # checkpointed: the layer runs again in backward
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), name


def test_micro_batches_add_up_to_the_whole_step():
    torch.manual_seed(0)
    models = [Target(_tiny()).train() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    ids = pad_batch(_seqs(6), range(6))
    before = models[0].lm_head.weight.detach().clone()
    losses = []
    for model, micro in zip(models, (0, 2)):
        opt = torch.optim.SGD(model.parameters(), lr=0.5)  # plain SGD: a mis-scaled part would show
        loss, tokens = _target_step(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                                    TrainConfig(micro_batch=micro), ids)
        assert tokens == int((ids[:, 1:] != 0).sum())
        losses.append(loss)
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    for p, q in zip(*(m.parameters() for m in models)):
        assert torch.allclose(p, q, atol=1e-6)
    assert (models[0].lm_head.weight - before).abs().max() > 1e-3  # the step moved them


class _Steps(Budget):
    """A budget that allows `n` steps, then says stop."""

    def __init__(self, n):
        super().__init__()
        self.n = n

    def allows(self, need_s):
        self.n -= 1
        return self.n >= 0


def test_target_training_paused_and_resumed_equals_an_uninterrupted_run(tmp_path):
    cfg = TrainConfig(epochs=2, batch_size=5, warmup_steps=2, lr=3e-3)
    seqs = _seqs(23)  # 5 steps an epoch; the pause falls inside the second epoch
    whole, curves = train_target(_tiny(), seqs, cfg, progress=False)
    with pytest.raises(Paused) as paused:
        train_target(_tiny(), seqs, cfg, progress=False, budget=_Steps(7))
    assert paused.value.position.to_dict() == {"epoch": 1, "step": 2}
    save_state(tmp_path / "s.pt", {"run": 1}, paused.value.state)  # through the file a later process reads
    with pytest.raises(CheckpointError, match="other settings"):
        load_state(tmp_path / "s.pt", {"run": 2})
    state = load_state(tmp_path / "s.pt", {"run": 1})
    resumed, rcurves = train_target(_tiny(), seqs, cfg, progress=False, resume=state)
    assert rcurves["loss"] == curves["loss"]
    assert all(torch.equal(x, y) for x, y in zip(whole.state_dict().values(), resumed.state_dict().values()))


def test_bf16_weights_train_without_fp32_copies_and_learn():
    cfg = TrainConfig(epochs=3, batch_size=6, warmup_steps=2, lr=1e-2, weights="bfloat16", dtype="bfloat16")
    model, curves = train_target(_tiny(), _seqs(24), cfg, progress=False)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert np.mean(curves["loss"][-3:]) < curves["loss"][0] - 0.3


@pytest.fixture(scope="module")
def cat_and_target():
    layout = TokenLayout(2, 4)
    rng = np.random.default_rng(0)
    sids = np.array([[a, b] for a in range(4) for b in range(4)])[rng.permutation(16)[:12]]
    cat = Catalogue(layout, np.arange(100, 112), sids)
    torch.manual_seed(0)
    return cat, Target(_tiny(layout.vocab_size)).eval()


def _draft_seqs(cat, n=14):
    from padrec_export.train import encode_example
    rng = np.random.default_rng(1)
    return [encode_example(cat, rng.choice(cat.item_ids, 3, replace=False).tolist(),
                           rng.choice(cat.item_ids, 4, replace=False).tolist()) for _ in range(n)]


def _draft_cfg(cat, target):
    t = target.cfg
    return DraftConfig(hidden_size=t.hidden_size, vocab_size=t.vocab_size, n_heads=t.n_heads, n_kv_heads=t.n_kv_heads,
                       intermediate_size=t.intermediate_size, n_slots=cat.layout.n_slots)


def test_cached_target_features_give_the_draft_the_same_losses(cat_and_target):
    cat, target = cat_and_target
    seqs = _draft_seqs(cat)
    cache = TargetFeatures(target, seqs, batch_size=4)
    from padrec_export.models import Draft
    torch.manual_seed(0)
    draft = Draft(_draft_cfg(cat, target), target)
    slots = lambda t: torch.from_numpy(cat.layout.slots(t.numpy()))  # noqa: E731
    idx = np.array([5, 0, 9])
    ids = pad_batch(seqs, idx)
    live = draft_losses(draft, *target_outputs(target, ids), ids, 3, slots)
    cached = draft_losses(draft, *cache.batch(idx, ids.shape[1]), ids, 3, slots)
    assert torch.allclose(torch.stack(live), torch.stack(cached), atol=1e-5)
    assert _draft_step_mask(1, 4, 1, "cpu").shape == (1, 4, 8)


def test_draft_training_resumes_mid_epoch_with_cached_features(cat_and_target):
    cat, target = cat_and_target
    seqs = _draft_seqs(cat)
    cfg = TrainConfig(epochs=2, batch_size=4, warmup_steps=2, draft_steps=2, cache_features=True)
    whole, curve = train_draft(target, _draft_cfg(cat, target), seqs, cfg, cat, progress=False)
    with pytest.raises(Paused) as paused:
        train_draft(target, _draft_cfg(cat, target), seqs, cfg, cat, progress=False, budget=_Steps(5))
    assert paused.value.position.to_dict() == {"epoch": 1, "step": 1}
    resumed, rcurve = train_draft(target, _draft_cfg(cat, target), seqs, cfg, cat, progress=False,
                                  resume=paused.value.state)
    assert rcurve == pytest.approx(curve, abs=1e-6)
    for x, y in zip(whole.trainable_state().values(), resumed.trainable_state().values()):
        assert torch.allclose(x, y, atol=1e-6)


def test_batch_tokens_set_sequences_per_step():
    seqs = _seqs(10)
    longest = max(len(s) for s in seqs)
    assert TrainConfig(batch_tokens=4 * longest + 1).sequences_per_step(seqs) == 4
    assert TrainConfig(batch_size=7).sequences_per_step(seqs) == 7
    with pytest.raises(InputError, match="weights: got 'float16'"):
        TrainConfig(weights="float16")


def test_target_config_of_a_preset_uses_the_catalogue_vocabulary(cat_and_target):
    cat, _ = cat_and_target
    tc = target_config(SIZES["qwen-7b"], cat)
    assert (tc.vocab_size, tc.hidden_size, tc.n_layers, tc.n_heads, tc.n_kv_heads, tc.intermediate_size) == (
        cat.layout.vocab_size, 3584, 28, 28, 4, 18944)
    assert tc.head_dim == 128 and isinstance(SIZES["qwen-7b"], ModelSize)
