"""CUDA paths: device placement and bf16 autocast in the training loop (skipped without a GPU)."""

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("backbone", ["labram-small", "labram-base"])
def test_training_on_cuda_with_amp_learns_and_stays_on_device(backbone):
    # Prepare
    from fedeeg.data import make_synthetic_sites
    from fedeeg.models import LoraSpec, apply_lora, build_backbone
    from fedeeg.training import evaluate, resolve_device, train_epochs

    site = make_synthetic_sites(1, subjects_per_site=6, seed=0)[0]
    model = apply_lora(build_backbone(backbone, n_outputs=2, seed=0), LoraSpec(), seed=0)
    before = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    # Execute
    result = train_epochs(model, site.windows, epochs=3, lr=5e-3, device="auto", amp=True, seed=0)
    metrics = evaluate(model, site.windows, device="auto")
    # Assert
    assert resolve_device("auto").type == "cuda"
    assert all(p.device.type == "cuda" for p in model.parameters())
    assert np.isfinite(result.loss) and result.windows_per_second > 0
    changed = [k for k, v in model.named_parameters() if v.requires_grad and not torch.equal(v.detach().cpu(), before[k].cpu())]
    assert len(changed) == len(before)
    assert 0.0 <= metrics["balanced_accuracy"] <= 1.0
    print(f"{backbone}: {result.windows_per_second:.0f} windows/s, train bal.acc {metrics['balanced_accuracy']:.3f}")


def test_compiled_training_on_cuda_matches_the_eager_loss_scale():
    # Prepare
    from fedeeg.data import make_synthetic_sites
    from fedeeg.models import LoraSpec, apply_lora, build_backbone
    from fedeeg.training import train_epochs

    site = make_synthetic_sites(1, subjects_per_site=6, seed=0)[0]
    eager = apply_lora(build_backbone("labram-small", n_outputs=2, seed=0), LoraSpec(), seed=0)
    compiled = apply_lora(build_backbone("labram-small", n_outputs=2, seed=0), LoraSpec(), seed=0)
    # Execute
    a = train_epochs(eager, site.windows, epochs=2, lr=5e-3, device="cuda", seed=0)
    b = train_epochs(compiled, site.windows, epochs=2, lr=5e-3, device="cuda", seed=0, compile=True)
    # Assert: same data, same seed; compiled kernels differ in rounding only
    assert np.isfinite(b.loss) and abs(a.loss - b.loss) < 0.05 * max(a.loss, 1e-3)


@pytest.mark.parametrize("name", ["eegnet", "eeg-inception"])
def test_baselines_train_on_cuda(name):
    # Prepare
    from fedeeg.data import make_synthetic_sites
    from fedeeg.models import load_backbone
    from fedeeg.training import evaluate, train_epochs

    site = make_synthetic_sites(1, subjects_per_site=6, seed=0)[0]
    model = load_backbone(name, ch_names=site.windows.ch_names, n_times=site.windows.n_times, seed=0)
    # Execute
    result = train_epochs(model, site.windows, epochs=3, lr=1e-3, device="cuda", seed=0)
    metrics = evaluate(model, site.windows, device="cuda")
    # Assert
    assert all(p.device.type == "cuda" for p in model.parameters())
    assert np.isfinite(result.loss) and 0.0 <= metrics["balanced_accuracy"] <= 1.0
    assert int(model.bn1.num_batches_tracked) > 0 if hasattr(model, "bn1") else True


def test_pretraining_runs_on_cuda_with_bf16(monkeypatch):
    # Prepare: record where the pretrainer's weights are while it trains
    import fedeeg.pretrain as pt
    from fedeeg.data import make_synthetic_sites

    devices = []
    original = pt.train_pretrainer

    def spy(model, *args, **kwargs):
        out = original(model, *args, **kwargs)
        devices.extend({p.device.type for p in model.parameters()})
        return out

    monkeypatch.setattr(pt, "train_pretrainer", spy)
    sites = make_synthetic_sites(2, subjects_per_site=4, seed=0)
    cfg = pt.PretrainConfig(backbone="labram-small", dataset="synthetic", epochs=3, batch_size=16, device="cuda")
    # Execute
    result = pt.pretrain_central(cfg, {s.name: s.windows for s in sites})
    # Assert: trained on the GPU, finite, the loss falls; the result comes back on the CPU for writing
    losses = [h["loss"] for h in result.history]
    assert devices == ["cuda"]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    print(f"pretraining: {result.history[-1]['windows_per_second']:.0f} windows/s")


#: Kernel configurations of fedeeg.models._short_attention: (impl, BLOCK_M, NUM_WARPS); None: the default.
SHORT_ATTENTION_CONFIGS = [
    ("tile", None, None),
    ("qblock", None, None),
    ("qblock", 16, 4),
    ("qblock", 32, 4),
    ("qblock", 64, 4),
    ("qblock", 32, 8),
    ("qblock", 16, 2),
    ("qblock", (64, 16), (8, 4)),
]


@pytest.mark.parametrize(("impl", "block_m", "warps"), SHORT_ATTENTION_CONFIGS, ids=str)
@pytest.mark.parametrize("shape", [(64, 10, 77, 20), (8, 5, 5, 20), (4, 3, 128, 64), (16, 2, 33, 8)])
def test_short_attention_kernel_matches_sdpa_forward_and_backward(monkeypatch, shape, impl, block_m, warps):
    # Prepare: fresh random inputs, non-contiguous q/k/v as in LaBraM (views of one qkv tensor)
    import torch.nn.functional as F

    from fedeeg.models import _short_attention as sa

    monkeypatch.setattr(sa, "IMPL", impl)
    monkeypatch.setattr(sa, "BLOCK_M", block_m)
    monkeypatch.setattr(sa, "NUM_WARPS", warps)
    B, H, T, D = shape
    gen = torch.Generator(device="cuda").manual_seed(sum(shape))
    qkv = torch.randn(B, T, 3, H, D, device="cuda", generator=gen).to(torch.bfloat16).permute(2, 0, 3, 1, 4)
    q, k, v = (t.detach().requires_grad_() for t in qkv.unbind(0))
    grad = torch.randn(B, T, H, D, device="cuda", generator=gen).to(torch.bfloat16)
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    scale = D**-0.5
    assert sa.short_attention_supported(q, k, v)
    # Execute
    out = sa.short_attention(q, k, v, scale)  # (B, T, H, D)
    out.backward(grad)
    ref = F.scaled_dot_product_attention(qr, kr, vr, scale=scale).transpose(1, 2)  # float64 reference
    ref.backward(grad.double())
    lse = sa._forward(q.detach(), k.detach(), v.detach(), scale)[1]
    ref_lse = torch.logsumexp(qr.detach() @ kr.detach().transpose(-1, -2) * scale, dim=-1)
    # Assert: bf16 operands, float32 accumulation -> relative error well under 2e-2, every element written
    def rel(a, b):
        return float((a.double() - b).norm() / b.norm())

    assert out.shape == (B, T, H, D) and torch.isfinite(out).all()
    assert rel(out, ref) < 2e-2
    assert rel(lse, ref_lse) < 1e-4  # float32 sums of exact bf16 products
    for got, want in ((q.grad, qr.grad), (k.grad, kr.grad), (v.grad, vr.grad)):
        assert got.shape == want.shape and torch.isfinite(got).all()
        assert rel(got, want) < 3e-2


@pytest.mark.parametrize("impl", ["tile", "qblock"])
def test_labram_uses_the_short_attention_kernel_under_autocast_and_compile(monkeypatch, impl):
    # Prepare
    from fedeeg.data.channels import EEGMAT_CHANNELS, to_vocab
    from fedeeg.models import _short_attention as sa
    from fedeeg.models import build_backbone

    monkeypatch.setattr(sa, "IMPL", impl)

    ch = to_vocab(EEGMAT_CHANNELS)
    model = build_backbone("labram-base", seed=0).cuda().eval()
    x = torch.randn(16, len(ch), 800, device="cuda") * 0.2
    # Execute
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        fused = model(x, ch).float()
        compiled = torch.compile(model)(x, ch).float()
        sa.ENABLED = False
        try:
            torch._dynamo.reset()
            sdpa = model(x, ch).float()
        finally:
            sa.ENABLED = True
    # Assert: the same logits (bf16 rounding) with and without the kernel
    assert float((fused - sdpa).abs().max()) < 2e-2 * float(sdpa.abs().max()) + 1e-3
    assert float((compiled - sdpa).abs().max()) < 2e-2 * float(sdpa.abs().max()) + 1e-3


def test_train_epochs_keeps_a_sites_windows_on_the_gpu_between_calls():
    # Prepare
    from fedeeg.data import make_synthetic_sites
    from fedeeg.training import _windows_on_device, release_device_cache

    windows = make_synthetic_sites(1, subjects_per_site=4, seed=0)[0].windows
    release_device_cache()
    # Execute
    X1, y1 = _windows_on_device(windows, torch.device("cuda"))
    X2, y2 = _windows_on_device(windows, torch.device("cuda"))
    # Assert: one copy, the same values, and the host arrays can no longer change under it
    assert X1.data_ptr() == X2.data_ptr() and y1.data_ptr() == y2.data_ptr()
    assert np.array_equal(X1.cpu().numpy(), windows.X)
    with pytest.raises(ValueError):
        windows.X[0, 0, 0] = 1.0
    release_device_cache()


def test_gemm_patch_embedding_matches_the_conv_path_on_cuda(monkeypatch):
    # Prepare: paper LoRA with dropout 0.5 in train mode, random B; float32 without TF32 so both paths are exact
    from fedeeg.data.channels import EEGMAT_CHANNELS, to_vocab
    from fedeeg.models import LoraSpec, apply_lora, build_backbone, lora_pairs
    from fedeeg.models import _patch_gemm as pg

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    ch = to_vocab(EEGMAT_CHANNELS)
    model = apply_lora(build_backbone("labram-base", seed=0), LoraSpec(dropout=0.5), seed=0).cuda().train()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, b in lora_pairs(model).values():
            b.copy_(torch.randn(b.shape, generator=gen) * 0.1)
        head = model.base_model.model.head.modules_to_save["default"].weight
        head.copy_(torch.randn(head.shape, generator=gen) * 0.1)  # sensitive logits, backbone gradients of size
    x = torch.randn(8, len(ch), 800, generator=gen).cuda() * 0.2
    proj = torch.randn(8, 2, generator=gen).cuda()

    def run(mode):
        monkeypatch.setattr(pg, "MODE", mode)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        out = model(x, ch)
        (out * proj).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    def close(a, b, rel, scale=0.0):
        return float((a.float() - b.float()).abs().max()) <= rel * max(scale, float(b.float().abs().max())) + 1e-12

    # Execute
    conv_out, conv_grads = run("conv")
    gemm_out, gemm_grads = run("gemm")
    model.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        monkeypatch.setattr(pg, "MODE", "conv")
        conv_bf16 = model(x, ch)
        monkeypatch.setattr(pg, "MODE", "gemm")
        torch._dynamo.reset()
        gemm_compiled = torch.compile(model)(x, ch)
    # Assert: the same dropout masks on CUDA (a different mask changes the output by far more than 1e-4)
    assert close(gemm_out, conv_out, 1e-4)
    assert gemm_grads.keys() == conv_grads.keys()
    # biases with a gradient of zero up to rounding (k_norm.bias) are measured against their weight's gradient
    sibling = {n: float(conv_grads.get(n[: -len("bias")] + "weight", torch.zeros(1)).abs().max()) if n.endswith("bias") else 0.0
               for n in conv_grads}
    bad = [n for n in conv_grads if not close(gemm_grads[n], conv_grads[n], 1e-3, sibling[n])]
    assert bad == []
    assert close(gemm_compiled, conv_bf16, 3e-2)
