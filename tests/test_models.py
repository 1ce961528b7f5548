"""CIFAR ResNets: parameter counts against He et al. 2016 (Table 6) and a hand count, shapes, shortcuts."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lb_dist.models import BasicBlock, CifarResNet, resnet20, resnet32, resnet44, resnet56, resnet110

torch.set_num_threads(1)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def hand_count(depth: int, num_classes: int = 10, option: str = "A") -> int:
    """Count from the architecture description: 3x3 convs without bias, BN (2 params per channel)."""
    n = (depth - 2) // 6
    conv = lambda cin, cout, k=3: cin * cout * k * k
    total = conv(3, 16) + 2 * 16
    cin = 16
    for width in (16, 32, 64):
        for i in range(n):
            total += conv(cin, width) + conv(width, width) + 4 * width
            if option == "B" and cin != width:
                total += conv(cin, width, 1) + 2 * width
            cin = width
    return total + 64 * num_classes + num_classes


def test_resnet20_has_about_0_27M_parameters():
    model = resnet20()
    assert n_params(model) == hand_count(20) == 269_722
    assert round(n_params(model) / 1e6, 2) == 0.27  # He et al. 2016, Table 6
    assert n_params(resnet20(shortcut="B")) == hand_count(20, option="B")
    assert n_params(resnet20(num_classes=100)) == hand_count(20, num_classes=100)


@pytest.mark.parametrize("factory,millions", [(resnet32, 0.46), (resnet44, 0.66), (resnet56, 0.85), (resnet110, 1.7)])
def test_deeper_resnets_match_the_paper(factory, millions):
    count = n_params(factory())
    digits = 1 if millions >= 1 else 2
    assert round(count / 1e6, digits) == millions
    assert count == hand_count(factory().depth)


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_forward_shape_and_backward(shortcut):
    model = resnet20(shortcut=shortcut, num_classes=7)
    x = torch.randn(3, 3, 32, 32)
    out = model(x)
    assert out.shape == (3, 7)
    F.cross_entropy(out, torch.tensor([0, 1, 2])).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 7)
    assert CifarResNet(8, in_channels=1)(torch.randn(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("depth", [0, 2, 7, 19, 21, 33])
def test_depth_validation(depth):
    with pytest.raises(ValueError, match="depth"):
        CifarResNet(depth)


def test_argument_validation():
    with pytest.raises(ValueError, match="depth"):
        CifarResNet("20")
    with pytest.raises(ValueError, match="shortcut"):
        CifarResNet(20, shortcut="C")
    with pytest.raises(ValueError, match="num_classes"):
        CifarResNet(20, num_classes=0)
    with pytest.raises(ValueError, match="residual_bn_init"):
        CifarResNet(20, residual_bn_init=float("nan"))


def test_option_a_shortcut_is_subsampled_zero_padded_identity():
    torch.manual_seed(0)
    block = BasicBlock(16, 32, stride=2, shortcut="A")
    assert n_params(block) == 16 * 32 * 9 + 32 * 32 * 9 + 4 * 32  # no shortcut parameters
    x = torch.randn(2, 16, 8, 8)
    expected = torch.zeros(2, 32, 4, 4)
    for i in range(4):
        for j in range(4):
            expected[:, :16, i, j] = x[:, :, 2 * i, 2 * j]
    torch.testing.assert_close(block.shortcut(x), expected, rtol=0, atol=0)


def test_residual_bn_init_zero_makes_blocks_identity():
    torch.manual_seed(0)
    model = resnet20(residual_bn_init=0.0)
    block = model.layer1[1]
    assert torch.equal(block.bn2.weight, torch.zeros(16)) and torch.equal(block.bn1.weight, torch.ones(16))
    x = torch.relu(torch.randn(4, 16, 8, 8))  # block inputs are post-ReLU
    torch.testing.assert_close(block(x), x)


# ------------------------------------------------------------------------------------------------
# build_model: ResNet-18 (CIFAR), VGG-11-BN, ResNet-50 (ImageNet), the Transformers
# ------------------------------------------------------------------------------------------------
from lb_dist.models import MODEL_NAMES, build_model, is_seq2seq  # noqa: E402


def conv_bn(cin, cout, k):
    """A bias-free k x k convolution and its BatchNorm (2 parameters per channel)."""
    return cin * cout * k * k + 2 * cout


def resnet_hand_count(block: str, layers, num_classes: int, stem: str) -> int:
    """He et al. 2016, Table 1, with projection shortcuts where the shape changes."""
    total = conv_bn(3, 64, 7 if stem == "imagenet" else 3)
    cin = 64
    for stage, (width, n) in enumerate(zip((64, 128, 256, 512), layers)):
        for i in range(n):
            if block == "basic":
                cout = width
                total += conv_bn(cin, width, 3) + conv_bn(width, width, 3)
            else:
                cout = 4 * width
                total += conv_bn(cin, width, 1) + conv_bn(width, width, 3) + conv_bn(width, cout, 1)
            if cin != cout or (stage > 0 and i == 0):
                total += conv_bn(cin, cout, 1)
            cin = cout
    return total + cin * num_classes + num_classes


def test_model_names_and_unknown_name():
    assert set(MODEL_NAMES) == {"resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet18_cifar",
                                "vgg11_bn", "resnet50", "transformer_small", "transformer_base"}
    with pytest.raises(ValueError, match="unknown model 'resnet19'.*resnet20.*transformer_base"):
        build_model("resnet19")
    with pytest.raises(ValueError, match="does not take option.*'depth'"):
        build_model("resnet50", depth=50)
    with pytest.raises(ValueError, match="does not take option.*'last_bn_gamma'"):
        build_model("vgg11_bn", last_bn_gamma=0.0)
    with pytest.raises(ValueError, match="last_bn_gamma"):
        build_model("resnet18_cifar", last_bn_gamma=float("inf"))
    with pytest.raises(ValueError, match="num_classes"):
        build_model("transformer_small", num_classes=10)
    with pytest.raises(ValueError, match="vocab"):
        build_model("transformer_small")


@pytest.mark.parametrize("name,millions", [("resnet20", 0.27), ("resnet56", 0.85), ("resnet110", 1.7)])
def test_build_model_cifar_resnets(name, millions):
    model = build_model(name)
    digits = 1 if millions >= 1 else 2
    assert round(n_params(model) / 1e6, digits) == millions
    assert n_params(model) == hand_count(int(name[6:]))
    assert n_params(build_model(name, num_classes=100)) == hand_count(int(name[6:]), num_classes=100)


def test_resnet18_cifar_parameters_and_shape():
    model = build_model("resnet18_cifar")
    assert n_params(model) == resnet_hand_count("basic", (2, 2, 2, 2), 10, "cifar") == 11_173_962
    assert round(n_params(model) / 1e6, 1) == 11.2
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    F.cross_entropy(out, torch.tensor([1, 2])).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_vgg11_bn_parameters_and_shape():
    model = build_model("vgg11_bn", num_classes=100)
    widths = (64, 128, 256, 256, 512, 512, 512, 512)
    features, cin = 0, 3
    for w in widths:  # 3x3 convolution WITH bias, BatchNorm
        features += cin * w * 9 + w + 2 * w
        cin = w
    assert n_params(model) == features + 512 * 100 + 100
    assert n_params(build_model("vgg11_bn")) == features + 512 * 10 + 10 == 9_231_114
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def test_resnet50_parameters_shape_and_last_bn_gamma():
    model = build_model("resnet50", last_bn_gamma=0.25)
    # 25,557,032: torchvision's resnet50 (the number every ImageNet paper quotes as 25.6M)
    assert n_params(model) == resnet_hand_count("bottleneck", (3, 4, 6, 3), 1000, "imagenet") == 25_557_032
    blocks = [m for m in model.modules() if type(m).__name__ == "Bottleneck"]
    assert len(blocks) == 3 + 4 + 6 + 3
    for block in blocks:
        assert torch.equal(block.bn3.weight, torch.full_like(block.bn3.weight, 0.25))
        assert torch.equal(block.bn1.weight, torch.ones_like(block.bn1.weight))
        assert torch.equal(block.bn2.weight, torch.ones_like(block.bn2.weight))
        if block.downsample is not None:  # the projection's BatchNorm is not the block's last BN
            assert torch.equal(block.downsample[1].weight, torch.ones_like(block.downsample[1].weight))
    assert torch.equal(model.bn1.weight, torch.ones(64))
    default = build_model("resnet50")
    assert all(torch.equal(b.bn3.weight, torch.ones_like(b.bn3.weight)) for b in default.modules()
               if type(b).__name__ == "Bottleneck")
    model.eval()
    assert build_model("resnet50", num_classes=7).eval()(torch.randn(1, 3, 64, 64)).shape == (1, 7)


def test_last_bn_gamma_zero_makes_bottlenecks_identity():
    torch.manual_seed(0)
    model = build_model("resnet50", last_bn_gamma=0.0).eval()
    block = model.layer2[1]  # no projection: output = relu(bn3(...) + x) = relu(x) = x for x >= 0
    x = torch.relu(torch.randn(2, 512, 4, 4))
    torch.testing.assert_close(block(x), x)
    cifar = build_model("resnet20", last_bn_gamma=0.0)  # the CIFAR ResNets map it to residual_bn_init
    assert all(torch.equal(b.bn2.weight, torch.zeros_like(b.bn2.weight)) for b in cifar.modules()
               if isinstance(b, BasicBlock))
    r18 = build_model("resnet18_cifar", last_bn_gamma=0.5)
    assert all(torch.equal(b.bn2.weight, torch.full_like(b.bn2.weight, 0.5)) for b in r18.residual_blocks())


# --------------------------------------------------------------------------------- Transformer
import importlib.util  # noqa: E402

needs_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                        reason="the Transformer needs the 'workloads' extra (transformers)")


def transformer_formula(d, f, n_enc, n_dec, v_src, v_tgt=None):
    """Trainable parameters: per encoder layer self-attention (4 d x d projections + biases), FFN,
    2 LayerNorms; per decoder layer two attentions, FFN, 3 LayerNorms; embeddings (shared or one per
    side, the output projection tied); sinusoidal positions are frozen."""
    attn = 4 * (d * d + d)
    ffn = d * f + f + f * d + d
    enc = attn + ffn + 2 * 2 * d
    dec = 2 * attn + ffn + 3 * 2 * d
    emb = d * v_src if v_tgt is None else d * (v_src + v_tgt)
    return n_enc * enc + n_dec * dec + emb


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@needs_transformers
def test_transformer_base_parameter_count():
    from lb_dist.models.transformer import transformer_parameter_count

    model = build_model("transformer_base", vocab_size=37000)
    cfg = model.config
    assert (cfg.d_model, cfg.encoder_layers, cfg.decoder_layers, cfg.encoder_attention_heads,
            cfg.encoder_ffn_dim) == (512, 6, 6, 8, 2048)
    assert trainable(model) == transformer_formula(512, 2048, 6, 6, 37000) == 63_082_496
    assert 60e6 < trainable(model) < 66e6  # Vaswani et al. report 65M for base (37000 tokens)
    assert transformer_parameter_count(512, 2048, 6, 6, 37000) == trainable(model)
    emb = model.model.encoder.embed_tokens.weight
    assert emb is model.model.decoder.embed_tokens.weight and emb is model.lm_head.weight
    assert cfg.activation_function == "relu" and cfg.scale_embedding


@needs_transformers
def test_transformer_separate_vocabularies_and_options():
    model = build_model("transformer_small", src_vocab_size=300, tgt_vocab_size=200, d_model=32, ffn_dim=64,
                        attention_heads=4, max_positions=40)
    assert trainable(model) == transformer_formula(32, 64, 2, 2, 300, 200)
    assert model.lm_head.weight.shape == (200, 32)
    assert model.lm_head.weight is model.model.decoder.embed_tokens.weight
    small = build_model("transformer_small", vocab_size=1000)
    assert trainable(small) == transformer_formula(128, 512, 2, 2, 1000) == 925_696 + 128 * 1000
    with pytest.raises(ValueError, match="d_model .* divisible by attention_heads"):
        build_model("transformer_small", vocab_size=50, d_model=30, attention_heads=4)
    with pytest.raises(ValueError, match="not both"):
        build_model("transformer_small", vocab_size=50, src_vocab_size=50, tgt_vocab_size=50)
    with pytest.raises(ValueError, match="pad_token_id"):
        build_model("transformer_small", vocab_size=50, pad_token_id=50)
    with pytest.raises(ValueError, match="unknown Transformer option.*'layers'"):
        build_model("transformer_small", vocab_size=50, layers=3)


@needs_transformers
def test_small_transformer_trains_and_generates():
    torch.manual_seed(0)
    v = 40
    model = build_model("transformer_small", vocab_size=v, d_model=64, ffn_dim=128, max_positions=32, dropout=0.0)
    assert is_seq2seq(model) and not is_seq2seq(build_model("resnet20"))
    wrapper = torch.nn.Module()
    wrapper.module = model
    assert is_seq2seq(wrapper)  # DDP / DeepSpeed style .module wrapper
    # a copy task: the target is the source; eos = 2 ends every sentence, pad = 0
    src = torch.randint(4, v, (8, 6))
    src[:, -1] = 2
    labels = src.clone()
    labels[:4, -3:] = -100  # shorter targets, padded with -100
    mask = torch.ones_like(src)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        out = model(input_ids=src, attention_mask=mask, labels=labels)
        assert out.logits.shape == (8, 6, v)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    # the model's loss is the token-mean cross-entropy over non -100 labels (independent check)
    with torch.no_grad():
        out = model(input_ids=src, attention_mask=mask, labels=labels)
        ref = F.cross_entropy(out.logits.reshape(-1, v), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, ref)
    assert losses[-1] < 0.5 * losses[0], losses
    model.eval()
    gen = model.generate(input_ids=src, attention_mask=mask, max_length=10)
    assert gen.shape[0] == 8 and gen.shape[1] <= 10
    assert torch.all(gen[:, 0] == model.config.decoder_start_token_id)
    assert ((gen == 2).any(1) | (gen.shape[1] == 10)).all()
