"""LaBraM backbone: checkpoint layout, loading, determinism, forward pass and errors."""

from __future__ import annotations

import argparse
import hashlib
import logging
import math

import pytest
import torch
import torch.nn.functional as F

from fedeeg.models import BACKBONES, LaBraM, LaBraMConfig, build_backbone, load_checkpoint

CH_NAMES = ["FP1", "FP2", "F3", "F4", "C3", "CZ", "C4", "P3", "PZ", "P4", "O1", "O2"]


def _x(n_chans: int = len(CH_NAMES), n_times: int = 400, batch: int = 2, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, n_chans, n_times, generator=gen)


@pytest.fixture(scope="module")
def base():
    return build_backbone("labram-base", seed=0).eval()


@pytest.fixture
def small():
    return build_backbone("labram-small", seed=1).eval()


# --------------------------------------------------------------------------- layout


def _official_shapes(dim: int = 200, depth: int = 12, heads: int = 10, out_chans: int = 8) -> dict[str, list[int]]:
    """The key table of the notes (after stripping ``student.``); the defaults are labram-base's."""
    hd, c = dim // heads, out_chans
    shapes = {
        "cls_token": [1, 1, dim],
        "pos_embed": [1, 129, dim],
        "time_embed": [1, 16, dim],
        "patch_embed.conv1.weight": [c, 1, 1, 15],
        "patch_embed.conv1.bias": [c],
        "patch_embed.conv2.weight": [c, c, 1, 3],
        "patch_embed.conv2.bias": [c],
        "patch_embed.conv3.weight": [c, c, 1, 3],
        "patch_embed.conv3.bias": [c],
        "norm.weight": [dim],
        "norm.bias": [dim],
    }
    for i in (1, 2, 3):
        shapes[f"patch_embed.norm{i}.weight"] = [c]
        shapes[f"patch_embed.norm{i}.bias"] = [c]
    for n in range(depth):
        b = f"blocks.{n}."
        shapes.update(
            {
                b + "gamma_1": [dim],
                b + "gamma_2": [dim],
                b + "norm1.weight": [dim],
                b + "norm1.bias": [dim],
                b + "attn.qkv.weight": [3 * dim, dim],
                b + "attn.q_norm.weight": [hd],
                b + "attn.q_norm.bias": [hd],
                b + "attn.k_norm.weight": [hd],
                b + "attn.k_norm.bias": [hd],
                b + "attn.proj.weight": [dim, dim],
                b + "attn.proj.bias": [dim],
                b + "norm2.weight": [dim],
                b + "norm2.bias": [dim],
                b + "mlp.fc1.weight": [4 * dim, dim],
                b + "mlp.fc1.bias": [4 * dim],
                b + "mlp.fc2.weight": [dim, 4 * dim],
                b + "mlp.fc2.bias": [dim],
            }
        )
    return shapes


_official_base_shapes = _official_shapes

#: Published sizes (LaBraM paper, Table 1): embed dim, depth, heads, temporal-conv maps.
OFFICIAL_SIZES = {
    "labram-base": (200, 12, 10, 8),
    "labram-large": (400, 24, 16, 16),
    "labram-huge": (800, 48, 16, 32),
}


@pytest.mark.filterwarnings("ignore:.*meta parameter")
@pytest.mark.parametrize("name", list(OFFICIAL_SIZES))
def test_official_layout_loads_strictly_into_every_size(tmp_path, monkeypatch, name):
    # Prepare: an official-layout file for this size, made from the key table (zero-stride tensors: no memory),
    # and the model on the meta device (large/huge would take GBs to materialise)
    import fedeeg.models.labram as labram_mod
    from fedeeg.models.labram import LaBraM

    shapes = _official_shapes(*OFFICIAL_SIZES[name])
    official = {f"student.{k}": torch.zeros(()).expand(v) for k, v in shapes.items()}
    official["student.mask_token"] = torch.zeros(()).expand(1, 1, shapes["cls_token"][-1])
    official["student.lm_head.weight"] = torch.zeros(()).expand(8192, 64)
    path = tmp_path / f"{name}.pth"
    path.write_bytes(b"stand-in: _read_file is patched to return the official layout")
    files = {"ok": {"model": official}}
    monkeypatch.setattr(labram_mod, "_read_file", lambda p: files["ok"])
    with torch.device("meta"):
        model = LaBraM(BACKBONES[name])
    # Execute / Assert: strict load passes
    assert load_checkpoint(model, path) == hashlib.sha256(path.read_bytes()).hexdigest()
    # ... and a missing key and a wrong shape are named
    broken = dict(official)
    del broken["student.blocks.3.mlp.fc1.bias"]
    broken["student.blocks.0.attn.qkv.weight"] = torch.zeros(()).expand(3, 3)
    files["ok"] = {"model": broken}
    with pytest.raises(ValueError, match=r"missing keys: blocks\.3\.mlp\.fc1\.bias.*blocks\.0\.attn\.qkv\.weight \(checkpoint \[3, 3\]"):
        load_checkpoint(model, path)


def test_base_keys_and_shapes_match_official_table(base):
    # Prepare
    expected = _official_base_shapes()
    # Execute
    got = {k: list(v.shape) for k, v in base.state_dict().items()}
    # Assert: spot checks of blocks 0 and 11, and of the top level
    for n in (0, 11):
        for k in [k for k in expected if k.startswith(f"blocks.{n}.")]:
            assert got[k] == expected[k], k
    assert got["blocks.11.attn.qkv.weight"] == [600, 200]
    assert "blocks.12.gamma_1" not in got
    # Assert: every official key with its shape, and only fc_norm/head beyond them
    assert {k: got[k] for k in expected} == expected
    assert set(got) - set(expected) == {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
    assert got["head.weight"] == [2, 200]
    assert "attn.qkv.bias" not in " ".join(got)


def test_config_validation_and_unknown_backbone():
    # Execute / Assert
    with pytest.raises(ValueError, match="out_chans \\* 25"):
        LaBraMConfig(embed_dim=120, depth=1, num_heads=4, out_chans=4)
    with pytest.raises(ValueError, match="divisible by 'num_heads'"):
        LaBraMConfig(embed_dim=100, depth=1, num_heads=3, out_chans=4)
    with pytest.raises(ValueError, match="'labram-small', 'labram-base'"):
        build_backbone("labram-tiny")
    assert [c.embed_dim for c in BACKBONES.values()] == [100, 200, 400, 800]


# --------------------------------------------------------------------------- checkpoints


def _official_file(model: LaBraM, path, wrapper: str = "model"):
    sd = {f"student.{k}": v.clone() for k, v in model.state_dict().items() if not k.startswith(("fc_norm.", "head."))}
    sd["lm_head.weight"] = torch.zeros(8, 3)
    sd["student.lm_head.weight"] = torch.zeros(8, 3)
    sd["student.mask_token"] = torch.zeros(1, 1, model.embed_dim)
    sd["projection_head.0.weight"] = torch.zeros(3, 3)
    # Training scripts store their args beside the weights (an argparse.Namespace).
    torch.save({wrapper: sd, "args": argparse.Namespace(lr=5e-4, model="labram_base"), "epoch": 3}, path)
    return path


@pytest.mark.parametrize("wrapper", ["model", "module"])
def test_official_layout_loads_strictly(tmp_path, small, wrapper):
    # Prepare
    path = _official_file(small, tmp_path / "labram-official.pth", wrapper)
    other = build_backbone("labram-small", seed=2).eval()
    x = _x()
    assert not torch.allclose(other.forward_features(x, CH_NAMES), small.forward_features(x, CH_NAMES))
    # Execute
    sha = load_checkpoint(other, path)
    # Assert: identical backbone → identical features; head/fc_norm kept from seed 2 (absent from the file)
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest() == other.checkpoint_sha256
    torch.testing.assert_close(other.forward_features(x, CH_NAMES), small.forward_features(x, CH_NAMES), rtol=0, atol=0)
    assert not torch.equal(other.head.weight, small.head.weight)


def test_official_layout_with_head_gives_identical_outputs(tmp_path, small):
    # Prepare: a checkpoint that also carries fc_norm/head (e.g. a fine-tuned file)
    sd = {f"student.{k}": v for k, v in small.state_dict().items()}
    sd["student.mask_token"] = torch.zeros(1, 1, small.embed_dim)
    torch.save({"model": sd}, tmp_path / "ft.pth")
    # Execute
    other = build_backbone("labram-small", seed=2, checkpoint=tmp_path / "ft.pth").eval()
    # Assert
    x = _x()
    torch.testing.assert_close(other(x, CH_NAMES), small(x, CH_NAMES), rtol=0, atol=0)
    assert other.checkpoint_sha256 is not None and small.checkpoint_sha256 is None
    assert other.backbone_name == "labram-small"


def test_missing_and_wrong_shape_keys_are_named(tmp_path, small, caplog):
    # Prepare
    sd = dict(small.state_dict())
    del sd["blocks.2.attn.proj.bias"]
    torch.save(sd, tmp_path / "missing.pt")
    sd = dict(small.state_dict())
    sd["blocks.1.mlp.fc1.weight"] = torch.zeros(7, 100)
    torch.save(sd, tmp_path / "shape.pt")
    sd = dict(small.state_dict())
    sd["blocks.9.extra"] = torch.zeros(1)
    torch.save(sd, tmp_path / "extra.pt")
    target = build_backbone("labram-small", seed=2)
    before = target.blocks[1].mlp.fc1.weight.clone()
    # Execute / Assert
    with pytest.raises(ValueError, match=r"missing keys: blocks\.2\.attn\.proj\.bias.*strict=False"):
        load_checkpoint(target, tmp_path / "missing.pt")
    with pytest.raises(ValueError, match=r"blocks\.1\.mlp\.fc1\.weight \(checkpoint \[7, 100\], model \[400, 100\]\)"):
        load_checkpoint(target, tmp_path / "shape.pt")
    with pytest.raises(ValueError, match=r"unexpected keys: blocks\.9\.extra"):
        load_checkpoint(target, tmp_path / "extra.pt")
    assert torch.equal(target.blocks[1].mlp.fc1.weight, before)
    # Execute: strict=False loads the rest and warns with the list
    with caplog.at_level(logging.WARNING, logger="fedeeg.models.labram"):
        load_checkpoint(target, tmp_path / "shape.pt", strict=False)
    # Assert
    assert "blocks.1.mlp.fc1.weight" in caplog.text
    assert torch.equal(target.blocks[1].mlp.fc1.weight, before)
    assert torch.equal(target.blocks[0].mlp.fc1.weight, small.blocks[0].mlp.fc1.weight)


def test_wrong_size_checkpoint_hints_at_backbone(tmp_path, base):
    # Prepare
    torch.save(base.state_dict(), tmp_path / "base.pt")
    # Execute / Assert
    with pytest.raises(ValueError, match="matches the backbone 'labram-base'"):
        load_checkpoint(build_backbone("labram-small"), tmp_path / "base.pt")


def test_safetensors_and_plain_dict_load(tmp_path, small):
    # Prepare
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in small.state_dict().items()}, str(tmp_path / "w.safetensors"))
    torch.save(small.state_dict(), tmp_path / "w.pth")
    x = _x()
    want = small(x, CH_NAMES)
    for name in ("w.safetensors", "w.pth"):
        # Execute
        model = build_backbone("labram-small", seed=5, checkpoint=tmp_path / name).eval()
        # Assert
        torch.testing.assert_close(model(x, CH_NAMES), want, rtol=0, atol=0)


def test_unreadable_checkpoints_name_the_path(tmp_path):
    # Prepare
    model = build_backbone("labram-small")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    # Execute / Assert
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_checkpoint(model, tmp_path / "nope.pth")
    with pytest.raises(ValueError, match="junk.pth"):
        load_checkpoint(model, tmp_path / "junk.pth")
    with pytest.raises(ValueError, match="junk.safetensors"):
        load_checkpoint(model, tmp_path / "junk.safetensors")


class _Opaque:
    """Not a tensor: weights_only=True refuses it."""


def test_pickled_objects_are_refused(tmp_path):
    # Prepare: a file that needs weights_only=False
    torch.save({"model": {}, "extra": _Opaque()}, tmp_path / "obj.pth")
    # Execute / Assert
    with pytest.raises(ValueError, match="other than tensors"):
        load_checkpoint(build_backbone("labram-small"), tmp_path / "obj.pth")


# --------------------------------------------------------------------------- init


def test_seeded_init_is_deterministic_and_leaves_global_rng():
    # Prepare
    state = torch.random.get_rng_state()
    # Execute
    a, b, c = (build_backbone("labram-small", seed=s) for s in (3, 3, 4))
    # Assert
    assert torch.equal(torch.random.get_rng_state(), state)
    for (k, va), vb, vc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(va, vb), k
    differs = [k for (k, va), vc in zip(a.state_dict().items(), c.state_dict().values()) if not torch.equal(va, vc)]
    assert {"cls_token", "pos_embed", "blocks.0.attn.qkv.weight", "patch_embed.conv1.weight", "head.weight"} <= set(differs)
    # LaBraM's init: truncated at ±0.02, layer scale 0.1, depth-rescaled proj
    assert a.pos_embed.abs().max() <= 0.02
    assert torch.all(a.blocks[0].gamma_1 == 0.1)
    assert a.blocks[3].attn.proj.weight.abs().max() <= 0.02 / math.sqrt(8) + 1e-7


# --------------------------------------------------------------------------- forward


def _reference_forward(model: LaBraM, x: torch.Tensor, slots: list[int]) -> torch.Tensor:
    """A literal transcription of LaBraM's fine-tuning forward (x as B, N, A, T)."""
    B, N, T = x.shape
    A = T // 200
    x = x.reshape(B, N, A, 200)
    pe = model.patch_embed
    h = x.reshape(B, N * A, 200).unsqueeze(1)  # 'B N A T -> B (N A) T'
    h = F.gelu(pe.norm1(pe.conv1(h)))
    h = F.gelu(pe.norm2(pe.conv2(h)))
    h = F.gelu(pe.norm3(pe.conv3(h)))
    h = h.permute(0, 2, 3, 1).reshape(B, N * A, -1)  # 'B C NA T -> B NA (T C)'
    h = torch.cat([model.cls_token.expand(B, -1, -1), h], dim=1)
    used = model.pos_embed[:, slots]
    pos = used[:, 1:, :].unsqueeze(2).expand(B, -1, A, -1).flatten(1, 2)
    h = h + torch.cat([used[:, 0:1, :].expand(B, -1, -1), pos], dim=1)
    h[:, 1:, :] += model.time_embed[:, 0:A, :].unsqueeze(1).expand(B, N, -1, -1).flatten(1, 2)
    for blk in model.blocks:
        at = blk.attn
        y = blk.norm1(h)
        qkv = F.linear(y, at.qkv.weight).reshape(B, h.shape[1], 3, at.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = at.q_norm(qkv[0]), at.k_norm(qkv[1]), qkv[2]
        attn = ((q * at.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        y = (attn @ v).transpose(1, 2).reshape(B, h.shape[1], -1)
        h = h + blk.gamma_1 * at.proj(y)
        h = h + blk.gamma_2 * blk.mlp.fc2(F.gelu(blk.mlp.fc1(blk.norm2(h))))
    return model.head(model.fc_norm(h[:, 1:].mean(1)))


def test_forward_matches_reference_transcription(small):
    # Prepare
    from fedeeg.data.channels import input_chans

    with torch.no_grad():
        small.head.weight.normal_()  # make the logits sensitive
    x = _x(n_times=600)
    # Execute
    got = small(x, CH_NAMES)
    # Assert
    torch.testing.assert_close(got, _reference_forward(small, x, input_chans(CH_NAMES)), rtol=1e-4, atol=1e-5)


def test_output_shapes_and_channel_permutation(small):
    # Prepare
    model = build_backbone("labram-small", n_outputs=3, seed=0).eval()
    x = _x(n_times=800, batch=4)
    perm = torch.randperm(len(CH_NAMES), generator=torch.Generator().manual_seed(0))
    # Execute
    logits = model(x, CH_NAMES)
    feats = model.forward_features(x, CH_NAMES)
    permuted = model(x[:, perm], [CH_NAMES[i] for i in perm])
    # Assert: shapes; pooling is invariant to a consistent reordering of channels and names
    assert logits.shape == (4, 3) and feats.shape == (4, 100)
    torch.testing.assert_close(permuted, logits, rtol=1e-4, atol=1e-6)
    assert model(x[:, :, :200], CH_NAMES).shape == (4, 3)
    assert model(_x(n_times=3200, batch=1), CH_NAMES).shape == (1, 3)
    assert model.channel_index(CH_NAMES) is model.channel_index(tuple(CH_NAMES))


def test_input_errors(small):
    # Prepare
    x = _x()
    # Execute / Assert
    with pytest.raises(ValueError, match="shape \\(batch, n_chans, n_times\\)"):
        small(x[0], CH_NAMES)
    with pytest.raises(ValueError, match="multiple of 200.*got 350"):
        small(x[:, :, :350], CH_NAMES)
    with pytest.raises(ValueError, match="17 patches"):
        small(_x(n_times=3400, batch=1), CH_NAMES)
    with pytest.raises(ValueError, match="each of the 12 channels.*got 11 names"):
        small(x, CH_NAMES[:-1])
    with pytest.raises(ValueError, match="'XYZ'"):
        small(x, CH_NAMES[:-1] + ["XYZ"])
    with pytest.raises(ValueError, match=r"'P4-O2' \(slot 136\)"):
        small(x, CH_NAMES[:-1] + ["P4-O2"])


def test_bf16_autocast_forward_on_cpu(small):
    # Prepare
    x = _x()
    want = small.forward_features(x, CH_NAMES)
    # Execute
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats = small.forward_features(x, CH_NAMES)
        logits = small(x, CH_NAMES)
    # Assert
    assert feats.shape == (2, 100) and logits.shape == (2, 2)
    assert torch.isfinite(feats.float()).all()
    torch.testing.assert_close(feats.float(), want, rtol=0.1, atol=0.1)


def test_compiled_forward_builds_the_channel_index_as_a_graph_constant(small):
    # Prepare: a fresh model (empty channel-index cache), a counting backend (no inductor: fast)
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    names = ["FP1", "FP2", "CZ", "O1"]
    x = torch.randn(2, len(names), 400, generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(small, backend=counter, fullgraph=True)
    # Execute: two calls, then the eager model
    with torch.no_grad():
        first, second = compiled(x, names), compiled(x, names)
        cache_after_compiled = dict(small._chan_cache)
        eager = small(x, names)
    # Assert: one graph, no recompilation; nothing cached from inside the graph (a CUDA-graph replay would
    # overwrite such a tensor); the same logits as eager
    assert counter.frame_count == 1
    assert cache_after_compiled == {}
    assert torch.allclose(first, eager, atol=1e-6) and torch.allclose(second, eager, atol=1e-6)
    torch._dynamo.reset()
