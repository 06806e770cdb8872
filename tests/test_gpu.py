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
