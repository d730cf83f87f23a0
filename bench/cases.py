"""Benchmark cases: real layer shapes per op. One function per op family
returns its cases; CASES is the registry run.py and test_bench.py use."""

from __future__ import annotations

import torch
import torch.nn.functional as TF

import torchfuse.functional as F

from harness import Case


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# ------------------------------------------------------------------ RMSNorm
# LLM token x hidden shapes: Llama-2/3 7-8B (4096), 13B (5120), 70B (8192) and
# a small model (1024).
RMS_SHAPES = [(4096, 4096), (8192, 5120), (2048, 8192), (16384, 1024)]


def _rms_inputs(M, N, residual):
    def make(device, dtype):
        g = torch.Generator(device="cpu").manual_seed(0)
        d = {
            "x": torch.randn(M, N, generator=g).to(device, dtype).requires_grad_(),
            "weight": (1 + 0.1 * torch.randn(N, generator=g)).to(device, dtype).requires_grad_(),
        }
        if residual:
            d["residual"] = torch.randn(M, N, generator=g).to(device, dtype).requires_grad_()
        return d

    return make


def _tf_rms(x, weight):
    return F.rms_norm(x, (x.shape[-1],), weight, 1e-6)


def _eager_rms(x, weight):
    return TF.rms_norm(x, (x.shape[-1],), weight, 1e-6)


def _tf_add_rms(x, residual, weight):
    return F.add_rms_norm(x, residual, (x.shape[-1],), weight, 1e-6)


def _eager_add_rms(x, residual, weight):
    summed = x + residual
    return TF.rms_norm(summed, (x.shape[-1],), weight, 1e-6), summed


def rms_norm_cases() -> list[Case]:
    cases = []
    for dtype in (torch.float32, torch.bfloat16):
        for residual in (False, True):
            for M, N in RMS_SHAPES:
                mn = M * N * _size(dtype)
                if residual:
                    # fwd: read x, residual; write out, summed. bwd: read dy,
                    # d(summed), summed; write dx (= d residual).
                    fwd, bwd = 4 * mn, 4 * mn
                else:
                    fwd, bwd = 2 * mn, 3 * mn  # read x, write out | read dy, x; write dx
                cases.append(Case(
                    op="add_rms_norm" if residual else "rms_norm",
                    name=f"{M}x{N}",
                    dtype=dtype,
                    make_inputs=_rms_inputs(M, N, residual),
                    torchfuse=_tf_add_rms if residual else _tf_rms,
                    eager=_eager_add_rms if residual else _eager_rms,
                    grad_inputs=("x", "residual", "weight") if residual else ("x", "weight"),
                    bytes_fwd=fwd,
                    bytes_bwd=bwd,
                ))
    return cases


# ---------------------------------------------------------------- GroupNorm
# 32 groups for the model shapes: Stable Diffusion UNet blocks (batch 2, CFG), the VAE
# decoder at batch 1 (its 512x512 full-resolution stage last: the slowest
# case), and a detection FPN/head (8x256x56x56). Eager baseline: F.group_norm
# (+ F.silu), the pattern every diffusion ResNet block runs. Last, a small
# convolutional stem's 16 channels in 4 groups: channels_last rows shorter
# than the CPU kernels' vector steps.
GN_SHAPES = [("sd-unet", 2, 1280, 16, 32), ("sd-unet", 2, 640, 32, 32),
             ("sd-unet", 2, 320, 64, 32), ("vae-dec", 1, 512, 64, 32),
             ("detection", 8, 256, 56, 32), ("vae-dec", 1, 128, 512, 32),
             ("stem", 8, 16, 128, 4)]


def _gn_inputs(N, C, HW, channels_last):
    def make(device, dtype):
        g = torch.Generator(device="cpu").manual_seed(0)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        return {
            "x": torch.randn(N, C, HW, HW, generator=g).to(device, dtype)
            .contiguous(memory_format=fmt).requires_grad_(),
            "weight": (1 + 0.1 * torch.randn(C, generator=g)).to(device, dtype).requires_grad_(),
            "bias": (0.1 * torch.randn(C, generator=g)).to(device, dtype).requires_grad_(),
        }

    return make


def _tf_gn(G, act):
    return lambda x, weight, bias: F.group_norm(x, G, weight, bias, 1e-5, act)


def _eager_gn(G, act):
    if act == "silu":
        return lambda x, weight, bias: TF.silu(TF.group_norm(x, G, weight, bias, 1e-5))
    return lambda x, weight, bias: TF.group_norm(x, G, weight, bias, 1e-5)


def group_norm_cases() -> list[Case]:
    cases = []
    for dtype in (torch.float32, torch.bfloat16):
        for label, N, C, HW, G in GN_SHAPES:
            for cl in (False, True):
                for act in (None, "silu"):
                    nbytes = N * C * HW * HW * _size(dtype)
                    tags = {"layout": "channels_last"} if cl else {}
                    if act:
                        tags["act"] = act
                    cases.append(Case(
                        op="group_norm", name=f"{label} {N}x{C}x{HW}x{HW} g={G}", dtype=dtype,
                        make_inputs=_gn_inputs(N, C, HW, cl), torchfuse=_tf_gn(G, act),
                        eager=_eager_gn(G, act), grad_inputs=("x", "weight", "bias"),
                        bytes_fwd=2 * nbytes,  # read x, write out
                        bytes_bwd=3 * nbytes,  # read dy, x; write dx
                        tags=tags,
                    ))
    return cases


# ----------------------------------------------------------- channel shuffle
# ShuffleNetV2 (1x) stage tails: cat of two halves, then channel_shuffle(., 2);
# ShuffleNetV1 stage-2 units with g = 3 (240 channels) and g = 8 (384).
SHUFFLE_V2 = [(116, 28), (232, 14), (464, 7)]
SHUFFLE_V1 = [(240, 28, 3), (384, 28, 8)]


def _shuffle_inputs(N, C, HW, pieces, channels_last):
    def make(device, dtype):
        g = torch.Generator(device="cpu").manual_seed(0)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        return {
            f"x{k}": torch.randn(N, C // pieces, HW, HW, generator=g).to(device, dtype)
            .contiguous(memory_format=fmt).requires_grad_()
            for k in range(pieces)
        }

    return make


def _tf_shuffle(groups):
    return lambda x0: F.channel_shuffle(x0, groups)


def _eager_shuffle(groups):
    return lambda x0: TF.channel_shuffle(x0, groups)


def _tf_cat_shuffle(x0, x1):
    return F.cat_shuffle([x0, x1], 2)


def _eager_cat_shuffle(x0, x1):
    return TF.channel_shuffle(torch.cat([x0, x1], dim=1), 2)


def _unit_inputs(N, C, HW, channels_last):
    """ShuffleNetV2's stride-1 unit tail: x (the unit's input, whose first
    half passes through) and y (the branch's output, C / 2 channels)."""
    def make(device, dtype):
        g = torch.Generator(device="cpu").manual_seed(0)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        return {k: torch.randn(N, c, HW, HW, generator=g).to(device, dtype)
                .contiguous(memory_format=fmt).requires_grad_()
                for k, c in (("x", C), ("y", C // 2))}

    return make


def _tf_unit_tail(x, y):
    return F.cat_shuffle([x.chunk(2, dim=1)[0], y], 2)


def _eager_unit_tail(x, y):
    return TF.channel_shuffle(torch.cat([x.chunk(2, dim=1)[0], y], dim=1), 2)


def channel_shuffle_cases() -> list[Case]:
    cases = []
    for dtype in (torch.float32, torch.bfloat16):
        for cl in (False, True):
            layout = {"layout": "channels_last"} if cl else {}
            shapes = [(N, C, HW, 2) for C, HW in SHUFFLE_V2 for N in (1, 64, 256)]
            shapes += [(N, C, HW, g) for C, HW, g in SHUFFLE_V1 for N in (1, 64)]
            for N, C, HW, groups in shapes:
                nbytes = N * C * HW * HW * _size(dtype)
                cases.append(Case(
                    op="channel_shuffle", name=f"{N}x{C}x{HW}x{HW} g={groups}", dtype=dtype,
                    make_inputs=_shuffle_inputs(N, C, HW, 1, cl),
                    torchfuse=_tf_shuffle(groups), eager=_eager_shuffle(groups),
                    grad_inputs=("x0",), bytes_fwd=2 * nbytes, bytes_bwd=2 * nbytes,
                    tags=dict(layout),
                ))
            for C, HW in SHUFFLE_V2:
                for N in (1, 64, 256):
                    nbytes = N * C * HW * HW * _size(dtype)
                    cases.append(Case(
                        op="cat_shuffle", name=f"{N}x({C // 2}+{C // 2})x{HW}x{HW} g=2",
                        dtype=dtype, make_inputs=_shuffle_inputs(N, C, HW, 2, cl),
                        torchfuse=_tf_cat_shuffle, eager=_eager_cat_shuffle,
                        grad_inputs=("x0", "x1"), bytes_fwd=2 * nbytes, bytes_bwd=2 * nbytes,
                        tags=dict(layout),
                    ))
            # the same with the first piece a chunk of the unit's input, as
            # torchvision's ShuffleNetV2 passes it (a view, rows C apart)
            for C, HW in SHUFFLE_V2:
                for N in (1, 64):
                    nbytes = N * C * HW * HW * _size(dtype)
                    cases.append(Case(
                        op="cat_shuffle", name=f"{N}x(chunk+{C // 2})x{HW}x{HW} g=2",
                        dtype=dtype, make_inputs=_unit_inputs(N, C, HW, cl),
                        torchfuse=_tf_unit_tail, eager=_eager_unit_tail,
                        grad_inputs=("x", "y"), bytes_fwd=2 * nbytes, bytes_bwd=2 * nbytes,
                        tags=dict(layout),
                    ))
    return cases


# ---------------------------------------------------------- response norms
# AlexNet (conv1/conv2 outputs) and GoogLeNet v1 (pre-/post-conv2) LRN inputs.
LRN_SHAPES = [("alexnet1", 96, 55), ("alexnet2", 256, 27), ("googlenet1", 64, 56),
              ("googlenet2", 192, 56)]
LRN_BATCHES = (1, 32, 128)


def _lrn_inputs(N, C, HW, cl=False):
    fmt = torch.channels_last if cl else torch.contiguous_format

    def make(device, dtype):
        g = torch.Generator(device="cpu").manual_seed(0)
        return {"x": torch.randn(N, C, HW, HW, generator=g).to(device, dtype)
                .contiguous(memory_format=fmt).requires_grad_()}

    return make


def _tf_lrn(x):
    return F.local_response_norm(x, 5, 1e-4, 0.75, 2.0)


def _eager_lrn(x):
    if x.device.type == "cpu" and x.dtype in (torch.float16, torch.bfloat16):
        # torch's CPU LRN (avg_pool3d) has no float16/bfloat16 kernel: the
        # user's workaround is a float32 round trip.
        return TF.local_response_norm(x.float(), 5, 1e-4, 0.75, 2.0).to(x.dtype)
    return TF.local_response_norm(x, 5, 1e-4, 0.75, 2.0)


def _tf_srn(x):
    return F.spatial_response_norm(x, 3, 5e-5, 0.75, 1.0)


def _eager_srn(x):
    # torch has no within-channel LRN: the composite a user would write
    # (zero pad, avg_pool2d of x^2, scale, pow, divide).
    div = TF.avg_pool2d(TF.pad(x * x, (1, 1, 1, 1)), 3, stride=1)
    return x / (1.0 + 5e-5 * div).pow(0.75)


def lrn_cases() -> list[Case]:
    cases = []
    # Contiguous input at every shape and batch; then channels_last input (what
    # a channels_last CNN hands the layer, where torch's composite runs on
    # channels_last tensors too) at AlexNet conv1 and GoogLeNet conv2, N = 1, 32.
    for cl, batches, shapes in ((False, LRN_BATCHES, LRN_SHAPES),
                                (True, LRN_BATCHES[:2], (LRN_SHAPES[0], LRN_SHAPES[3]))):
        for op, tf, eager in (("local_response_norm", _tf_lrn, _eager_lrn),
                              ("spatial_response_norm", _tf_srn, _eager_srn)):
            for dtype in (torch.float32, torch.bfloat16):
                for N in batches:
                    for label, C, HW in shapes:
                        nbytes = N * C * HW * HW * _size(dtype)
                        cases.append(Case(
                            op=op, name=f"{label} {N}x{C}x{HW}x{HW}", dtype=dtype,
                            make_inputs=_lrn_inputs(N, C, HW, cl), torchfuse=tf, eager=eager,
                            grad_inputs=("x",),
                            bytes_fwd=2 * nbytes,  # read x, write out
                            bytes_bwd=3 * nbytes,  # read dy, x; write dx
                            tags={"layout": "channels_last"} if cl else {},
                        ))
    return cases


# --------------------------------------------------- L2 / cosine normalization
# SSD300's conv4_3 L2Norm (N x 512 x 38 x 38, scale 20), embedding
# normalization along the last dim, 3-vectors (surface normals, directions:
# rows far shorter than a vector step), and a cosine classifier head.
SSD_BATCHES = (1, 8, 32)


def _l2_inputs(shape, weight_len):
    def make(device, dtype):
        g = torch.Generator(device="cpu").manual_seed(0)
        d = {"x": torch.randn(*shape, generator=g).to(device, dtype).requires_grad_()}
        if weight_len:
            d["weight"] = (20 + torch.randn(weight_len, generator=g)).to(device, dtype)
            d["weight"].requires_grad_()
        return d

    return make


def _tf_l2(x, weight):
    return F.l2_norm(x, weight, 1)


def _eager_l2(x, weight):  # torchvision's SSD: scale_weight.view(1, -1, 1, 1) * normalize(x)
    return weight.view(1, -1, 1, 1) * TF.normalize(x)


def _tf_normalize(x):
    return F.normalize(x, dim=-1)


def _eager_normalize(x):
    return TF.normalize(x, dim=-1)


def _cos_inputs(M, K, N_OUT):
    def make(device, dtype):
        g = torch.Generator(device="cpu").manual_seed(0)
        return {
            "x": torch.randn(M, K, generator=g).to(device, dtype).requires_grad_(),
            "weight": torch.randn(N_OUT, K, generator=g).to(device, dtype).requires_grad_(),
        }

    return make


def _tf_cos(x, weight):
    return F.cosine_linear(x, weight, None, 1e-8)


def _eager_cos(x, weight):
    return TF.linear(TF.normalize(x, dim=-1, eps=1e-8), TF.normalize(weight, dim=1, eps=1e-8))


def l2_norm_cases() -> list[Case]:
    cases = []
    for dtype in (torch.float32, torch.bfloat16):
        for n in SSD_BATCHES:
            nb = n * 512 * 38 * 38 * _size(dtype)
            cases.append(Case(
                op="l2_norm", name=f"ssd-conv4_3 {n}x512x38x38", dtype=dtype,
                make_inputs=_l2_inputs((n, 512, 38, 38), 512),
                torchfuse=_tf_l2, eager=_eager_l2, grad_inputs=("x", "weight"),
                bytes_fwd=2 * nb, bytes_bwd=3 * nb,  # read x, write out | read dy, x; write dx
            ))
        for label, (rows, d) in (("embeddings", (65536, 768)), ("3-vectors", (1048576, 3))):
            nb = rows * d * _size(dtype)
            cases.append(Case(
                op="normalize", name=f"{label} {rows}x{d} dim=-1", dtype=dtype,
                make_inputs=_l2_inputs((rows, d), 0),
                torchfuse=_tf_normalize, eager=_eager_normalize, grad_inputs=("x",),
                bytes_fwd=2 * nb, bytes_bwd=3 * nb,
            ))
    M, K, N_OUT = 256, 512, 10000
    sz = _size(torch.float32)
    cases.append(Case(
        op="cosine_linear", name=f"classifier {M}x{K}->{N_OUT}", dtype=torch.float32,
        make_inputs=_cos_inputs(M, K, N_OUT),
        torchfuse=_tf_cos, eager=_eager_cos, grad_inputs=("x", "weight"),
        # fwd: read x, w; write out. bwd: read dy, x, w; write dx, dw (GEMM-bound)
        bytes_fwd=(M * K + N_OUT * K + M * N_OUT) * sz,
        bytes_bwd=(M * N_OUT + 2 * (M * K + N_OUT * K)) * sz,
    ))
    return cases


# ------------------------------------------------------- Gram matrices / style
# Neural style transfer on a 256 x 256 image: the Gram matrices of VGG-19's
# relu1_1 .. relu5_1 features at batch 1 (Gatys et al.'s style layers), as
# gram_matrix and as the style loss against a fixed target.
VGG_STYLE = [("relu1_1", 64, 256), ("relu2_1", 128, 128), ("relu3_1", 256, 64),
             ("relu4_1", 512, 32), ("relu5_1", 512, 16)]


def _gram_inputs(C, HW, channels_last, target):
    def make(device, dtype):
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(1, C, HW, HW, generator=g).to(device, dtype)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        d = {"x": x.requires_grad_()}
        if target:
            y = torch.randn(1, C, HW * HW, generator=g)
            d["target"] = (y @ y.transpose(1, 2) / (C * HW * HW))[0].to(device)
        return d

    return make


def _tf_gram(x):
    return F.gram_matrix(x)


def _eager_gram(x):  # what style-transfer code writes
    n, c = x.shape[0], x.shape[1]
    f = x.reshape(n, c, -1)
    return torch.bmm(f, f.transpose(1, 2)) / (c * f.shape[2])


def _tf_style(x, target):
    return F.style_loss(x, target)


def _eager_style(x, target):
    g = _eager_gram(x)
    return TF.mse_loss(g, target.to(g.dtype).expand_as(g))


def gram_cases() -> list[Case]:
    cases = []
    for dtype in (torch.float32, torch.bfloat16):
        for layer, C, HW in VGG_STYLE:
            nx = C * HW * HW * _size(dtype)
            ng = C * C * _size(dtype)
            for op, tf, eager, target in (("gram_matrix", _tf_gram, _eager_gram, False),
                                          ("style_loss", _tf_style, _eager_style, True)):
                cases.append(Case(
                    op=op, name=f"vgg19-{layer} 1x{C}x{HW}x{HW}", dtype=dtype,
                    make_inputs=_gram_inputs(C, HW, False, target),
                    torchfuse=tf, eager=eager, grad_inputs=("x",),
                    # GEMM-bound: the bytes are those of reading x once (and
                    # the C x C matrices), a floor far below the FLOPs' time
                    bytes_fwd=nx + ng, bytes_bwd=2 * nx + ng,
                ))
        C, HW = 256, 64
        nx = C * HW * HW * _size(dtype)
        cases.append(Case(
            op="style_loss", name=f"vgg19-relu3_1 1x{C}x{HW}x{HW}", dtype=dtype,
            make_inputs=_gram_inputs(C, HW, True, True),
            torchfuse=_tf_style, eager=_eager_style, grad_inputs=("x",),
            bytes_fwd=nx + C * C * _size(dtype), bytes_bwd=2 * nx + C * C * _size(dtype),
            tags={"layout": "channels_last"},
        ))
    return cases


# ------------------------------------------------------------- convolutions
# (label, N, Cin, HW, Cout, kernel, stride, padding, dilation, groups,
# shuffle): the grouped, depthwise and dilated layers of the networks that
# use them, at training batch sizes (and one at batch 1).
CONV_SHAPES = [
    ("shufflenetv2-dw", 32, 116, 28, 116, 3, 1, 1, 1, 116, 1),
    ("shufflenetv2-dw", 1, 232, 14, 232, 3, 1, 1, 1, 232, 1),
    ("mobilenetv2-dw-s2", 32, 144, 56, 144, 3, 2, 1, 1, 144, 1),
    ("mobilenetv2-dw-s2", 32, 576, 14, 576, 3, 2, 1, 1, 576, 1),
    ("mobilenetv2-dw", 32, 384, 14, 384, 3, 1, 1, 1, 384, 1),
    ("shufflenetv1-g3-gconv+shuffle", 32, 240, 28, 240, 1, 1, 0, 1, 3, 3),
    ("shufflenetv1-g8-gconv+shuffle", 32, 384, 28, 96, 1, 1, 0, 1, 8, 8),
    ("resnext50-32x4d-stage2", 16, 256, 28, 256, 3, 1, 1, 1, 32, 1),
    ("resnext50-32x4d-stage3", 16, 512, 14, 512, 3, 1, 1, 1, 32, 1),
    ("resnext50-32x4d-stage4", 16, 1024, 7, 1024, 3, 1, 1, 1, 32, 1),
    ("regnetx-1.6gf-gw24", 32, 168, 28, 168, 3, 1, 1, 1, 7, 1),
    ("deeplabv3-layer4-atrous", 1, 512, 33, 512, 3, 1, 2, 2, 1, 1),
    ("drn-d-dilated2", 8, 256, 28, 256, 3, 1, 2, 2, 1, 1),
]
# also run with channels_last input (what a channels_last CNN hands them)
CONV_CHANNELS_LAST = ("mobilenetv2-dw",)


def _conv_inputs(N, C, HW, Co, k, groups, channels_last=False):
    def make(device, dtype):
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(N, C, HW, HW, generator=g).to(device, dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        w = (torch.randn(Co, C // groups, k, k, generator=g) / (C // groups * k * k) ** 0.5)
        b = torch.randn(Co, generator=g)
        return {"x": x.requires_grad_(), "weight": w.to(device, dtype).requires_grad_(),
                "bias": b.to(device, dtype).requires_grad_()}

    return make


def _conv_fns(stride, padding, dilation, groups, shuffle):
    def tf(x, weight, bias):
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups, shuffle)

    def eager(x, weight, bias):  # the convolution, then the shuffle's copy
        y = TF.conv2d(x, weight, bias, stride, padding, dilation, groups)
        return TF.channel_shuffle(y, shuffle) if shuffle > 1 else y

    return tf, eager


def conv_cases() -> list[Case]:
    cases = []
    for dtype in (torch.float32, torch.bfloat16):
        sz = _size(dtype)
        for label, N, C, HW, Co, k, s, p, d, g, sh in CONV_SHAPES:
            ohw = (HW + 2 * p - d * (k - 1) - 1) // s + 1
            nx, ny = N * C * HW * HW * sz, N * Co * ohw * ohw * sz
            nw = Co * C // g * k * k * sz
            tf, eager = _conv_fns(s, p, d, g, sh)
            for cl in (False, True) if label.startswith(CONV_CHANNELS_LAST) else (False,):
                cases.append(Case(
                    op="conv2d", name=f"{label} {N}x{C}x{HW}x{HW}->{Co}", dtype=dtype,
                    make_inputs=_conv_inputs(N, C, HW, Co, k, g, cl),
                    torchfuse=tf, eager=eager, grad_inputs=("x", "weight", "bias"),
                    # fwd: read x, w; write y. bwd: read dy, x, w; write dx, dw.
                    # A floor for the depthwise and 1x1 ones; the dense and
                    # grouped 3x3 ones are bound by their FLOPs
                    bytes_fwd=nx + nw + ny, bytes_bwd=ny + 2 * nx + 2 * nw,
                    tags={"layout": "channels_last"} if cl else {},
                ))
    return cases


CASES: list[Case] = [
    *rms_norm_cases(),
    *group_norm_cases(),
    *channel_shuffle_cases(),
    *lrn_cases(),
    *l2_norm_cases(),
    *gram_cases(),
    *conv_cases(),
]
