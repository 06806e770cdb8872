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
