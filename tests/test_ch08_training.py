"""Chapter 8: the loss, AdamW, the schedule, clipping, accumulation, mixed precision,
data, checkpoints and exact resumption, each against an independent reference.

Run against your own module with: pytest tests/test_ch08_training.py --impl my_ch08.py
"""

import dataclasses
import hashlib
import math
import pickle

import numpy as np
import pytest
import torch

from ch06_gpt import GPTConfig
from helpers import tiny_gpt, tiny_train_settings


@pytest.fixture(scope="module")
def ch(load_chapter):
    return load_chapter("ch08_training")


def random_batch(seed, batch_size=4, block_size=16, vocab_size=50):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab_size, (batch_size, block_size), generator=g)
    y = torch.randint(0, vocab_size, (batch_size, block_size), generator=g)
    return x, y


def tiny_config(ch, out_dir, **overrides):
    return ch.make_config("tiny", **tiny_train_settings(out_dir, **overrides))


# ---------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------


def test_lm_loss_matches_torch_cross_entropy(ch):
    torch.manual_seed(0)
    logits, targets = torch.randn(3, 7, 11), torch.randint(0, 11, (3, 7))
    expected = torch.nn.functional.cross_entropy(logits.view(-1, 11), targets.view(-1))
    torch.testing.assert_close(ch.lm_loss(logits, targets), expected)


def test_lm_loss_rejects_mismatched_shapes(ch):
    with pytest.raises(ValueError, match="targets"):
        ch.lm_loss(torch.randn(2, 5, 9), torch.zeros(2, 4, dtype=torch.long))


def test_naive_cross_entropy_overflows_where_log_sum_exp_does_not(ch):
    logits = torch.tensor([[100.0, 0.0, -5.0]])  # e^100 overflows float32
    targets = torch.tensor([0])
    assert not torch.isfinite(ch.naive_cross_entropy(logits, targets))
    torch.testing.assert_close(
        ch.lm_loss(logits[None], targets[None]), torch.nn.functional.cross_entropy(logits, targets)
    )


def test_perplexity_and_bits_per_byte(ch):
    assert ch.perplexity(math.log(65)) == pytest.approx(65)  # a uniform guess over 65 tokens
    # 1000 tokens of 4 bytes each at ln 2 nats per token: 1 bit per token = 0.25 bits per byte
    assert ch.bits_per_byte(math.log(2), 1000, 4000) == pytest.approx(0.25)


def test_untrained_model_loss_is_about_ln_vocab_size(ch):
    model = tiny_gpt(vocab_size=50)
    x, y = random_batch(0)
    _, loss = model(x, y)
    assert loss.item() == pytest.approx(math.log(50), abs=0.15)


# ---------------------------------------------------------------------------
# AdamW
# ---------------------------------------------------------------------------


@pytest.mark.exercise(1)
def test_exercise_1_adamw_matches_torch_step_for_step_on_a_gpt(ch):
    # float64: the key biases of attention get gradients that are rounding noise (softmax
    # ignores a constant shift), which Adam's normalisation would amplify in float32.
    ours_model, ref_model = tiny_gpt(seed=1).double(), tiny_gpt(seed=1).double()
    ours = ch.AdamW(ch.param_groups(ours_model, 0.1), lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    ref = torch.optim.AdamW(ch.param_groups(ref_model, 0.1), lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    for step in range(8):
        x, y = random_batch(step)
        for model, opt in [(ours_model, ours), (ref_model, ref)]:
            _, loss = model(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad()
        for (name, p), q in zip(ours_model.named_parameters(), ref_model.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=f"step {step}: {name}")


@pytest.mark.exercise(1)
def test_exercise_1_adamw_update_of_a_single_tensor(ch):
    # First step from zero moments: m_hat = g, v_hat = g^2, so the update is lr * g/(|g|+eps).
    p = torch.tensor([1.0, -2.0, 3.0])
    g = torch.tensor([0.5, -0.1, 2.0])
    m, v = torch.zeros(3), torch.zeros(3)
    ch.adamw_update(p, g, m, v, 1, 0.1, 0.9, 0.999, 1e-8, 0.01)
    expected = torch.tensor([1.0, -2.0, 3.0]) * (1 - 0.1 * 0.01) - 0.1 * g / (g.abs() + 1e-8)
    torch.testing.assert_close(p, expected)
    torch.testing.assert_close(m, 0.1 * g)
    torch.testing.assert_close(v, 0.001 * g * g)


def test_param_groups_decay_only_matrices(ch):
    model = tiny_gpt()
    decay, no_decay = ch.param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_adamw_rejects_invalid_settings(ch):
    with pytest.raises(ValueError, match="invalid"):
        ch.AdamW([torch.zeros(1, requires_grad=True)], lr=-1.0)


# ---------------------------------------------------------------------------
# Schedule, clipping, accumulation
# ---------------------------------------------------------------------------


@pytest.mark.exercise(2)
def test_exercise_2_schedule_matches_torch_schedulers(ch):
    # The same schedule from PyTorch's own LinearLR + CosineAnnealingLR.
    max_lr, min_lr, warmup, decay = 1.0, 0.1, 10, 60
    param = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([param], lr=max_lr)
    sched = torch.optim.lr_scheduler.SequentialLR(
        opt,
        [torch.optim.lr_scheduler.LinearLR(opt, start_factor=1 / warmup, end_factor=1.0, total_iters=warmup - 1),
         torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=decay - warmup + 1, eta_min=min_lr)],
        milestones=[warmup - 1],
    )
    for step in range(decay):
        expected = opt.param_groups[0]["lr"]
        assert ch.lr_at(step, max_lr, min_lr, warmup, decay) == pytest.approx(expected, abs=1e-9), step
        opt.step()
        sched.step()
    assert ch.lr_at(decay + 50, max_lr, min_lr, warmup, decay) == pytest.approx(min_lr)


@pytest.mark.exercise(2)
def test_exercise_2_schedule_shape(ch):
    lrs = [ch.lr_at(s, 6e-4, 6e-5, 100, 1000) for s in range(1100)]
    assert lrs[0] == pytest.approx(6e-4 / 100) and lrs[99] == pytest.approx(6e-4)
    assert all(a < b for a, b in zip(lrs[:99], lrs[1:100]))  # warmup rises
    assert all(a >= b for a, b in zip(lrs[99:1000], lrs[100:1001]))  # decay falls
    assert lrs[550] == pytest.approx((6e-4 + 6e-5) / 2, rel=1e-2)  # half-way down at the middle


def test_clip_grad_norm_matches_torch(ch):
    for max_norm in [0.01, 1.0, 1e6]:  # clips, clips, leaves alone
        a, b = tiny_gpt(seed=2), tiny_gpt(seed=2)
        x, y = random_batch(3)
        for model in (a, b):
            model(x, y)[1].backward()
        ours = ch.clip_grad_norm(list(a.parameters()), max_norm)
        ref = torch.nn.utils.clip_grad_norm_(b.parameters(), max_norm)
        torch.testing.assert_close(ours, ref)
        for p, q in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(p.grad, q.grad)


@pytest.mark.exercise(3)
def test_exercise_3_accumulation_equals_the_large_batch(ch):
    big, accumulated = tiny_gpt(seed=4), tiny_gpt(seed=4)
    x, y = random_batch(5, batch_size=8)
    _, loss = big(x, y)
    loss.backward()
    micro = [(x[i : i + 2], y[i : i + 2]) for i in range(0, 8, 2)]
    total = ch.accumulate_gradients(accumulated, micro)
    assert total == pytest.approx(loss.item(), rel=1e-5)
    for p, q in zip(big.parameters(), accumulated.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------
# Mixed precision
# ---------------------------------------------------------------------------


def test_float_formats_match_ieee(ch):
    formats = ch.float_formats()
    assert formats["fp16"]["max"] == 65504.0
    assert formats["bf16"]["epsilon"] == 2.0**-7 and formats["fp16"]["epsilon"] == 2.0**-10
    assert formats["bf16"]["smallest_normal"] == formats["fp32"]["smallest_normal"]  # fp32's range


def test_small_gradients_underflow_in_fp16_unless_scaled(ch):
    grad = torch.tensor(1e-8)
    assert grad.to(torch.float16).item() == 0.0  # lost
    assert grad.to(torch.bfloat16).item() != 0.0  # bf16 keeps fp32's range
    scaled = (grad * 2.0**16).to(torch.float16)
    assert scaled.float().item() / 2.0**16 == pytest.approx(1e-8, rel=1e-2)  # GradScaler's trick


def test_choose_precision_on_cuda_never_scales_bf16(ch, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert ch.choose_precision("cuda") == (torch.bfloat16, False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert ch.choose_precision("cuda") == (torch.float16, True)


def test_choose_precision_on_cpu_is_full_precision(ch):
    assert ch.choose_precision("cpu") == (None, False)
    assert ch.resolve_precision("bf16", torch.device("cpu")) == (torch.bfloat16, False)


def test_matmul_gflops_is_a_plausible_measurement(ch):
    gflops = ch.matmul_gflops(torch.float32, n=128)
    assert 0.01 < gflops < 10_000


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


def test_char_tokenizer_round_trip_and_errors(ch):
    tok = ch.CharTokenizer.from_text("hello world")
    assert tok.vocab_size == len(set("hello world"))
    assert tok.decode(tok.encode("low hello")) == "low hello"
    with pytest.raises(ValueError, match="alphabet"):
        tok.encode("xyz")
    with pytest.raises(ValueError, match="token ids"):
        tok.decode([tok.vocab_size])


def test_split_has_no_leakage(ch):
    ids = np.arange(1000)
    train, val = ch.split_train_val(ids, 0.1)
    assert len(train) == 900 and len(val) == 100
    assert train.max() < val.min()  # disjoint, contiguous: no window crosses the border
    np.testing.assert_array_equal(np.concatenate([train, val]), ids)


def test_get_batch_windows(ch):
    data = np.arange(500, dtype=np.uint16)
    g = torch.Generator().manual_seed(0)
    x, y = ch.get_batch(data, 32, 8, g)
    assert x.shape == y.shape == (8, 32) and x.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y, x + 1)  # next tokens
    assert int(y.max()) < 500
    x2, _ = ch.get_batch(data, 32, 8, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)  # the generator is the data position
    with pytest.raises(ValueError, match="too few"):
        ch.get_batch(data[:10], 32, 2, g)


def test_window_dataset_with_dataloader_covers_the_data_once(ch):
    data = np.arange(101, dtype=np.uint16)
    dataset = ch.WindowDataset(data, 10)
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    xs = torch.cat([x for x, _ in loader])
    assert sorted(xs[:, 0].tolist()) == list(range(0, 100, 10))
    assert all(torch.equal(y, x + 1) for x, y in loader)


def test_fetch_verifies_the_checksum_and_caches(ch, tmp_path):
    source = tmp_path / "source.txt"
    source.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n")
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    target = tmp_path / "cache" / "corpus.txt"
    assert ch.fetch(source.as_uri(), digest, target).read_text() == source.read_text()
    source.unlink()  # now the URL is gone: the cached copy must be used
    assert ch.fetch(source.as_uri(), digest, target) == target
    with pytest.raises(ValueError, match="SHA-256"):
        bad = tmp_path / "bad.txt"
        bad.write_text("tampered")
        ch.fetch(bad.as_uri(), digest, tmp_path / "other.txt")


def test_shakespeare_falls_back_to_the_builtin_corpus_offline(ch, monkeypatch, tmp_path):
    monkeypatch.setattr(ch, "CACHE_DIR", tmp_path)
    monkeypatch.setattr(ch, "TINY_SHAKESPEARE_URL", (tmp_path / "missing.txt").as_uri())
    with pytest.warns(UserWarning, match="could not get Tiny Shakespeare") as caught:
        text, source = ch.read_corpus("shakespeare")
    assert text == ch.load_corpus("python-docs") and len(text) > 100_000
    assert source == "Python documentation (built in), in place of Tiny Shakespeare (offline)"
    advice = str(caught[0].message)  # what happened, and the three ways to fix it
    for part in ["trains on the Python documentation", "--data PATH", "LLM_FROM_SCRATCH_CACHE",
                 str(tmp_path / "tinyshakespeare.txt"), ch.TINY_SHAKESPEARE_URL]:
        assert part in advice


def test_unknown_corpus_is_a_clear_error(ch):
    with pytest.raises(FileNotFoundError, match="no corpus"):
        ch.load_corpus("no/such/file.txt")


# ---------------------------------------------------------------------------
# Checkpoints and resumption
# ---------------------------------------------------------------------------


def test_checkpoint_round_trip(ch, tmp_path):
    model = tiny_gpt(seed=5)
    opt = ch.AdamW(ch.param_groups(model, 0.1), lr=1e-3)
    model(*random_batch(0))[1].backward()
    opt.step()
    g = torch.Generator().manual_seed(9)
    g.seed()
    ch.save_checkpoint(tmp_path / "c.safetensors", model, opt, 7, g, {"note": "x"})

    fresh, g2 = tiny_gpt(seed=6), torch.Generator()
    opt2 = ch.AdamW(ch.param_groups(fresh, 0.1), lr=1e-3)
    info = ch.load_checkpoint(tmp_path / "c.safetensors", fresh, opt2, g2)
    assert info["step"] == 7 and info["note"] == "x"
    for p, q in zip(model.state_dict().values(), fresh.state_dict().values()):
        torch.testing.assert_close(p, q)
    params = [p for group in opt.param_groups for p in group["params"]]
    params2 = [p for group in opt2.param_groups for p in group["params"]]
    for p, q in zip(params, params2):
        for key in opt.state[p]:
            torch.testing.assert_close(opt.state[p][key], opt2.state[q][key])
    assert torch.equal(g.get_state(), g2.get_state())


def test_checkpoint_write_is_atomic(ch, tmp_path, monkeypatch):
    path = tmp_path / "c.safetensors"
    model, g = tiny_gpt(), torch.Generator()
    opt = ch.AdamW(model.parameters())
    ch.save_checkpoint(path, model, opt, 1, g, {})
    before = path.read_bytes()

    def crash(*args):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(ch.os, "fsync", crash)  # dies after writing the temporary file
    with pytest.raises(KeyboardInterrupt):
        ch.save_checkpoint(path, model, opt, 2, g, {})
    assert path.read_bytes() == before  # the previous checkpoint is intact


def test_loading_refuses_pickles_and_corrupt_files(ch, tmp_path):
    model = tiny_gpt()

    class Exploit:
        def __reduce__(self):
            return (print, ("pickle code ran",))

    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(pickle.dumps({"model": Exploit()}))
    with pytest.raises(ValueError, match="not a checkpoint"):
        ch.load_checkpoint(evil, model)
    torch_file = tmp_path / "model.pt"
    torch.save(model.state_dict(), torch_file)
    with pytest.raises(ValueError, match="not a checkpoint"):
        ch.load_checkpoint(torch_file, model)


def test_killed_run_resumes_with_identical_losses(ch, tmp_path):
    # Dropout is on, so the global RNG state matters as well as the batch generator.
    whole = ch.train(tiny_config(ch, tmp_path / "whole"), log=lambda s: None)
    interrupted_cfg = tiny_config(ch, tmp_path / "interrupted")
    first = ch.train(interrupted_cfg, stop_after=6, log=lambda s: None)
    assert len(first["train"]) == 6
    resumed = ch.train(interrupted_cfg, log=lambda s: None)
    assert resumed["train"] == whole["train"]  # exactly, on CPU
    assert resumed["val"] == whole["val"]


def test_fused_adamw_trains_like_the_books_and_resumes_exactly(ch, tmp_path):
    book = ch.train(tiny_config(ch, tmp_path / "book"), log=lambda s: None)
    fused_cfg = tiny_config(ch, tmp_path / "fused", fused_adamw=True)
    fused = ch.train(fused_cfg, log=lambda s: None)
    # the same update in another order of float operations: equal to rounding, not bitwise
    torch.testing.assert_close(fused["train"], book["train"], rtol=1e-4, atol=1e-4)
    interrupted_cfg = tiny_config(ch, tmp_path / "fused-interrupted", fused_adamw=True)
    ch.train(interrupted_cfg, stop_after=6, log=lambda s: None)
    assert ch.train(interrupted_cfg, log=lambda s: None)["train"] == fused["train"]


def test_training_lowers_the_loss_and_writes_its_outputs(ch, tmp_path):
    cfg = tiny_config(ch, tmp_path, max_iters=60, decay_iters=60, eval_interval=30, lr=3e-3, dropout=0.0)
    history = ch.train(cfg, log=lambda s: None)
    first_val = history["val"][0][1]
    assert history["val"][-1][1] < first_val < math.log(ch.CharTokenizer.from_text(ch.load_corpus()).vocab_size)
    for name in ["checkpoint.safetensors", "loss.svg", "train.npy", "val.npy", "tokenizer.json"]:
        assert (tmp_path / name).exists(), name


def test_cli_flags_and_config_file(ch, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('batch_size = 7\nlr = 0.002\nprogress = false\n')
    cfg = ch.parse_args(["--config", str(config), "--lr", "0.005", "--no-compile", "--out-dir", "x"])
    assert (cfg.batch_size, cfg.lr, cfg.progress, cfg.compile, cfg.out_dir) == (7, 0.005, False, False, "x")
    assert dataclasses.asdict(ch.parse_args([])) == dataclasses.asdict(ch.TrainConfig())
    config.write_text("batch_sise = 7\n")
    with pytest.raises(SystemExit):
        ch.parse_args(["--config", str(config)])


def test_cli_recipe_is_overridden_by_the_config_file_and_flags(ch, tmp_path):
    book = ch.parse_args(["--recipe", "book"])
    assert (book.model.positions, book.model.mlp, book.lr, book.max_iters, book.fused_adamw) == ("rope", "relu", 3e-3, 900, True)
    assert book.model.n_layer == 4 and book.model.block_size == 64  # nanoGPT's model and data otherwise
    config = tmp_path / "run.toml"
    config.write_text("max_iters = 500\n")
    cfg = ch.parse_args(["--recipe", "book", "--config", str(config), "--lr", "0.001"])
    assert (cfg.max_iters, cfg.lr, cfg.model.positions) == (500, 0.001, "rope")
    with pytest.raises(SystemExit):
        ch.parse_args(["--recipe", "fastest"])


def test_model_from_checkpoint_is_the_trained_model_and_leaves_the_random_state_alone(ch, tmp_path):
    from safetensors.torch import load_file

    cfg = tiny_config(ch, tmp_path, dropout=0.0)
    ch.train(cfg, log=lambda s: None)
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    model, info = ch.model_from_checkpoint(tmp_path / "checkpoint.safetensors")
    torch.testing.assert_close(torch.rand(3), expected)  # loading to use a model reseeds nothing
    assert info["step"] == cfg.max_iters and not model.training
    assert model.config == dataclasses.replace(cfg.model, vocab_size=ch.load_run_tokenizer(tmp_path).vocab_size)
    saved = load_file(tmp_path / "checkpoint.safetensors")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, saved["model." + name]), name
    with pytest.raises(ValueError, match="not a checkpoint"):
        ch.checkpoint_metadata(tmp_path / "tokenizer.json")


def test_clip_grad_norm_without_gradients_returns_zero_like_pytorch(ch):
    model = tiny_gpt()  # no backward yet: every .grad is None
    expected = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    assert ch.clip_grad_norm(model.parameters(), 1.0) == expected == 0


@pytest.mark.parametrize("fused", [False, True])
def test_checkpoint_restores_the_optimizer_exactly_types_included(ch, tmp_path, fused):
    model = tiny_gpt(seed=5)
    cfg = ch.make_config("tiny", fused_adamw=fused)
    opt = ch.make_optimizer(model, cfg)
    model(*random_batch(0))[1].backward()
    opt.step()
    ch.save_checkpoint(tmp_path / "c.safetensors", model, opt, 1, torch.Generator(), {})
    fresh = tiny_gpt(seed=6)
    opt2 = ch.make_optimizer(fresh, cfg)
    ch.load_checkpoint(tmp_path / "c.safetensors", fresh, opt2)
    saved, restored = opt.state_dict(), opt2.state_dict()
    assert restored["param_groups"] == saved["param_groups"]
    assert [type(v) for g in restored["param_groups"] for v in g.values()] == \
        [type(v) for g in saved["param_groups"] for v in g.values()]  # betas is a tuple again
    assert isinstance(restored["param_groups"][0]["betas"], tuple)
    for index, state in saved["state"].items():
        for key, value in state.items():
            other = restored["state"][index][key]
            assert type(other) is type(value) and other.dtype == value.dtype and torch.equal(other, value)


def test_loading_a_checkpoint_leaves_the_global_random_state_unless_asked(ch, tmp_path):
    model, g = tiny_gpt(), torch.Generator()
    torch.manual_seed(1)
    ch.save_checkpoint(tmp_path / "c.safetensors", model, ch.AdamW(model.parameters()), 1, g, {})
    saved_state = torch.get_rng_state()
    other = tiny_gpt(seed=3)
    torch.manual_seed(2)
    before = torch.get_rng_state()
    ch.load_checkpoint(tmp_path / "c.safetensors", other)
    assert torch.equal(torch.get_rng_state(), before)
    ch.load_checkpoint(tmp_path / "c.safetensors", other, restore_rng=True)
    assert torch.equal(torch.get_rng_state(), saved_state)


def test_make_config_routes_model_settings_and_rejects_unknown_recipes(ch):
    cfg = ch.make_config("tiny", n_kv_head=1, norm="rmsnorm", max_iters=7)
    assert (cfg.model.n_layer, cfg.model.n_kv_head, cfg.model.norm, cfg.max_iters) == (2, 1, "rmsnorm", 7)
    assert ch.make_config() == ch.TrainConfig()
    with pytest.raises(ValueError, match="unknown recipe"):
        ch.make_config("fastest")


LLAMA_FLAGS = ["--n-kv-head", "1", "--norm", "rmsnorm", "--mlp", "swiglu", "--positions", "rope",
               "--rope-base", "500000", "--d-ff", "96", "--no-tie-weights", "--norm-eps", "1e-6"]


def test_cli_exposes_every_model_setting_and_a_model_table_in_toml(ch, tmp_path):
    cfg = ch.parse_args(LLAMA_FLAGS)
    expected = dict(n_kv_head=1, norm="rmsnorm", mlp="swiglu", positions="rope", rope_base=500000.0, d_ff=96,
                    tie_weights=False, norm_eps=1e-6)
    assert {k: getattr(cfg.model, k) for k in expected} == expected
    settable = {f.name for f in dataclasses.fields(GPTConfig)} - {"vocab_size"}  # vocab_size comes from the data
    flags = {action.dest for action in ch.arg_parser()._actions}
    assert settable <= flags
    config = tmp_path / "run.toml"
    config.write_text('lr = 0.002\n[model]\nn_layer = 3\nmlp = "relu"\n')
    cfg = ch.parse_args(["--config", str(config), "--n-layer", "5"])
    assert (cfg.lr, cfg.model.n_layer, cfg.model.mlp) == (0.002, 5, "relu")


def test_a_llama_style_model_trains_saves_and_reloads(ch, tmp_path):
    cfg = ch.parse_args([*LLAMA_FLAGS, "--recipe", "tiny", "--max-iters", "6", "--eval-interval", "3",
                         "--eval-iters", "1", "--block-size", "16", "--batch-size", "4", "--device", "cpu",
                         "--out-dir", str(tmp_path)])
    history = ch.train(cfg, log=lambda s: None)
    assert len(history["train"]) == 6
    model, info = ch.model_from_checkpoint(tmp_path / "checkpoint.safetensors")
    assert model.config.n_kv_head == 1 and not model.config.tie_weights and model.config.norm == "rmsnorm"
    assert info["config"]["model"]["mlp"] == "swiglu"


class CopyTask:
    """A source of padded batches for train(): copy a random prefix; only the copy is learned."""

    def __init__(self, vocab_size=50, length=6):
        self.vocab_size, self.length = vocab_size, length

    def get_batch(self, split, batch_size, generator, device="cpu"):
        prefix = torch.randint(1, self.vocab_size, (batch_size, self.length), generator=generator)
        seq = torch.cat([prefix, prefix], dim=1)  # (B, 2L)
        x, y = seq[:, :-1], seq[:, 1:]
        mask = torch.zeros_like(y, dtype=torch.bool)
        mask[:, self.length - 1 :] = True  # the second half is predictable, the first is not
        return x.to(device), y.to(device), mask.to(device)


def test_train_takes_any_model_source_of_batches_and_frozen_parameters(ch, tmp_path):
    model = tiny_gpt(seed=3)
    frozen = model.blocks[0].mlp
    frozen.requires_grad_(False)  # a frozen part stays as it was
    before = [p.detach().clone() for p in frozen.parameters()]
    cfg = ch.make_config("tiny", max_iters=80, decay_iters=80, eval_interval=40, eval_iters=4, lr=1e-2,
                         batch_size=16, out_dir=str(tmp_path), device="cpu")
    data = CopyTask()
    history = ch.train(cfg, model, data, evaluate=lambda m: {"n": 1.0}, log=lambda s: None)
    assert all(torch.equal(p, q) for p, q in zip(frozen.parameters(), before))
    assert history["val"][-1][1] < 0.5 * history["val"][0][1]  # it learned to copy
    assert [it for it, _ in history["metrics"]] == [40, 80]
    # the loss is measured on the masked targets only: the reference is the brute-force mean
    x, y, mask = data.get_batch("val", 4, torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, _ = model(x)
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), y, reduction="none")
        expected = losses[mask].mean()
        torch.testing.assert_close(ch.next_token_loss(model, (x, y, mask)), expected)
    assert not (tmp_path / "train.npy").exists()  # the data came from the source, not the corpus
    assert ch.checkpoint_metadata(tmp_path / "checkpoint.safetensors")["step"] == 80


def test_out_dir_none_trains_in_memory(ch, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    history = ch.train(ch.make_config("tiny", max_iters=4, eval_interval=2, eval_iters=1, out_dir=None,
                                      device="cpu"), log=lambda s: None)
    assert len(history["train"]) == 4 and len(history["val"]) == 2
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_without_frozen_weights_resumes_exactly(ch, tmp_path):
    def run(out_dir, stop_after=None):
        model = tiny_gpt(seed=3)
        model.blocks[0].requires_grad_(False)
        cfg = ch.make_config("tiny", max_iters=12, decay_iters=12, eval_interval=6, eval_iters=1, batch_size=4,
                             out_dir=str(out_dir), device="cpu", save_frozen=False)
        return ch.train(cfg, model, CopyTask(), stop_after=stop_after, log=lambda s: None)

    whole = run(tmp_path / "whole")
    run(tmp_path / "resumed", stop_after=6)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "resumed" / "checkpoint.safetensors")
    assert not any(k.startswith("model.blocks.0.") for k in saved) and "model.blocks.1.mlp.fc.weight" in saved
    assert run(tmp_path / "resumed")["train"] == whole["train"]
    with pytest.raises(ValueError, match="does not fit this model; tensors unknown"):
        ch.load_checkpoint(tmp_path / "whole" / "checkpoint.safetensors", tiny_gpt(n_layer=1))


# ---------------------------------------------------------------------------
# The run folder: the record of its data, its lock, leftovers of a killed run
# ---------------------------------------------------------------------------


def test_a_run_records_the_text_it_was_trained_on(ch, tmp_path):
    from ch02_tokenizer import python_docs_text

    assert ch.run_data_info(tmp_path) is None  # a folder without a record
    ch.train(tiny_config(ch, tmp_path / "docs", max_iters=2, eval_interval=2), log=lambda s: None)
    text = python_docs_text()
    assert ch.run_data_info(tmp_path / "docs") == {
        "corpus": "python-docs", "source": "Python documentation (built in)",
        "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(), "chars": len(text)}
    corpus = tmp_path / "mine.txt"
    corpus.write_text("héllo, wörld\n" * 200, encoding="utf-8")
    ch.train(tiny_config(ch, tmp_path / "mine", data=str(corpus), max_iters=2, eval_interval=2), log=lambda s: None)
    info = ch.run_data_info(tmp_path / "mine")
    assert (info["corpus"], info["source"], info["chars"]) == (str(corpus), str(corpus.resolve()), 13 * 200)
    assert info["sha256"] == hashlib.sha256(corpus.read_bytes()).hexdigest()


LOCK_HOLDER = """
import sys, time
sys.path.insert(0, "code")
from ch08_training import lock_run_folder
with lock_run_folder(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_second_trainer_on_a_folder_is_refused_until_the_first_dies(ch, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(tmp_path)], cwd=root,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RuntimeError, match=rf"in use by another trainer \(pid {holder.pid} on .*, started "):
            ch.train(tiny_config(ch, tmp_path), log=lambda s: None)
        assert not (tmp_path / "tokenizer.json").exists()  # refused before touching the folder
    finally:
        holder.kill()  # as a crash would: no cleanup runs in the holder
        holder.wait()
    with ch.lock_run_folder(tmp_path):  # the operating system released the dead process's lock
        assert f"pid {os.getpid()} " in (tmp_path / "train.lock").read_text()
        with pytest.raises(RuntimeError, match=f"pid {os.getpid()} "):  # even within one process
            ch.train(tiny_config(ch, tmp_path), log=lambda s: None)


def test_resuming_on_another_text_is_refused_and_leaves_the_folder_as_it_was(ch, tmp_path):
    first, second = tmp_path / "first.txt", tmp_path / "second.txt"
    first.write_text("abcdefgh\n" * 300)
    second.write_text("hgfedcba\n" * 300)  # the same alphabet: ids would be remapped silently
    run = tmp_path / "run"
    ch.train(tiny_config(ch, run, data=str(first)), stop_after=6, log=lambda s: None)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.name != "train.lock"}
    with pytest.raises(ValueError, match=r"trained on .*first.txt \(2,700 characters, sha256 [0-9a-f]{12}\), "
                                         r"and --data .*second.txt is another text.*new --out-dir"):
        ch.train(tiny_config(ch, run, data=str(second)), log=lambda s: None)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.name != "train.lock"} == before
    (run / "data.json").unlink()  # a folder written before runs recorded their data
    with pytest.raises(ValueError, match="another text"):  # its token files still tell
        ch.train(tiny_config(ch, run, data=str(second)), log=lambda s: None)
    history = ch.train(tiny_config(ch, run, data=str(first)), log=lambda s: None)  # its own text resumes
    assert len(history["train"]) == 12


def test_the_next_start_removes_exactly_what_a_killed_write_left(ch, tmp_path):
    from ch02_tokenizer import atomic_path

    ch.train(tiny_config(ch, tmp_path), stop_after=6, log=lambda s: None)
    leftovers = []
    for name in ["checkpoint.safetensors", "loss.svg", "train.npy", "tokenizer.json"]:
        with atomic_path(tmp_path / "elsewhere" / name) as tmp:  # the names a write killed half-way leaves
            tmp.write_bytes(b"half")
            leftovers.append(tmp.name)
    for name in leftovers:
        (tmp_path / name).write_bytes(b"half")
    others = [".notes.tmp", "checkpoint.safetensors.tmp", ".loss.1234abcd.tmp.svg.bak", ".loss.xyz.tmp.svg",
              ".checkpoint.1234ABCD.tmp.safetensors", "mine.0a1b2c3d.tmp.txt"]
    for name in others:
        (tmp_path / name).write_text("the user's")
    messages = []
    ch.train(tiny_config(ch, tmp_path), log=messages.append)
    assert not any((tmp_path / name).exists() for name in leftovers)
    assert all((tmp_path / name).read_text() == "the user's" for name in others)
    assert any("removed 4 unfinished file(s)" in m for m in messages)


def test_a_gradient_that_is_not_finite_stops_the_run_and_keeps_the_last_good_checkpoint(ch, tmp_path):
    cfg = tiny_config(ch, tmp_path, dropout=0.0)
    tokenizer, data = ch.prepare_data(cfg)
    model = tiny_gpt(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=1, d_model=32, n_head=2).train()
    ch.plant_nan(model.blocks[0].mlp.fc.weight, from_call=8)
    with pytest.raises(FloatingPointError, match=r"iteration 8: the gradient norm is nan, and the first gradient "
                                                 r"that is not finite is blocks\.0\.mlp\.fc\.weight's. The run stopped before "
                                                 r"updating the weights; the last good checkpoint, of iteration 6, "
                                                 r"is kept.*--lr"):
        ch.train(cfg, model, data, log=lambda s: None)
    saved, info = ch.model_from_checkpoint(tmp_path / "checkpoint.safetensors")
    assert info["step"] == 6 and len(info["history"]["train"]) == 6
    assert all(torch.isfinite(p).all() for p in saved.parameters())


def test_a_loss_that_is_not_finite_stops_the_run(ch, tmp_path):
    calls = iter(range(100))

    def blows_up_at_the_fourth_step(model, batch):
        loss = ch.next_token_loss(model, batch)
        return loss * math.inf if next(calls) == 3 else loss

    with pytest.raises(FloatingPointError, match="iteration 4: the loss is inf"):
        ch.train(tiny_config(ch, tmp_path), loss_fn=blows_up_at_the_fourth_step, log=lambda s: None)
    assert not (tmp_path / "checkpoint.safetensors").exists()  # nothing good to keep yet


# ---------------------------------------------------------------------------
# Settings, texts and checkpoints that cannot work: one clear error, before any work
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("settings, message", [
    (dict(n_layer="two"), "n_layer must be a whole number, got 'two'"),
    (dict(max_iters=3.5), "max_iters must be a whole number, got 3.5"),
    (dict(progress="no"), "progress must be true or false, got 'no'"),  # a non-empty string is truthy
    (dict(eval_interval=0), "eval_interval must be at least 1, got 0"),
    (dict(grad_accum=0), "grad_accum must be at least 1, got 0"),
    (dict(batch_size=-2), "batch_size must be at least 1, got -2"),
    (dict(warmup_iters=-1), "warmup_iters must not be negative, got -1"),
    (dict(lr=math.nan), "lr must be a finite number, got nan"),
    (dict(beta2=1.0), "beta1 and beta2 must be in [0, 1)"),
    (dict(precision="fp8"), "unknown precision 'fp8': choose one of auto, fp32, bf16, fp16"),
    (dict(device="gpu"), "unknown device 'gpu'"),
])
def test_settings_that_cannot_work_are_refused_when_the_config_is_built(ch, settings, message):
    import re

    with pytest.raises(ValueError, match=re.escape(message)):
        ch.make_config("tiny", **settings)


def test_a_toml_file_of_the_wrong_types_and_abbreviated_flags_are_refused(ch, tmp_path):
    config = tmp_path / "run.toml"
    for line, message in [('n_layer = "two"', "n_layer must be a whole number"),
                          ("max_iters = 3.5", "max_iters must be a whole number"),
                          ('progress = "no"', "progress must be true or false")]:
        config.write_text(line + "\n")
        with pytest.raises(ValueError, match=message):
            ch.parse_args(["--config", str(config)])
    with pytest.raises(SystemExit):  # not taken for --max-iters
        ch.parse_args(["--max-iter", "5"])
    assert ch.make_config("tiny", eval_iters=0).eval_iters == 0  # 0: no validation loss, as documented


def test_every_flag_has_help_and_its_default_from_the_dataclass_fields(ch):
    import argparse

    parser = ch.arg_parser()
    flags = [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]
    assert len(flags) == len(ch.settings()) + 3  # --recipe, --config, --debug
    defaults = ch.TrainConfig()
    for field in ch.settings():
        action = next(a for a in flags if a.dest == field.name)
        value = getattr(defaults.model if field.name in ch.MODEL_SETTINGS else defaults, field.name)
        assert action.help.startswith(field.metadata["help"].replace("%", "%%")), field.name
        assert f"(default: {value}" in action.help, field.name
    text = parser.format_help()
    assert "python-docs (built in), shakespeare" in " ".join(text.split()) and "--debug" in text
    assert "steps between evaluations, samples and checkpoints (default: 250, tiny: 100)" in " ".join(text.split())


def test_texts_that_cannot_be_trained_on_are_refused_with_their_name(ch, tmp_path):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café\n".encode("latin-1") * 100)
    with pytest.raises(ValueError, match=r"latin1.txt is not UTF-8 text \(byte 3 cannot be decoded\)"):
        ch.train(tiny_config(ch, tmp_path / "a", data=str(latin1)), log=lambda s: None)
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(128)) * 10)  # valid UTF-8, but NUL bytes
    with pytest.raises(ValueError, match="weights.bin holds NUL bytes"):
        ch.read_corpus(str(binary))
    short = tmp_path / "short.txt"
    short.write_text("to be or not to be\n" * 5)  # 95 characters: 10 for validation
    with pytest.raises(ValueError, match=r"short.txt: its validation part has 10 characters, too few for "
                                         r"windows of 17"):
        ch.train(tiny_config(ch, tmp_path / "b", data=str(short)), log=lambda s: None)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b" / "checkpoint.safetensors").exists()


def test_the_command_line_prints_one_line_for_an_error_and_leaves_no_folder(ch, tmp_path, capsys):
    run = tmp_path / "run"
    for argv, message in [(["--data", "shakspeare"], "no corpus named 'shakspeare': use python-docs or shakespeare"),
                          (["--eval-interval", "0"], "eval_interval must be at least 1"),
                          (["--precision", "fp8"], "unknown precision 'fp8'")]:
        assert ch.run_command(ch.main, argv + ["--out-dir", str(run)]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"error: {message}"), err
        assert not run.exists()


def crafted_checkpoint(ch, path, model, step=3, **config):
    """A checkpoint as save_checkpoint writes it, with the model settings of its metadata
    overridden (what a corrupted or malicious file could say)."""
    cfg = dataclasses.asdict(ch.make_config("tiny"))
    cfg["model"] = {**dataclasses.asdict(model.config), **config}
    ch.save_checkpoint(path, model, ch.make_optimizer(model, ch.make_config("tiny")), step, torch.Generator(),
                       {"config": cfg, "history": {"train": [], "val": []}})
    return path


def test_checkpoints_that_do_not_fit_get_one_clear_error(ch, tmp_path):
    path = crafted_checkpoint(ch, tmp_path / "c.safetensors", tiny_gpt())
    for other, message in [(tiny_gpt(d_model=64), r"of another shape tok_emb.weight \(50, 32\), not \(50, 64\)"),
                           (tiny_gpt(n_layer=3), r"missing blocks\.2\.attn_norm\.weight"),
                           (tiny_gpt(n_layer=1), r"unknown blocks\.1\.")]:
        with pytest.raises(ValueError, match=rf"c.safetensors does not fit this model; tensors {message}"):
            ch.load_checkpoint(path, other)
    crafted_checkpoint(ch, path, tiny_gpt(), n_layer="two")
    with pytest.raises(ValueError, match="metadata holds no valid configuration .n_layer must be a whole number"):
        ch.model_from_checkpoint(path)
    crafted_checkpoint(ch, path, tiny_gpt(), step="3")
    with pytest.raises(ValueError, match="metadata is not what save_checkpoint writes"):
        ch.load_checkpoint(path, tiny_gpt())


def test_a_checkpoint_holding_nan_is_refused_with_the_tensors_name(ch, tmp_path):
    model = tiny_gpt()
    with torch.no_grad():
        model.blocks[1].mlp.proj.weight[3, 4] = math.inf
    path = crafted_checkpoint(ch, tmp_path / "c.safetensors", model)
    with pytest.raises(ValueError, match=r"blocks\.1\.mlp\.proj\.weight holds NaN or inf"):
        ch.model_from_checkpoint(path)


def test_a_model_too_large_for_memory_is_refused_from_the_metadata_alone(ch, tmp_path, monkeypatch):
    from ch06_gpt import GPTConfig, gpt_num_parameters

    path = crafted_checkpoint(ch, tmp_path / "c.safetensors", tiny_gpt(), d_model=2**20)  # a file of 200 kB
    assert path.stat().st_size < 10**6

    def never(config):
        raise AssertionError("a model was built")

    monkeypatch.setattr(ch, "GPT", never)
    n = gpt_num_parameters(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, d_model=2**20))
    with pytest.raises(MemoryError, match=rf"model of {n:,} parameters needs {4 * n / 2**30:,.1f} GiB"):
        ch.model_from_checkpoint(path)
    with pytest.raises(MemoryError, match="needs"):  # and a command line asking for it
        ch.train(tiny_config(ch, tmp_path / "big", d_model=2**20, n_head=2), log=lambda s: None)


def test_the_command_line_names_a_checkpoint_that_does_not_fit_in_one_line(ch, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    ch.train(tiny_config(ch, tmp_path), stop_after=6, log=lambda s: None)
    argv = [sys.executable, "code/ch08_training.py", "--recipe", "tiny", "--data", "python-docs", "--out-dir",
            str(tmp_path), "--device", "cpu", "--n-layer", "2", "--d-model", "32", "--block-size", "16"]
    done = subprocess.run(argv, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"error: {tmp_path / 'checkpoint.safetensors'} does not fit this model; tensors ")


# ---------------------------------------------------------------------------
# The stored run the chapter's loss figure is drawn from (docs/data/)
# ---------------------------------------------------------------------------


def test_the_stored_training_run_is_what_its_function_trains(ch):
    from ch03_embeddings import stored_run

    run = stored_run("ch08_training.training_run")
    assert run["recipe"] == "tiny" and run["settings"] == ch.TRAINING_RUN
    assert run["recorded"]["command"] == ".venv/bin/python tests/benchmarks/figure_data.py ch08_training.training_run"
    cfg = ch.make_config("tiny", **ch.TRAINING_RUN)
    assert len(run["train"]) == cfg.max_iters and [s for s, _ in run["val"]] == list(range(50, 301, 50))
    vocab = ch.CharTokenizer.from_text(ch.load_corpus(cfg.data)).vocab_size
    assert run["val"][-1][1] < run["val"][0][1] < math.log(vocab)
    again = ch.training_run_history(stop_after=5)  # the first iterations, trained again
    torch.testing.assert_close(again["train"], run["train"][:5], rtol=0, atol=1e-4)


def test_the_loss_figure_draws_the_stored_run_without_training(ch, monkeypatch):
    from ch03_embeddings import stored_run

    def no_training(*args, **kwargs):
        raise AssertionError("the figure trained a model")

    monkeypatch.setattr(ch, "train", no_training)
    fig = ch.plot_training_run()
    lines = fig.axes[0].get_lines()
    assert list(lines[0].get_ydata()) == stored_run("ch08_training.training_run")["train"]


def test_evaluation_lines_go_above_the_progress_bar(ch, tmp_path, monkeypatch):
    from tqdm.auto import tqdm

    written = []
    monkeypatch.setattr(tqdm, "write", classmethod(lambda cls, s, *args, **kwargs: written.append(s)))
    ch.train(tiny_config(ch, tmp_path, max_iters=6, eval_interval=3, sample_tokens=0, progress=True))
    assert [line.split(":")[0] for line in written] == ["iter 3", "iter 6"]


def test_a_command_piped_into_a_reader_that_leaves_ends_quietly():
    # `... | head -1`: the pipe closes while the command still prints
    import subprocess
    import sys
    from pathlib import Path

    script = ("import sys; sys.path.insert(0, 'code'); from ch08_training import run_command\n"
              "def main(argv):\n    for _ in range(100_000): print('x' * 80)\n"
              "sys.exit(run_command(main, []))\n")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()  # the reader leaves
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0
    assert stderr == "", stderr
