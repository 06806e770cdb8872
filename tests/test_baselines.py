"""Small baselines (EEGNet, EEG-Inception): size, shapes, input checks, gradients, init, weights, model folders."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from fedeeg.data.base import WindowSet
from fedeeg.data.channels import EEGMAT_CHANNELS
from fedeeg.models import EEGInception, EEGNet, load_backbone

CH = list(EEGMAT_CHANNELS)  # 19 channels
N_TIMES = 800  # 4 s at 200 Hz
BASELINES = ["eegnet", "eeg-inception"]


def _x(batch: int = 4, n_chans: int = len(CH), n_times: int = N_TIMES, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return 0.3 * torch.randn(batch, n_chans, n_times, generator=gen)


def _model(name: str, seed: int = 0, **kw):
    return load_backbone(name, ch_names=CH, n_times=N_TIMES, seed=seed, **kw)


# --------------------------------------------------------------------------- size and shapes


@pytest.mark.parametrize(("name", "cls", "low", "high", "n_features"), [
    ("eegnet", EEGNet, 2_000, 5_000, 16 * (N_TIMES // 32)),
    ("eeg-inception", EEGInception, 10_000, 40_000, 6 * (N_TIMES // 32)),
])  # fmt: skip
def test_parameter_counts_and_shapes(name, cls, low, high, n_features):
    # Prepare
    model = _model(name).eval()
    x = _x(batch=3)
    # Execute
    n_params = sum(p.numel() for p in model.parameters())
    logits = model(x, CH)
    feats = model.forward_features(x, CH)
    # Assert: a few thousand (EEGNet) to tens of thousands (EEG-Inception) parameters
    assert isinstance(model, cls)
    assert low <= n_params <= high, n_params
    assert logits.shape == (3, 2) and feats.shape == (3, n_features)
    assert model.n_features == model.head.in_features == n_features
    assert isinstance(model.head, torch.nn.Linear) and not hasattr(model, "fc_norm")
    assert model.backbone_name == name and model.supports_lora is False and model.checkpoint_sha256 is None


def test_temporal_kernels_follow_sfreq():
    # Prepare / Execute
    eegnet = _model("eegnet")
    inception = _model("eeg-inception")
    eegnet_128 = load_backbone("eegnet", ch_names=CH, n_times=512, sfreq=128.0)
    # Assert: half a second for EEGNet; 500/250/125 ms for EEG-Inception (and a quarter of those in module 2)
    assert eegnet.conv_temporal.kernel_size == (1, 100)
    assert eegnet_128.conv_temporal.kernel_size == (1, 64)
    assert [b.conv.kernel_size[1] for b in inception.inception1] == [100, 50, 25]
    assert [b.conv.kernel_size[1] for b in inception.inception2] == [25, 12, 6]
    assert eegnet.conv_spatial.kernel_size == (len(CH), 1) and eegnet.conv_spatial.groups == 8


@pytest.mark.parametrize("kernel", [1, 4, 15, 16, 100])
def test_same_padding_equals_torch_same_for_even_and_odd_kernels(kernel):
    # Prepare
    import warnings

    from fedeeg.models.eegnet import SameConv2d

    conv = SameConv2d(2, 3, (1, kernel), bias=False)
    x = _x(batch=2, n_chans=2, n_times=137).unsqueeze(2)  # (batch, 2, 1, 137)
    # Execute
    got = conv(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about the copy for even kernels
        want = torch.nn.functional.conv2d(x, conv.weight, padding="same")
    # Assert
    assert got.shape == (2, 3, 1, 137)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", BASELINES)
def test_too_short_windows_are_refused(name):
    # Execute / Assert
    with pytest.raises(ValueError, match=r"needs n_times >= .*32.*got n_times=31"):
        load_backbone(name, ch_names=CH, n_times=31)
    assert load_backbone(name, ch_names=CH, n_times=32).eval()(_x(batch=1, n_times=32), CH).shape == (1, 2)


# --------------------------------------------------------------------------- input checks


@pytest.mark.parametrize("name", BASELINES)
def test_wrong_input_is_a_clear_error(name):
    # Prepare
    model = _model(name)
    x = _x()
    swapped = CH[:]
    swapped[2], swapped[3] = swapped[3], swapped[2]
    # Execute / Assert
    with pytest.raises(ValueError, match=r"x has 18 channels but this \w+ was built for n_chans=19 \(FP1, FP2"):
        model(x[:, :-1], CH[:-1])
    with pytest.raises(ValueError, match=r"n_times=400 .* built for n_times=800 \(4 s at 200 Hz\)"):
        model(x[:, :, :400], CH)
    with pytest.raises(ValueError, match=r"another order \(position 2: got 'F4', expected 'F3'\)"):
        model(x, swapped)
    with pytest.raises(ValueError, match=r"missing \['PZ'\], unexpected \['OZ'\]"):
        model(x, CH[:-1] + ["OZ"])
    with pytest.raises(ValueError, match="each of the 19 channels of x, got 18 names"):
        model(x, CH[:-1])
    with pytest.raises(ValueError, match=r"shape \(batch, n_chans, n_times\)"):
        model(x[0], CH)
    with pytest.raises(TypeError, match="floating-point"):
        model(x.long(), CH)
    # names are compared case-insensitively, like LaBraM's vocabulary
    assert model.eval()(x, [c.lower() for c in CH]).shape == (4, 2)


def test_bad_construction_arguments():
    # Execute / Assert
    with pytest.raises(ValueError, match="must not repeat a channel.*'FP1'"):
        EEGNet(["FP1", "FP1"], 800)
    with pytest.raises(TypeError, match="sequence of channel names"):
        EEGNet("FP1", 800)
    with pytest.raises(ValueError, match="multiple of 4"):
        EEGInception(CH, 800, n_filters=6)
    with pytest.raises(ValueError, match="'max_norm' must be > 0"):
        EEGNet(CH, 800, max_norm=0.0)


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("name", BASELINES)
def test_every_parameter_gets_a_gradient(name):
    # Prepare
    model = _model(name).train()
    # Execute
    model(_x(), CH).logsumexp(1).sum().backward()
    # Assert
    silent = [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert silent == []


@pytest.mark.parametrize("name", BASELINES)
def test_spatial_max_norm_holds_whatever_the_stored_kernel(name):
    # Prepare
    model = _model(name).eval()
    convs = [m for m in model.modules() if type(m).__name__ == "Conv2dMaxNorm"]
    with torch.no_grad():
        for conv in convs:
            conv.weight.mul_(50.0)
    # Execute
    with torch.no_grad():
        norms = [conv.constrained_weight().flatten(1).norm(dim=1) for conv in convs]
        stored = [conv.weight.flatten(1).norm(dim=1) for conv in convs]
    # Assert: the kernel in use has every filter norm <= 1 while the stored one is far larger
    assert convs and all(float(n.max()) <= 1.0 + 1e-5 for n in norms)
    assert all(float(s.max()) > 1.5 for s in stored)


@pytest.mark.parametrize("name", BASELINES)
def test_seeded_init_is_deterministic_and_leaves_global_rng(name):
    # Prepare
    state = torch.random.get_rng_state()
    # Execute
    a, b, c = (_model(name, seed=s) for s in (3, 3, 4))
    # Assert
    assert torch.equal(torch.random.get_rng_state(), state)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    assert not torch.equal(a.head.weight, c.head.weight)


def test_a_few_steps_of_training_reduce_the_loss_and_update_batchnorm():
    # Prepare: two separable classes (alpha-like 10 Hz power on posterior channels)
    from fedeeg.training import train_epochs

    rng = np.random.default_rng(0)
    n = 32
    X = 0.1 * rng.standard_normal((n, len(CH), 400)).astype(np.float32)
    y = np.repeat([0, 1], n // 2)
    t = np.arange(400) / 200.0
    X[y == 1, 12:16] += (0.5 * np.sin(2 * np.pi * 10 * t)).astype(np.float32)
    windows = WindowSet(X, y, np.array([f"s{i % 4}" for i in range(n)]), tuple(CH), 200.0, ("a", "b"))
    model = load_backbone("eegnet", ch_names=CH, n_times=400, seed=0)
    # Execute
    first = train_epochs(model, windows, epochs=1, lr=1e-2, batch_size=16, device="cpu", seed=0)
    last = train_epochs(model, windows, epochs=6, lr=1e-2, batch_size=16, device="cpu", seed=1)
    # Assert
    assert last.loss < first.loss
    assert int(model.bn1.num_batches_tracked) == 14 and not torch.all(model.bn1.running_var == 1)


@pytest.mark.parametrize("name", BASELINES)
def test_batchnorm_statistics_travel_with_the_weights_and_average(name):
    # Prepare: a site model whose BatchNorm statistics were updated by training steps
    from fedeeg.aggregation import weighted_average
    from fedeeg.models import load_trainable_state_dict, trainable_state_dict

    site = _model(name, seed=0)
    site.train()
    with torch.no_grad():
        for i in range(3):
            site(_x(seed=i) + 0.5, CH)
    site.eval()
    # Execute: what a site sends, loaded into the server's fresh model
    sent = trainable_state_dict(site)
    server = _model(name, seed=0)
    load_trainable_state_dict(server, sent)
    server.eval()
    # Assert: the running statistics travel, so the server's model predicts as the site's does
    stats = [k for k in sent if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert stats and all(k in dict(site.named_buffers()) for k in stats)
    torch.testing.assert_close(server(_x(seed=9), CH), site(_x(seed=9), CH))
    # ... and they average like the weights (counts round to integers)
    other = {k: v.numpy() * (2 if v.is_floating_point() else 1) for k, v in sent.items()}
    mean = weighted_average([({k: v.numpy() for k, v in sent.items()}, 1.0), (other, 3.0)])
    key = next(k for k in stats if k.endswith("running_var"))
    np.testing.assert_allclose(mean[key], 1.75 * sent[key].numpy(), rtol=1e-6)
    count = next(k for k in stats if k.endswith("num_batches_tracked"))
    assert mean[count].dtype == np.int64 and mean[count].item() == 3
    # ... and survive Flower's ArrayRecord (which has no 0-d arrays) into a fresh model
    from fedeeg.federation.records import numpy_to_state, record_to_numpy, state_to_record

    again = _model(name, seed=0)
    load_trainable_state_dict(again, numpy_to_state(record_to_numpy(state_to_record(sent))))
    again.eval()
    torch.testing.assert_close(again(_x(seed=9), CH), site(_x(seed=9), CH))


# --------------------------------------------------------------------------- weights


@pytest.mark.parametrize("name", BASELINES)
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_state_dict_round_trip(tmp_path, name, suffix):
    # Prepare: a model whose BatchNorm statistics and weights differ from a fresh one
    from safetensors.torch import save_file

    model = _model(name, seed=1).train()
    with torch.no_grad():
        model(_x(), CH)
    model.eval()
    path = tmp_path / f"w{suffix}"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)
    # Execute
    other = _model(name, seed=2, checkpoint=path).eval()
    # Assert
    x = _x(seed=3)
    torch.testing.assert_close(other(x, CH), model(x, CH), rtol=0, atol=0)
    assert other.checkpoint_sha256 is not None and len(other.checkpoint_sha256) == 64


def test_checkpoint_mismatches_are_named(tmp_path, caplog):
    # Prepare
    from safetensors.torch import save_file

    model = _model("eegnet")
    other_montage = load_backbone("eegnet", ch_names=CH[:12], n_times=N_TIMES)
    save_file({k: v.contiguous() for k, v in other_montage.state_dict().items()}, str(tmp_path / "montage.safetensors"))
    sd = dict(model.state_dict())
    del sd["bn2.running_var"]
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "keys.pt")
    no_head = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    torch.save(no_head, tmp_path / "nohead.pt")
    # Execute / Assert
    with pytest.raises(ValueError, match=r"conv_spatial\.weight \(checkpoint \[16, 1, 12, 1\], model \[16, 1, 19, 1\]\).*built for 19 channels"):
        _model("eegnet", checkpoint=tmp_path / "montage.safetensors")
    with pytest.raises(ValueError, match=r"missing keys: bn2\.running_var; unexpected keys: extra\.weight.*strict=False"):
        _model("eegnet", checkpoint=tmp_path / "keys.pt")
    with caplog.at_level(logging.WARNING, logger="fedeeg.models.registry"):
        loaded = _model("eegnet", seed=5, checkpoint=tmp_path / "keys.pt", strict=False)
    assert "bn2.running_var" in caplog.text
    assert torch.equal(loaded.conv_temporal.weight, model.conv_temporal.weight)
    # a checkpoint without head loads strictly: the head is new for the task
    headless = _model("eegnet", seed=5, checkpoint=tmp_path / "nohead.pt")
    assert torch.equal(headless.conv_spatial.weight, model.conv_spatial.weight)
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        _model("eegnet", checkpoint=tmp_path / "nope.pt")


# --------------------------------------------------------------------------- model folders


def _manifest(model, **extra) -> dict:
    return {"channels": CH, "sfreq": 200.0, "window_seconds": 4.0, "n_times": N_TIMES, "label_names": ["rest", "arithmetic"],
            "preprocessing": {}, "lora": None, "strategy": "full", "checkpoint_sha256": None, **extra}


@pytest.mark.parametrize("name", BASELINES)
def test_full_model_folder_round_trip(tmp_path, name):
    # Prepare: a "trained" model (BatchNorm statistics updated)
    from fedeeg.checkpoint import load_model_dir, save_model_dir

    model = _model(name, seed=1).train()
    with torch.no_grad():
        model(_x(), CH)
    model.eval()
    # Execute
    save_model_dir(model, tmp_path / "adapter", manifest=_manifest(model))
    loaded, manifest = load_model_dir(tmp_path / "adapter")
    # Assert
    assert manifest["backbone"] == name and manifest["kind"] == "full"
    assert manifest["channels"] == CH and manifest["n_times"] == N_TIMES and manifest["batchnorm_stats"] == "trained"
    assert set(manifest["files"]) == {"model.safetensors"}
    x = _x(seed=4)
    assert not loaded.training
    torch.testing.assert_close(loaded(x, CH), model(x, CH), rtol=0, atol=0)


def test_model_folder_refuses_contradicting_manifest_and_warns_on_initial_batchnorm(tmp_path, caplog):
    # Prepare
    from fedeeg.checkpoint import save_model_dir

    model = _model("eegnet")
    # Execute / Assert: channels or window that the model was not built for
    with pytest.raises(ValueError, match=r"manifest\['channels'\].*differ"):
        save_model_dir(model, tmp_path / "a", manifest=_manifest(model, channels=CH[::-1]))
    with pytest.raises(ValueError, match=r"manifest\['n_times'\] is 400"):
        save_model_dir(model, tmp_path / "a", manifest=_manifest(model, n_times=400))
    with pytest.raises(ValueError, match=r"manifest\['backbone'\] is 'labram-small' but the model is 'eegnet'"):
        save_model_dir(model, tmp_path / "a", manifest=_manifest(model, backbone="labram-small"))
    # Execute / Assert: untouched BatchNorm statistics are recorded and warned about
    with caplog.at_level(logging.WARNING, logger="fedeeg.checkpoint"):
        save_model_dir(model, tmp_path / "b", manifest=_manifest(model))
    from fedeeg.checkpoint import read_manifest

    assert read_manifest(tmp_path / "b")["batchnorm_stats"] == "initial"
    assert "never updated" in caplog.text
    assert not (tmp_path / "a").exists()


def test_centralized_eegnet_run_writes_a_folder_that_evaluates(tmp_path):
    # Prepare
    from fedeeg.config import RunConfig
    from fedeeg.evaluation import evaluate_model_dir
    from fedeeg.experiment import prepare_sites, run_centralized
    from fedeeg.outputs import write_outputs

    cfg = RunConfig(mode="centralized", strategy="full", backbone="eegnet", sites=2, rounds=1, local_epochs=1,
                    batch_size=16, window_seconds=2.0, device="cpu", out=str(tmp_path / "run"))
    # Execute
    result = run_centralized(cfg, prepare_sites(cfg))
    out = write_outputs(cfg, result, wall_seconds=1.0)
    scores = evaluate_model_dir(out / "adapter", dataset="synthetic", n_sites=2, seed=0, device="cpu")
    # Assert
    assert 0.0 <= scores["balanced_accuracy"] <= 1.0 and scores["n_windows"] > 0
    assert scores["adapter"]["backbone"] == "eegnet"
